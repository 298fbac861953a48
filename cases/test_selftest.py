"""The selftest itself, on a tiny stand-in gate with known answers (seconds, no model).

The stand-in gate has one case per behaviour: one that fails only when `router.skip_renorm` is
planted (with a hypothesis property, so a minimal example exists), one that never fails. The
selftest must name the catching case, report a fault nothing catches as survived (exit 1), and
refuse to go on when the clean run already fails. Only the failed check (call phase) of a case
that passed on clean code is a catch: a set-up error is named, never counted, and with
`--skip-clean` the clean run's gate report says which cases passed.

Hypothesis' example is read from the exception's notes where the case ran. The cases below feed
the hook both wordings seen so far (6.155: "Falsifying example: ...", 6.170: "Failing test case:
..."; both as notes), groups of failures, and a report sent through pytest's serialisation as
xdist sends it; the stand-in runs read it from whatever hypothesis is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from nested import nested_env

from verifier import selftest_events
from verifier.selftest import case_files, case_function
from verifier.selftest import main as selftest_main
from verifier.selftest_events import EXAMPLE

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


def refusal(capsys, cases: Path, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of a selftest that stops at its arguments, run in this process: no
    interpreter start for a run that plants nothing (the entry point's exits are the other cases')."""
    code = selftest_main(["--cases", str(cases), *args])
    return code, capsys.readouterr().err


def selftest(cases: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = cases.parent / "selftest.json"
    proc = subprocess.run([sys.executable, "-m", "verifier.selftest", "--cases", str(cases), "--json", str(out), *args],
                          capture_output=True, text=True, timeout=300, env=nested_env())
    return proc, json.loads(out.read_text()) if out.exists() else {}


# The three ON_ONE_WORKER cases (further down) read one selftest of the stand-in with
# test_phases.py beside it and SKIPPED_CLEAN as its test_graph.py, run as CI runs it:
# `--skip-clean` with the gate report of a clean pytest run (one clean run, four planted runs), on
# one xdist worker so that it runs once.
# The selftest's own clean run is the census case's and the false-alarm case's.
ON_ONE_WORKER = pytest.mark.xdist_group("selftest-stand-in")


@pytest.fixture(scope="module")
def four_faults(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """router.skip_renorm (a failed check: caught), kv.stale_block_table (only a case that had not
    passed clean fails: survives), graph.round_down (a set-up error: no catch), kv.slot_off_by_one
    (a failed check, then a teardown error: caught) on the stand-in gate plus PHASE_CASES, with
    test_graph.py skipped clean and failing whatever is planted."""
    cases = stand_in_gate(tmp_path_factory.mktemp("selftest"))
    (cases / "test_phases.py").write_text(textwrap.dedent(PHASE_CASES))
    (cases / "test_graph.py").write_text(textwrap.dedent(SKIPPED_CLEAN))
    return selftest(cases, "--skip-clean", "--clean-report", str(clean_report(cases)), "--only", "router.skip_renorm",
                    "kv.stale_block_table", "graph.round_down", "kv.slot_off_by_one")


@ON_ONE_WORKER
def test_selftest_names_the_case_that_catches_and_flags_a_survivor(four_faults):
    proc, doc = four_faults
    assert proc.returncode == 1, proc.stdout + proc.stderr  # kv.stale_block_table survives the stand-in gate
    found = {entry["failpoint"]: entry for entry in doc["failpoints"]}
    renorm = found["router.skip_renorm"]
    assert renorm["caught"] and renorm["caught_by"].endswith("test_router.py::test_weights_sum_to_one")
    assert renorm["example"].startswith("test_weights_sum_to_one(") and "x=10" in renorm["example"]  # shrunk
    assert renorm["reproduce"] == f"python -m pytest '{renorm['caught_by']}' --failpoints router.skip_renorm"
    stale = found["kv.stale_block_table"]
    assert not stale["caught"] and stale["note"].startswith("no check failed with the fault planted; not catches: ")
    assert "test_graph.py::test_graph failed, but had not passed on clean code; log " in stale["note"]
    assert doc["summary"]["caught"] == 2 and doc["summary"]["planted"] == 4
    assert proc.stdout.splitlines()[-1] == "selftest: 2 passed, 2 failed"


def test_selftest_stops_on_a_false_alarm(tmp_path):
    proc, doc = selftest(stand_in_gate(tmp_path, broken=True), "--only", "router.skip_renorm")
    assert proc.returncode == 1
    assert "FALSE ALARM" in proc.stdout and "planting" not in proc.stdout


def test_selftest_refuses_an_unknown_failpoint(tmp_path, capsys):
    code, err = refusal(capsys, stand_in_gate(tmp_path), "--only", "router.no_such_fault")
    assert code == 2 and "error: selftest: unknown failpoint(s) router.no_such_fault" in err


def test_a_faults_own_area_runs_first(tmp_path):
    cases = stand_in_gate(tmp_path)
    assert case_files("graph", cases) == ["test_graph.py", "test_router.py"]
    assert case_files("router", cases) == ["test_router.py", "test_graph.py"]
    assert case_files(None, cases) == ["test_router.py", "test_graph.py"]  # GATE_ORDER: router first


def noted(error: BaseException, *notes: str) -> BaseException:
    for text in notes:
        error.add_note(text)
    return error


def example_through_the_hook(error: BaseException | None, name: str = "test_x") -> str | None:
    """Drive selftest_events' makereport wrapper as pytest would, on a constructed failure."""
    item = SimpleNamespace(originalname=name, name=f"{name}[param]")
    call = SimpleNamespace(excinfo=None if error is None else SimpleNamespace(value=error))
    hook = selftest_events.pytest_runtest_makereport(item, call)
    next(hook)
    with pytest.raises(StopIteration) as done:
        hook.send(SimpleNamespace(failed=error is not None))
    return getattr(done.value.value, EXAMPLE, None)


REPRODUCE = "You can reproduce this example by temporarily adding @reproduce_failure('6.1', b'AA') as a decorator"


@pytest.mark.parametrize("heading", ["Falsifying example", "Failing test case",  # 6.155, 6.170
                                     "Some future wording"])  # recognised by the call of the test
def test_the_example_is_read_from_the_notes_whatever_their_heading(heading):
    error = noted(AssertionError("assert 10 < 10"), f"{heading}: test_x(\n    n=3,\n    m='a, b',\n)", REPRODUCE)
    assert example_through_the_hook(error) == "test_x(n=3, m='a, b')"


def test_the_example_leaves_out_addresses_comments_and_other_notes():
    error = noted(ValueError("boom"), "Failing test case: test_y(\n    # The test always failed when commented parts"
                  " were varied together.\n    runner=<engine.X object at 0x7f00>,\n    n=2,  # or any other"
                  " generated value\n)", "Explanation:\n    These lines were always and only run by failing examples:")
    assert example_through_the_hook(error, "test_y") == "test_y(n=2)"
    assert example_through_the_hook(noted(ValueError("x"), "Explanation: test_y(n=1) ran")) is None
    assert example_through_the_hook(noted(ValueError("x"), "a note: other_test(n=1)")) is None
    assert example_through_the_hook(ValueError("plain failure")) is None
    assert example_through_the_hook(None) is None  # a passed phase carries nothing


def test_each_failure_of_a_group_gives_its_example():
    group = ExceptionGroup("Hypothesis found 2 distinct failures.", [
        noted(AssertionError("a"), "Falsifying example: test_x(\n    n=1,\n)"),
        ExceptionGroup("inner", [noted(KeyError("b"), "Failing test case: test_x(\n    n=7,\n)")])])
    assert example_through_the_hook(group) == "test_x(n=1)\ntest_x(n=7)"


def test_the_example_travels_on_the_report_through_xdists_serialisation(pytestconfig):
    report = pytest.TestReport("t.py::test_x", ("t.py", 0, "test_x"), {}, "failed", "AssertionError", "call")
    setattr(report, EXAMPLE, "test_x(n=3)")
    data = pytestconfig.hook.pytest_report_to_serializable(config=pytestconfig, report=report)
    shipped = pytestconfig.hook.pytest_report_from_serializable(config=pytestconfig, data=json.loads(json.dumps(data)))
    assert getattr(shipped, EXAMPLE) == "test_x(n=3)"


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
    assert doc["clean_run"]["note"] == "clean gate passed"
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


PHASE_CASES = """
import pytest

@pytest.fixture
def engine(request):
    planted = request.config.getoption("--failpoints")
    if "graph.round_down" in planted:
        raise RuntimeError("the engine did not build")
    yield
    if "kv.slot_off_by_one" in planted:
        raise RuntimeError("teardown broke")

def test_uses_engine(engine, request):
    assert "kv.slot_off_by_one" not in request.config.getoption("--failpoints")
"""


@ON_ONE_WORKER
def test_a_set_up_error_is_named_and_no_catch_while_a_failed_check_is_one_whatever_teardown_did(four_faults):
    _, doc = four_faults
    found = {entry["failpoint"]: entry for entry in doc["failpoints"]}
    setup = found["graph.round_down"]
    assert not setup["caught"] and setup["note"].startswith("no check failed with the fault planted; not catches: ")
    assert "; set-up error in cases/test_phases.py::test_uses_engine; " in setup["note"]  # after test_graph's (area first)
    checked = found["kv.slot_off_by_one"]
    assert checked["caught"] and checked["caught_by"].endswith("test_phases.py::test_uses_engine"), checked
    assert "teardown error in " in checked["note"]  # shown beside the catch, not lost


SKIPPED_CLEAN = """
import pytest

def test_graph(request):
    if not request.config.getoption("--failpoints"):
        pytest.skip("only runs with a fault planted")
    assert False, "fails whatever is planted"
"""


def clean_report(cases: Path) -> Path:
    """The gate report of a clean pytest run of the stand-in, as CI writes it before the selftest."""
    report = cases.parent / "clean-report.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "verifier.plugin", "--report-json", str(report),
                           "cases"], cwd=cases.parent, capture_output=True, text=True, timeout=300,
                          env=nested_env())
    assert done.returncode == 0, done.stdout + done.stderr
    return report


@ON_ONE_WORKER
def test_skip_clean_counts_no_case_that_had_not_passed_clean(four_faults):
    _, doc = four_faults
    entry = {entry["failpoint"]: entry for entry in doc["failpoints"]}["graph.round_down"]
    assert not entry["caught"] and "test_graph.py::test_graph failed, but had not passed on clean code" in entry["note"]


def test_skip_clean_without_the_clean_report_or_with_a_failed_one_is_refused(tmp_path, capsys):
    code, err = refusal(capsys, stand_in_gate(tmp_path), "--skip-clean", "--only", "router.skip_renorm")
    assert code == 2 and "error: selftest: --skip-clean needs --clean-report PATH" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    cases = stand_in_gate(broken, broken=True)
    report = broken / "clean-report.json"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "verifier.plugin", "--report-json", str(report), "cases"],
                   cwd=broken, capture_output=True, timeout=300, env=nested_env())
    code, err = refusal(capsys, cases, "--skip-clean", "--clean-report", str(report), "--only", "router.skip_renorm")
    assert code == 2 and "the clean run's verdict is 'divergence', not 'pass'" in err
