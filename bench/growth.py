"""How an eager prefill step's time grows with tokens, layers and experts: a log-log plot.

    nice -n 10 python -m bench.growth [--quick] [--reps R] [--threads N] [--note TEXT]

Three series on bench/synthetic.py's GLM-style decoder with random weights (every layer MoE, the
sparse form, top-8, one shared expert; hidden 256, 2 query heads / 1 kv head of 128, expert width
64), each varying one quantity around a shared base point (1024 tokens, 2 layers, 32 experts):

* tokens 128..8192, as sequences of at most 512 (a serving prefill step: attention per token
  stays bounded, so anything above slope 1 is the rest of the step growing faster than linear);
* layers 1..8;
* routed experts 8..128 at top-8 (the sparse form's useful FLOPs do not depend on the expert count).

Every point is a prebuilt runner and batch; repetitions are interleaved (rep 1 runs every point,
then rep 2, ...) so that a change in machine load spreads over all points, and each point's
median is kept. The log-log slope fitted to each series (least squares) is its growth exponent:
1.0 is linear. Writes bench/results/growth-<date>.json and the plot bench/results/growth.png
(matplotlib, the `bench` extra); prints a table and the slopes. Never imported by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.machine import ROOT, describe, slug
from bench.synthetic import random_weights, synthetic_config
from bench.workload import prefill_batch
from engine.config import EngineConfig, ModelConfig, MoEForm
from engine.models.moe_decoder import MoEDecoder
from engine.moe.experts import expert_capacity
from engine.runner import ModelRunner
from engine.scheduler import Batch
from engine.threads import set_threads

RESULTS = ROOT / "bench" / "results"
PLOT = RESULTS / "growth.png"
SEQ_LEN = 512
HIDDEN, TOP_K = 256, 8
BASE = {"tokens": 1024, "layers": 2, "experts": 32}
FULL = {"tokens": (128, 256, 512, 1024, 2048, 4096, 8192), "layers": (1, 2, 3, 4, 6, 8),
        "experts": (8, 16, 32, 64, 128)}
QUICK = {"tokens": (128, 512, 2048), "layers": (1, 2, 4), "experts": (8, 32, 128)}
AXIS_LABEL = {"tokens": "tokens in the step (sequences of <= 512)", "layers": "decoder layers (all MoE)",
              "experts": "routed experts (top-8)"}


@dataclass(frozen=True)
class Point:
    """One measured configuration: the series it belongs to and its three quantities."""

    series: str
    tokens: int
    layers: int
    experts: int

    @property
    def x(self) -> int:
        return getattr(self, self.series)


def growth_config(layers: int, experts: int) -> ModelConfig:
    """The synthetic GLM-style decoder with every layer MoE, top-8 of `experts` in groups of 8."""
    cfg = synthetic_config(hidden=HIDDEN, layers=layers, experts=experts, max_positions=SEQ_LEN)
    groups = max(1, experts // 8)
    return replace(cfg, moe_layers=tuple(range(layers)), top_k=TOP_K, n_group=groups, topk_group=max(1, groups // 2),
                   moe_intermediate_size=HIDDEN // 4, moe_form=MoEForm.SPARSE)


def plan(quick: bool) -> list[Point]:
    """Each series over its values with the other two quantities at BASE (the base point recurs)."""
    values = QUICK if quick else FULL
    return [Point(series, **{**BASE, series: x}) for series, xs in values.items() for x in xs]


class Timed:
    """A runner and a prefill batch of exactly `point.tokens` tokens, ready to be stepped again."""

    def __init__(self, point: Point, models: dict):
        key = (point.layers, point.experts)
        if key not in models:  # series share a model where layers and experts agree
            cfg = growth_config(*key)
            models[key] = MoEDecoder(cfg, random_weights(cfg))
        self.point, self.model = point, models[key]
        seqs = -(-point.tokens // SEQ_LEN)
        engine = EngineConfig(max_num_batched_tokens=max(point.tokens, SEQ_LEN), max_num_seqs=seqs)
        self.runner = ModelRunner(self.model, engine)
        self.batch: Batch = prefill_batch(self.runner.cache.allocator, self.runner.cache.block_size, point.tokens,
                                          SEQ_LEN, self.model.cfg.vocab_size)
        self.times: list[float] = []
        self.overflowed = False

    def step(self) -> None:
        start = time.perf_counter()
        result = self.runner.step(self.batch)
        self.times.append(time.perf_counter() - start)
        self.overflowed |= overflowed(result.routing, self.point.tokens, self.point.experts)


def overflowed(routing: dict, tokens: int, experts: int) -> bool:
    """Did any layer send an expert more rows than a graph's bucket holds? Eager steps take the exact
    path and never overflow; a captured step like it would be redone eagerly (a counted fallback).
    A label for the result, from the step's own routing."""
    capacity = expert_capacity(tokens, TOP_K, experts)
    return any(np.bincount(np.concatenate(rows).ravel(), minlength=experts).max() > capacity
               for rows in routing.values())


def measure(points: list[Point], reps: int) -> list[dict]:
    models: dict = {}
    timed = [Timed(p, models) for p in points]
    for t in timed:  # warm-up: first-call allocations and kernel selection
        t.step()
        t.times.clear()
    for rep in range(reps):
        for t in timed:
            t.step()
        print(f"rep {rep + 1}/{reps} done", file=sys.stderr)
    return [{"series": t.point.series, "x": t.point.x, "tokens": t.point.tokens, "layers": t.point.layers,
             "experts": t.point.experts, "median_s": statistics.median(t.times), "times_s": t.times,
             "overflow_pass": t.overflowed} for t in timed]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): the growth exponent."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def slopes(rows: list[dict]) -> dict[str, float]:
    series = dict.fromkeys(r["series"] for r in rows)
    return {s: slope([r["x"] for r in rows if r["series"] == s], [r["median_s"] for r in rows if r["series"] == s])
            for s in series}


def plot(result: dict, path: Path) -> None:
    """One log-log panel per series: medians, min..max of the repetitions, the fitted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, fitted = result["rows"], result["slopes"]
    fig, axes = plt.subplots(1, len(fitted), figsize=(4.2 * len(fitted), 3.8), sharey=True)
    for ax, series in zip(np.atleast_1d(axes), fitted):
        mine = [r for r in rows if r["series"] == series]
        xs, ys = np.array([r["x"] for r in mine]), np.array([r["median_s"] for r in mine])
        low, high = ys - [min(r["times_s"]) for r in mine], [max(r["times_s"]) for r in mine] - ys
        ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=3, label="median (min..max)")
        extra = np.array([r["overflow_pass"] for r in mine])
        if extra.any():  # a graph replay of these steps would overflow its buckets and fall back
            ax.plot(xs[extra], ys[extra], "s", mfc="none", ms=11, color="C3", label="beyond a graph's buckets")
        a, b = np.polyfit(np.log(xs), np.log(ys), 1)
        ax.plot(xs, np.exp(b) * xs ** a, "--", label=f"fit: slope {a:.2f}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(AXIS_LABEL[series])
        ax.set_title(f"{series}: time ~ {series}^{a:.2f}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("eager prefill step, s")
    base = ", ".join(f"{k} {v}" for k, v in BASE.items())
    fig.suptitle(f"Prefill step time growth (sparse MoE, hidden {HIDDEN}, top-{TOP_K}; base: {base}); "
                 f"{result['started']}, load {result['machine']['load_average_at_start'][0]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    lines = ["| series | x | tokens | layers | experts | median s | min..max s | beyond graph buckets |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['series']} | {r['x']} | {r['tokens']} | {r['layers']} | {r['experts']} | "
                     f"{r['median_s']:.3f} | {min(r['times_s']):.3f}..{max(r['times_s']):.3f} | "
                     f"{'yes' if r['overflow_pass'] else 'no'} |")
    lines.append("")
    lines += [f"slope ({s}): {v:.2f}" for s, v in result["slopes"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 points per series, 2 repetitions")
    parser.add_argument("--reps", type=int, help="timed repetitions per point (default 3, --quick 2)")
    parser.add_argument("--threads", type=int, help="kernel threads (default: every usable CPU)")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. the machine's load)")
    parser.add_argument("--plot", type=Path, default=PLOT, help=f"plot image path (default {PLOT})")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = describe(threads)
    rows = measure(plan(args.quick), args.reps or (2 if args.quick else 3))
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"started": started, "quick": args.quick, "note": args.note, "machine": machine,
              "config": {"hidden": HIDDEN, "top_k": TOP_K, "seq_len": SEQ_LEN, "base": BASE, "moe_form": "sparse"},
              "rows": rows, "slopes": slopes(rows)}
    out = RESULTS / f"growth-{slug(machine)}-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json"
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    try:
        plot(result, args.plot)
        print(f"wrote {out} and {args.plot}")
    except ImportError:
        print(f"wrote {out}; no plot: matplotlib is missing (pip install -e .[bench])")


if __name__ == "__main__":
    main()
