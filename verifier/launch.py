"""Run N-rank jobs for the cases through `python -m paddle.distributed.launch`, bounded in time.

Two ways to run ranks:

- `run_ranks(argv, nproc, timeout_s=...)` runs one job to completion and returns a `JobResult`.
- `RankPool(argv, nproc)` starts ranks once; their program calls `serve(handler)`, and
  `pool.request(payload)` hands one payload to every rank and returns the replies by rank. This is
  how a hypothesis-driven case feeds many examples to one 4-rank job.

`argv` names a Python program as `python` would take it: `["-m", "pkg.module", *args]` or
`["path/to/script.py", *args]`. Every rank runs it under `_rank_main`, which records the rank's
exit (code, time, exception) in the log folder and lets the parent ask for a Python stack dump.

Failures raise `RankJobError` naming the rank: the first rank to fail, by the time of its exit
record or, for a rank that died without one (signal, os._exit, crash), of its death as watched
through a pidfd (the peers that then fail on the broken collective come later); or, at a timeout,
the ranks still running, with where each one's Python stack was (faulthandler dump). The message
has the tail of each named rank's log. Whatever happens, the call returns only once no process of
the job is left: the launcher's process group and every process carrying the job's token
(`job_pids`) get SIGTERM, then SIGKILL after a grace period.

A job's log folder holds Paddle's files (below) and this module's: `launcher.log` (the launcher's
own stdout/stderr), `exit.R.json` (rank R's exit record) and, for a pool, `pool/` (requests,
replies and ready marks, as .npz files).

What this relies on in Paddle 3.3.1's launcher (measured on CPU; the same flags select NCCL on GPU):
  - Single node: `--nnodes 1 --nproc_per_node N`. `--master` is ignored for one node (the workers'
    PADDLE_MASTER is a random port the launcher picks itself), so the port goes in through
    `--ips 127.0.0.1 --start_port P`: rank 0 then serves the TCP store on P (P+1.. are assigned as
    endpoints but nothing listens on them with gloo). No `--devices` on CPU: with no devices the
    launcher sets PADDLE_DISTRI_BACKEND=gloo.
  - Logs: `workerlog.R` per rank (stdout and stderr), `envlog.R`, `backup_env.R.json`,
    `<job>.<pod>.log` (holds the launcher's whole environment). Files are appended to, so every
    job gets a fresh folder. The launcher echoes rank 0's log to its own stdout.
  - Every worker is started with `setsid`: it is NOT in the launcher's process group, so killing
    that group alone leaves the ranks running. Hence the token.
  - The launcher polls its workers every second, so it sees a rank end about 1 s after the
    process is gone (Paddle's interpreter tear-down takes another 1-3 s after the program's last
    line). On a failure it logs `Container rank R status failed cmd [...] code C log ...`,
    SIGTERMs the others and exits with the first non-zero code in rank order, usually that of a
    terminated peer (-15, exit status 241): its exit code never names the rank that failed first.
  - Worker processes get a Paddle SIGTERM handler ("FatalError: `Termination signal` is detected").
  - A rank that tries the TCP store before rank 0 listens logs "Retry to connect ... not yet
    listening" and sleeps 3 s before the next try: many starts pay up to 3 s for it.
  - envlog.R, backup_env.R.json and <job>.<pod>.log copy the whole environment of this process:
    do not publish log folders of a CI run that has secrets in its environment.

Linux only for the token scan (it reads /proc); elsewhere only the process group is signalled.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import itertools
import json
import logging
import math
import os
import random
import re
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

_log = logging.getLogger(__name__)

TOKEN_ENV = "GRAPHGATE_JOB_TOKEN"  # marks every process of one job, for the clean-up scan
_PARENT_ENV = "GRAPHGATE_JOB_PARENT"  # pid of the process that launched the job
_POOL_DIR_ENV = "GRAPHGATE_POOL_DIR"  # where a pool's requests and replies live
_RANK_ENV = "PADDLE_TRAINER_ID"  # set by the launcher for each worker
_LAUNCHER_LOG = "launcher.log"
# The ranks import this checkout's packages, like the parent: its root replaces `python -c`'s ''.
_RANK_ENTRY = (f"import sys; sys.path[0:1] = [{str(Path(__file__).resolve().parents[1])!r}]; "
               "from verifier.launch import _rank_main; _rank_main()")
_FAILED_LINE = re.compile(r"Container rank (\d+) status failed cmd .* code (-?\d+) log ")
_FRAME_LINE = re.compile(r'\s+File "(.*)", line (\d+) in (\S+)')
_ERROR_KEY = "__error__"
_SHUTDOWN_KEY = "__shutdown__"
_JSON_KEY = "__json__"
_STOP_GRACE_S = 5.0
_DUMP_WAIT_S = 3.0  # longest wait for the stack dumps: a loaded machine runs the handlers late
_DUMP_HEADER = "(most recent call first):"
_DUMP_FRAMES = 12  # innermost frames of each rank's main thread shown in a timeout message
# A death without an exit record is blamed before exit records up to this much older: the peers of
# a rank that dies hard fail on the broken connection within milliseconds, and this process may
# notice the death 100 ms late on a loaded machine (measured: 75 ms, after a peer's record).
_HARD_DEATH_LEAD_S = 0.5


# ----------------------------------------------------------------------------- public data


@dataclass(frozen=True)
class JobResult:
    """A finished job. `rank_logs[r]` is rank r's combined stdout/stderr."""

    returncode: int
    elapsed_s: float
    log_dir: Path
    rank_logs: dict[int, Path]
    port: int
    token: str

    def tail(self, rank: int, lines: int = 30) -> str:
        """The last `lines` lines of rank `rank`'s log ('' if the rank wrote nothing)."""
        return _tail(self.rank_logs[rank], lines)


class RankJobError(RuntimeError):
    """A job failed or timed out. `ranks`: the first rank that failed, the ranks whose handler
    raised, the ranks that did not answer in time, or else the ranks still running at a timeout
    (empty when no rank can be blamed, e.g. the launcher itself failed). The message holds
    `reason` and the tail of each named rank's log (and its Python stack after a timeout);
    `log_dir` has the full logs, `token` names the job for `job_pids`."""

    def __init__(self, ranks: Sequence[int], reason: str, log_dir: Path, token: str, details: str):
        self.ranks = tuple(ranks)
        self.reason = reason
        self.log_dir = log_dir
        self.token = token
        super().__init__(f"{_rank_names(self.ranks)}: {reason} (logs: {log_dir})\n{details}")


def free_port(count: int = 1) -> int:
    """First of `count` consecutive TCP ports that are free now, chosen below the kernel's
    ephemeral range: a port from `bind(0)` comes from that range, where any outgoing connection
    (the gloo meshes of concurrent jobs open dozens) may take it before rank 0 binds it seconds
    later. Random choice keeps concurrent callers (pytest -n 4) apart."""
    low = _ephemeral_range()[0]
    rng = random.Random(os.urandom(8))
    for _ in range(200):
        first = rng.randrange(10000, max(low - count, 10001))
        if all(_bindable(first + i) for i in range(count)):
            return first
    return _bound_port()


def job_pids(token: str) -> list[int]:
    """Live processes carrying this job token (the launcher, the ranks and their children).
    Empty once `run_ranks` returned or raised, or a pool is closed."""
    return [proc.pid for proc in _job_processes(token)]


def run_ranks(argv: Sequence[str], nproc: int, *, timeout_s: float, log_dir: Path | None = None,
              env: Mapping[str, str] | None = None) -> JobResult:
    """Run the Python program `argv` on `nproc` ranks and wait for all of them.

    `timeout_s` bounds the whole job including start-up (a trivial 4-rank job takes 10-20 s on two
    cores). `log_dir` must be missing or empty (None: a fresh temporary folder, kept). `env` is
    added to this process's environment for the ranks; nothing is set in this process.
    Raises RankJobError if a rank fails or the job times out; no process is left either way."""
    _check_positive("timeout_s", timeout_s)
    job = _Launch(argv, nproc, _fresh_dir(log_dir), env or {})
    try:
        returncode = job.wait(timeout_s)
    except BaseException:
        job.stop()
        raise
    if returncode != 0:
        raise job.exit_error()
    job.stop()  # reaps stragglers (children a rank left behind)
    return JobResult(returncode, time.monotonic() - job.started, job.log_dir, job.rank_logs,
                     job.port, job.token)


# ----------------------------------------------------------------------------- the pool


class RankPool:
    """`nproc` ranks started once, each running `argv`, a program that sets up (init_parallel_env,
    load a model) and then calls `serve(handler)`.

    `request(payload)` gives the same payload to every rank and returns `replies[rank]`. Payloads
    and replies are dicts of numpy arrays and JSON values, passed as .npz files in the pool folder
    (no pickle). One caller at a time. Use as a context manager, or call `close()`.

    If every rank's handler raises, `request` raises RankJobError naming them and the pool stays
    usable. If some ranks raise and the others give no reply within `error_grace_s` (they wait in
    a collective the failed ranks never joined), a rank dies, or the request times out, the ranks
    are stopped, RankJobError names the ranks, and every later request raises.

    `start_s`: seconds from the launch until every rank was serving."""

    def __init__(self, argv: Sequence[str], nproc: int, *, start_timeout_s: float = 120.0,
                 request_timeout_s: float = 60.0, error_grace_s: float = 3.0,
                 log_dir: Path | None = None, env: Mapping[str, str] | None = None):
        for name, value in [("start_timeout_s", start_timeout_s),
                            ("request_timeout_s", request_timeout_s), ("error_grace_s", error_grace_s)]:
            _check_positive(name, value)
        self.request_timeout_s = request_timeout_s
        self.error_grace_s = error_grace_s
        log_dir = _fresh_dir(log_dir)
        self.pool_dir = log_dir / "pool"
        self.pool_dir.mkdir()
        self._job = _Launch(argv, nproc, log_dir, {**(env or {}), _POOL_DIR_ENV: str(self.pool_dir)})
        self._requests = itertools.count()
        self._closed_because: str | None = None
        try:
            self._wait_ready(start_timeout_s)
        except BaseException:
            self._stop("start-up failed")
            raise
        self.start_s = time.monotonic() - self._job.started

    @property
    def nproc(self) -> int:
        return self._job.nproc

    @property
    def log_dir(self) -> Path:
        return self._job.log_dir

    @property
    def token(self) -> str:
        return self._job.token

    def request(self, payload: Mapping[str, Any], *, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Send `payload` (a dict of numpy arrays and JSON values; keys not starting with "__")
        to every rank; return the handlers' replies, `replies[rank]`, within `timeout_s` (default:
        the pool's `request_timeout_s`)."""
        if self._closed_because is not None:
            raise RankJobError((), f"pool is closed ({self._closed_because})", self.log_dir,
                               self.token, "")
        timeout_s = self.request_timeout_s if timeout_s is None else timeout_s
        _check_positive("timeout_s", timeout_s)
        number = next(self._requests)
        _write_atomic(self.pool_dir / f"request.{number}.npz", _encode(payload))
        try:
            replies = self._collect(number, timeout_s)
        finally:
            if self._closed_because is None:  # a stopped pool keeps its files for inspection
                for path in self.pool_dir.glob(f"*.{number}.*"):
                    path.unlink()
        return [replies[rank] for rank in range(self.nproc)]

    def close(self, timeout_s: float = 30.0) -> None:
        """Ask the ranks to return from `serve`, then end the job; afterwards no process is left.
        Once every rank's program has returned (exit code 0) the job is stopped without waiting
        for the interpreters' tear-down (seconds on a loaded machine). Raises RankJobError if a
        rank fails or they have not all returned within `timeout_s`. Closing twice is a no-op."""
        if self._closed_because is not None:
            return
        self._closed_because = "close() was called"
        _write_atomic(self.pool_dir / f"request.{next(self._requests)}.npz",
                      _encode({_SHUTDOWN_KEY: True}, reserved_ok=True))
        deadline = time.monotonic() + timeout_s
        try:
            for pause in _backoff(limit_s=0.05):
                records, returncode = self._job.exit_records(), self._job.proc.poll()
                if returncode not in (None, 0) or any(rec["code"] for rec in records.values()):
                    raise self._job.exit_error()
                if returncode == 0:
                    return
                if len(records) == self.nproc:  # programs done: skip the tear-down, and the
                    self._job.stop(signal.SIGKILL)  # noise Paddle's SIGTERM handler logs
                    return
                if time.monotonic() > deadline:
                    raise self._job.timeout_error(f"did not shut down within {timeout_s:g} s")
                time.sleep(pause)
        finally:
            self._job.stop()

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stop("stopped by an exception in the caller")

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        ready: set[int] = set()
        for pause in _backoff():
            ready |= {r for r in range(self.nproc) if (self.pool_dir / f"ready.{r}").exists()}
            if len(ready) == self.nproc:
                return
            self._check_alive()
            if time.monotonic() > deadline:
                not_ready = [r for r in range(self.nproc) if r not in ready]
                raise self._timed_out(f"not ready within {timeout_s:g} s", not_ready)
            time.sleep(pause)

    def _collect(self, number: int, timeout_s: float) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        replies: dict[int, dict[str, Any]] = {}
        grace_end = None
        for pause in _backoff():
            replies.update(self._read_replies(number, replies))
            errors = sorted(r for r, reply in replies.items() if _ERROR_KEY in reply)
            if len(replies) == self.nproc:
                if errors:
                    raise self._handler_error(number, replies, errors, stopped=False)
                return replies
            if errors and grace_end is None:
                grace_end = time.monotonic() + self.error_grace_s
            self._check_alive()
            if grace_end is not None and time.monotonic() > grace_end:
                self._stop("stopped after a handler error")
                raise self._handler_error(number, replies, errors, stopped=True)
            if time.monotonic() > deadline:
                waiting = [r for r in range(self.nproc) if r not in replies]
                raise self._timed_out(f"request {number}: no reply within {timeout_s:g} s", waiting)
            time.sleep(pause)

    def _read_replies(self, number: int, have: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        paths = {r: self.pool_dir / f"reply.{number}.{r}.npz" for r in range(self.nproc) if r not in have}
        return {r: _decode(path.read_bytes()) for r, path in paths.items() if path.exists()}

    def _check_alive(self) -> None:
        """Raise if the launcher ended or any rank exited: no rank may leave `serve` unasked."""
        if self._job.proc.poll() is not None or self._job.exit_records() or self._job.deaths:
            self._closed_because = "a rank exited"
            raise self._job.exit_error(any_exit_fails=True)

    def _stop(self, reason: str) -> None:
        """Stop the ranks for good; later requests raise, quoting the first reason."""
        self._closed_because = self._closed_because or reason
        self._job.stop()

    def _timed_out(self, reason: str, suspects: Sequence[int]) -> RankJobError:
        """Stop the ranks for good and return the error naming `suspects`."""
        self._closed_because = self._closed_because or reason
        return self._job.timeout_error(reason, suspects)

    def _handler_error(self, number: int, replies: Mapping[int, dict], errors: list[int],
                       stopped: bool) -> RankJobError:
        silent = [r for r in range(self.nproc) if r not in replies]
        reason = f"request {number} raised on {_rank_names(errors)}"
        if stopped:
            reason += (f"; {_rank_names(silent)} gave no reply within {self.error_grace_s:g} s "
                       "after that, so the pool was stopped")
        details = "".join(f"---- rank {r} ----\n{replies[r][_ERROR_KEY]}" for r in errors)
        return RankJobError(errors, reason, self.log_dir, self.token, details)


# ----------------------------------------------------------------------------- rank side


def serve(handler: Callable[[dict[str, Any]], Mapping[str, Any]]) -> None:
    """Answer a RankPool's requests on this rank until the pool closes; call it after set-up.

    `handler(payload)` returns a dict of numpy arrays and JSON values (reply keys must not start
    with "__"). An exception in `handler` is sent back as this rank's error and serving goes on.
    Only for programs started by RankPool (it reads the pool folder from the environment)."""
    pool_dir = Path(os.environ[_POOL_DIR_ENV])
    rank = int(os.environ[_RANK_ENV])
    _write_atomic(pool_dir / f"ready.{rank}", b"")
    for number in itertools.count():
        payload = _decode(_wait_for(pool_dir / f"request.{number}.npz"))
        if payload.get(_SHUTDOWN_KEY):
            return
        _write_atomic(pool_dir / f"reply.{number}.{rank}.npz", _answer(handler, payload))


def _answer(handler: Callable, payload: dict[str, Any]) -> bytes:
    try:
        return _encode(handler(payload))
    except Exception:
        return _encode({_ERROR_KEY: traceback.format_exc()}, reserved_ok=True)


def _wait_for(path: Path) -> bytes:
    for pause in _backoff(limit_s=0.02):
        if path.exists():
            return path.read_bytes()
        time.sleep(pause)


def _rank_main() -> None:
    """Each rank's entry point (run as `python -c`): run the program in sys.argv[1:] as `python`
    would, with a stack dump on SIGUSR1, an exit record for the parent, and an exit when the
    parent that launched the job is gone (so a killed test run leaves no ranks behind)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _watch_parent()
    code, error = 0, ""
    try:
        _run_program(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    except BaseException as exc:
        code, error = 1, traceback.format_exception_only(exc)[-1].strip()[:300]
        raise
    finally:
        _record_exit(code, error)


def _run_program(argv: list[str]) -> None:
    """As `python -m module args` or `python script args` would (sys.path[0], sys.argv)."""
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        runpy.run_path(argv[0], run_name="__main__")


def _record_exit(code: int, error: str) -> None:
    rank, log_dir = os.environ.get(_RANK_ENV), os.environ.get("PADDLE_LOG_DIR")
    if rank is None or log_dir is None:
        return
    record = {"rank": int(rank), "code": code, "time": time.time(), "error": error}
    _write_atomic(Path(log_dir) / f"exit.{rank}.json", json.dumps(record).encode())


def _watch_parent() -> None:
    parent = int(os.environ.get(_PARENT_ENV, "0"))
    if parent <= 0:
        return

    def watch() -> None:
        while _pid_alive(parent):
            time.sleep(1.0)
        print(f"verifier.launch: parent process {parent} is gone; this rank exits", file=sys.stderr)
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# ----------------------------------------------------------------------------- one launched job


class _Launch:
    """One started launcher job: its command, processes and logs, and how to stop and blame."""

    def __init__(self, argv: Sequence[str], nproc: int, log_dir: Path, env: Mapping[str, str]):
        self.argv = _check_argv(argv)
        if not (isinstance(nproc, int) and nproc >= 1):
            raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
        self.nproc = nproc
        self.log_dir = log_dir
        self.rank_logs = {r: self.log_dir / f"workerlog.{r}" for r in range(nproc)}
        self.token = uuid.uuid4().hex
        self.port = free_port(nproc)
        self.deaths: dict[int, float] = {}  # rank -> time.time() its process ended (_watch_deaths)
        self._stopping_since: float | None = None
        self._stopped = threading.Event()
        child_env = {**os.environ, **_check_env(env), TOKEN_ENV: self.token, _PARENT_ENV: str(os.getpid())}
        self._out = open(self.log_dir / _LAUNCHER_LOG, "wb")
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(self._command(), env=child_env, stdin=subprocess.DEVNULL,
                                         stdout=self._out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        except BaseException:
            self._out.close()
            raise
        if hasattr(os, "pidfd_open"):
            threading.Thread(target=self._watch_deaths, name="rank-deaths", daemon=True).start()
        _log.debug("started %d ranks of %s on port %d, logs in %s", nproc, self.argv, self.port, self.log_dir)

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "paddle.distributed.launch", "--nnodes", "1",
                "--nproc_per_node", str(self.nproc), "--ips", "127.0.0.1",
                "--start_port", str(self.port), "--log_dir", str(self.log_dir),
                sys.executable, "-u", "-c", _RANK_ENTRY, *self.argv]

    def wait(self, timeout_s: float) -> int:
        """The launcher's exit code once the job ended by itself; RankJobError (job stopped) as
        soon as a rank's exit record shows a failure, or at the timeout."""
        deadline = self.started + timeout_s
        while True:
            try:
                return self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            if any(rec["code"] for rec in self.exit_records().values()):
                raise self.exit_error()
            if time.monotonic() > deadline:
                raise self.timeout_error(f"timeout after {timeout_s:g} s")

    def _watch_deaths(self) -> None:
        """Thread: note when each rank's process ends (pidfd), the only witness of a rank that
        dies without Python unwinding (signal, os._exit, crash), which leaves no exit record."""
        watched: dict[int, int] = {}  # pidfd -> rank
        try:
            while not self._stopped.is_set() and len(self.deaths) < self.nproc:
                if len(watched) + len(self.deaths) < self.nproc:  # some ranks not found yet
                    for rank, pid in self.rank_pids().items():
                        if rank not in watched.values() and rank not in self.deaths:
                            with contextlib.suppress(ProcessLookupError):
                                watched[os.pidfd_open(pid)] = rank
                ready, _, _ = select.select(list(watched), [], [], 0.2)
                for fd in ready:
                    self.deaths[watched.pop(fd)] = time.time()
                    os.close(fd)
        finally:
            for fd in watched:
                os.close(fd)

    def rank_pids(self) -> dict[int, int]:
        """rank -> pid of each rank's own process (not its children) still alive."""
        procs = _job_processes(self.token)
        by_pid = {p.pid: p for p in procs}
        return {p.rank: p.pid for p in procs if p.rank is not None
                and not (p.ppid in by_pid and by_pid[p.ppid].rank == p.rank)}

    def exit_records(self) -> dict[int, dict[str, Any]]:
        records = (json.loads(path.read_text()) for path in self.log_dir.glob("exit.*.json"))
        return {rec["rank"]: rec for rec in records}

    def stop(self, first_signal: int = signal.SIGTERM) -> None:
        """End every process of the job: `first_signal`, SIGKILL what is left after a grace
        period; reap the launcher. Safe to call again."""
        self._stopping_since = self._stopping_since or time.time()
        self._signal_all(first_signal)
        if not self._wait_gone(_STOP_GRACE_S):
            _log.warning("job %s: processes left after SIGTERM, sending SIGKILL", self.log_dir)
            self._signal_all(signal.SIGKILL)
            self._wait_gone(_STOP_GRACE_S)
        self.proc.wait()
        self._out.close()
        self._stopped.set()

    def _signal_all(self, sig: int) -> None:
        groups = {_pgid(pid) for pid in job_pids(self.token)}
        if self.proc.poll() is None:  # not reaped yet, so its pid is still its group's
            groups.add(self.proc.pid)
        for pgid in groups - {None, os.getpgrp()}:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in job_pids(self.token):  # a child that moved to a group of its own
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not job_pids(self.token):
                return True
            time.sleep(0.05)
        return False

    def timeout_error(self, reason: str, suspects: Sequence[int] | None = None) -> RankJobError:
        """Dump the running ranks' stacks into their logs, blame `suspects` (default: the running
        ranks), say where each running rank was, stop the job. The tails are read before the stop
        so that they end with the dump, not with the noise of Paddle's SIGTERM handler."""
        running = self.rank_pids()
        dumps = self._stack_dumps(running)
        where = _group_by_frame({r: _innermost_frame(dump) for r, (_, dump) in dumps.items()})
        blamed = sorted(running if suspects is None else suspects)
        error = self._error(blamed, f"{reason}; still running: {where or 'no rank'}", lines=15, dumps=dumps)
        self.stop()
        return error

    def _stack_dumps(self, running: Mapping[int, int]) -> dict[int, tuple[int, str]]:
        """rank -> (log size before, what the log gained after) a SIGUSR1, which makes
        faulthandler (registered by _rank_main) write the rank's Python stacks."""
        offsets = {r: _size(self.rank_logs[r]) for r in running}
        for pid in running.values():
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + _DUMP_WAIT_S
        while running:
            dumps = {r: _read_span(self.rank_logs[r], offsets[r]) for r in running}
            if time.monotonic() > deadline or all(_DUMP_HEADER in dump for dump in dumps.values()):
                time.sleep(0.05)  # let a dump that has just begun finish
                break
            time.sleep(0.05)
        return {r: (offsets[r], _read_span(self.rank_logs[r], offsets[r])) for r in running}

    def exit_error(self, any_exit_fails: bool = False) -> RankJobError:
        """Stop the job and blame the rank that failed first (with `any_exit_fails`, the first
        rank that exited at all: a pool's ranks must not end before they are asked to)."""
        self.stop()
        ranks, reason = self._blame(any_exit_fails)
        return self._error(ranks, reason, lines=30)

    def _blame(self, any_exit_fails: bool) -> tuple[list[int], str]:
        """The rank that failed first: by its exit record's time, or, for a rank that died without
        one (before this job was being stopped), by its death's time less _HARD_DEATH_LEAD_S. The
        launcher's report gives the code of a rank without a record when it names it."""
        records = self.exit_records()
        found = _FAILED_LINE.search((self.log_dir / _LAUNCHER_LOG).read_text(errors="replace"))
        named = {int(found[1]): _code_text(int(found[2]))} if found else {}
        failures = {r: (rec["time"], _exit_reason(rec)) for r, rec in records.items()
                    if rec["code"] != 0 or any_exit_fails}
        failures |= {r: (died, named.get(r, "died without a Python exit (signal, os._exit, crash)"))
                     for r, died in self.deaths.copy().items()  # copy: the watcher thread adds
                     if r not in records and died < (self._stopping_since or math.inf)}
        if not failures and named:
            [(rank, text)] = named.items()
            return [rank], text
        if not failures:
            return [], f"launcher exited with code {self.proc.returncode}"
        first = min(failures, key=lambda r: failures[r][0] - (0 if r in records else _HARD_DEATH_LEAD_S))
        later = sorted((r for r in failures if r != first and r in records), key=lambda r: failures[r][0])
        reason = failures[first][1]
        if later:
            reason += "; then " + ", ".join(f"rank {r} ({failures[r][1]})" for r in later)
        return [first], reason

    def _error(self, ranks: list[int], reason: str, lines: int,
               dumps: Mapping[int, tuple[int, str]] | None = None) -> RankJobError:
        """The error with each named rank's log tail (before its stack dump, then the dump's main
        thread, when `dumps` has one), or the launcher's log tail when no rank is named."""
        dumps = dumps or {}
        parts = []
        for r in ranks:
            end, dump = dumps.get(r, (None, ""))
            path = self.rank_logs[r]
            parts.append(f"---- rank {r}: last {lines} lines of {path} ----\n{_tail(path, lines, end)}\n")
            if dump:
                parts.append(f"---- rank {r}: Python stack, innermost first ----\n{_main_stack(dump)}\n")
        if not ranks:
            path = self.log_dir / _LAUNCHER_LOG
            parts.append(f"---- launcher: last {lines} lines of {path} ----\n{_tail(path, lines)}\n")
        return RankJobError(ranks, reason, self.log_dir, self.token, "".join(parts))


# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    rank: int | None


def _job_processes(token: str) -> list[_Proc]:
    """Processes whose environment carries TOKEN_ENV=token (Linux /proc; [] elsewhere)."""
    needle = f"{TOKEN_ENV}={token}".encode()
    found = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in environ:
            found.append(_Proc(int(name), int(stat.rsplit(b")", 1)[1].split()[1]), _env_rank(environ)))
    return found


def _env_rank(environ: list[bytes]) -> int | None:
    prefix = f"{_RANK_ENV}=".encode()
    values = [item[len(prefix):] for item in environ if item.startswith(prefix)]
    return int(values[0]) if values else None


def _main_thread_block(dump: str) -> list[str]:
    """The 'Current thread' block of a faulthandler dump: header, then frames innermost first.
    (The kernel hands a process-directed signal to the main thread unless it blocks it.)"""
    lines = dump.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Current thread ")]
    if not starts:
        return []
    block = [lines[starts[-1]]]
    for line in lines[starts[-1] + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


def _main_stack(dump: str) -> str:
    block = _main_thread_block(dump) or dump.splitlines()
    more = ["  ..."] if len(block) > _DUMP_FRAMES + 1 else []
    return "\n".join(block[:_DUMP_FRAMES + 1] + more)


def _innermost_frame(dump: str) -> str | None:
    """Where the main thread was in a faulthandler dump: 'file.py:41 in main'."""
    block = _main_thread_block(dump)
    frame = _FRAME_LINE.match(block[1]) if len(block) > 1 else None
    return f"{Path(frame[1]).name}:{frame[2]} in {frame[3]}" if frame else None


def _group_by_frame(frames: Mapping[int, str | None]) -> str:
    """'rank 1 at a.py:3 in f; ranks 0, 2 at b.py:9 in g' (smallest group first: the odd one out)."""
    groups: dict[str, list[int]] = {}
    for rank, frame in sorted(frames.items()):
        groups.setdefault(frame or "an unknown place (no stack dump)", []).append(rank)
    ordered = sorted(groups.items(), key=lambda item: (len(item[1]), item[1]))
    return "; ".join(f"{_rank_names(ranks)} at {frame}" for frame, ranks in ordered)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exit_reason(record: Mapping[str, Any]) -> str:
    text = _code_text(record["code"]) if record["code"] else "returned (exit code 0) unasked"
    return f"{text}: {record['error']}" if record["error"] else text


def _code_text(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exit code {code}"


def _rank_names(ranks: Sequence[int]) -> str:
    if not ranks:
        return "job"
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _tail(path: Path, lines: int, end: int | None = None) -> str:
    """The last `lines` lines of a file, or of its first `end` bytes; '' if it does not exist."""
    end = _size(path) if end is None else end
    start = max(0, end - 200 * lines - 4096)
    text = _read_span(path, start, end)
    return "\n".join(text.splitlines()[-lines:])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_span(path: Path, start: int, end: int | None = None) -> str:
    """Bytes [start, end) of a file (to its end when `end` is None), decoded; '' if missing."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
    except FileNotFoundError:
        return ""
    return data.decode(errors="replace")


def _backoff(limit_s: float = 0.01):
    """Sleep lengths for a polling loop: 0.5 ms doubling up to `limit_s`, forever."""
    pause = 0.0005
    while True:
        yield pause
        pause = min(2 * pause, limit_s)


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers on this machine see the old state or all of `data` (no fsync: not for durability)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _encode(payload: Mapping[str, Any], reserved_ok: bool = False) -> bytes:
    """A dict of numpy arrays and JSON values -> .npz bytes (arrays as entries, the rest as JSON)."""
    arrays, plain = {}, {}
    for key, value in payload.items():
        if not isinstance(key, str) or (key.startswith("__") and not reserved_ok):
            raise ValueError(f"payload key {key!r}: keys are strings not starting with '__'")
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError(f"payload key {key!r}: object arrays cannot be sent (no pickle)")
            arrays[key] = value
        else:
            plain[key] = value
    try:
        text = json.dumps(plain)
    except TypeError as exc:
        raise TypeError(f"payload values must be numpy arrays or JSON values: {exc}") from None
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{_JSON_KEY: np.frombuffer(text.encode(), dtype=np.uint8)})
    return buffer.getvalue()


def _decode(data: bytes) -> dict[str, Any]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        payload = json.loads(npz[_JSON_KEY].tobytes())
        payload.update({key: npz[key] for key in npz.files if key != _JSON_KEY})
    return payload


def _check_argv(argv: Sequence[str]) -> tuple[str, ...]:
    argv = tuple(argv)
    if not argv or not all(isinstance(a, str) for a in argv) or argv == ("-m",):
        raise ValueError(f"argv must be ['-m', module, *args] or [script, *args] (strings), got {argv!r}")
    return argv


def _check_env(env: Mapping[str, str]) -> dict[str, str]:
    bad = [k for k, v in env.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"env keys and values must be strings: {bad}")
    return dict(env)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _fresh_dir(path: Path | None) -> Path:
    """`path` created if missing (must be empty if present), or a new temporary folder."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix="ranks-")).resolve()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise ValueError(f"log_dir {path} is not empty: every job needs a fresh folder")
    return path.resolve()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def _bound_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
