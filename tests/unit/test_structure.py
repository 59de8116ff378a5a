"""The code's shape, checked: the linter passes, functions stay short, the CLI starts light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 80


def test_ruff_passes():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_function_in_orchestrator_is_over_80_lines():
    long = []
    for path in sorted((REPO / "orchestrator").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 80 lines: " + ", ".join(long)


def test_the_cli_imports_no_heavy_library():
    """`orch --help` and the one-line errors must not wait for torch, Ray, DeepSpeed, Hydra or pyarrow."""
    code = ("import sys, orchestrator.cli.main; heavy = [m for m in ('torch', 'ray', 'deepspeed', 'hydra', 'wandb', "
            "'pyarrow') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# ------------------------------------------------------------------------------ import contract
# The layers of ARCHITECTURE.md, top to bottom. A module may import its own package and the layers
# below its own, never one above; packages on one line are independent of each other. Imports made
# inside functions (lazy ones) count: they are dependencies all the same.
LAYERS = [
    ["orchestrator.__main__"],
    ["orchestrator.cli"],
    ["orchestrator.service"],
    ["orchestrator.execution"],
    ["orchestrator.jobs", "orchestrator.raycluster"],
    ["orchestrator.train"],
    ["orchestrator.data", "orchestrator.artifacts", "orchestrator.joblogs"],
    ["orchestrator.checkpoint", "orchestrator.workspace"],
    ["orchestrator.config"],
    ["orchestrator.storage"],
    ["orchestrator.constants", "orchestrator.errors", "orchestrator.conf", "orchestrator"],
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every orchestrator/model module `path` imports (`from orchestrator import x` names orchestrator.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("orchestrator", "model")}


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for root in ("orchestrator", "model") for p in (REPO / root).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _layer(module: str) -> tuple[int, str]:
    """(layer index, package) of a module: the longest package prefix listed in LAYERS."""
    best = None
    for i, packages in enumerate(LAYERS):
        for pkg in packages:
            if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(best[1])):
                best = (i, pkg)
    assert best is not None, f"{module} is in no layer of LAYERS: add it"
    return best


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in _import_graph().items():
        if not module.startswith("orchestrator"):
            continue
        mine, my_pkg = _layer(module)
        for target in targets:
            if target.startswith("model"):
                continue
            theirs, their_pkg = _layer(target)
            if theirs < mine or (theirs == mine and their_pkg != my_pkg and their_pkg != "orchestrator"):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers (ARCHITECTURE.md): " + ", ".join(sorted(wrong))


def test_model_imports_nothing_of_orchestrator():
    graph = _import_graph()
    wrong = [f"{m} -> {t}" for m, ts in graph.items() if m.startswith("model")
             for t in ts if t.startswith("orchestrator")]
    assert not wrong, wrong


def test_no_import_circle():
    graph = _import_graph()
    seen, on_path, circles = set(), [], []

    def visit(module: str) -> None:
        if module in on_path:
            circles.append(" -> ".join(on_path[on_path.index(module):] + [module]))
            return
        if module in seen:
            return
        seen.add(module)
        on_path.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        on_path.pop()

    for module in sorted(graph):
        visit(module)
    assert not circles, "import circles: " + "; ".join(circles)


def test_no_private_name_is_imported_across_modules():
    wrong = []
    for path in sorted((REPO / "orchestrator").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("orchestrator"):
                wrong += [f"{path.relative_to(REPO)}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not wrong, wrong


def test_every_package_has_its_init():
    folders = [d for root in ("orchestrator", "model") for d in [REPO / root, *(REPO / root).rglob("*")]]
    missing = [str(d.relative_to(REPO)) for d in folders
               if d.is_dir() and not d.is_symlink() and d.name != "__pycache__" and any(d.glob("*.py"))
               and not (d / "__init__.py").exists()]
    assert not missing, missing


def test_unit_tests_mirror_the_packages():
    """tests/unit/<package>/ for each package of orchestrator/ (and model/, and cluster/ for the cluster
    files); the few flat modules' tests and the checks of the whole tree stay at tests/unit/."""
    packages = {p.name for p in (REPO / "orchestrator").iterdir()
                if (p / "__init__.py").exists() and not p.is_symlink()}
    folders = {p.name for p in (REPO / "tests" / "unit").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders - packages <= {"model", "cluster"}, sorted(folders - packages)
    assert all((REPO / "tests" / "unit" / f / "__init__.py").exists() for f in folders)
