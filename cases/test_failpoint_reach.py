"""Every fault reaches every process: each kind of process the cases start announces exactly the
run's `--failpoints` (run this file with and without a failpoint planted).

A case that starts a process without handing it the run's failpoints passes with any fault
planted, because the process under test never has it (a 2-rank CLI job once passed with
`dist.skip_allreduce` that way). Every process that runs engine code prints one line
`failpoints: a,b` (`none` when clean) to its log, and the rank servers also put the names in
each reply. Kinds the cases start, and where each one's announcement is read:
  - a 1-rank `python -m engine run` process: its stderr;
  - a `python -m engine run --tp 2` job: the parent's stderr and each rank's workerlog;
  - the engine-server RankPool (cases/four_ranks.py): each rank's workerlog and a reply field;
  - the probe-server RankPool (cases/conftest.py's probe_rank_pool): each rank's workerlog and a
    reply field.
Rank jobs are the ones the other cases use (same xdist group, so one worker owns each; a run of
this file alone starts them itself). The expected value is read from the pytest option here, not
from engine/failpoints.py. A last check keeps case files from starting the CLI except through
cases/engine_cli.py (which always passes --failpoints).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from engine_cli import ROOT, engine_env, engine_run

from fixtures.pytest_fixtures import PROMPTS, checkpoint_dir

pytestmark = pytest.mark.gate_area("verifier")


@pytest.fixture(scope="module")
def expected(pytestconfig) -> str:
    """The run's --failpoints as a process must announce them: sorted, unique, 'none' when empty."""
    names = sorted({name.strip() for name in pytestconfig.getoption("--failpoints").split(",") if name.strip()})
    return ",".join(names) or "none"


def announced(text: str) -> list[str]:
    """The values of every `failpoints: ...` line in a log."""
    return re.findall(r"^failpoints: (\S*)$", text, re.M)


def rank_logs(log_dir: Path, nproc: int) -> dict[int, list[str]]:
    return {rank: announced((log_dir / f"workerlog.{rank}").read_text(errors="replace")) for rank in range(nproc)}


def test_a_one_rank_cli_process_announces_the_runs_failpoints(faults, expected):
    """Also the one case of the gate that runs `python -m engine run` as a real 1-rank process
    (test_cli.py runs the CLI's main in its own process): the module entry point ends with exit
    code 0 and prints one line per prompt, whatever fault is planted (none stops a 1-rank run)."""
    done = subprocess.run(engine_run(faults, checkpoint_dir("glm4_moe"), "--prompts", PROMPTS, "--max-new-tokens", 1),
                          capture_output=True, text=True, cwd=ROOT, env=engine_env(), timeout=300)
    assert announced(done.stderr) == [expected], done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["p0_len5", "p1_len17", "p2_len33", "p3_len64"]


@pytest.mark.xdist_group("two_rank_cli")
def test_a_two_rank_cli_job_and_each_rank_announce_the_runs_failpoints(two_rank_routing_job, expected):
    job = two_rank_routing_job
    assert announced(job.done.stderr) == [expected], job.done.stderr[-3000:]  # the parent
    assert rank_logs(job.logs, 2) == {0: [expected], 1: [expected]}


@pytest.mark.xdist_group("four_ranks")
def test_engine_server_ranks_announce_the_runs_failpoints(four_rank_pool, expected):
    assert rank_logs(four_rank_pool.log_dir, 4) == {rank: [expected] for rank in range(4)}
    replies = four_rank_pool.request({"checkpoint": "glm4_moe", "tp": 4, "prompts": [[1, 2, 3]], "max_new_tokens": 1})
    assert [reply["failpoints"] or "none" for reply in replies] == [expected] * 4


@pytest.mark.xdist_group("probe_ranks")
def test_probe_server_ranks_announce_the_runs_failpoints(probe_rank_pool, expected):
    assert rank_logs(probe_rank_pool.log_dir, 2) == {0: [expected], 1: [expected]}
    replies = probe_rank_pool.request({"checkpoint": "glm4_moe", "tp": 2, "ep": 1, "parts": [[0, 3, 0, 0]], "seed": 0})
    assert [reply["failpoints"] or "none" for reply in replies] == [expected] * 2


CLI_SPELLED = re.compile(r"""["']-m["']\s*,\s*["']engine["']""")


def test_case_files_start_the_cli_only_through_engine_cli():
    """A new case that builds `python -m engine ...` itself could leave --failpoints out."""
    cases = Path(__file__).resolve().parent
    spelled = [f"{path.name}:{text[:match.start()].count(chr(10)) + 1}"
               for path in sorted(cases.rglob("*.py")) if path.name != "engine_cli.py"
               for text in [path.read_text()] for match in CLI_SPELLED.finditer(text)]
    assert spelled == [], f"start the CLI with cases/engine_cli.py's engine_run: {spelled}"
