"""What machine a result came from, and how much memory the process holds."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    """Resident set size of this process now (VmRSS), MiB."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """Largest resident set size of this process so far (VmHWM), MiB."""
    return _status_kib("VmHWM") / 1024


def thread_count() -> int:
    """Threads of this process now (Paddle's static executor starts a pool per compiled program)."""
    return _status_kib("Threads")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {field}")


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def describe(threads: int) -> dict:
    """Machine facts for the result file; `paddle` must already be importable."""
    import paddle

    return {"cpu": cpu_model(), "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "omp_num_threads": threads, "paddle": paddle.__version__, "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "git": git_state()}


def git_state() -> dict | None:
    """The checkout's commit and whether engine/ has uncommitted changes (None outside git)."""
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--", "engine"))
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "engine_dirty": dirty}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def slug(machine: dict) -> str:
    """A file-name-safe machine tag, e.g. `amd-epyc-2c`."""
    name = re.sub(r"[^a-z0-9]+", "-", machine["cpu"].lower()).strip("-")[:32] or "cpu"
    return f"{name}-{machine['nproc']}c"
