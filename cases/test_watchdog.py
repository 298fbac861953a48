"""The collective watchdog (engine/launch/watchdog.py): a rank stuck in a collective is named with
its step and collective within the timeout, instead of a gloo abort half a minute later.

Unit cases drive a `Watchdog` with a fake collective (a thread waiting on an event no peer sets)
and its rule as data; two cases run a real 2-rank CLI job in which rank 1 runs a step eagerly
while rank 0 replays a graph (`dist.rank_disagrees`): with the per-step agreement check the job
ends in that check's error, and with the check weakened (`dist.skip_agreement_check`) in the
watchdog's. Both real jobs plant the run's `--failpoints` too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import paddle
import pytest
from engine_cli import engine_run

from engine.__main__ import build_parser, engine_config
from engine.config import ConfigError, ParallelConfig
from engine.distributed import Collectives
from engine.failpoints import Failpoints
from engine.launch import blame
from engine.launch.watchdog import SLACK_PER_CPU_S, STUCK_EXIT, UNWATCHED, Call, Watchdog, describe, read_state
from fixtures.pytest_fixtures import checkpoint_dir

ROOT = Path(__file__).resolve().parent.parent
BOUND_S = 240.0  # a hang detector for the subprocess, not a speed check
# Eight prompt tokens and one capture size of 8: rank 0 pads nothing, so gloo sees buffers of equal
# size on both ranks and waits (the case that used to end in gloo's own timeout, ~30 s later).
RANK_JOB = ["--max-new-tokens", "3", "--tp", "2", "--graph", "piecewise", "--capture-sizes", "8",
            "--decode-capture-sizes", "1", "--collective-timeout", "3"]


# ----------------------------------------------------------------------------- one process


class Stuck:
    """What the watchdog hands `on_stuck`, set once."""

    def __init__(self):
        self.seen = threading.Event()
        self.code, self.line = None, None

    def __call__(self, code: int, line: str) -> None:
        self.code, self.line = code, line
        self.seen.set()


def wait_stuck(dog: Watchdog, stuck: Stuck, kind: str, what: str) -> None:
    """Enter (kind, what) on another thread, as a rank would, and wait there until reported."""
    never = threading.Event()

    def rank() -> None:
        with dog.watch(kind, what):
            never.wait(30)

    thread = threading.Thread(target=rank, daemon=True)
    thread.start()
    try:
        assert stuck.seen.wait(30), "the watchdog never reported the stuck call"
    finally:
        never.set()
        thread.join()


def test_a_collective_no_peer_joins_is_named_with_its_step_and_index(tmp_path):
    stuck = Stuck()
    dog = Watchdog(rank=3, timeout_s=0.3, state_path=tmp_path / "state.json", on_stuck=stuck, poll_s=0.02)
    dog.begin_step()
    dog.begin_step()
    with dog.watch("all_reduce", "embedding"):
        pass
    wait_stuck(dog, stuck, "all_reduce", "o_proj, layer 1")
    assert stuck.code == STUCK_EXIT
    assert re.fullmatch(r"stuck in all_reduce #2 \(o_proj, layer 1\) at step 2 for \d+\.\d s "
                        r"\(collective timeout 0\.3 s\)", stuck.line), stuck.line
    state = read_state(tmp_path / "state.json")
    assert (state["rank"], state["in"], state["in_step"], state["stuck"]) == \
        (3, "all_reduce #2 (o_proj, layer 1)", 2, stuck.line)


def test_a_state_file_that_cannot_be_written_does_not_stop_the_checks(tmp_path, capfd):
    stuck = Stuck()
    unwritable = tmp_path / "gone" / "state.json"  # its folder does not exist: every write fails
    dog = Watchdog(rank=2, timeout_s=0.2, state_path=unwritable, on_stuck=stuck, poll_s=0.02)
    wait_stuck(dog, stuck, "all_reduce", "o_proj, layer 0")
    assert stuck.line.startswith("stuck in all_reduce #1 (o_proj, layer 0) at step 0"), stuck.line
    assert capfd.readouterr().err.count(f"cannot write {unwritable}") == 1  # warned once, not per poll


def test_a_capture_before_the_first_step_is_bounded_by_a_multiple_of_the_timeout():
    stuck = Stuck()
    dog = Watchdog(rank=1, timeout_s=0.1, on_stuck=stuck, poll_s=0.02)
    wait_stuck(dog, stuck, "capture", "piece 0 at size 8")
    assert re.fullmatch(r"stuck in capture #1 \(piece 0 at size 8\) at step 0 for \d+\.\d s "
                        r"\(collective timeout 0\.3 s\)", stuck.line), stuck.line


def test_calls_that_end_are_never_reported(tmp_path):
    stuck = Stuck()
    dog = Watchdog(rank=0, timeout_s=0.3, state_path=tmp_path / "state.json", on_stuck=stuck, poll_s=0.02)
    for _ in range(3):
        dog.begin_step()
        for layer in range(2):
            with dog.watch("all_reduce", f"o_proj, layer {layer}"):
                pass
    assert not stuck.seen.wait(1.0)  # more than 3 timeouts with nothing in progress
    dog.close()
    state = read_state(tmp_path / "state.json")
    assert (state["in"], state["last"], state["last_step"]) == (None, "all_reduce #2 (o_proj, layer 1)", 3)
    assert describe(state) == "not in a collective; last entered all_reduce #2 (o_proj, layer 1) at step 3"


def call(kind: str, what: str, started: float, cpu_before: float, limit_s: float = 2.0) -> Call:
    return Call(kind, what, index=1, step=4, started=started, cpu_before=cpu_before, serial=1, limit_s=limit_s)


def test_the_bound_is_the_timeout_plus_slack_for_the_cpu_the_rank_used():
    dog = Watchdog(rank=0, timeout_s=2.0)
    replay = call("replay", "piece 1 at size 8", started=100.0, cpu_before=50.0)
    # 1 s of CPU since the previous call (a compile, say) buys SLACK_PER_CPU_S s of waiting.
    bound = 100.0 + 2.0 + SLACK_PER_CPU_S * 1.0
    assert not dog.is_stuck([replay], now=bound - 0.01, cpu=51.0)
    assert dog.is_stuck([replay], now=bound + 0.01, cpu=51.0)
    assert not dog.is_stuck([], now=1e9, cpu=0.0)


def test_an_enclosing_call_lends_its_allowance_to_the_calls_inside_it():
    dog = Watchdog(rank=0, timeout_s=2.0)
    capture = call("capture", "piece 1 at size 8", started=100.0, cpu_before=40.0)  # 10 s of CPU: 40 s more
    inner = call("all_reduce", "o_proj, layer 0", started=101.0, cpu_before=50.0)
    assert dog.waited_s(inner, now=110.0, cpu=50.0) > dog.timeout_s
    assert not dog.is_stuck([capture, inner], now=110.0, cpu=50.0)
    assert dog.is_stuck([capture, inner], now=143.0, cpu=50.0)
    just_entered = call("all_reduce", "o_proj, layer 1", started=142.5, cpu_before=50.0)
    assert not dog.is_stuck([capture, just_entered], now=143.0, cpu=50.0)  # the program is moving on


def test_a_stuck_record_is_blamed_by_its_line_and_positions_show_the_odd_rank_first():
    record = {"code": STUCK_EXIT, "time": 1.0, "error": "stuck in all_reduce #2 (o_proj, layer 0) at step 1 for 3.1 s"}
    assert blame.exit_reason(record).startswith("stuck in all_reduce #2 (o_proj, layer 0) at step 1 for 3.1 s")
    same = {"in": "replay #2 (piece 1 at size 8)", "in_step": 1, "in_since": 95.0, "stuck": ""}
    odd = {"in": "all_gather #5 (lm head)", "in_step": 1, "in_since": 96.0, "stuck": ""}
    where = blame.group_by_position({0: same, 1: odd, 2: same | {"stuck": "stuck in ..."}, 3: None})
    assert where.split("; ") == ["rank 1 in all_gather #5 (lm head) at step 1",
                                 "rank 3 no collective watchdog state",
                                 "ranks 0, 2 in replay #2 (piece 1 at size 8) at step 1"]


def test_collectives_watch_eager_calls_but_not_a_program_being_traced():
    """While to_static traces a piece, a collective becomes a program op; the program's call is what
    waits, and the graph runner watches that instead."""
    comm, seen = Collectives(2, watchdog=Watchdog(rank=0, timeout_s=5.0)), []

    @paddle.jit.not_to_static
    def look() -> None:
        seen.append(comm.watch("all_reduce", "traced") is UNWATCHED)

    def program(x):
        look()
        return x * 2

    paddle.jit.to_static(program, full_graph=True)(paddle.ones([2]))
    look()
    assert seen == [True, False]
    assert Collectives(1).watch("all_reduce") is UNWATCHED  # one rank: nothing to wait for


def test_the_timeout_comes_from_the_flag_or_the_environment(monkeypatch):
    def timeout(*args: str) -> float:
        run = ["run", "--model", "m", "--prompts", "p", "--tp", "2", *args]
        return engine_config(build_parser().parse_args(run)).parallel.collective_timeout_s

    assert timeout() == ParallelConfig.collective_timeout_s
    monkeypatch.setenv("ENGINE_COLLECTIVE_TIMEOUT", "7.5")
    assert (timeout(), timeout("--collective-timeout", "0")) == (7.5, 0)
    with pytest.raises(ConfigError, match=r"collective_timeout_s=-1\.0 must be a number of seconds >= 0"):
        timeout("--collective-timeout", "-1")


# ----------------------------------------------------------------------------- a real 2-rank job


def run_cli(tmp_path: Path, failpoints: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([list(range(1, 9))]))
    logs = tmp_path / "logs"
    command = engine_run(Failpoints(frozenset(failpoints)), checkpoint_dir("glm4_moe"), "--prompts", prompts,
                         "--log-dir", logs, *RANK_JOB)
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=BOUND_S,
                          env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)})
    return done, logs


def planted_with(faults, *names: str) -> list[str]:
    return sorted(set(names) | faults.active)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_disagreeing_rank_is_named_by_the_agreement_check(tmp_path, faults):
    done, _ = run_cli(tmp_path, planted_with(faults, "dist.rank_disagrees"))
    errors = error_lines(done.stderr)
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("error: ranks disagree on the step (phase, tokens, padded size; 0 = eager)"), errors


def test_without_the_agreement_check_the_watchdog_names_the_stuck_rank_and_collective(tmp_path, faults):
    done, logs = run_cli(tmp_path, planted_with(faults, "dist.rank_disagrees", "dist.skip_agreement_check"))
    errors = error_lines(done.stderr)
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
    # The stuck rank is named first, or right after a peer that gloo aborted on the mismatched
    # collective first ("rank 0: killed by signal 6 (SIGABRT); then rank 1 (stuck in ...").
    found = re.search(r"^error: the 2-rank job failed: (?:.*; then )?rank (\d)(?:: | \()stuck in "
                      r"((all_reduce|all_gather|capture|replay) #\d+ \([^)]+\)) at step 1 for [\d.]+ s "
                      r"\(collective timeout 3 s\) \(exit code 124", errors[0])
    assert found, errors[0]
    rank, collective = int(found[1]), found[2]
    assert json.loads((logs / f"exit.{rank}.json").read_text())["code"] == STUCK_EXIT
    # Where every rank was, from the ranks' state files: rank 0 in a program, rank 1 eager.
    positions = errors[0].split("; collectives: ", 1)[1]
    assert f" in {collective} at step 1" in positions, positions
    assert re.search(r"rank 0 in (capture|replay) #\d+ \(piece \d at size 8\) at step 1", positions)
    assert re.search(r"rank 1 in all_(reduce|gather) #\d+ \([^)]+\) at step 1", positions)
