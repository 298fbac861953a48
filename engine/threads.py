"""How many threads the engine's CPU kernels use: decided here, applied once at process set-up.

Importing Paddle sets OMP_NUM_THREADS=1 when it is unset, so without a decision every GEMM runs
on one core. The policy:

* `python -m engine run` owns the machine: one thread per CPU this process may run on
  (`os.sched_getaffinity`), unless the user asks for a number.
* The gate runs 4 xdist workers on 2 cores, already more processes than cores: each worker keeps
  1 thread (a second would only add contention); its set-up calls `set_threads(1)`.
* Ranks of an N-rank job share the machine: `cpus // N` each, at least 1.

The callers (the CLI's set-up, conftest) apply it before the first step; nothing else calls
`set_threads`; every rank's entry (engine/launch/rank_entry.py) runs `prepare_process`. It also picks the GEMM code path
(`choose_gemm_path`), which must happen before the first matrix product of the process, and keeps
large freed blocks in the heap (`keep_large_blocks`). Paddle offers no public setter: the internal one is called through
`engine/graph/paddle_compat.py`, with the other Paddle internals.
"""

from __future__ import annotations

import os
from pathlib import Path

# Paddle's CPU build links an MKL (libmklml_intel) that picks its kernels by CPU vendor: on AMD it
# takes a generic path and multiplies float32 matrices 2-3x slower than the AVX2 path the same CPU
# runs (8192x512 @ 512x1024 on the 2-core AMD EPYC VM: 70.7 vs 168.1 GFLOP/s, python -m bench.gemm_paths,
# bench/results/gemm-paths-20261129-1357.json).
# This MKL still honours MKL_DEBUG_CPU_TYPE=5 (use the AVX2 kernels); newer MKLs ignore it. MKL reads
# it at its first GEMM, so it is set here, at set-up, and only on AMD (on Intel the vendor path may
# be AVX-512, faster than AVX2) and only when the user has not chosen a value.
MKL_CPU_TYPE_ENV = "MKL_DEBUG_CPU_TYPE"
MKL_AVX2 = "5"

# Paddle's CPU allocator hands large requests to malloc, and glibc serves every request above its
# mmap threshold (at most 32 MiB by its own adjustment) with fresh pages that it unmaps on free, so
# each step's large temporaries are page-faulted in again: a 64 MiB gather took 80 ms instead of
# 10-12 ms on the 2-core AMD EPYC VM (bench/README.md). Raising both thresholds keeps freed blocks
# for reuse; resident memory then stays at its high-water mark, which a serving process reaches anyway.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
KEEP_BLOCKS_UP_TO = 1 << 30


def default_threads(ranks: int = 1) -> int:
    """Threads per process for an engine run of `ranks` processes on this machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, ranks))


def set_threads(count: int | None = None, ranks: int = 1) -> int:
    """Make Paddle's CPU kernels use `count` threads (None: `default_threads(ranks)`); returns it.
    Raises ValueError naming the value when it is not a positive integer."""
    threads = default_threads(ranks) if count is None else count
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={count!r}: must be a positive integer")
    from engine.graph.paddle_compat import set_kernel_threads  # deferred: deciding must not import Paddle

    prepare_process()
    set_kernel_threads(threads)
    return threads


def prepare_process() -> None:
    """The set-up that needs no Paddle import (a rank's entry runs it before its program imports
    anything): the GEMM path and the heap policy."""
    choose_gemm_path()
    keep_large_blocks()


def choose_gemm_path(vendor: str | None = None) -> str | None:
    """On an AMD CPU, ask MKL for its AVX2 GEMM kernels unless the user set `MKL_DEBUG_CPU_TYPE`;
    returns the value in force (None: left to MKL). Child processes (ranks) inherit the choice."""
    vendor = cpu_vendor() if vendor is None else vendor
    if vendor == "AuthenticAMD":
        os.environ.setdefault(MKL_CPU_TYPE_ENV, MKL_AVX2)
    return os.environ.get(MKL_CPU_TYPE_ENV)


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU vendor string (e.g. "AuthenticAMD", "GenuineIntel"), None when it cannot be read."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def keep_large_blocks() -> bool:
    """Ask glibc's malloc to serve and keep blocks up to 1 GiB from its heap instead of mapping and
    unmapping each (see KEEP_BLOCKS_UP_TO); True when it took effect. A no-op (False) on a C library
    without `mallopt` or when the user set MALLOC_MMAP_THRESHOLD_ (glibc then follows the user)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BLOCKS_UP_TO))
