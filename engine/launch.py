"""Starting the engine's N-rank job from the CLI, and collecting what the ranks report.

`python -m engine run --tp 4 ...` re-runs itself under `python -m paddle.distributed.launch` (gloo
on CPU, NCCL on GPU) with a free port, and waits. Each rank writes what it would print to
`<log dir>/reports/rank{R}.out` and a user error to `rank{R}.err`; the parent prints rank 0's
output and the first rank's error, so a 4-rank run reads like a 1-rank one. Started by the launcher
directly (PADDLE_TRAINER_ID set), the CLI just runs as one rank of that job.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

LAUNCHER_LOG = "launcher.log"


def inside_launched_job() -> bool:
    return "PADDLE_TRAINER_ID" in os.environ


def this_rank() -> int:
    return int(os.environ.get("PADDLE_TRAINER_ID", "0"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(argv: list[str], nproc: int, log_dir: Path, report_dir: Path) -> list[str]:
    return [sys.executable, "-m", "paddle.distributed.launch", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--ips", "127.0.0.1", "--start_port", str(free_port()), "--log_dir", str(log_dir),
            sys.executable, "-u", "-m", "engine", *argv, "--report-dir", str(report_dir)]


def relaunch(argv: list[str], nproc: int, log_dir: str | None) -> int:
    """Run `argv` (the CLI's own arguments) as an nproc-rank job; returns the CLI exit code."""
    logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="engine-ranks-"))
    reports = logs / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    print(f"starting {nproc} ranks (logs in {logs})", file=sys.stderr)
    with open(logs / LAUNCHER_LOG, "wb") as out:
        code = subprocess.run(launch_command(argv, nproc, logs, reports), stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    return _report(reports, logs, nproc, code)


def _report(reports: Path, logs: Path, nproc: int, code: int) -> int:
    errors = [(r, (reports / f"rank{r}.err").read_text()) for r in range(nproc) if (reports / f"rank{r}.err").exists()]
    if errors:
        rank, text = errors[0]
        print(f"{text.rstrip()} (rank {rank})", file=sys.stderr)
        return 2
    first = reports / "rank0.out"
    if code != 0 or not first.exists():
        silent = [r for r in range(nproc) if not (reports / f"rank{r}.out").exists()]
        rank = silent[0] if silent else 0
        print(f"error: the {nproc}-rank job failed (launcher exit {code}); rank {rank} left no report. "
              f"Last lines of {logs / f'workerlog.{rank}'}:\n{_tail(logs / f'workerlog.{rank}')}", file=sys.stderr)
        return 1
    sys.stdout.write(first.read_text())
    return 0


def write_report(report_dir: str, text: str, error: bool) -> None:
    """Rank side: leave this rank's output (or error line) for the parent, atomically."""
    path = Path(report_dir) / f"rank{this_rank()}.{'err' if error else 'out'}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
