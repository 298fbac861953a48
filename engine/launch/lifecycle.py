"""One started N-rank job: start it, watch its ranks, stop it, and say which rank failed.

What this relies on in Paddle 3.3.1's launcher (measured on CPU; the same flags select NCCL on GPU):
  - Single node: `--nnodes 1 --nproc_per_node N`. `--master` is ignored for one node (the workers'
    PADDLE_MASTER is a random port the launcher picks itself), so the port goes in through
    `--ips 127.0.0.1 --start_port P`: rank 0 then serves the TCP store on P (P+1.. are assigned as
    endpoints but nothing listens on them with gloo). No `--devices` on CPU: with no devices the
    launcher sets PADDLE_DISTRI_BACKEND=gloo.
  - Logs: `workerlog.R` per rank (stdout and stderr), `envlog.R`, `backup_env.R.json`,
    `<job>.<pod>.log` (holds the launcher's whole environment). Files are appended to, so every
    job gets a fresh folder. The launcher echoes rank 0's log to its own stdout, kept here in
    `launcher.log`; rank_entry adds `exit.R.json`, the collective watchdog (watchdog.py)
    `collectives.R.json` (where each rank was: the blame's message quotes it).
  - Several nodes (nodes.py): one launcher per host, each with `--nnodes N --ips A,B,... --host
    <its address> --start_port P` (P: nodes.START_PORT unless the caller chose one); a host's
    workers are `workerlog.0..K-1` by local index, but PADDLE_TRAINER_ID (the exit records, the watchdog's files) and the blame use global
    ranks, and the launcher's "Container rank R" is local too (blame.Evidence.rank_offset). This
    side sees only its own host's ranks: a peer host's failure reaches it as its own ranks' failing
    collectives.
  - Every worker is started with `setsid` (see processes.py for why that needs the token).
  - The launcher polls its workers every second, so it sees a rank end about 1 s after the
    process is gone (rank_entry skips Paddle's interpreter tear-down, 1-3 s, after a program that
    returned). A one-node job whose ranks all recorded exit code 0 and are gone is ended here
    without waiting for that poll (Launch.wait). On a failure it logs `Container rank R status failed cmd [...] code C log ...`,
    SIGTERMs the others and exits with the first non-zero code in rank order (blame.py).
  - Worker processes get a Paddle SIGTERM handler ("FatalError: `Termination signal` is detected").
  - A rank that tries the TCP store before rank 0 listens logs "Retry to connect ... not yet
    listening" and sleeps 3 s before the next try: many starts pay up to 3 s for it.
  - envlog.R, backup_env.R.json and <job>.<pod>.log copy the whole environment of this process:
    do not publish log folders of a CI run that has secrets in its environment.
"""

from __future__ import annotations

import contextlib
import math
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from engine.launch import blame, processes, rank_logs, watchdog
from engine.launch.nodes import START_PORT, Nodes
from engine.launch.ports import check_free, check_start_port, free_port
from engine.launch.rank_entry import ENTRY_CODE, PARENT_ENV, TOKEN_ENV, joined_path

_log = logging.getLogger(__name__)

LAUNCHER_LOG = "launcher.log"
_STOP_GRACE_S = 5.0
_DUMP_WAIT_S = 3.0  # longest wait for the stack dumps: a loaded machine runs the handlers late
_POLL_S = 0.2


class Launch:
    """A job started through `python -m paddle.distributed.launch`: `argv` (['-m', module, *args]
    or [script, *args]) on `nproc` ranks, logs in `log_dir` (fresh), `env` added to this process's
    environment for the ranks. Processes carry a new token; a thread notes each rank's death.
    Over several `nodes` this object starts and watches this host's share, `ranks` (global).
    `start_port` (name it `port_name` in errors): the port rank 0 serves its store on; None: a
    free one drawn at random on one node, START_PORT over several (every host must agree)."""

    def __init__(self, argv: Sequence[str], nproc: int, log_dir: Path, env: Mapping[str, str],
                 nodes: Nodes = Nodes(), start_port: int | None = None, port_name: str = "start_port"):
        self.argv = _check_argv(argv)
        if not (isinstance(nproc, int) and nproc >= 1):
            raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
        self.nproc = nproc
        self.nodes = nodes
        self.ranks = nodes.local_ranks(nproc)
        self.log_dir = log_dir
        self.rank_logs = {r: self.log_dir / f"workerlog.{i}" for i, r in enumerate(self.ranks)}
        self.token = uuid.uuid4().hex
        self.port = _job_port(nodes, len(self.ranks), start_port, port_name)
        self.deaths: dict[int, float] = {}  # rank -> time.time() its process was seen to end
        self._watched_pids: dict[int, int] = {}  # rank -> pid, once _watch_deaths found it
        self._stopping_since: float | None = None
        self._stopped = threading.Event()
        child_env = {**os.environ, **_check_env(env), TOKEN_ENV: self.token, PARENT_ENV: str(os.getpid())}
        self._out = open(self.log_dir / LAUNCHER_LOG, "wb")
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
        _log.debug("started ranks %s of %d of %s on port %d, logs in %s", list(self.ranks), nproc, self.argv,
                   self.port, self.log_dir)

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "paddle.distributed.launch", *self.nodes.launcher_args(self.nproc, self.port),
                "--log_dir", str(self.log_dir),
                sys.executable, "-u", "-c", ENTRY_CODE, *self.argv]

    def wait(self, timeout_s: float | None, start_timeout_s: float | None = None) -> int:
        """The launcher's exit code once the job ended by itself. RankJobError (job stopped) as
        soon as a rank's exit record shows a failure or a rank died without one, at the timeout
        (None: no timeout), or when this host's ranks have not all joined the job (rank_entry's
        `joined.R`) `start_timeout_s` after the start (None: no start-up bound)."""
        deadline = math.inf if timeout_s is None else self.started + timeout_s
        joined_by = math.inf if start_timeout_s is None else self.started + start_timeout_s
        while True:
            try:
                return self.proc.wait(timeout=_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            died = set(self.deaths)  # read before the records: a clean exit records, then dies
            records = self.exit_records()
            if any(rec["code"] for rec in records.values()) or died - set(records):
                raise self.exit_error()
            if self._all_ranks_done(died, records):
                self.stop(signal.SIGKILL)  # the launcher's SIGTERM handler only adds log noise
                return 0
            if time.monotonic() > deadline:
                raise self.timeout_error(f"timeout after {timeout_s:g} s")
            if time.monotonic() > joined_by and self.not_joined():
                raise self.start_error(start_timeout_s)

    def _all_ranks_done(self, died: set[int], records: Mapping[int, Any]) -> bool:
        """Every rank of this one-node job recorded exit code 0 and its process is gone: the job
        succeeded, and waiting for the launcher would only add its next poll of its workers (up to
        1 s) and its own interpreter tear-down (1-2 s). Over several nodes the launcher of node 0
        also serves the launchers' rendezvous, so each host's launcher is left to end by itself."""
        return not self.nodes.multi and died >= set(self.ranks) and set(records) >= set(self.ranks)

    def _watch_deaths(self) -> None:
        """Thread: note when each rank's process ends (pidfd), the only witness of a rank that
        dies without Python unwinding (signal, os._exit, crash), which leaves no exit record."""
        watched: dict[int, int] = {}  # pidfd -> rank
        try:
            while not self._stopped.is_set() and len(self.deaths) < len(self.ranks):
                if len(watched) + len(self.deaths) < len(self.ranks):  # some ranks not found yet
                    for rank, pid in self.rank_pids().items():
                        if rank not in watched.values() and rank not in self.deaths:
                            with contextlib.suppress(ProcessLookupError):
                                watched[os.pidfd_open(pid)] = rank
                                self._watched_pids[rank] = pid
                ready, _, _ = select.select(list(watched), [], [], _POLL_S)
                for fd in ready:
                    self.deaths.setdefault(watched.pop(fd), time.time())
                    os.close(fd)
        finally:
            for fd in watched:
                os.close(fd)

    def rank_pids(self) -> dict[int, int]:
        """rank -> pid of each rank's own process still alive."""
        return processes.rank_pids(self.token)

    def exit_records(self) -> dict[int, dict[str, Any]]:
        records = (json.loads(path.read_text()) for path in self.log_dir.glob("exit.*.json"))
        return {rec["rank"]: rec for rec in records}

    def stop(self, first_signal: int = signal.SIGTERM) -> None:
        """End every process of the job: `first_signal`, SIGKILL what is left after a grace
        period; reap the launcher. Safe to call again."""
        if self._stopping_since is None:
            self._note_ended_ranks()
            self._stopping_since = time.time()
        self._signal_all(first_signal)
        if not self._wait_gone(_STOP_GRACE_S):
            _log.warning("job %s: processes left after SIGTERM, sending SIGKILL", self.log_dir)
            self._signal_all(signal.SIGKILL)
            self._wait_gone(_STOP_GRACE_S)
        self.proc.wait()
        self._out.close()
        self._stopped.set()

    def _note_ended_ranks(self) -> None:
        """Record the deaths the watcher thread has not reported yet (a loaded machine may run
        it late): a rank that is gone before this process stops the job died by itself, and blame
        must not mistake it for a rank ended by the stop."""
        for rank, pid in list(self._watched_pids.items()):
            if rank not in self.deaths and processes.has_ended(pid):
                self.deaths.setdefault(rank, time.time())

    def _signal_all(self, sig: int) -> None:
        unreaped = self.proc.pid if self.proc.poll() is None else None  # a reaped pid may be reused
        processes.signal_job(self.token, unreaped, sig)

    def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not processes.job_pids(self.token):
                return True
            time.sleep(0.05)
        return False

    def timeout_error(self, reason: str, suspects: Sequence[int] | None = None) -> blame.RankJobError:
        """Dump the running ranks' stacks into their logs, blame `suspects` (default: the running
        ranks), say where each running rank was, stop the job. The tails are read before the stop
        so that they end with the dump, not with the noise of Paddle's SIGTERM handler."""
        running = self.rank_pids()
        dumps = self._stack_dumps(running)
        where = blame.group_by_frame({r: rank_logs.innermost_frame(dump) for r, (_, dump) in dumps.items()})
        blamed = sorted(running if suspects is None else suspects)
        reason = f"{reason}; still running: {where or 'no rank'}{self._positions()}"
        error = self.error(blamed, reason, lines=15, dumps=dumps)
        self.stop(signal.SIGKILL)  # the dumps are taken: Paddle's SIGTERM handler would only add 1-2 s
        return error

    def not_joined(self) -> list[int]:
        """This host's ranks that have not yet joined the job (no `joined.R` in the log folder)."""
        return [r for r in self.ranks if not joined_path(self.log_dir, r).exists()]

    def start_error(self, bound_s: float) -> blame.RankJobError:
        """The start-up bound passed: name this node, the ranks not joined, and the peers that
        never arrived (a host whose command never ran, or whose launcher died before its ranks
        connected); stop the job. Over one node no peer is missing: the ranks are slow or stuck."""
        waiting = self.not_joined()
        here = f"node {self.nodes.this} ({self.nodes.ips[self.nodes.this]})" if self.nodes.multi else "this node"
        reason = f"{here}: {blame.rank_names(waiting)} did not join the {self.nproc}-rank job within the start-up " \
                 f"bound of {bound_s:g} s"
        if self.nodes.multi:
            reason += f"; peers never arrived: {self.nodes.missing_peers(self.port)}"
        return self.timeout_error(reason, suspects=waiting)

    def _stack_dumps(self, running: Mapping[int, int]) -> dict[int, tuple[int, str]]:
        """rank -> (log size before, what the log gained after) a SIGUSR1, which makes
        faulthandler (registered by rank_entry.main) write the rank's Python stacks."""
        offsets = {r: rank_logs.size(self.rank_logs[r]) for r in running}
        for pid in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + _DUMP_WAIT_S
        while running:
            dumps = {r: rank_logs.read_span(self.rank_logs[r], offsets[r]) for r in running}
            if time.monotonic() > deadline or all(rank_logs.DUMP_HEADER in d for d in dumps.values()):
                time.sleep(0.05)  # let a dump that has just begun finish
                break
            time.sleep(0.05)
        return {r: (offsets[r], rank_logs.read_span(self.rank_logs[r], offsets[r])) for r in running}

    def exit_error(self, any_exit_fails: bool = False) -> blame.RankJobError:
        """Stop the job and blame the rank that failed first (with `any_exit_fails`, the first
        rank that exited at all). SIGKILL at once: the evidence is the records, the deaths before
        the stop and what the launcher logged so far; Paddle's SIGTERM handler in every rank would
        only add its stack printout to the tails and 1.5-3 s (loaded) to the stop."""
        self.stop(signal.SIGKILL)
        records, deaths = self.exit_records(), dict(self.deaths)  # copy: the watcher adds
        terminated = frozenset(r for r in deaths if r not in records
                               and blame.terminated_by(rank_logs.tail(self.rank_logs[r], 80)) == self.proc.pid)
        evidence = blame.Evidence(records, deaths, (self.log_dir / LAUNCHER_LOG).read_text(errors="replace"),
                                  self._stopping_since, self.proc.returncode, self.ranks.start, terminated)
        ranks, reason = blame.first_failure(evidence, any_exit_fails)
        return self.error(ranks, reason + self._positions(), lines=30)

    def _positions(self) -> str:
        """'; collectives: rank 1 in ...; ranks 0, 2 in ...' from the ranks' watchdog state files
        ('' when no rank wrote one: no collective watchdog, or no collective yet)."""
        states = {r: watchdog.read_state(watchdog.state_path(self.log_dir, r)) for r in self.ranks}
        where = blame.group_by_position(states)
        return f"; collectives: {where}" if where else ""

    def error(self, ranks: Sequence[int], reason: str, lines: int,
              dumps: Mapping[int, tuple[int, str]] | None = None) -> blame.RankJobError:
        return blame.error_with_tails(ranks, reason, self.log_dir, self.token, self.rank_logs,
                                      self.log_dir / LAUNCHER_LOG, lines, dumps)



def _job_port(nodes: Nodes, count: int, start_port: int | None, name: str) -> int:
    """The first of this host's `count` ports. A port the caller named is checked (range; free
    here, on the host that serves the store) so that a clash is named before any rank starts."""
    if start_port is None:
        return START_PORT if nodes.multi else free_port(count)
    check_start_port(start_port, count, name)
    if nodes.this == 0:
        check_free(start_port, name)
    return start_port


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
