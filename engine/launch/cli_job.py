"""`python -m engine run --tp N`: the CLI re-run on N ranks, read back as one run.

The parent re-runs its own arguments as `python -m engine ... --report-dir DIR` through
`run_ranks` (no timeout: a run takes what it takes) and waits. Each rank writes what it would
print to DIR/rank{R}.out, or its user error line to DIR/rank{R}.err. The parent then prints rank
0's output (over several nodes: each host prints its own first rank's; ranks agree on it), so an
N-rank run reads like a 1-rank one; or one `error:` line: a rank's user error
(exit 2), or else the rank that failed first, followed by that rank's log tail (exit 1). "First"
is blame.py's: a rank killed mid-run is named, not the peers the launcher then terminated.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from engine.failpoints import Failpoints
from engine.launch.blame import RankJobError
from engine.launch.job import fresh_dir, run_ranks
from engine.launch.nodes import Nodes
from engine.launch.rank_entry import inside_launched_job, this_rank

__all__ = ["inside_launched_job", "relaunch", "write_report"]

# The default start-up bound of a multi-node job, in collective timeouts (5 s -> 120 s): the ranks
# join once Python, Paddle and the launcher have started on every host, which took 5-15 s on two
# loaded cores here; a host that never starts is named instead of waited for without end.
START_TIMEOUT_PER_COLLECTIVE_TIMEOUT = 24.0


def relaunch(argv: list[str], nproc: int, log_dir: str | None, faults: Failpoints, nodes: Nodes = Nodes(),
             start_timeout_s: float | None = None, start_port: int | None = None) -> int:
    """Run `argv` (the CLI's own arguments) as an nproc-rank job; returns the CLI's exit code.
    `log_dir` (the CLI's --log-dir) must be missing or empty; None: a new temporary folder.
    `faults` (parsed from argv) are announced here; each rank announces its own in its log.
    `nodes`: the hosts of the job (--nnodes/--ips); this call starts this host's ranks.
    `start_timeout_s` (--start-timeout): how long this host's ranks may take to join (None: no bound).
    `start_port` (--start-port, checked by the caller): rank 0's store port (None: the launcher's choice)."""
    try:
        logs = fresh_dir(Path(log_dir) if log_dir else None)
    except ValueError as err:
        print(f"error: --log-dir: {err}", file=sys.stderr)
        return 2
    local = nodes.local_ranks(nproc)
    share = f"ranks {local[0]}-{local[-1]} of {nproc} on node {nodes.this} of {nodes.count}" if nodes.multi \
        else f"{nproc} ranks"
    print(f"starting {share} (logs in {logs})", file=sys.stderr)
    print(faults.announcement(), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="engine-reports-") as reports:
        try:
            run_ranks(["-m", "engine", *argv, "--report-dir", reports], nproc, timeout_s=None, log_dir=logs,
                      nodes=nodes, start_timeout_s=start_timeout_s, start_port=start_port,
                      port_name="--start-port")
        except RankJobError as err:
            return _report_failure(Path(reports), nproc, err)
        return _report_success(Path(reports), local[0])


def write_report(report_dir: str, text: str, error: bool) -> None:
    """Rank side: leave this rank's output (or error line) for the parent, atomically."""
    path = Path(report_dir) / f"rank{this_rank()}.{'err' if error else 'out'}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _report_success(reports: Path, rank: int) -> int:
    """Print `rank`'s output (this host's first rank)."""
    first = reports / f"rank{rank}.out"
    if not first.exists():  # every rank exited 0, so this one must have reported
        print(f"error: rank {rank} exited normally but left no report in {reports}", file=sys.stderr)
        return 1
    sys.stdout.write(first.read_text())
    return 0


def _report_failure(reports: Path, nproc: int, err: RankJobError) -> int:
    """A rank's user error if one wrote it (the blamed rank's first), else the blame and tail."""
    ranks = [*err.ranks, *(r for r in range(nproc) if r not in err.ranks)]
    user_errors = [(r, reports / f"rank{r}.err") for r in ranks if (reports / f"rank{r}.err").exists()]
    if user_errors:
        rank, path = user_errors[0]
        print(f"{path.read_text().rstrip()} (rank {rank})", file=sys.stderr)
        return 2
    print(f"error: the {nproc}-rank job failed: {err}", file=sys.stderr)
    return 1
