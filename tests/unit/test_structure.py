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
    code = ("import sys, orchestrator.cli; heavy = [m for m in ('torch', 'ray', 'deepspeed', 'hydra', 'wandb', "
            "'pyarrow') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
