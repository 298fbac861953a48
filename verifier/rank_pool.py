"""RankPool: N ranks started once that answer many requests, so that a hypothesis-driven case
feeds its examples to one warm 4-rank job instead of paying a launch (10-20 s) per example.

Built on engine/launch/: the ranks start through its `Launch` (so they share its port choice,
death watch, clean-up and blame), their program calls `engine.launch.serve(handler)` after its
set-up, and requests and replies travel as the .npz files of engine/launch/wire.py in the pool
folder `<log dir>/pool`. One-shot jobs use `engine.launch.run_ranks` directly.
"""

from __future__ import annotations

import itertools
import logging
import signal
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from engine.failpoints import Failpoints
from engine.launch import wire
from engine.launch.blame import RankJobError, rank_names
from engine.launch.job import check_positive, fresh_dir
from engine.launch.lifecycle import Launch
from engine.launch.nodes import Nodes
from engine.launch.rank_entry import POOL_DIR_ENV, POOL_FAILPOINTS_ENV

log = logging.getLogger(__name__)

__all__ = ["RankPool", "RankJobError"]


class RankPool:
    """`nproc` ranks started once, each running `argv`, a program that sets up (init_parallel_env,
    load a model) and then calls `serve(handler)`.

    `request(payload)` gives the same payload to every rank and returns `replies[rank]`. Payloads
    and replies are dicts of numpy arrays and JSON values (no pickle). One caller at a time. Use
    as a context manager, or call `close()`.

    If every rank's handler raises, `request` raises RankJobError naming them and the pool stays
    usable. If some ranks raise and the others give no reply within `error_grace_s` (they wait in
    a collective the failed ranks never joined), a rank dies, or the request times out, the ranks
    are stopped, RankJobError names the ranks, and every later request raises.

    `failpoints` (required, so that no pool forgets the run's: "" for none) reach every rank as
    `engine.launch.rank_entry.pool_failpoints()`; each rank announces them in its log.

    `nodes` (engine/launch/nodes.py; the CLI's --nnodes/--ips): over several hosts, each host makes
    its own pool with the same arguments; it starts, serves and stops that host's ranks (`ranks`)
    and `request` returns their replies in rank order.

    `start_port`: the port rank 0 serves the job's store on, the same on every host (None: a free
    one on one node, engine.launch.nodes.START_PORT over several); ValueError before any rank
    starts when it is out of range or taken here.

    `start_s`: seconds from the launch until every rank was serving."""

    def __init__(self, argv: Sequence[str], nproc: int, *, failpoints: Failpoints | str, start_timeout_s: float = 120.0,
                 request_timeout_s: float = 60.0, error_grace_s: float = 3.0,
                 log_dir: Path | None = None, env: Mapping[str, str] | None = None, nodes: Nodes = Nodes(),
                 start_port: int | None = None):
        for name, value in [("start_timeout_s", start_timeout_s),
                            ("request_timeout_s", request_timeout_s), ("error_grace_s", error_grace_s)]:
            check_positive(name, value)
        self.request_timeout_s = request_timeout_s
        self.error_grace_s = error_grace_s
        log_dir = fresh_dir(log_dir)
        self.pool_dir = log_dir / "pool"
        self.pool_dir.mkdir()
        planted = failpoints if isinstance(failpoints, Failpoints) else Failpoints.parse(failpoints)
        self.failpoints = planted
        self._job = Launch(argv, nproc, log_dir, {**(env or {}), POOL_DIR_ENV: str(self.pool_dir),
                                                  POOL_FAILPOINTS_ENV: planted.names}, nodes, start_port)
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
    def ranks(self) -> range:
        """The global ranks this pool runs (all of them on one node)."""
        return self._job.ranks

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
        check_positive("timeout_s", timeout_s)
        number = next(self._requests)
        wire.write_atomic(wire.request_path(self.pool_dir, number), wire.encode(payload))
        try:
            replies = self._collect(number, timeout_s)
        finally:
            if self._closed_because is None:  # a stopped pool keeps its files for inspection
                for path in self.pool_dir.glob(f"*.{number}.*"):
                    path.unlink()
        return [replies[rank] for rank in self.ranks]

    def close(self, timeout_s: float = 30.0) -> None:
        """Ask the ranks to return from `serve`, then end the job; afterwards no process is left.
        Once every rank's program has returned (exit code 0) the job is stopped without waiting
        for the interpreters' tear-down (seconds on a loaded machine). Raises RankJobError if a
        rank fails or they have not all returned within `timeout_s`. Closing twice is a no-op."""
        if self._closed_because is not None:
            return
        self._closed_because = "close() was called"
        wire.write_atomic(wire.request_path(self.pool_dir, next(self._requests)),
                          wire.encode({wire.SHUTDOWN_KEY: True}, reserved_ok=True))
        deadline = time.monotonic() + timeout_s
        try:
            for pause in wire.backoff(limit_s=0.05):
                records, returncode = self._job.exit_records(), self._job.proc.poll()
                if returncode not in (None, 0) or any(rec["code"] for rec in records.values()):
                    raise self._job.exit_error()
                if returncode == 0:
                    return
                if len(records) == len(self.ranks):  # programs done: skip the tear-down, and the
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
        """Wait for every rank's ready mark; logs progress (INFO) as ranks come up (10 s or more)."""
        start = time.monotonic()
        deadline = start + timeout_s
        ready: set[int] = set()
        for pause in wire.backoff():
            now_ready = {r for r in self.ranks if wire.ready_path(self.pool_dir, r).exists()}
            if now_ready - ready:
                log.info("rank pool: %d/%d ranks ready after %.1f s", len(ready | now_ready), len(self.ranks),
                         time.monotonic() - start)
            ready |= now_ready
            if len(ready) == len(self.ranks):
                return
            self._check_alive()
            if time.monotonic() > deadline:
                not_ready = [r for r in self.ranks if r not in ready]
                raise self._timed_out(f"not ready within {timeout_s:g} s", not_ready)
            time.sleep(pause)

    def _collect(self, number: int, timeout_s: float) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        replies: dict[int, dict[str, Any]] = {}
        grace_end = None
        for pause in wire.backoff():
            replies.update(self._read_replies(number, replies))
            errors = sorted(r for r, reply in replies.items() if wire.ERROR_KEY in reply)
            if len(replies) == len(self.ranks):
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
                waiting = [r for r in self.ranks if r not in replies]
                raise self._timed_out(f"request {number}: no reply within {timeout_s:g} s", waiting)
            time.sleep(pause)

    def _read_replies(self, number: int, have: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        paths = {r: wire.reply_path(self.pool_dir, number, r) for r in self.ranks if r not in have}
        return {r: wire.decode(path.read_bytes()) for r, path in paths.items() if path.exists()}

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
        silent = [r for r in self.ranks if r not in replies]
        reason = f"request {number} raised on {rank_names(errors)}"
        if stopped:
            reason += (f"; {rank_names(silent)} gave no reply within {self.error_grace_s:g} s "
                       "after that, so the pool was stopped")
        details = "".join(f"---- rank {r} ----\n{replies[r][wire.ERROR_KEY]}" for r in errors)
        return RankJobError(errors, reason, self.log_dir, self.token, details)
