"""How many threads the engine's CPU kernels use, and the rest of the process set-up.

Importing Paddle sets OMP_NUM_THREADS=1 when it is unset, so without a decision every GEMM runs
on one core. The policy:

* An engine owns the machine: one thread per CPU this process may run on
  (`os.sched_getaffinity`), unless the user asks for a number.
* The gate runs 4 xdist workers on 2 cores, already more processes than cores: each worker keeps
  1 thread (a second would only add contention); its set-up calls `set_threads(1)`.
* Ranks of an N-rank job share the machine: `cpus // N` each, at least 1.

`prepare_engine(ranks)` applies it: `LLM(...)` calls it when it builds an engine, so a library user
gets the set-up without knowing of it. It acts once per process (later calls return the first
result) and never over a value the user set: an earlier explicit `set_threads` call (the CLI's
`--threads`, conftest), OMP_NUM_THREADS or MKL_NUM_THREADS in the environment the process started
with, MKL_DEBUG_CPU_TYPE, MALLOC_MMAP_THRESHOLD_. It also picks the GEMM code path
(`choose_gemm_path`), which must happen before the first matrix product of the process, and keeps
large freed blocks in the heap (`keep_large_blocks`). Every rank's entry
(engine/launch/rank_entry.py) runs `prepare_process` before importing Paddle. Paddle offers no
public thread setter: the internal one is called through `engine/graph/paddle_compat.py`, with the
other Paddle internals.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
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

# Variables through which a user chooses the kernel thread count himself. Paddle's import writes
# OMP_NUM_THREADS=1 into os.environ when it is unset, so os.environ cannot tell a user's value from
# Paddle's: the environment the process started with can (/proc/self/environ, else the snapshot
# taken when this module is imported, which is the user's own when Paddle is not imported yet).
USER_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_ENV_AT_IMPORT = None if "paddle" in sys.modules else {k: os.environ[k] for k in USER_THREAD_VARS if k in os.environ}


@dataclass(frozen=True)
class ProcessSetup:
    """What the process set-up left in force, for the run summary."""

    threads: int | None  # the kernel thread count the engine set; None: left to the user's setting
    threads_source: str  # why: "engine default: ...", "set_threads(1)", "OMP_NUM_THREADS=4 (user's, left as set)"
    gemm_path: str | None  # MKL_DEBUG_CPU_TYPE in force (None: MKL's own choice by CPU vendor)
    large_blocks_kept: bool
    vendor: str | None = None  # /proc/cpuinfo's vendor_id

    def describe(self) -> str:
        """One line, e.g. "threads 2 (engine default: this machine's CPUs), GEMM path
        MKL_DEBUG_CPU_TYPE=5 (AVX2), heap keeps large blocks"."""
        threads = f"threads {self.threads} ({self.threads_source})" if self.threads else f"threads: {self.threads_source}"
        if self.gemm_path is None:
            gemm = f"GEMM path: MKL's own for this CPU ({self.vendor or 'vendor unknown'})"
        else:
            gemm = f"GEMM path MKL_DEBUG_CPU_TYPE={self.gemm_path}" + (" (AVX2)" if self.gemm_path == MKL_AVX2 else "")
        heap = "heap keeps large blocks" if self.large_blocks_kept else "heap: malloc's defaults"
        return f"{threads}, {gemm}, {heap}"


_explicit: tuple[int, str] | None = None  # (count, how) of the last set_threads call
_prepared: ProcessSetup | None = None


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

    global _explicit
    prepare_process()
    set_kernel_threads(threads)
    _explicit = (threads, f"set_threads({count!r}" + (f", ranks={ranks})" if ranks != 1 else ")"))
    return threads


def prepare_engine(ranks: int = 1) -> ProcessSetup:
    """The process set-up for an engine of `ranks` processes, applied once per process (idempotent:
    later calls return the first call's result without acting). The thread count is set to
    `default_threads(ranks)` only when the user chose none (see the module docstring)."""
    global _prepared
    if _prepared is not None:
        return _prepared
    heap = prepare_process()
    user = user_thread_setting()
    if _explicit is not None:
        count, source = _explicit
    elif user is not None:
        count, source = None, f"{user} (user's, left as set)"
    else:
        count, source = set_threads(None, ranks), "engine default: " + (
            "this machine's CPUs" if ranks == 1 else f"this machine's CPUs / {ranks} ranks")
    _prepared = ProcessSetup(count, source, os.environ.get(MKL_CPU_TYPE_ENV), heap, cpu_vendor())
    return _prepared


def user_thread_setting() -> str | None:
    """"NAME=value" of the first thread-count variable the user set before Paddle's import, or None."""
    env = startup_environment()
    for name in USER_THREAD_VARS:
        if name in env:
            return f"{name}={env[name]}"
    return None


def startup_environment(path: Path = Path("/proc/self/environ")) -> dict[str, str]:
    """The thread-count variables of the environment this process started with; where that cannot
    be read, the ones in os.environ when this module was imported before Paddle (else none known)."""
    try:
        entries = path.read_bytes().split(b"\0")
    except OSError:
        return dict(_ENV_AT_IMPORT or {})
    pairs = (e.decode(errors="replace").partition("=") for e in entries if e)
    found = {k: v for k, _, v in pairs if k in USER_THREAD_VARS}
    return {**found, **(_ENV_AT_IMPORT or {})}


def prepare_process() -> bool:
    """The set-up that needs no Paddle import (a rank's entry runs it before its program imports
    anything): the GEMM path and the heap policy; returns whether the heap policy took effect."""
    choose_gemm_path()
    return keep_large_blocks()


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
