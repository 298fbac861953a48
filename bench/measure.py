"""The measurements of one model: capture time and memory, then eager-vs-piecewise prefill steps.

Both runners share one decoder (it holds no per-step state) and each owns its KV cache. Capture
goes through `GraphRunner.capture`, size by size, largest first (the order `capture_all` uses),
so progress can be shown and each size timed. Step times are medians of interleaved repetitions
(eager, piecewise, then piecewise, eager, ...) after one warm-up each, so slow drift of a shared
machine hits both modes alike; every step also checks that the two modes agree.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import machine, workload
from bench.synthetic import synthetic_config, synthetic_model
from bench.timers import Clock, instrument, timed_programs
from engine.checkpoint.loader import load_weights
from engine.config import EngineConfig, GraphConfig, ModelConfig
from engine.config import default_prefill_sizes
from engine.graph.guard import PREFILL
from engine.hf_config import read_model_config
from engine.models.moe_decoder import MoEDecoder
from engine.runner import ModelRunner

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "checkpoints" / "glm4_moe"
MAX_TOKENS = 8192
BLOCK_SIZE = 16
MODES = ("eager", "piecewise")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    capture_sizes: tuple[int, ...]  # captured before the step timings, largest first
    step_sizes: tuple[int, ...]  # capture sizes whose steps are timed, at `size` and `size - 1` tokens
    reps: int  # timed repetitions per mode and step, after one warm-up
    seq_len: int  # tokens per sequence in a step (a step of n tokens has ceil(n / seq_len) sequences)


def load(name: str) -> MoEDecoder:
    if name == "fixture":
        cfg = read_model_config(FIXTURE_DIR)
        return MoEDecoder(cfg, load_weights(FIXTURE_DIR, cfg))
    return synthetic_model(synthetic_config())


def measure(name: str, plan: Plan, progress: Progress) -> dict:
    rss_start = machine.rss_mib()
    model = load(name)
    progress(f"[{name}] model loaded, RSS {machine.rss_mib():.0f} MiB")
    clock = Clock()
    with timed_programs(clock):
        runners = {mode: ModelRunner(model, engine_config(mode, plan)) for mode in MODES}
        for runner in runners.values():
            instrument(runner, clock)
        capture = measure_capture(runners["piecewise"], plan.capture_sizes, lambda m: progress(f"[{name}] {m}"))
        steps = [measure_step(runners, clock, size, n, plan, lambda m: progress(f"[{name}] {m}"))
                 for size in plan.step_sizes for n in sorted({size, max(1, size - 1)}, reverse=True)]
    return {"model": describe_model(model.cfg), "seq_len": plan.seq_len, "reps": plan.reps,
            "rss_start_mib": round(rss_start), "capture": capture, "steps": steps,
            "peak_rss_mib": round(machine.peak_rss_mib())}


def engine_config(mode: str, plan: Plan) -> EngineConfig:
    # Room for a step of MAX_TOKENS plus one of MAX_TOKENS - 1 (both batches live at once).
    blocks = 2 * workload.blocks_for_step(MAX_TOKENS, plan.seq_len, BLOCK_SIZE)
    graph = GraphConfig(mode=mode, backend="static", capture="lazy") if mode != "eager" else GraphConfig()
    return EngineConfig(max_num_batched_tokens=MAX_TOKENS, block_size=BLOCK_SIZE, num_kv_blocks=blocks, graph=graph)


def describe_model(cfg: ModelConfig) -> dict:
    keys = ("architecture", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "moe_layers", "num_experts", "top_k", "moe_intermediate_size", "n_group",
            "topk_group", "n_shared_experts", "vocab_size", "max_position_embeddings")
    return {k: getattr(cfg, k) for k in keys}


# ---------------------------------------------------------------------------------------------
# Capture


def measure_capture(runner: ModelRunner, sizes: tuple[int, ...], progress: Progress) -> dict:
    order = tuple(sorted(sizes, reverse=True))
    rss_before, wall_start, cpu_start = machine.rss_mib(), time.perf_counter(), time.process_time()
    per_size = []
    for i, size in enumerate(order, 1):
        wall, cpu = time.perf_counter(), time.process_time()
        runner.graphs.capture(PREFILL, size)
        row = {"size": size, "seconds": round(time.perf_counter() - wall, 3),
               "cpu_seconds": round(time.process_time() - cpu, 3), "rss_mib": round(machine.rss_mib()),
               "threads": machine.thread_count()}
        per_size.append(row)
        progress(f"capture {size:>5} ({i}/{len(order)}): {row['seconds']:.2f} s, RSS {row['rss_mib']} MiB, "
                 f"{row['threads']} threads")
    rss_after = machine.rss_mib()
    return {"sizes": len(order), "full_ladder": order == tuple(reversed(default_prefill_sizes(MAX_TOKENS))),
            "seconds": round(time.perf_counter() - wall_start, 2),
            "cpu_seconds": round(time.process_time() - cpu_start, 2), "rss_before_mib": round(rss_before),
            "rss_after_mib": round(rss_after), "rss_growth_mib": round(rss_after - rss_before),
            "threads_after": machine.thread_count(), "per_size": per_size}


# ---------------------------------------------------------------------------------------------
# Steps


def measure_step(runners: dict[str, ModelRunner], clock: Clock, size: int, num_tokens: int, plan: Plan,
                 progress: Progress) -> dict:
    vocab = runners["eager"].model.cfg.vocab_size
    batches = {mode: workload.prefill_batch(r.cache.allocator, BLOCK_SIZE, num_tokens, plan.seq_len, vocab)
               for mode, r in runners.items()}
    try:
        contexts, prepare_ms = _prepare(runners, batches)
        if contexts["piecewise"].padded_size != size:
            raise RuntimeError(f"a step of {num_tokens} tokens replays size {contexts['piecewise'].padded_size}, "
                               f"not {size}")
        agreement = _agreement(runners, contexts, num_tokens)  # also the warm-up
        samples, cpu, buckets = _timed_reps(runners, contexts, clock, plan.reps)
    finally:
        for mode, runner in runners.items():
            workload.release(runner.cache.allocator, batches[mode])
    row = _step_row(size, num_tokens, samples, cpu, buckets, plan.reps, prepare_ms, agreement)
    progress(f"step {num_tokens:>5} -> {size:>5}: eager {row['eager_ms']:.1f} ms, piecewise "
             f"{row['piecewise_ms']:.1f} ms, speedup {row['speedup']:.2f}x")
    return row


def _timed_reps(runners: dict[str, ModelRunner], contexts: dict, clock: Clock, reps: int):
    """Wall and CPU seconds per mode and repetition, modes interleaved in alternating order;
    plus the timer buckets summed over the repetitions."""
    wall, cpu = {mode: [] for mode in MODES}, {mode: [] for mode in MODES}
    buckets = {mode: Counter() for mode in MODES}
    for rep in range(reps):
        for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
            with clock.measuring() as seconds:
                start, start_cpu = time.perf_counter(), time.process_time()
                runners[mode].forward(contexts[mode])
                wall[mode].append(time.perf_counter() - start)
                cpu[mode].append(time.process_time() - start_cpu)
            buckets[mode].update(seconds)
    return wall, cpu, buckets


def _prepare(runners: dict[str, ModelRunner], batches) -> tuple[dict, dict]:
    contexts, prepare_ms = {}, {}
    for mode, runner in runners.items():
        start = time.perf_counter()
        contexts[mode] = runner.prepare(batches[mode])
        prepare_ms[mode] = round(1e3 * (time.perf_counter() - start), 2)
    return contexts, prepare_ms


def _agreement(runners: dict[str, ModelRunner], contexts: dict, num_tokens: int) -> dict:
    """Run each mode once (the warm-up) and compare the final hidden states of the real rows."""
    eager = runners["eager"].forward(contexts["eager"]).hidden.numpy()
    graph = runners["piecewise"].forward(contexts["piecewise"]).hidden[:num_tokens].numpy()
    return {"bitwise_equal": bool(np.array_equal(eager, graph)),
            "max_abs_diff": float(np.max(np.abs(eager - graph))) if eager.size else 0.0}


def _step_row(size: int, n: int, samples: dict, cpu: dict, buckets: dict, reps: int, prepare_ms: dict,
              agreement: dict) -> dict:
    ms = {mode: 1e3 * statistics.median(samples[mode]) for mode in MODES}
    cpu_ms = {mode: 1e3 * statistics.median(cpu[mode]) for mode in MODES}
    mean = {mode: {k: 1e3 * v / reps for k, v in buckets[mode].items()} for mode in MODES}
    paired = [e / g for e, g in zip(samples["eager"], samples["piecewise"])]
    graph, step = mean["piecewise"], 1e3 * statistics.fmean(samples["piecewise"])
    copy_out = graph.get("replay", 0.0) - graph.get("copy_in", 0.0) - graph.get("program", 0.0)
    overhead = graph.get("copy_in", 0.0) + copy_out
    pieces = {mode: ms[mode] - mean[mode].get("attention", 0.0) for mode in MODES}
    return {
        "size": size, "tokens": n, "eager_ms": round(ms["eager"], 3), "piecewise_ms": round(ms["piecewise"], 3),
        "eager_tok_s": round(n / ms["eager"] * 1e3), "piecewise_tok_s": round(n / ms["piecewise"] * 1e3),
        "speedup": round(ms["eager"] / ms["piecewise"], 3),
        "paired_speedup_min_max": [round(min(paired), 3), round(max(paired), 3)],
        "cpu_ms": {mode: round(cpu_ms[mode], 3) for mode in MODES},
        "cpu_speedup": round(cpu_ms["eager"] / cpu_ms["piecewise"], 3),
        "attention_ms": {mode: round(mean[mode].get("attention", 0.0), 3) for mode in MODES},
        "pieces_speedup": round(pieces["eager"] / pieces["piecewise"], 3) if pieces["piecewise"] > 0 else None,
        "graph_ms": {"program": round(graph.get("program", 0.0), 3), "copy_in": round(graph.get("copy_in", 0.0), 3),
                     "copy_out": round(copy_out, 3)},
        "overhead_pct": round(100 * overhead / step, 2),
        "prepare_ms": prepare_ms, **agreement,
    }


def default_sizes() -> tuple[int, ...]:
    return default_prefill_sizes(MAX_TOKENS)
