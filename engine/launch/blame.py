"""Which rank a failed job is blamed on, and the error that says so.

When one rank fails, its peers fail soon after on the broken collective, and Paddle's launcher
SIGTERMs the rest and exits with the first non-zero code in rank order, usually that of a
terminated peer: neither the launcher's exit code nor "who has no report" names the rank that
failed first. The blame here orders failures in time instead: a rank's exit record (written by
rank_entry.main as the program ends) or, for a rank that died without one (signal, os._exit,
crash), the moment its process was seen to end.
"""

from __future__ import annotations

import math
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from engine.launch import rank_logs, watchdog
from engine.launch.watchdog import STUCK_EXIT

# A death without an exit record is blamed before exit records up to this much older: the peers of
# a rank that dies hard fail on the broken connection within milliseconds, and the parent may
# notice the death 100 ms late on a loaded machine (measured: 75 ms, after a peer's record).
HARD_DEATH_LEAD_S = 0.5
HARD_DEATH = "died without a Python exit (signal, os._exit, crash)"
# Paddle's launcher reports a failed worker as this line in its own log.
_FAILED_LINE = re.compile(r"Container rank (\d+) status failed cmd .* code (-?\d+) log ")
# Paddle's signal handler in a rank writes where a SIGTERM came from to the rank's log.
_TERM_FROM = re.compile(r"SIGTERM \(@0x[0-9a-f]+\) received by PID \d+ \(TID 0x[0-9a-f]+\) from PID (\d+)")


def terminated_by(log_text: str) -> int | None:
    """The pid that sent the SIGTERM a rank's log reports (Paddle's signal handler), or None."""
    found = _TERM_FROM.search(log_text)
    return int(found[1]) if found else None


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
        self.details = details
        super().__init__(f"{rank_names(self.ranks)}: {reason} (logs: {log_dir})\n{details}")


@dataclass(frozen=True)
class Evidence:
    """What the parent knows about how a job's ranks ended.

    records: rank -> exit record ({"code", "time", "error"}); deaths: rank -> time.time() its
    process was seen to end; launcher_log: the launcher's own output; stopping_since: when the
    parent began stopping the job (deaths after that are its own doing); launcher_code: the
    launcher's exit code (None while it runs); rank_offset: the global rank of this host's first
    rank (the launcher's log numbers a host's ranks from 0)."""

    records: Mapping[int, Mapping[str, Any]]
    deaths: Mapping[int, float]
    launcher_log: str
    stopping_since: float | None
    launcher_code: int | None
    rank_offset: int = 0
    terminated_by_launcher: frozenset[int] = frozenset()


def first_failure(evidence: Evidence, any_exit_fails: bool = False) -> tuple[list[int], str]:
    """([rank], reason) for the rank that failed first, the reason listing later failures; with
    `any_exit_fails` any exit counts (a pool's ranks must not end unasked). The launcher's report
    gives the code of a rank without a record when it names it; ([], reason) if no rank failed."""
    records = evidence.records
    found = _FAILED_LINE.search(evidence.launcher_log)
    named = {evidence.rank_offset + int(found[1]): code_text(int(found[2]))} if found else {}
    failures = {r: (rec["time"], exit_reason(rec)) for r, rec in records.items()
                if rec["code"] != 0 or any_exit_fails}
    failures |= {r: (died, named.get(r, HARD_DEATH)) for r, died in evidence.deaths.items()
                 if r not in records and died <= (evidence.stopping_since or math.inf)}
    # The launcher SIGTERMs the other ranks after one failed: such a death is a consequence, never the
    # first failure, however soon after that failure the parent saw it (under load a peer's own
    # watchdog may fire after the launcher's SIGTERM, so the death can come first in time).
    victims = {r for r in failures if r not in records and r in evidence.terminated_by_launcher}
    if failures.keys() - victims:
        failures = {r: failure for r, failure in failures.items() if r not in victims}
    if not failures and named:
        [(rank, text)] = named.items()
        return [rank], text
    if not failures:
        return [], f"launcher exited with code {evidence.launcher_code}"
    first = min(failures, key=lambda r: failures[r][0] - (0 if r in records else HARD_DEATH_LEAD_S))
    later = sorted((r for r in failures if r != first and r in records), key=lambda r: failures[r][0])
    reason = failures[first][1]
    if later:
        reason += "; then " + ", ".join(f"rank {r} ({failures[r][1]})" for r in later)
    return [first], reason


def error_with_tails(ranks: Sequence[int], reason: str, log_dir: Path, token: str,
                     logs: Mapping[int, Path], launcher_log: Path, lines: int,
                     dumps: Mapping[int, tuple[int, str]] | None = None) -> RankJobError:
    """The error with each named rank's log tail (before its stack dump, then the dump's main
    thread, when `dumps` has one: rank -> (log size before the dump, the dump)), or the
    launcher's log tail when no rank is named."""
    dumps = dumps or {}
    parts = []
    for r in ranks:
        end, dump = dumps.get(r, (None, ""))
        parts.append(f"---- rank {r}: last {lines} lines of {logs[r]} ----\n"
                     f"{rank_logs.tail(logs[r], lines, end)}\n")
        if dump:
            parts.append(f"---- rank {r}: Python stack, innermost first ----\n{rank_logs.main_stack(dump)}\n")
    if not ranks:
        parts.append(f"---- launcher: last {lines} lines of {launcher_log} ----\n"
                     f"{rank_logs.tail(launcher_log, lines)}\n")
    return RankJobError(ranks, reason, log_dir, token, "".join(parts))


def group_by_frame(frames: Mapping[int, str | None], missing: str = "at an unknown place (no stack dump)") -> str:
    """'rank 1 at a.py:3 in f; ranks 0, 2 at b.py:9 in g' (smallest group first: the odd one out);
    `frames` are 'at ...' or 'in ...' phrases, `missing` stands for None."""
    groups: dict[str, list[int]] = {}
    for rank, frame in sorted(frames.items()):
        groups.setdefault(frame or missing, []).append(rank)
    ordered = sorted(groups.items(), key=lambda item: (len(item[1]), item[1]))
    return "; ".join(f"{rank_names(ranks)} {frame}" for frame, ranks in ordered)


def exit_reason(record: Mapping[str, Any]) -> str:
    if record["code"] == STUCK_EXIT and record["error"]:  # the watchdog's line names the call
        return f"{record['error']} (exit code {STUCK_EXIT}: the collective watchdog)"
    text = code_text(record["code"]) if record["code"] else "returned (exit code 0) unasked"
    return f"{text}: {record['error']}" if record["error"] else text


def code_text(code: int) -> str:
    """'killed by signal 9 (SIGKILL)' for a negative exit code, else 'exit code N'."""
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def group_by_position(states: Mapping[int, Mapping[str, Any] | None]) -> str:
    """'rank 1 in all_gather #9 (lm head) at step 2; ranks 0, 2 in ...' from the ranks' collective
    watchdog state files (engine/launch/watchdog.py), smallest group first: the rank at a different
    collective from the others. '' when no rank left a state file."""
    if not any(states.values()):
        return ""
    return group_by_frame({r: watchdog.describe(state) if state else None for r, state in states.items()},
                          missing="no collective watchdog state")


def rank_names(ranks: Sequence[int]) -> str:
    if not ranks:
        return "job"
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
