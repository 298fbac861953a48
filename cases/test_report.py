"""The gate's report: recording, the merge across xdist workers, the JSON schema, plain text.

The merge and schema cases run one small inner pytest session with 2 xdist workers (a merge
across workers; more workers would ask nothing new and each costs a process start) on a synthetic
case file whose comparison counts are known by construction (case k makes k comparisons), so the
expected numbers never come from the code under test.
"""

from __future__ import annotations

import contextvars
import copy
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from nested import nested_env

from verifier.compare import compare
from verifier.dumps import compare_dumps
from verifier.recording import note, recording
from verifier.render import render
from verifier.report import SCHEMA, Case, GateReport, area_of_file, read_json

ROOT = Path(__file__).resolve().parent.parent
CASES = 12
FAILING = 7  # the one synthetic case that fails
EXPECTED_FAILURES = {4, 9}  # cases that see a comparison fail inside pytest.raises, and pass

SYNTHETIC = f'''
import numpy as np
import pytest
from verifier.compare import assert_close, compare

# the first three share an xdist group: under --dist loadgroup their nodeids gain "@first"
@pytest.mark.parametrize("k", [pytest.param(k, marks=pytest.mark.xdist_group("first")) if k < 3 else k
                               for k in range({CASES})])
def test_k(k):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for layer in range(k):
        assert compare(x, x.copy(), name=f"hidden[{{layer}}]").passed
    if k in {EXPECTED_FAILURES}:
        with pytest.raises(AssertionError):
            assert_close(x + 1, x, name="planted")
    if k == {FAILING}:
        y = x.copy()
        y[1, 2] += 0.5
        assert_close(y, x, name="logits")
'''


def inner_session(folder: Path, test_text: str, *args: str) -> subprocess.CompletedProcess:
    """Run pytest on one synthetic case file under the repository's own conftest.py (profiles,
    --failpoints, fixtures, the report plugin), in `folder`; NO_COLOR so the output is plain."""
    shutil.copy(ROOT / "conftest.py", folder / "conftest.py")
    (folder / "test_synthetic.py").write_text(test_text)
    env = nested_env(PYTHONPATH=str(ROOT), NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "pytest", "test_synthetic.py", "-p", "no:cacheprovider", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


# The cases reading the merged run share one xdist worker (`--dist loadgroup`), so it runs once.
ON_ONE_WORKER = pytest.mark.xdist_group("report-merge")
WORKERS = "2"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """(completed process, folder) of the 2-worker run, with JSON and JUnit artifacts."""
    folder = tmp_path_factory.mktemp("merge")
    done = inner_session(folder, SYNTHETIC, "-n", WORKERS, "--dist", "loadgroup", "--report-json", "report.json",
                         "--junitxml", "junit.xml")
    return done, folder


@ON_ONE_WORKER
def test_the_workers_merge_into_one_report_losing_and_duplicating_nothing(merged):
    done, folder = merged
    assert done.returncode == 1, done.stdout[-3000:]  # exactly the planted failure
    data = json.loads((folder / "report.json").read_text())
    ids = [case["nodeid"] for case in data["cases"]]
    assert sorted(ids) == sorted(f"test_synthetic.py::test_k[{k}]" for k in range(CASES)) and len(set(ids)) == CASES
    for case in data["cases"]:
        k = int(case["nodeid"].rsplit("[", 1)[1].rstrip("]"))
        want_ran = k + (k in EXPECTED_FAILURES) + (k == FAILING)
        ran = case["comparisons"]["counts"].get("numeric", {"ran": 0})["ran"]
        assert ran == want_ran, case["nodeid"]
        assert case["outcome"] == ("failed" if k == FAILING else "passed")
        assert case["worker"] and case["worker"].startswith("gw"), "the case did not come through xdist"
    assert {case["worker"] for case in data["cases"]} == {f"gw{i}" for i in range(int(WORKERS))}, "no merge to check"
    assert data["totals"] == {"passed": CASES - 1, "failed": 1, "error": 0, "skipped": 0, "xfailed": 0, "xpassed": 0}
    assert data["areas"][0]["comparisons"] == sum(range(CASES)) + len(EXPECTED_FAILURES) + 1
    assert data["areas"][0]["failed_comparisons"] == 1  # expected failures in passing cases do not count


@ON_ONE_WORKER
def test_the_failing_case_names_its_tensor_index_tolerance_and_rerun(merged):
    done, folder = merged
    failed = [c for c in json.loads((folder / "report.json").read_text())["cases"] if c["outcome"] == "failed"]
    [item] = failed[0]["comparisons"]["failures"]
    assert (item["name"], item["max_abs_index"], item["mismatches"]) == ("logits", [1, 2], 1)
    assert item["tolerance"] == "rtol=1e-05, atol=1e-05 x max(1, row RMS)" and item["tolerance_source"] == "verifier/tolerance.py, float32 row"
    assert failed[0]["reproduce"] == f"python -m pytest 'test_synthetic.py::test_k[{FAILING}]'"
    console = done.stdout
    assert console.count("graphgate report") == 1, "one summary, from the controller only"
    assert f"test_synthetic.py::test_k[{FAILING}]" in console and "token 1, channel 2" in console
    assert "\x1b[" not in console and console.isascii(), "NO_COLOR / no terminal: plain ASCII"


@ON_ONE_WORKER
def test_junit_xml_carries_each_cases_record_once(merged):
    _, folder = merged
    testcases = ET.parse(folder / "junit.xml").getroot().iter("testcase")
    records = {}
    for testcase in testcases:
        values = [p.get("value") for p in testcase.iter("property") if p.get("name") == "graphgate.record"]
        assert len(values) == 1, testcase.get("name")
        records[testcase.get("name")] = json.loads(values[0])
    assert len(records) == CASES
    assert records[f"test_k[{FAILING}]"]["comparisons"]["counts"]["numeric"] == {"ran": FAILING + 1, "failed": 1}


@ON_ONE_WORKER
def test_report_json_validates_against_its_schema(merged):
    jsonschema = pytest.importorskip("jsonschema")  # the `schema` extra
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    data = json.loads((merged[1] / "report.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert read_json(merged[1] / "report.json").verdict() == "divergence"
    broken = copy.deepcopy(data)
    broken["cases"][-1]["comparisons"]["counts"]["numeric"]["ran"] = -1  # test_k[9]: 10 comparisons
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_read_json_names_the_file_of_another_schema(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"schema": "something.else", "version": 1}))
    with pytest.raises(ValueError, match="other.json: not a graphgate.report v2"):
        read_json(path)


# ---------------------------------------------------------------------------- recording, in process


def test_recording_counts_inside_its_block_only_and_restores_on_error():
    x = np.ones(4, dtype=np.float32)
    with pytest.raises(RuntimeError):
        with recording() as outer:
            compare(x, x + 1)
            with recording() as inner:
                compare(x, x)
            compare(x, x)
            raise RuntimeError
    compare(x, x)  # after the block: counted by the recording around this case, not by `outer`
    assert outer.counts == {"numeric": [2, 1]} and inner.counts == {"numeric": [1, 0]}


def test_note_outside_any_recording_returns_its_argument():
    assert contextvars.Context().run(note, "untouched") == "untouched"  # a fresh context: no recording


def test_a_rel_l2_only_dump_comparison_records_no_exact_failure():
    """compare_dumps measures rel L2 under EXACT; that inner comparison must not count as failed."""
    expected = {"logits_p0": np.ones((2, 3), dtype=np.float32), "greedy_p0": np.array([1, 2])}
    actual = {"logits_p0": expected["logits_p0"] * (1 + 1e-7), "greedy_p0": np.array([1, 2])}
    with recording() as recorder:
        assert not compare_dumps(actual, expected, max_rel_l2=1e-4).failures()
    assert recorder.counts == {"numeric": [1, 0], "tokens": [1, 0]}
    with recording() as recorder:
        assert compare_dumps(actual, expected, max_rel_l2=1e-9).failures()
    assert recorder.counts["numeric"] == [1, 1]


def test_near_ties_are_shown_apart_and_colour_only_when_asked():
    case = Case("cases/test_x.py::test_y[glm4_moe-piecewise]", area="routing", outcome="failed",
                message="boom " + "-" * 300,  # a word longer than the panel: folded, never cut with an ellipsis
                comparisons={"counts": {"routing": {"ran": 2, "failed": 1}}, "failures": [],
                             "layers": [{"tensor": "keys[]", "layer": 0, "max_abs_err": 0.0},
                                        {"tensor": "keys[]", "layer": 1, "max_abs_err": 2e-3}],
                             "near_ties": [{"key": "topk_ids_p0_layer1", "rows": [3, 5]}]})
    report = GateReport()
    report.add(case)
    plain = render(report, color=False)
    assert "Routing near-ties" in plain and "topk_ids_p0_layer1" in plain and "3, 5" in plain
    assert "cases/test_x.py::test_y[glm4_moe-piecewise]" in plain  # brackets are not markup
    assert "#" * 30 in plain and "Error per layer" in plain  # the largest error gets the full bar
    case.comparisons["layers"][1]["max_abs_err"] = 0.0
    assert "Error per layer" not in render(report)  # no picture when every layer agrees
    assert plain.isascii() and "\x1b[" not in plain
    assert "\x1b[" in render(report, color=True)


def test_a_failed_check_and_the_teardown_error_after_it_are_both_shown():
    report = GateReport()
    report.add(Case("t.py::test_both", outcome="failed", failed_in="call", message="AssertionError: logits differ",
                    teardown="RuntimeError: rank 1 did not stop"))
    report.add(Case("t.py::test_after", outcome="failed", failed_in="teardown", message="RuntimeError: leaked file",
                    teardown="RuntimeError: leaked file",
                    comparisons={"counts": {"numeric": {"ran": 3, "failed": 1}}, "failures": [], "layers": [],
                                 "near_ties": []}))
    plain = render(report)
    assert "AssertionError: logits differ" in plain and "RuntimeError: rank 1 did not stop" in plain
    assert "teardown error" in plain and "FAILED in teardown" in plain
    assert plain.count("RuntimeError: leaked file") == 1  # a teardown that filed the case is its failure, once
    # a comparison that failed inside the passing check (an expected failure) is no failed comparison
    assert report.cases["t.py::test_after"].ran_failed() == (3, 0) and report.verdict() == "divergence"


@pytest.mark.parametrize(("stem", "area"), [("test_graph", "graph vs eager"), ("test_parallel", "ranks"),
                                            ("test_routing_replay_store", "routing replay"), ("test_new", "other")])
def test_case_files_map_to_report_areas(stem, area):
    assert area_of_file(stem) == area


def test_every_area_a_case_file_maps_to_is_a_report_area():
    from verifier.report import AREA_OF_FILE, AREA_OF_PREFIX, AREAS

    assert set(AREA_OF_FILE.values()) | set(AREA_OF_PREFIX.values()) <= set(AREAS)
