"""The selftest itself, on a tiny stand-in gate with known answers (seconds, no model).

The stand-in gate has one case per behaviour: one that fails only when `router.skip_renorm` is
planted (with a hypothesis property, so a minimal example exists), one that never fails. The
selftest must name the catching case, report a fault nothing catches as survived (exit 1), and
refuse to go on when the clean run already fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from verifier.selftest import case_files, case_function
from verifier.selftest_events import falsifying_example

CONFTEST = """
from hypothesis import settings
settings.register_profile("ci", max_examples=50, derandomize=True, deadline=None)

def pytest_addoption(parser):
    parser.addoption("--failpoints", default="")
"""

ROUTER_CASES = """
from hypothesis import given, strategies as st

@given(st.integers(0, 1000))
def test_weights_sum_to_one(request, x):
    assert not (x >= 10 and "router.skip_renorm" in request.config.getoption("--failpoints"))

def test_never_fails():
    pass
"""


def stand_in_gate(root: Path, broken: bool = False) -> Path:
    cases = root / "cases"
    cases.mkdir()
    (cases / "conftest.py").write_text(CONFTEST)
    (cases / "test_router.py").write_text(textwrap.dedent(ROUTER_CASES))
    (cases / "test_graph.py").write_text("def test_graph():\n    assert " + ("False" if broken else "True") + "\n")
    return cases


def selftest(cases: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = cases.parent / "selftest.json"
    proc = subprocess.run([sys.executable, "-m", "verifier.selftest", "--cases", str(cases), "--json", str(out), *args],
                          capture_output=True, text=True, timeout=300)
    return proc, json.loads(out.read_text()) if out.exists() else {}


def test_selftest_names_the_case_that_catches_and_flags_a_survivor(tmp_path):
    proc, doc = selftest(stand_in_gate(tmp_path), "--only", "router.skip_renorm", "graph.round_down")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # graph.round_down survives the stand-in gate
    found = {entry["failpoint"]: entry for entry in doc["failpoints"]}
    renorm = found["router.skip_renorm"]
    assert renorm["caught"] and renorm["caught_by"].endswith("test_router.py::test_weights_sum_to_one")
    assert renorm["example"].startswith("test_weights_sum_to_one(") and "x=10" in renorm["example"]  # shrunk
    assert renorm["reproduce"] == f"python -m pytest '{renorm['caught_by']}' --failpoints router.skip_renorm"
    assert not found["graph.round_down"]["caught"] and "passed" in found["graph.round_down"]["note"]
    assert doc["clean_run"]["note"] == "clean gate passed"
    assert doc["summary"]["caught"] == 1 and doc["summary"]["planted"] == 2
    assert proc.stdout.splitlines()[-1] == "selftest: 1 passed, 1 failed"


def test_selftest_stops_on_a_false_alarm(tmp_path):
    proc, doc = selftest(stand_in_gate(tmp_path, broken=True), "--only", "router.skip_renorm")
    assert proc.returncode == 1
    assert "FALSE ALARM" in proc.stdout and "planting" not in proc.stdout


def test_selftest_refuses_an_unknown_failpoint(tmp_path):
    proc, _ = selftest(stand_in_gate(tmp_path), "--only", "router.no_such_fault")
    assert proc.returncode == 2 and "error: selftest: unknown failpoint(s) router.no_such_fault" in proc.stderr


def test_a_faults_own_area_runs_first(tmp_path):
    cases = stand_in_gate(tmp_path)
    assert case_files("graph", cases) == ["test_graph.py", "test_router.py"]
    assert case_files("router", cases) == ["test_router.py", "test_graph.py"]
    assert case_files(None, cases) == ["test_router.py", "test_graph.py"]  # GATE_ORDER: router first


def test_falsifying_example_is_read_from_the_failure_text():
    text = "E   AssertionError\nFalsifying example: test_x(\n    n=3,\n)\nmore"
    assert falsifying_example(text) == "test_x( n=3, )"
    assert falsifying_example("AssertionError: plain failure") == ""
    runner = "Falsifying example: test_y(\n    runner=<engine.X object at 0x7f00>,\n    n=2,\n)"
    assert falsifying_example(runner) == "test_y( n=2, )"


def test_every_file_the_selftest_orders_exists():
    from verifier.selftest import AREA_FIRST, CASES, GATE_ORDER

    named = set(GATE_ORDER) | {f for files in AREA_FIRST.values() for f in files}
    assert sorted(f for f in named if not (CASES / f).exists()) == []


SECOND_CASES = """
import pytest

@pytest.mark.parametrize("rows", [1, 2])
def test_weights_again(request, rows):
    assert "router.skip_renorm" not in request.config.getoption("--failpoints")
"""


def test_census_runs_to_the_end_and_records_every_failing_case(tmp_path):
    cases = stand_in_gate(tmp_path, broken=True)  # test_graph.py fails, but is not among --files
    (cases / "test_second.py").write_text(textwrap.dedent(SECOND_CASES))
    table = tmp_path / "census.md"
    proc, doc = selftest(cases, "--census", "--only", "router.skip_renorm", "--files", "test_router.py",
                         "test_second.py", "--markdown", str(table))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the clean run of those two files passed
    [renorm] = doc["failpoints"]
    assert [n.split("/")[-1] for n in renorm["detectors"]] == [
        "test_router.py::test_weights_sum_to_one", "test_second.py::test_weights_again[1]",
        "test_second.py::test_weights_again[2]"]
    assert renorm["files"] == ["test_router.py", "test_second.py"]
    # Not shrunk: hypothesis stops at the first failing draw instead of walking down to x=10.
    assert renorm["example"].startswith("test_weights_sum_to_one(") and "x=10," not in renorm["example"]
    assert ("| router.skip_renorm | 2 | 2 | test_router.py::test_weights_sum_to_one, "
            "test_second.py::test_weights_again |") in table.read_text()


def test_a_case_counts_once_whatever_its_parameters_and_xdist_group():
    assert case_function("cases/test_g.py::test_x[a-b]@graph-a") == "cases/test_g.py::test_x"
    assert case_function("cases/test_g.py::test_y@ranks") == "cases/test_g.py::test_y"
    assert case_function("cases/test_g.py::test_z") == "cases/test_g.py::test_z"
