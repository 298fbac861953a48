"""A failed case's reproduce line runs as the gate's report prints it, and fails the same way.

One small gate run (`python -m verifier gate`, 2 xdist workers) on a synthetic case file beside a
copy of the repository's conftest.py and pyproject.toml (so the same addopts and scheduling hooks
apply). The file holds one planted failure whose node id, assertion text and line are known by
construction, and one xdist_group whose cases must all run on one worker. The expected values come
from the synthetic source, never from the report under test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nested import nested_env

pytestmark = pytest.mark.gate_area("verifier")

ROOT = Path(__file__).resolve().parent.parent
PLANTED_MESSAGE = "planted: 41 is not 42"
GROUPED = 6  # cases in the xdist_group; as many free cases beside them, so plain `load` would split them

SYNTHETIC = f'''
import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.xdist_group("together")
@pytest.mark.parametrize("k", range({GROUPED}))
def test_grouped(k):
    (HERE / f"grouped-{{k}}.worker").write_text(os.environ.get("PYTEST_XDIST_WORKER", "none"))


@pytest.mark.parametrize("k", range({GROUPED}))
def test_free(k):
    pass


def test_planted():
    value = 40 + 1
    assert value == 42, "{PLANTED_MESSAGE}"
'''
PLANTED_NODEID = "test_synthetic.py::test_planted"
PLANTED_LINE = SYNTHETIC.splitlines().index(f'    assert value == 42, "{PLANTED_MESSAGE}"') + 1

# One gate run serves every case below: they share one xdist worker (`--dist loadgroup`).
ON_ONE_WORKER = pytest.mark.xdist_group("reproduce-gate")


def _env(tmp: Path) -> dict[str, str]:
    """`python` on PATH is this interpreter (the line says `python`); this checkout is importable."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return nested_env(PATH=path, PYTHONPATH=str(ROOT), NO_COLOR="1", HOME=os.environ.get("HOME", str(tmp)))


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory):
    """(folder, completed gate process, the failed case's JSON record)."""
    folder = tmp_path_factory.mktemp("reproduce")
    shutil.copy(ROOT / "conftest.py", folder / "conftest.py")
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")  # its [tool.pytest.ini_options]
    (folder / "test_synthetic.py").write_text(SYNTHETIC)
    done = subprocess.run([sys.executable, "-m", "verifier", "gate", "-n", "2", "--cases", str(folder / "test_synthetic.py"),
                           "--json", str(folder / "report.json")],
                          cwd=ROOT, env=_env(folder), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # exactly the planted failure
    failed = [c for c in json.loads((folder / "report.json").read_text())["cases"] if c["outcome"] == "failed"]
    assert [c["nodeid"] for c in failed] == [PLANTED_NODEID]
    return folder, done, failed[0]


def _rerun(folder: Path, line: str) -> subprocess.CompletedProcess:
    # shell=True on purpose: the line is run exactly as a user pastes it into a shell
    return subprocess.run(line, shell=True, cwd=folder, env=_env(folder), capture_output=True, text=True, timeout=300)


def _assert_fails_like_the_planted_case(done: subprocess.CompletedProcess) -> None:
    out = done.stdout
    assert done.returncode == 1, out[-3000:] + done.stderr[-3000:]
    assert re.search(r"^=+ 1 failed(, \d+ warnings?)? in [\d.]+s =+$", out, re.M), out[-3000:]  # pytest's own tally: that one case
    assert f"FAILED {PLANTED_NODEID}" in out, out[-3000:]
    assert f"test_synthetic.py:{PLANTED_LINE}: AssertionError" in out, out[-3000:]  # same assertion, same line
    assert PLANTED_MESSAGE in out


@ON_ONE_WORKER
def test_the_reproduce_line_runs_as_printed_and_fails_the_same_way(gate_run):
    folder, done, case = gate_run
    line = case["reproduce"]
    assert f"reproduce: {line}\n" in done.stdout, "the JSON's line is the one the console report prints"
    _assert_fails_like_the_planted_case(_rerun(folder, line))


@ON_ONE_WORKER
def test_a_single_case_runs_with_xdist_disabled(gate_run):
    """`pytest -p no:xdist FILE::CASE` must start (addopts may not carry xdist-only options)."""
    folder, _, _ = gate_run
    _assert_fails_like_the_planted_case(_rerun(folder, f"python -m pytest -p no:xdist {PLANTED_NODEID}"))


@ON_ONE_WORKER
def test_each_xdist_group_stays_on_one_worker(gate_run):
    folder, _, _ = gate_run
    workers = {(folder / f"grouped-{k}.worker").read_text() for k in range(GROUPED)}
    assert len(workers) == 1 and workers.pop().startswith("gw"), f"group split over workers {workers}"
