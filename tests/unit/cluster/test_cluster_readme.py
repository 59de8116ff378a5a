"""The cluster docs are a path a user can follow: README.md's "From laptop to cluster" and
cluster/README.md. Each `python -m TOOL` a block runs is installed by an earlier line of the same
page (or comes with orch's client install), each file they name exists, and each `orch` subcommand
they type is one the CLI has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
# modules `python -m` may run without an install line: the standard library's and orch's own
PRESENT = {"venv", "pip", "orchestrator", "json", "http"}
PACKAGE_OF = {"build": "build"}  # module -> the distribution that brings it
# commands that orch's client install does not bring -> the distribution that does
COMMAND_OF = {"ray": "ray", "aws": "awscli"}


def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:end if end > 0 else None]


def _pages() -> dict[str, str]:
    readme = (REPO / "README.md").read_text()
    return {"README.md#from-laptop-to-cluster": _section(readme, "## From laptop to cluster"),
            "cluster/README.md": (REPO / "cluster" / "README.md").read_text()}


def _commands(page: str) -> list[str]:
    """The shell lines of the page's bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", page, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.extend(part.strip() for part in re.split(r"&&|;", line))
    return lines


@pytest.mark.parametrize("name", list(_pages()))
def test_each_python_m_tool_is_installed_before_it_runs(name):
    installed: set[str] = set()
    for cmd in _commands(_pages()[name]):
        if re.match(r"^pip install\b", cmd):
            installed |= {re.split(r"[=<>\[]", a)[0].strip('"') for a in cmd.split()[2:] if not a.startswith("-")}
        tool = cmd.split()[0] if cmd.split() else ""
        if tool in COMMAND_OF:  # (the client is orch's wheel alone: no Ray, no AWS CLI)
            assert COMMAND_OF[tool] in installed, (
                f"{name}: `{cmd}` runs {tool}, which no earlier line installs (pip install {COMMAND_OF[tool]})")
        for module in re.findall(r"python -m ([\w.]+)", cmd):
            top = module.split(".")[0]
            if top not in PRESENT:
                package = PACKAGE_OF.get(top, top)
                assert package in installed, (
                    f"{name}: `{cmd}` runs {top}, which no earlier line installs (pip install {package})")


@pytest.mark.parametrize("name", list(_pages()))
def test_each_file_the_docs_name_exists(name):
    page = _pages()[name]
    paths = set(re.findall(r"(?<![\w/.~])((?:cluster|scripts|tests/data)/[\w./-]*\w)", page))
    assert paths, name
    missing = sorted(p for p in paths if not (REPO / p).exists() and not any(REPO.glob(p)))
    assert missing == [], f"{name} names files that do not exist: {missing}"


@pytest.mark.parametrize("name", list(_pages()))
def test_each_orch_command_is_one_the_cli_has(name):
    from orchestrator.cli.main import build_parser

    parser = build_parser()
    choices = next(a.choices for a in parser._actions if getattr(a, "choices", None) and isinstance(a.choices, dict))
    used = {m for cmd in _commands(_pages()[name]) for m in re.findall(r"(?:^|\s)orch (\w[\w-]*)", cmd)}
    assert used and used <= set(choices), (name, sorted(used - set(choices)))
