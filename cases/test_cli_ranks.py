"""`python -m engine run --tp N` end to end: the CLI's multi-rank path, started as a user would.

The CLI re-runs itself on N ranks through engine/launch/ (cli_job.py). One case checks what a
2-rank run writes against the 1-rank engine; one kills a rank mid-run and checks that the CLI's
one error line names that rank, with its log, instead of a peer the launcher then terminated.
Each case starts one 2-rank job (15-30 s on two loaded cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from engine_cli import engine_run

from engine.__main__ import main
from engine.dump import dump_arrays, read_dump
from engine.launch import RankJobError, cli_job
from fixtures.pytest_fixtures import PROMPTS, checkpoint_dir
from verifier.dumps import compare_dumps
from verifier.tolerance import GOLDEN_LOGITS, GOLDEN_MAX_REL_L2, tolerance_for

ROOT = Path(__file__).resolve().parent.parent
FLOAT32 = tolerance_for("float32")
# A hang detector, not a speed check: under `pytest -n 4` on two cores a 2-rank run takes 15-40 s.
BOUND_S = 240.0
MAX_NEW_TOKENS = 8  # as the goldens: a fault that the 1-rank reference shares is still seen


def cli(faults, *args) -> list[str]:
    return engine_run(faults, checkpoint_dir("glm4_moe"), *args)


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_two_rank_cli_run_dumps_every_rank_and_matches_one_rank(tmp_path, engine_for, prompts, golden, faults):
    dump = tmp_path / "tp2.npz"
    done = subprocess.run(cli(faults, "--prompts", PROMPTS, "--max-new-tokens", MAX_NEW_TOKENS, "--tp", 2, "--ep", 2,
                              "--dump", dump, "--dump-all-ranks", "--log-dir", tmp_path / "logs"),
                          capture_output=True, text=True, timeout=BOUND_S, cwd=ROOT, env=cli_env())
    assert done.returncode == 0, done.stderr
    written = read_dump(dump)
    for rank in range(2):  # hidden states are replicated and logits gathered: ranks agree bitwise
        on_rank = read_dump(tmp_path / f"tp2.rank{rank}.npz")
        assert sorted(on_rank) == sorted(written)
        assert [k for k in written if not np.array_equal(on_rank[k], written[k])] == [], f"rank {rank}"
    llm = engine_for("glm4_moe")
    reference = dump_arrays(llm.generate(prompts, MAX_NEW_TOKENS), llm.model_config.moe_layers)
    compare_dumps(written, reference, logits_tol=FLOAT32).assert_ok()  # tokens and experts exactly
    # The reference engine carries the run's failpoints too; the goldens do not.
    compare_dumps(written, golden("glm4_moe"), logits_tol=GOLDEN_LOGITS, max_rel_l2=GOLDEN_MAX_REL_L2).assert_ok()
    printed = [line.split(": ") for line in done.stdout.splitlines()]
    assert [name for name, _ in printed] == [p.name for p in prompts]
    assert [tokens for _, tokens in printed] == [" ".join(map(str, written[f"greedy_p{i}"])) for i in range(4)]


def test_a_rank_killed_mid_run_is_the_rank_the_cli_names(tmp_path, faults):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[1, 2, 3, 4, 5]]))
    logs = tmp_path / "logs"
    # Long enough (a few hundred decode steps) that the run is still going when the kill lands.
    cli_proc = subprocess.Popen(cli(faults, "--prompts", prompts, "--max-new-tokens", 400, "--tp", 2, "--log-dir", logs, "-v"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=cli_env())
    try:
        victim = wait_for_step(cli_proc, rank=1, log=logs / "workerlog.1", step=3)
        job = processes_below(cli_proc.pid)  # the launcher and the ranks
        os.kill(victim, signal.SIGKILL)
        _, err = cli_proc.communicate(timeout=BOUND_S)
    finally:
        if cli_proc.poll() is None:
            cli_proc.kill()
            cli_proc.communicate()
    assert cli_proc.returncode not in (0, None)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("error: the 2-rank job failed: rank 1: "), err
    tail = err.split(f"---- rank 1: last 30 lines of {logs.resolve() / 'workerlog.1'} ----\n", 1)
    assert len(tail) == 2 and "step 3:" in tail[1], err  # rank 1's own log, up to where it died
    assert [pid for pid in job if alive(pid)] == []  # the CLI left no process of its job behind


def test_a_used_log_dir_is_refused_before_any_rank_starts(tmp_path, capsys):
    (tmp_path / "workerlog.0").write_text("an earlier job's log, which the launcher would append to")
    code = main(["run", "--model", str(checkpoint_dir("glm4_moe")), "--prompts", str(PROMPTS), "--tp", "2",
                 "--log-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: --log-dir: {tmp_path} is not empty: every job needs a fresh log folder\n"


def test_a_user_error_on_a_rank_is_reported_as_that_ranks_one_line(tmp_path, capsys):
    """All ranks usually hit the same user error; the blamed (first) rank's line is the one shown."""
    for rank in (0, 3):
        (tmp_path / f"rank{rank}.err").write_text(f"error: prompt 0 is empty (seen on {rank})\n")
    failure = RankJobError([3], "exit code 2", tmp_path, "token", "")
    assert cli_job._report_failure(tmp_path, 4, failure) == 2
    assert capsys.readouterr().err == "error: prompt 0 is empty (seen on 3) (rank 3)\n"

def wait_for_step(cli_proc: subprocess.Popen, rank: int, log: Path, step: int) -> int:
    """The pid of `rank`'s process once its log shows it ran `step` (the CLI's -v step lines)."""
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        assert cli_proc.poll() is None, f"the CLI ended before rank {rank} ran step {step}: {cli_proc.stderr.read()}"
        if log.exists() and f"step {step}:" in log.read_text(errors="replace"):
            pid = rank_process(cli_proc.pid, rank)
            assert pid is not None, f"rank {rank} logged step {step} but has no process below the CLI"
            return pid
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} did not reach step {step} within {BOUND_S:g} s")


def rank_process(ancestor: int, rank: int) -> int | None:
    """The process below `ancestor` whose PADDLE_TRAINER_ID is `rank` and whose parent's is not
    (found through /proc, independently of the launcher's own bookkeeping)."""
    ranked = {pid: env.get("PADDLE_TRAINER_ID") for pid, env in processes_below(ancestor).items()}
    found = [pid for pid, value in ranked.items() if value == str(rank) and ranked.get(parent_of(pid)) != str(rank)]
    return found[0] if found else None


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (state Z) has ended and only waits to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def processes_below(ancestor: int) -> dict[int, dict[str, str]]:
    """pid -> environment of each live process whose parent chain reaches `ancestor`."""
    parents = {pid: parent_of(pid) for pid in map(int, filter(str.isdigit, os.listdir("/proc")))}
    found = {}
    for pid in parents:
        chain, up = set(), parents.get(pid)
        while up and up not in chain and up != ancestor:
            chain.add(up)
            up = parents.get(up)
        if up == ancestor:
            found[pid] = environment(pid)
    return found


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def environment(pid: int) -> dict[str, str]:
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in items if "=" in item)
