"""engine.launch: N-rank jobs through paddle.distributed.launch, and verifier.rank_pool's RankPool.

Each launched test costs one start of 1 or 2 ranks (the fewest that ask its question: every
process is a Python that imports Paddle, ~1.5 s of CPU, plus the launcher's own); the rank
programs live in cases/rank_programs/. Every test that launches also checks that no process of
the job is left. Six jobs, 11 ranks in all: one pool serves both pool questions in turn, and starts
beside an all_reduce job to show that two jobs started at once on their own start ports do not collide.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from engine.launch import RankJobError, free_port, job_pids, run_ranks
from engine.launch.blame import HARD_DEATH, Evidence, first_failure, terminated_by
from engine.launch.ports import ephemeral_range, is_listening
from engine.launch.processes import has_ended
from engine.launch.wire import decode, encode
from verifier.rank_pool import RankPool

PROGRAMS = Path(__file__).parent / "rank_programs"
ALLREDUCE = str(PROGRAMS / "allreduce.py")
POOL_SERVER = str(PROGRAMS / "pool_server.py")
BOUND_S = 180.0  # generous: under `pytest -n 4` the 2-core machine runs four jobs at once


def rank_values(out_dir: Path, nproc: int) -> list[np.ndarray]:
    return [np.load(out_dir / f"rank{r}.npz")["value"] for r in range(nproc)]


@pytest.mark.parametrize("rank, code, how", [(1, 3, "sys.exit"), (0, 7, "os._exit")])
def test_a_failing_rank_is_named_with_its_log_tail(tmp_path, rank, code, how):
    """2 ranks: a failing rank with its peer left in the all_reduce (blamed: not the peer, which
    then fails too). A rank other than 0 exits cleanly, rank 0 (the store's host) dies hard."""
    hard = ["--hard"] if how == "os._exit" else []
    with pytest.raises(RankJobError) as caught:
        run_ranks([ALLREDUCE, str(tmp_path), "--exit-rank", str(rank), "--exit-code", str(code), *hard], 2,
                  timeout_s=BOUND_S, log_dir=tmp_path / "logs")
    error = caught.value
    # The peers then fail on the broken all_reduce (within milliseconds of an os._exit, which leaves
    # no exit record); the blame stays with the rank that failed first.
    assert error.ranks == (rank,)
    if hard:  # the exit code is known only if the launcher reported the rank before the job was stopped
        assert error.reason.startswith(("died without a Python exit", f"exit code {code}"))
    else:
        assert error.reason.startswith(f"exit code {code}")
    assert str(error).startswith(f"rank {rank}: ")
    assert f"rank {rank} exits with code {code} on purpose" in str(error)
    assert job_pids(error.token) == []


def test_a_hanging_rank_times_out_with_stack_dumps_and_leaves_nothing(tmp_path):
    """1 rank: the timeout path is the same for any count (a peer left waiting is the watchdog
    case's), and 1 starts fastest, so the 10 s bound is still well after the start on loaded cores."""
    started = time.monotonic()
    with pytest.raises(RankJobError) as caught:
        run_ranks([ALLREDUCE, str(tmp_path), "--hang-rank", "0"], 1, timeout_s=10,
                  log_dir=tmp_path / "logs")
    elapsed = time.monotonic() - started
    error = caught.value
    assert error.reason.startswith("timeout after 10 s; still running: ")
    assert error.ranks == (0,)
    assert "(most recent call first)" in str(error)  # faulthandler's dump of each rank's stack
    assert elapsed < 10 + 15  # + stack dump wait + SIGTERM (and SIGKILL) grace
    assert job_pids(error.token) == []


def test_the_collective_watchdog_ends_a_job_whose_rank_never_joins_and_says_who_is_elsewhere(tmp_path):
    """2 ranks: one that waits and the one that never joins. The grouping of several ranks at one
    position is test_watchdog.py's (blame.group_by_position) and test_two_nodes.py's (ranks 2, 3)."""
    with pytest.raises(RankJobError) as caught:
        run_ranks([ALLREDUCE, str(tmp_path), "--hang-rank", "1", "--watchdog", "2"], 2, timeout_s=BOUND_S,
                  log_dir=tmp_path / "logs")
    error = caught.value
    # Rank 0 waits in the sum and its watchdog fires: it is blamed, and the positions read from the
    # ranks' state files single out rank 1, which never entered a collective.
    assert error.ranks == (0,)
    assert error.reason.startswith("stuck in all_reduce #1 (the program's sum) at step 1 for "), error.reason
    assert "(exit code 124: the collective watchdog)" in error.reason
    assert error.reason.endswith("; collectives: rank 0 in all_reduce #1 (the program's sum) at step 1; "
                                 "rank 1 no collective watchdog state"), error.reason
    assert job_pids(error.token) == []


def masters(log_dir: Path) -> set[str]:
    """PADDLE_MASTER (rank 0's store address) as the launcher gave it to the job's ranks."""
    return {line.split("=", 1)[1] for path in log_dir.glob("envlog.*") for line in path.read_text().splitlines()
            if line.startswith("PADDLE_MASTER=")}


def test_a_job_and_a_pool_started_at_once_on_their_own_start_ports_do_not_collide_then_the_pool_answers_and_stops(
        tmp_path, faults):
    """Two 2-rank jobs at once, each told its own start port (the next one goes to its other rank),
    an all_reduce job and a pool: they do not collide, and every rank of each was pointed at its own
    job's store on that port. The pool is then asked both pool questions in turn (one start instead
    of two): several requests answered in rank order (the sum over (rank + 1) is 3) and a failure on
    every rank that leaves the ranks in step, then a failure on rank 1 alone while its silent peer
    is stuck in the collective, which stops the pool."""
    first = free_port(4)
    ports = [first, first + 2]
    out = tmp_path / "out"
    out.mkdir()
    with ThreadPoolExecutor(1) as executor:
        beside = executor.submit(run_ranks, [ALLREDUCE, str(out), "--scale", "2"], 2, timeout_s=BOUND_S,
                                 log_dir=tmp_path / "job-logs", start_port=ports[1])
        pool = RankPool([POOL_SERVER], 2, failpoints=faults, start_timeout_s=BOUND_S, log_dir=tmp_path / "pool-logs",
                        start_port=ports[0])
        try:
            result = beside.result()
        except BaseException:
            pool.close()
            raise
    try:
        assert result.returncode == 0 and result.port == ports[1]
        assert masters(result.log_dir) == {f"127.0.0.1:{ports[1]}"}
        for value in rank_values(out, 2):  # every rank holds the sum over ranks of 2 * (rank + 1)
            np.testing.assert_array_equal(value, np.full(3, 2 * (1 + 2), np.float32))
        assert sorted(result.rank_logs) == [0, 1] and all(p.exists() for p in result.rank_logs.values())
        assert job_pids(result.token) == []
        assert masters(pool.log_dir) == {f"127.0.0.1:{ports[0]}"}

        for seed in range(3):
            x = np.random.default_rng(seed).standard_normal(5 + seed).astype(np.float32)
            replies = pool.request({"x": x})
            assert [reply["rank"] for reply in replies] == [0, 1]
            np.testing.assert_array_equal(replies[1]["sum"], replies[0]["sum"])
            np.testing.assert_allclose(replies[0]["sum"], x * 3, rtol=1e-6)
        with pytest.raises(RankJobError) as caught:
            pool.request({"x": x, "raise_on": "all"})
        assert caught.value.ranks == (0, 1)
        assert "planted failure on rank 1" in str(caught.value)
        # Every rank raised before the collective, so the ranks are still in step: the pool serves on.
        np.testing.assert_allclose(pool.request({"x": x})[1]["sum"], x * 3, rtol=1e-6)

        with pytest.raises(RankJobError) as caught:
            pool.request({"x": np.ones(4, np.float32), "raise_on": 1})
        error = caught.value
        assert error.ranks == (1,)
        assert "rank 0 gave no reply" in error.reason
        assert "ValueError: planted failure on rank 1" in str(error)
        assert job_pids(pool.token) == []  # rank 0 was stuck in the all_reduce: stopped
        with pytest.raises(RankJobError, match="pool is closed"):
            pool.request({"x": x})
    finally:
        pool.close()
    assert job_pids(pool.token) == []


# ----------------------------------------------------------------------------- no launch


def test_payloads_round_trip_without_pickle():
    payload = {"ids": np.arange(6, dtype=np.int64).reshape(2, 3), "name": "x", "sizes": [1, 2], "none": None}
    decoded = decode(encode(payload))
    np.testing.assert_array_equal(decoded["ids"], payload["ids"])
    assert decoded["ids"].dtype == np.int64
    assert {k: decoded[k] for k in ("name", "sizes", "none")} == {"name": "x", "sizes": [1, 2], "none": None}


@pytest.mark.parametrize("payload, message", [
    ({"a": np.array([object()])}, "object arrays"),
    ({"a": {1, 2}}, "numpy arrays or JSON"),
    ({"__error__": "x"}, "not starting with '__'"),
])
def test_payloads_that_cannot_be_sent_are_refused(payload, message):
    with pytest.raises((TypeError, ValueError), match=message):
        encode(payload)


def test_a_start_port_out_of_range_or_taken_is_refused_before_any_rank_starts(tmp_path, faults):
    with pytest.raises(ValueError, match=re.escape("start_port must be an integer in [1024, 65532] (the first "
                                                   "of 4 ports, one per rank on this host), got 65533")):
        RankPool([POOL_SERVER], 4, failpoints=faults, log_dir=tmp_path / "pool", start_port=65533)
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ValueError, match=f"start_port {port}: that port is in use on this host"):
            run_ranks([ALLREDUCE, str(tmp_path)], 2, timeout_s=BOUND_S, log_dir=tmp_path / "job", start_port=port)
    assert not (tmp_path / "job" / "launcher.log").exists()  # refused before the launcher started


def test_a_listening_port_is_seen_without_connecting(tmp_path):
    """rank_entry.wait_for_store's test: bound is not listening, listening is; unreadable: unknown."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert is_listening(port) is False
        server.listen()
        assert is_listening(port) is True
    assert is_listening(port, tables=(tmp_path / "missing",)) is None


def test_free_ports_avoid_the_ephemeral_range():
    low = ephemeral_range()[0]
    ports = [free_port(4) for _ in range(20)]
    assert all(10000 <= p and p + 3 < low for p in ports)


def test_bad_arguments_are_refused_before_launching(tmp_path):
    with pytest.raises(ValueError, match="nproc"):
        run_ranks([ALLREDUCE], 0, timeout_s=1, log_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="argv"):
        run_ranks([], 2, timeout_s=1, log_dir=tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "old").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        run_ranks([ALLREDUCE], 2, timeout_s=1, log_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- blame, as data


def evidence(records=None, deaths=None, launcher_log="", stopping_since=None, terminated=()) -> Evidence:
    records = {r: {"code": code, "time": t, "error": ""} for r, (code, t) in (records or {}).items()}
    return Evidence(records, deaths or {}, launcher_log, stopping_since, launcher_code=1,
                    terminated_by_launcher=frozenset(terminated))


def test_a_rank_the_launcher_terminated_is_not_blamed_before_the_failure_that_made_it_do_so():
    """Rank 0's watchdog ended it (exit 124); the launcher then SIGTERMed rank 1, whose death was seen
    0.1 s later, within HARD_DEATH_LEAD_S (seen in a loaded gate run: rank 1 was blamed)."""
    ranks, reason = first_failure(evidence(records={0: (124, 100.0)}, deaths={1: 100.1}, terminated={1}))
    assert ranks == [0] and "exit code 124" in reason
    # Killed by anyone else (a case's own kill), the death is still blamed first.
    assert first_failure(evidence(records={0: (124, 100.0)}, deaths={1: 100.1}))[0] == [1]
    # With no other failure, a terminated rank is still the one named.
    assert first_failure(evidence(deaths={1: 100.1}, terminated={1}))[0] == [1]


def test_the_sender_of_a_sigterm_is_read_from_paddles_signal_report():
    line = "  [SignalInfo: *** SIGTERM (@0x61f7) received by PID 25158 (TID 0x7fe21860cb80) from PID 25079 ***]"
    assert terminated_by(f"some log\n{line}\n") == 25079
    assert terminated_by(line.replace("SIGTERM", "SIGSEGV")) is None
    assert terminated_by("") is None


@pytest.mark.parametrize("noticed_after_peer_s", [0.0, 0.3])
def test_a_hard_death_is_blamed_before_the_peer_failures_it_causes(noticed_after_peer_s):
    # Rank 2 was SIGKILLed; rank 0 failed on the broken all_reduce 50 ms later, and the death watch
    # may notice rank 2's end after that record (a loaded machine).
    peer_failed = 100.05
    ranks, reason = first_failure(evidence(records={0: (1, peer_failed)},
                                           deaths={2: peer_failed + noticed_after_peer_s, 0: peer_failed + 0.01}))
    assert ranks == [2]
    assert reason.startswith(HARD_DEATH) and "then rank 0 (exit code 1)" in reason


def test_an_exit_record_well_before_a_death_is_blamed_first():
    ranks, reason = first_failure(evidence(records={1: (3, 100.0)}, deaths={3: 101.0}))
    assert ranks == [1] and reason == "exit code 3"


def test_deaths_after_the_parent_began_stopping_the_job_are_not_failures():
    ranks, _ = first_failure(evidence(records={1: (3, 104.0)}, deaths={0: 108.0}, stopping_since=104.5))
    assert ranks == [1]
    assert first_failure(evidence(deaths={0: 105.0}, stopping_since=104.5)) == ([], "launcher exited with code 1")


def test_the_launcher_report_gives_the_signal_of_a_rank_without_a_record():
    line = "Container rank 2 status failed cmd ['python'] code -9 log /tmp/workerlog.2\n"
    assert first_failure(evidence(deaths={2: 100.0}, launcher_log=line)) == ([2], "killed by signal 9 (SIGKILL)")
    assert first_failure(evidence(launcher_log=line)) == ([2], "killed by signal 9 (SIGKILL)")


def test_a_killed_process_has_ended_before_it_is_reaped():
    """The stop's last look for deaths the watcher thread has not reported yet: a killed rank
    stays a zombie until the launcher reaps it (up to a second later), and counts as ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not has_ended(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        while not Path(f"/proc/{child.pid}/stat").read_bytes().rsplit(b")", 1)[1].startswith(b" Z"):
            time.sleep(0.01)  # not reaped: this process has not called wait() yet
        assert has_ended(child.pid)
    finally:
        child.kill()
        child.wait()
    assert has_ended(child.pid)
