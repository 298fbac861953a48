"""How fast this machine is right now: the CPU seconds of one fixed, single-threaded piece of work.

The 2-core VMs these measurements run on change speed by a third or more within an hour (on
2026-12-07 one commit's gate took 136 s and, 30 minutes later, 208-213 s; session 9's code did 328 s
and then 506 s of CPU work an hour apart), with no steal time reported. A gate time is only comparable with another taken at the same machine speed, so
`bench.gate_bench` records this probe before each run. The work: a pure-Python loop and NumPy
element-wise operations on arrays small enough to stay single-threaded (no BLAS), the mix of the
gate's own per-op costs. Lower is faster. First readings, Intel Xeon VM, 2026-12-07 23:30-23:36:
0.33-0.34 s, taken beside a whole gate run (which then took 208-213 s). Whether the probe tracks the
drift is not shown yet: it has no reading from a fast phase; gate_bench's JSONs will tell.

    python -m bench.machine_speed        # prints the probe's seconds (best of 3)
"""

from __future__ import annotations

import time

import numpy as np


def _work() -> float:
    total = 0
    for i in range(4_000_000):  # interpreter speed: the gate's Python-level dispatch
        total += i * i % 7
    a = np.linspace(0.0, 1.0, 4096, dtype=np.float32)
    for _ in range(20_000):  # small element-wise kernels: the gate's tiny-tensor ops
        a = np.tanh(a * 1.0001 + 0.0001)
    return float(total) + float(a.sum())


def probe(repeats: int = 3) -> float:
    """The best CPU seconds of `repeats` runs of the fixed work in this thread."""
    best = float("inf")
    for _ in range(repeats):
        started = time.thread_time()
        _work()
        best = min(best, time.thread_time() - started)
    return round(best, 3)


if __name__ == "__main__":
    print(f"machine speed probe: {probe():.3f} s of CPU for the fixed work (lower is faster)")
