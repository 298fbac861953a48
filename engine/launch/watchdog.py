"""A bound on every collective a rank waits in: a stuck rank is named, not left to hang.

When ranks disagree about what to run (one replays a graph while another runs eagerly, one skips
a collective), each waits in a collective the others never join, and gloo's own timeout ends the
job half a minute later with a message that names neither the step nor the collective.
`Collectives` (engine/distributed.py) enters its `Watchdog` around each collective it issues,
and the graph runner around each call of a captured program. Inside a program the collectives
are program ops that Python never sees, so there the bound covers the whole program call, named
"replay #N (piece 3 at size 16)" (or "capture #N (...)": the capture's compile and first run).

The rule: a call is stuck once it has been outstanding for `timeout_s` plus SLACK_PER_CPU_S times
the CPU seconds this process used since its previous call ended. A rank blocked in a collective
uses no CPU (measured: gloo waits without spinning, and releases the GIL), so its slack stops
growing and the bound arrives; a rank that has just loaded weights or compiled a graph (before
the call or inside it, as a capture does) gives its peers time to do the same work, which on a
shared machine can take them several times as long. A call inside another one (a collective in
an uncompiled program) is stuck only once the enclosing call is too.

A stuck rank writes its Python stacks and then one line, `collective watchdog: rank R stuck in
NAME at step S for T s (...)`, to stderr, hands that line from "stuck" on to `on_stuck` (in a
launched job: the exit record that the launcher's blame reads) and exits with STUCK_EXIT. Its
peers then fail on the broken connection, and the blame names this rank. Its position (the call
in progress, the last call entered, the longest wait so far) is kept in a small JSON state file
that the launcher reads to say where every rank was.

The default timeout (ParallelConfig.collective_timeout_s, 5 s) is a measurement, not a guess: over
cases/test_launch.py, test_parallel.py, test_cli_ranks.py and test_routing_replay_ranks.py under
`pytest -n 2` on two shared cores (run twice), the longest wait beyond slack of any call on any
rank was 0.16 s (engine loads and gloo's first calls included: the CPU slack covers them); over the
4-rank runs of bench/dump_matrix.sh, 0.5 s, in a capture (every rank compiling at once), so
captures get SLOWER_KINDS' multiple of the timeout. A disagreeing rank in a 2-rank CLI job at
the default timeout is named 5.2 s after it entered the collective (cases/test_watchdog.py runs
the same job with a 3 s timeout); without the watchdog
gloo's own timeout ended it after 30.0 s, naming neither. Each state file keeps its rank's
longest wait, to check the margin.

On NCCL a collective returns once it is queued on the GPU, so there the watchdog bounds the
host's waits only (a program call, a blocking copy); a kernel that never ends is NCCL's own
timeout's business.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.launch import rank_entry

STUCK_EXIT = 124  # the exit code of a rank the watchdog ended (as GNU timeout(1) uses it)
SLACK_PER_CPU_S = 4.0  # extra seconds of waiting allowed per CPU second worked since the last call
POLL_S = 0.1
# Kinds of call bounded by a multiple of the timeout: in a capture every rank compiles at once, and
# the measured waits beyond slack were larger there (0.5 s, against 0.16 s elsewhere: see above).
SLOWER_KINDS = {"capture": 3.0}


@dataclass(frozen=True)
class Call:
    """One call the watchdog bounds: `kind` #`index` (its number in the step) (`what`)."""

    kind: str  # "all_reduce", "all_gather", "capture", "replay"
    what: str  # "o_proj, layer 1", "piece 3 at size 16"
    index: int
    step: int
    started: float  # time.monotonic()
    cpu_before: float  # process CPU seconds when the previous call ended
    serial: int  # calls entered before this one, over the watchdog's life
    limit_s: float  # how long it may wait beyond its slack

    @property
    def name(self) -> str:
        return f"{self.kind} #{self.index}" + (f" ({self.what})" if self.what else "")


class Watchdog:
    """Bounds the calls a rank enters with `watch`; see the module docstring for the rule.

    `state_path`: where the rank's position is kept (None: nowhere). `on_stuck(code, line)` runs
    on the watchdog's thread once a call is stuck; the default exits the process with `code`.
    The thread starts with the first call and is a daemon."""

    def __init__(self, rank: int, timeout_s: float, state_path: Path | None = None,
                 on_stuck: Callable[[int, str], Any] | None = None, poll_s: float = POLL_S):
        self.rank = rank
        if isinstance(timeout_s, bool) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.state_path = state_path
        self.on_stuck = on_stuck or _exit
        self.poll_s = poll_s
        self.step = 0
        self._index = 0
        self._serial = 0
        self._stack: list[Call] = []  # calls in progress, outermost first
        self._last: Call | None = None
        self._cpu_after_last = time.process_time()
        self.longest = (0.0, "")  # the longest wait beyond slack of a call that ended, and that call
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._state_failed = False  # a state-file write failed once (warned, not repeated)

    def begin_step(self) -> None:
        """Calls from here on belong to the next step (steps count from 1; 0 is before the first)."""
        self.step += 1
        self._index = 0

    def watch(self, kind: str, what: str = "") -> _Watched:
        """A context manager around one call: `with dog.watch("all_reduce", "o_proj, layer 1"): ...`"""
        return _Watched(self, kind, what)

    def enter(self, kind: str, what: str) -> None:
        self._index += 1
        self._serial += 1
        limit = self.timeout_s * SLOWER_KINDS.get(kind, 1.0)
        call = Call(kind, what, self._index, self.step, time.monotonic(), self._cpu_after_last, self._serial, limit)
        self._stack.append(call)
        self._last = call
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"collective-watchdog-{self.rank}", daemon=True)
            self._thread.start()

    def leave(self) -> None:
        call, now, cpu = self._stack.pop(), time.monotonic(), time.process_time()
        self._cpu_after_last = cpu
        waited = self.waited_s(call, now, cpu)
        if waited > self.longest[0]:
            self.longest = (waited, f"{call.name} at step {call.step}")

    def close(self) -> None:
        """Stop the thread (the calls in progress are no longer bounded)."""
        self._closed.set()

    def waited_s(self, call: Call, now: float, cpu: float) -> float:
        """How long `call` has waited beyond its slack at (`now`, process CPU `cpu`); the call is
        stuck once this exceeds its `limit_s`."""
        return now - call.started - SLACK_PER_CPU_S * (cpu - call.cpu_before)

    def is_stuck(self, calls: list[Call], now: float, cpu: float) -> bool:
        """True when `calls` (in progress, outermost first) are all past their bound: an enclosing
        call lends its allowance to the calls inside it."""
        return bool(calls) and all(self.waited_s(c, now, cpu) > c.limit_s for c in calls)

    def _run(self) -> None:
        """Check, then sleep: the first call's position is written at once (a rank that crashes
        in its first collective, as gloo aborts on mismatched sizes, then still says where)."""
        written = None
        while True:
            calls = list(self._stack)  # a copy: the rank's thread pushes and pops meanwhile
            now = time.monotonic()
            if self.is_stuck(calls, now, time.process_time()):
                self._stuck(calls, now)
                return
            position = (calls[-1].serial if calls else None, self._last.serial if self._last else None)
            if position != written:
                self._write_state(calls, now)
                written = position
            if self._closed.wait(self.poll_s):
                return

    def _stuck(self, calls: list[Call], now: float) -> None:
        call = calls[-1]
        inside = "".join(f" in {outer.name}" for outer in reversed(calls[:-1]))
        line = (f"stuck in {call.name}{inside} at step {call.step} for {now - call.started:.1f} s "
                f"(collective timeout {call.limit_s:g} s)")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(f"collective watchdog: rank {self.rank} {line}", file=sys.stderr, flush=True)
        self._write_state(calls, now, stuck=line)
        self.on_stuck(STUCK_EXIT, line)

    def _write_state(self, calls: list[Call], now: float, stuck: str = "") -> None:
        if self.state_path is None:
            return
        current, wall = calls[-1] if calls else None, time.time()
        state = {"rank": self.rank, "pid": os.getpid(), "time": wall, "step": self.step,
                 "in": current.name if current else None, "in_step": current.step if current else None,
                 "in_since": wall - (now - current.started) if current else None,
                 "last": self._last.name if self._last else None,
                 "last_step": self._last.step if self._last else None, "stuck": stuck,
                 "longest_wait_s": round(self.longest[0], 3), "longest_wait_in": self.longest[1]}
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.state_path)
        except OSError as err:  # the file only helps the blame: losing it must not stop the checks
            if not self._state_failed:
                print(f"collective watchdog: rank {self.rank} cannot write {self.state_path}: {err}",
                      file=sys.stderr, flush=True)
            self._state_failed = True


class _Watched:
    __slots__ = ("dog", "kind", "what")

    def __init__(self, dog: Watchdog, kind: str, what: str):
        self.dog, self.kind, self.what = dog, kind, what

    def __enter__(self) -> None:
        self.dog.enter(self.kind, self.what)

    def __exit__(self, *exc) -> None:
        self.dog.leave()


class _Unwatched:
    """The no-op context of calls nothing bounds (one rank, no watchdog, a program being traced)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


UNWATCHED = _Unwatched()


def for_rank(rank: int, timeout_s: float) -> Watchdog:
    """The watchdog of this rank of a launched job: its state file in the job's log folder, and
    on a stuck call the exit record (rank_entry's) before the exit. Outside a launched job: no
    state file, and the exit alone."""
    log_dir = rank_entry.job_log_dir()

    def record_and_exit(code: int, line: str) -> None:
        try:
            rank_entry.record_exit(code, line)
        finally:  # a failed record must not keep a stuck rank alive
            os._exit(code)

    return Watchdog(rank, timeout_s, state_path(log_dir, rank) if log_dir else None, record_and_exit)


def state_path(log_dir: Path, rank: int) -> Path:
    return log_dir / f"collectives.{rank}.json"


def read_state(path: Path) -> dict[str, Any] | None:
    """A rank's state file as written by `Watchdog`, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def describe(state: dict[str, Any]) -> str:
    """Where a state file says its rank was: 'in all_reduce #3 (embedding) at step 2', or 'not in
    a collective; last entered all_gather #9 (lm head) at step 2' (no times: ranks at the same
    call read the same, so a blame can group them)."""
    if state.get("in"):
        return f"in {state['in']} at step {state['in_step']}"
    if state.get("last"):
        return f"not in a collective; last entered {state['last']} at step {state['last_step']}"
    return "not in a collective yet"


def _exit(code: int, line: str) -> None:
    os._exit(code)
