"""The reliability recorder: a pytest plugin (its hooks are imported by tests/conftest.py).

Every test of a fault or a bad input tried on purpose carries the `reliability` marker:

    @pytest.mark.reliability(category="corpus", case="non-UTF-8 file {name}", lost="nothing")

`case` may name the test's parameters (`{name}`); each parametrized case is recorded on its own.
`happened` says what the test checks happened (default: the bad-input contract, HAPPENED_BAD_INPUT).
A test that tries its fault several times says how often with the `reliability_tries` fixture.

At the end of a run the counts per category are printed, and the outcomes are merged into
`.reliability.json` in the repository root (git-ignored; $ORCH_RELIABILITY_JSON elsewhere): each
case keeps how many runs it had, how many passed, how many times its fault was tried. Running the
test files one at a time adds up; delete the file for a fresh tally. `python
scripts/reliability_report.py` turns it into docs/RELIABILITY.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JSON_ENV = "ORCH_RELIABILITY_JSON"
JSON_NAME = ".reliability.json"
FORMAT_VERSION = 1
HAPPENED_BAD_INPUT = "refused in one line naming the value and the fix; exit 2; no traceback"

_RESULTS = pytest.StashKey[dict]()  # nodeid -> this run's outcome of a marked test
_TRIES = pytest.StashKey[int]()  # on an item: how many times its test tried the fault
_PROPERTY = "reliability"  # the name of a marked test's case in its reports' user_properties
_CONFIG: list[pytest.Config] = []  # this process's pytest config (logreport hooks get no config)


def json_path() -> Path:
    return Path(os.environ.get(JSON_ENV) or REPO / JSON_NAME)


def _case_name(item: pytest.Item, template: str) -> str:
    """The marker's case, with the test's parameters filled in, or its parameter id appended."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return template
    try:
        named = template.format(**callspec.params)
    except (KeyError, IndexError, ValueError):
        named = template
    return named if named != template else f"{template} [{callspec.id}]"


@pytest.fixture
def reliability_tries(request):
    """`reliability_tries(n)`: this test tried its fault n times (default 1)."""

    def tried(n: int) -> None:
        request.node.stash[_TRIES] = int(n)

    return tried


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = {}
    _CONFIG[:] = [config]


def pytest_runtest_logreport(report) -> None:
    """Runs where reports are tallied: the pytest process, or pytest-xdist's controller."""
    if _CONFIG:
        tally(_CONFIG[0].stash[_RESULTS], report)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """A marked test's case rides on each of its reports (`user_properties`), which pytest-xdist
    carries from its workers to the controller that tallies and writes them."""
    outcome = yield
    marker = item.get_closest_marker("reliability")
    if marker is None:
        return
    kw = marker.kwargs
    case = {"category": kw.get("category", "uncategorised"), "case": _case_name(item, kw.get("case", item.name)),
            "lost": kw.get("lost", "nothing"), "happened": kw.get("happened", HAPPENED_BAD_INPUT)}
    report = outcome.get_result()
    if report.when == "teardown":
        case["tries"] = item.stash.get(_TRIES, 1)
    report.user_properties.append((_PROPERTY, case))


def tally(results: dict, report) -> None:
    """Add one report of a marked test (setup, call or teardown) to `results` (nodeid -> outcome)."""
    case = next((value for name, value in report.user_properties if name == _PROPERTY), None)
    if case is None:
        return
    entry = results.setdefault(report.nodeid, {**{k: case[k] for k in ("category", "case", "lost", "happened")},
                                               "outcome": "passed", "duration_s": 0.0})
    entry["duration_s"] = round(entry["duration_s"] + report.duration, 3)
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] != "failed":
        entry["outcome"] = "skipped"
    if report.when == "teardown":
        entry["tries"] = case.get("tries", 1)


def merge(old: dict, session: dict, now: float | None = None) -> dict:
    """The recorded tally `old` (the JSON file's content, or {}) with one run's outcomes added."""
    now = time.time() if now is None else now
    cases = dict(old.get("cases") or {})
    for nodeid, r in session.items():
        c = dict(cases.get(nodeid) or {"runs": 0, "passed": 0, "failed": 0, "skipped": 0, "tries": 0})
        c.update(category=r["category"], case=r["case"], lost=r["lost"], happened=r["happened"],
                 last=r["outcome"], duration_s=r["duration_s"], at=now)
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
        if r["outcome"] != "skipped":
            c["runs"] += 1
            c["tries"] += r.get("tries", 1)
        cases[nodeid] = c
    return {"format_version": FORMAT_VERSION, "updated_at": now, "cases": dict(sorted(cases.items()))}


def _write(path: Path, session: dict) -> None:
    """Merge this run into the JSON file, under a lock (another run may finish at the same time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(merge(old, session), indent=1) + "\n")
        os.replace(tmp, path)


def pytest_sessionfinish(session: pytest.Session) -> None:
    results = session.config.stash.get(_RESULTS, {})
    if results and not hasattr(session.config, "workerinput"):  # (an xdist worker: its controller writes)
        _write(json_path(), results)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, {})
    if not results:
        return
    by_category: dict[str, Counter] = {}
    for r in results.values():
        by_category.setdefault(r["category"], Counter())[r["outcome"]] += 1
    tr = terminalreporter
    tr.write_sep("=", "reliability: faults and bad inputs tried")
    width = max(len(c) for c in by_category)
    for category in sorted(by_category, key=lambda c: (c.startswith("fault"), c)):
        n = by_category[category]
        skipped = f", {n['skipped']} skipped" if n["skipped"] else ""
        tr.write_line(f"{category:<{width}}  {sum(n.values()):>3} cases: {n['passed']} passed, "
                      f"{n['failed']} failed{skipped}")
    total = sum((c for c in by_category.values()), Counter())
    tr.write_line(f"{'total':<{width}}  {sum(total.values()):>3} cases: {total['passed']} passed, "
                  f"{total['failed']} failed; merged into {json_path()} "
                  f"(`python scripts/reliability_report.py` writes docs/RELIABILITY.md)")
