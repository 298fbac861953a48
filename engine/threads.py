"""How many threads the engine's CPU kernels use: decided here, applied once at process set-up.

Importing Paddle sets OMP_NUM_THREADS=1 when it is unset, so without a decision every GEMM runs
on one core. The policy:

* `python -m engine run` owns the machine: one thread per CPU this process may run on
  (`os.sched_getaffinity`), unless the user asks for a number.
* The gate runs 4 xdist workers on 2 cores, already more processes than cores: each worker keeps
  1 thread (a second would only add contention); its set-up calls `set_threads(1)`.
* Ranks of an N-rank job share the machine: `cpus // N` each, at least 1.

The caller (the CLI's set-up, conftest) applies it once, before the first step; nothing else calls
`set_threads`. Paddle offers no public setter: the internal one is called through
`engine/graph/paddle_compat.py`, with the other Paddle internals.
"""

from __future__ import annotations

import os


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

    set_kernel_threads(threads)
    return threads
