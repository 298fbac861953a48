"""Running one N-rank job to completion: `run_ranks` and its `JobResult`.

`argv` names a Python program as `python` would take it: `["-m", "pkg.module", *args]` or
`["path/to/script.py", *args]`. Every rank runs it under rank_entry.main. Failures raise
`RankJobError` naming the rank that failed first (blame.py) or, at a timeout, the ranks still
running with where each one's Python stack was. Whatever happens, the call returns only once no
process of the job is left.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from engine.launch import rank_logs
from engine.launch.lifecycle import Launch
from engine.launch.nodes import Nodes


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
        return rank_logs.tail(self.rank_logs[rank], lines)


def run_ranks(argv: Sequence[str], nproc: int, *, timeout_s: float | None, log_dir: Path | None = None,
              env: Mapping[str, str] | None = None, nodes: Nodes = Nodes(),
              start_timeout_s: float | None = None, start_port: int | None = None,
              port_name: str = "start_port") -> JobResult:
    """Run the Python program `argv` on `nproc` ranks and wait for all of them.

    `timeout_s` bounds the whole job including start-up (a trivial 4-rank job takes 10-20 s on two
    cores); None waits as long as the ranks run (the engine CLI: a run takes what it takes).
    `log_dir` must be missing or empty (None: a fresh temporary folder, kept). `env` is added to
    this process's environment for the ranks; nothing is set in this process. Over several
    `nodes` the same call runs on every host and starts and waits for that host's ranks only.
    `start_timeout_s` bounds the time until every rank of this host has joined the job (program
    ranks join in engine.distributed.init_parallel; None: no bound): a peer host that never
    starts is named instead of waited for (Launch.start_error). `start_port`: the port rank 0
    serves its store on (None: Launch's choice); checked before any rank starts (ValueError).
    Raises RankJobError if a rank fails or the job times out; no process is left either way."""
    for name, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s)):
        if value is not None:
            check_positive(name, value)
    job = Launch(argv, nproc, fresh_dir(log_dir), env or {}, nodes, start_port, port_name)
    try:
        returncode = job.wait(timeout_s, start_timeout_s)
    except BaseException:
        job.stop()
        raise
    if returncode != 0:
        raise job.exit_error()
    job.stop()  # reaps stragglers (children a rank left behind)
    return JobResult(returncode, time.monotonic() - job.started, job.log_dir, job.rank_logs,
                     job.port, job.token)


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def fresh_dir(path: Path | None) -> Path:
    """`path` created if missing (it must be empty if present: the launcher appends to its log
    files), or a new temporary folder; returned absolute."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix="ranks-")).resolve()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise ValueError(f"{path} is not empty: every job needs a fresh log folder")
    return path.resolve()
