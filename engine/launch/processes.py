"""Finding and signalling a job's processes by its token.

Every process of a job inherits TOKEN_ENV=token from the launching process. Paddle's launcher
starts each worker with `setsid`, so the workers are NOT in the launcher's process group and
signalling that group alone would leave the ranks running: the token finds them all, including
children a rank started. Linux only (it reads /proc); elsewhere the scan finds nothing and only
the launcher's group is signalled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.launch.rank_entry import RANK_ENV, TOKEN_ENV


@dataclass(frozen=True)
class JobProcess:
    pid: int
    ppid: int
    rank: int | None  # from the process's PADDLE_TRAINER_ID (None: the launcher)


def job_processes(token: str) -> list[JobProcess]:
    """Live processes whose environment carries TOKEN_ENV=token ([] without /proc)."""
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
            ppid = int(stat.rsplit(b")", 1)[1].split()[1])  # the name in (...) may hold spaces
            found.append(JobProcess(int(name), ppid, _environ_rank(environ)))
    return found


def job_pids(token: str) -> list[int]:
    """Live processes carrying this job token (the launcher, the ranks and their children).
    Empty once `run_ranks` returned or raised, or a pool is closed."""
    return [proc.pid for proc in job_processes(token)]


def rank_pids(token: str) -> dict[int, int]:
    """rank -> pid of each rank's own process (not its children) still alive."""
    procs = job_processes(token)
    by_pid = {p.pid: p for p in procs}
    return {p.rank: p.pid for p in procs if p.rank is not None
            and not (p.ppid in by_pid and by_pid[p.ppid].rank == p.rank)}


def has_ended(pid: int) -> bool:
    """True once the process is gone or a zombie (ended, waiting for its parent to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):  # no such process any more
        return True
    return state in (b"Z", b"X")


def signal_job(token: str, launcher_pid: int | None, sig: int) -> None:
    """Send `sig` to every process group holding a job process (and the launcher's group, while
    `launcher_pid` is unreaped), then to each job process itself (one may have left its group).
    Never signals this process's own group."""
    groups = {_pgid(pid) for pid in job_pids(token)}
    if launcher_pid is not None:
        groups.add(launcher_pid)  # started with its own session: its pid is its group's
    for pgid in groups - {None, os.getpgrp()}:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in job_pids(token):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _environ_rank(environ: list[bytes]) -> int | None:
    prefix = f"{RANK_ENV}=".encode()
    values = [item[len(prefix):] for item in environ if item.startswith(prefix)]
    return int(values[0]) if values else None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
