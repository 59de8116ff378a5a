"""The reliability recorder (tests/reliability.py) and its report (scripts/reliability_report.py):
tallies add up over runs, the report shows every case and any failure, and every test of the
bad-input catalogue is marked so that it is counted."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
from pathlib import Path

import pytest

from tests.reliability import HAPPENED_BAD_INPUT, merge

REPO = Path(__file__).resolve().parents[2]


def _report_module():
    spec = importlib.util.spec_from_file_location("reliability_report", REPO / "scripts" / "reliability_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outcome(outcome: str, category: str = "corpus", case: str = "binary junk", tries: int = 1) -> dict:
    return {"category": category, "case": case, "lost": "nothing", "happened": HAPPENED_BAD_INPUT,
            "outcome": outcome, "duration_s": 0.5, "tries": tries}


def test_runs_add_up_and_a_skip_is_not_a_run():
    tally = merge({}, {"t::a": _outcome("passed"), "t::b": _outcome("passed", case="kill -9", tries=20)}, now=1.0)
    tally = merge(tally, {"t::a": _outcome("failed"), "t::b": _outcome("skipped", case="kill -9")}, now=2.0)
    a, b = tally["cases"]["t::a"], tally["cases"]["t::b"]
    assert (a["runs"], a["passed"], a["failed"], a["tries"], a["last"]) == (2, 1, 1, 2, "failed")
    assert (b["runs"], b["passed"], b["skipped"], b["tries"], b["last"]) == (1, 1, 1, 20, "skipped")
    assert tally["updated_at"] == 2.0


def test_report_has_a_table_per_category_the_totals_and_the_command():
    report = _report_module()
    tally = merge({}, {
        "t::a": _outcome("passed", case="a | pipe"),
        "t::b": _outcome("failed", case="truncated shard", category="dataset"),
        "t::c": _outcome("passed", case="kill -9", category="fault: training", tries=3),
    }, now=0.0)
    text = report.render(tally)
    assert "## corpus" in text and "## dataset" in text and "## fault: training" in text
    assert text.index("## dataset") < text.index("## fault: training")  # bad input first, then faults
    assert "a \\| pipe" in text  # a '|' in a case does not break the table
    assert "3 cases in 3 categories; 5 tries in 3 test runs; 2 of 3 cases passed every run; 1 FAILED" in text
    failed_row = next(line for line in text.splitlines() if line.startswith("| truncated shard"))
    assert "**FAILED** 1/1" in failed_row and "unknown (the test failed)" in failed_row
    assert report.COMMAND in text


def test_report_script_writes_the_file(tmp_path):
    report = _report_module()
    tally = tmp_path / "tally.json"
    tally.write_text(json.dumps(merge({}, {"t::a": _outcome("passed")})))
    assert report.main(["--json", str(tally), "--out", str(tmp_path / "R.md"), "--no-collect"]) == 0
    assert "binary junk" in (tmp_path / "R.md").read_text()
    assert report.main(["--json", str(tmp_path / "missing.json"), "--out", str(tmp_path / "R2.md")]) == 2


def test_report_drops_removed_tests_and_lists_marked_ones_never_run():
    report = _report_module()
    tally = merge({}, {"t::gone": _outcome("passed", case="renamed since"), "t::a": _outcome("passed")}, now=0.0)
    text = report.render(tally, marked=["t::a", "t::never"])
    assert "renamed since" not in text and "binary junk" in text
    assert "## Not in this tally" in text and "- `t::never`" in text


@pytest.mark.parametrize("module", ["test_bad_input", "test_bad_data", "test_bad_checkpoints", "test_destinations"])
def test_every_catalogue_test_is_recorded(module):
    mod = importlib.import_module(f"tests.integration.{module}")
    tests = [f for name, f in inspect.getmembers(mod, inspect.isfunction)
             if name.startswith("test_") and f.__module__ == mod.__name__]
    unmarked = [f.__name__ for f in tests if not any(m.name == "reliability" for m in getattr(f, "pytestmark", []))]
    assert tests and not unmarked
