"""How fast this machine is right now: the CPU seconds of one fixed, single-threaded piece of work.

The 2-core VMs these measurements run on change speed by a third or more within an hour (on
2026-12-07 one commit's gate took 136 s and, 30 minutes later, 208-213 s; session 9's code did 328 s
and then 506 s of CPU work an hour apart), with no steal time reported. A gate time is only comparable with another taken at the same machine speed, so
`bench.gate_bench` records this probe before each run. The work: a pure-Python loop and NumPy
element-wise operations on arrays small enough to stay single-threaded (no BLAS), the mix of the
gate's own per-op costs. Lower is faster. Readings, Intel Xeon VM: 0.33-0.34 s beside slow whole-gate
runs (2026-12-07, 208-213 s); on 2026-12-08 0.277-0.296 s before three runs of one commit that took
185, 155 and 161 s, 0.318-0.324 s around a 155 s run, and 0.24-0.26 s before runs of 104-108 s. A
loose relation at best: the lowest readings came with the fastest runs, but readings of 0.27-0.30 s
have come with runs from 138 to 185 s, so it does NOT predict a gate's time. Kept as
a record beside each gate time; compare gate times by their CPU seconds and back-to-back pairs.

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
