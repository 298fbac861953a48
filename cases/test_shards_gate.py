"""End to end: a tiny synthetic gate run as 2 shards then merged equals its unsharded run.

One synthetic case file (an xdist group of 4, 6 free cases, 1 planted failure) beside copies of the
repository's conftest.py and pyproject.toml (so the same plugins, addopts and scheduling apply),
and a durations file written here that knows some of the cases. Shard 1/2 runs through
`python -m verifier gate -n 1` (an xdist worker ships the collection to the controller), shard 2/2
through plain `pytest --shard 2/2` without xdist, as does the unsharded run; merge-reports and
durations run in this process. The expected ids and outcomes come from the synthetic source.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nested import nested_env

from verifier import cli_durations, cli_merge

pytestmark = pytest.mark.gate_area("verifier")

ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC = '''
import pytest


@pytest.mark.xdist_group("together")
@pytest.mark.parametrize("k", range(4))
def test_grouped(k):
    pass


@pytest.mark.parametrize("k", range(6))
def test_free(k):
    pass


def test_planted():
    assert 41 == 42, "planted"
'''
IDS = sorted([f"test_synthetic.py::test_grouped[{k}]" for k in range(4)]
             + [f"test_synthetic.py::test_free[{k}]" for k in range(6)] + ["test_synthetic.py::test_planted"])
OUTCOMES = {nodeid: "failed" if nodeid.endswith("test_planted") else "passed" for nodeid in IDS}
KNOWN = {"test_synthetic.py::test_grouped[0]": 3.0, "test_synthetic.py::test_free[0]": 2.0,
         "test_synthetic.py::test_free[1]": 1.5}  # the rest: placed by hash

ON_ONE_WORKER = pytest.mark.xdist_group("shards-gate")


def _verb(module, *words: str) -> tuple[int, str]:
    """A verb's run() in this process (no `python -m verifier` start-up); (exit code, stdout)."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        return module.run(parser.parse_args([str(word) for word in words])), out.getvalue()


def _run(folder: Path, *command: str) -> subprocess.CompletedProcess:
    env = nested_env(PYTHONPATH=str(ROOT), NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", *command], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """folder, {name: (exit code, report JSON)} for "full", "shard1", "shard2", "merged"."""
    folder = tmp_path_factory.mktemp("shards")
    shutil.copy(ROOT / "conftest.py", folder / "conftest.py")
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
    (folder / "test_synthetic.py").write_text(SYNTHETIC)
    durations = folder / "durations.json"
    durations.write_text(json.dumps({"schema": "graphgate.durations", "version": 1, "durations": KNOWN}))
    case_file = str(folder / "test_synthetic.py")
    done = {
        "full": _run(folder, "pytest", "test_synthetic.py", "-p", "no:xdist", "--report-json", "full.json"),
        "shard1": _run(folder, "verifier", "gate", "-n", "1", "--cases", case_file, "--shard", "1/2",
                       "--shard-durations", str(durations), "--json", "shard1.json"),
        "shard2": _run(folder, "pytest", "test_synthetic.py", "-p", "no:xdist", "--shard", "2/2",
                       "--shard-durations", str(durations), "--report-json", "shard2.json"),
    }
    for name, process in done.items():
        assert (folder / f"{name}.json").is_file(), f"{name}: no report\n{process.stdout[-2000:]}{process.stderr[-2000:]}"
    code, console = _verb(cli_merge, folder / "shard1.json", folder / "shard2.json", "--json", folder / "merged.json")
    done["merged"] = subprocess.CompletedProcess(["merge-reports"], code, console, "")
    reports = {name: (process.returncode, json.loads((folder / f"{name}.json").read_text()))
               for name, process in done.items()}
    return folder, reports, done


@ON_ONE_WORKER
def test_two_shards_merged_equal_the_unsharded_run(runs):
    _, reports, done = runs
    full_code, full = reports["full"]
    merged_code, merged = reports["merged"]
    assert full_code == 1 and merged_code == 1, done["merged"].stdout[-3000:]
    assert {c["nodeid"]: c["outcome"] for c in merged["cases"]} == OUTCOMES
    assert {c["nodeid"]: c["outcome"] for c in full["cases"]} == OUTCOMES
    assert (merged["verdict"], merged["totals"], merged["areas"]) == (full["verdict"], full["totals"], full["areas"])
    [failed] = [c for c in merged["cases"] if c["outcome"] == "failed"]
    assert "planted" in failed["message"] and "test_synthetic.py::test_planted" in done["merged"].stdout


@ON_ONE_WORKER
def test_each_shard_ran_its_part_and_recorded_the_whole_collection(runs):
    _, reports, done = runs
    parts = []
    for name in ("shard1", "shard2"):
        _, report = reports[name]
        ran = sorted(c["nodeid"] for c in report["cases"])
        assert report["shard"]["collected"] == IDS, name
        assert report["shard"]["selected"] == ran and ran, f"{name} ran {ran}"
        parts.append(set(ran))
    assert not parts[0] & parts[1] and parts[0] | parts[1] == set(IDS)
    grouped = {n for n in IDS if "grouped" in n}
    assert grouped <= parts[0] or grouped <= parts[1], "the xdist group was split"
    for name in ("shard1", "shard2"):  # each shard's exit code is its own verdict
        has_failure = "test_synthetic.py::test_planted" in parts[name == "shard2"]
        assert done[name].returncode == int(has_failure), done[name].stdout[-2000:]


@ON_ONE_WORKER
def test_the_durations_file_is_refreshed_from_a_report(runs):
    folder, reports, _ = runs
    code, console = _verb(cli_durations, "--from", folder / "full.json", "--out", folder / "refreshed.json")
    assert code == 0, console
    written = json.loads((folder / "refreshed.json").read_text())["durations"]
    assert written == {c["nodeid"]: round(c["duration"], 3) for c in reports["full"][1]["cases"]}


@ON_ONE_WORKER
def test_shard_and_merged_reports_follow_the_report_schema(runs):
    jsonschema = pytest.importorskip("jsonschema")  # the `schema` extra
    from verifier.report import SCHEMA

    _, reports, _ = runs
    for name, (_, report) in reports.items():
        jsonschema.validate(report, SCHEMA)
    assert "shard" in reports["shard1"][1] and "shard" not in reports["merged"][1]
