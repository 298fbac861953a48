"""Issue 22, item 4: the engine as a user gets it against transformers, as ratios measured in one run.

    nice -n 10 python -m bench.defaults_yardstick          # about 4-6 minutes on 2 idle cores
    python -m bench.defaults_yardstick --reps 1 --decode-steps 8   # a smoke run

Needs torch and transformers (the dev-only `goldens` extra; nothing on the gate's path imports this
module). It builds bench/hf_yardstick.py's random GLM-4.5-style checkpoint (hidden 512, 64 routed
experts top-8 in 8 groups, 2 layers, layer 0 dense, float32) in a temp dir and loads it into

* the engine exactly as a library user writes it: `LLM(ckpt)`, no EngineConfig, no set-up call
  (so the defaults decide the MoE form, the graph mode and, through `LLM`'s process set-up, the
  thread count, the GEMM path and the heap policy);
* transformers with its defaults (sdpa attention, its default experts implementation) on
  `torch.set_num_threads(<the engine's thread count>)`, logits of the last position only.

It then times, interleaved (engine, transformers, then the other order) after a warm-up each,
the median of `--reps` repetitions:

* prefill of one sequence of 128, 512 and 2048 tokens (one step each);
* decode at batch 1 and 16: prompts of 128 tokens, `--decode-steps` greedy steps, the median
  step time (a decode step makes one token per sequence).

`ratio` = engine time / transformers time, medians (<= 1.0: the engine is at least as fast; the
issue's goal); `ratio_fastest` the same for each side's fastest repetition (or decode step), the
one least disturbed by other processes. Both sides run in the same process and alternate, so a
loaded machine inflates both, but not equally: oversubscribed, torch's OpenMP workers (libgomp)
gave outliers of 10-50x a step where Paddle's (libiomp5) gave 2-3x, so on a loaded machine the
median ratio flatters the engine; read `ratio_fastest` there, and both only from an idle run. The JSON goes to
bench/results/defaults-yardstick-<machine>-<date>.json with the machine, its load average at start
and end, the engine's process set-up line and the git commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import machine
from bench.hf_yardstick import ARCH, build_checkpoint, engine_steps, hf_decode, hf_prefill, load_hf
from bench.machine import ROOT

PREFILL_TOKENS = (128, 512, 2048)
DECODE_BATCHES = (1, 16)
DECODE_CONTEXT = 128
SETTLE_S = 0.3  # both libraries' OpenMP workers spin after a parallel region (bench/hf_yardstick.py)


def _settled(fn, *args):
    time.sleep(SETTLE_S)
    return fn(*args)


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _engine_prefill(llm, ids: np.ndarray) -> float:
    return engine_steps(llm, ids, 1)[0][0]


def _engine_decode(llm, ids: np.ndarray, steps: int) -> tuple[list[float], np.ndarray]:
    _, decode, tokens, _, _ = engine_steps(llm, ids, steps + 1)
    return decode, tokens


def _hf_decode(model, ids: np.ndarray, steps: int) -> tuple[list[float], np.ndarray]:
    times, tokens, _ = hf_decode(model, ids, steps + 1)
    return times, tokens


def interleaved(pair: dict, reps: int) -> dict[str, list]:
    """Call each of `pair`'s two functions once to warm up, then `reps` times, alternating which
    goes first; returns every call's result per name."""
    for fn in pair.values():
        _settled(fn)
    results = {name: [] for name in pair}
    for rep in range(reps):
        for name in (list(pair) if rep % 2 == 0 else list(reversed(pair))):
            results[name].append(_settled(pair[name]))
    return results


def run(args: argparse.Namespace, progress=print) -> dict:
    import torch

    from engine.llm import LLM

    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="defaults-yardstick-"))
    try:
        build_checkpoint(tmp, args.experts, max_positions=max(PREFILL_TOKENS) + 64)
        llm = LLM(tmp)  # the defaults, and the process set-up they bring, before any GEMM in Paddle
        threads = llm.setup.threads or torch.get_num_threads()
        torch.set_num_threads(threads)
        hf = load_hf(tmp, None)
        progress(f"engine: moe form {llm.engine.moe_form}, graphs {llm.engine.graph.mode}; {llm.setup.describe()}")
        out = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "machine": machine.describe(threads), "engine_setup": llm.setup.describe(),
               "engine_moe_form": str(llm.engine.moe_form), "engine_graph_mode": str(llm.engine.graph.mode),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "transformers": __import__("transformers").__version__,
               "hf_attn_implementation": hf.config._attn_implementation,
               "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None),
               "experts": args.experts, "reps": args.reps, "note": args.note,
               "ratio": "engine seconds / transformers seconds (<= 1: engine at least as fast)"}
        out["prefill"] = []
        for n in PREFILL_TOKENS:
            ids = rng.integers(0, ARCH["vocab_size"], (1, n))
            times = interleaved({"engine": lambda: _engine_prefill(llm, ids),
                                 "transformers": lambda: _timed(hf_prefill, hf, ids)}, args.reps)
            row = {"tokens": n, "times_s": times, **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
            row["ratio"] = row["engine_s"] / row["transformers_s"]
            row["ratio_fastest"] = min(times["engine"]) / min(times["transformers"])
            out["prefill"].append(row)
            progress(f"prefill {n}: engine {row['engine_s'] * 1e3:.1f} ms, transformers "
                     f"{row['transformers_s'] * 1e3:.1f} ms, ratio {row['ratio']:.2f}")
        out["decode"] = []
        for batch in DECODE_BATCHES:
            ids = rng.integers(0, ARCH["vocab_size"], (batch, DECODE_CONTEXT))
            runs = interleaved({"engine": lambda: _engine_decode(llm, ids, args.decode_steps),
                                "transformers": lambda: _hf_decode(hf, ids, args.decode_steps)}, args.reps)
            steps = {k: [t for times, _ in v for t in times] for k, v in runs.items()}
            row = {"batch": batch, "context": DECODE_CONTEXT, "steps": args.decode_steps,
                   "greedy_identical": bool(all((a[1] == b[1]).all() for a, b in zip(runs["engine"], runs["transformers"]))),
                   "step_times_s": steps, **{f"{k}_s": statistics.median(v) for k, v in steps.items()}}
            row["ratio"] = row["engine_s"] / row["transformers_s"]
            row["ratio_fastest"] = min(steps["engine"]) / min(steps["transformers"])
            out["decode"].append(row)
            progress(f"decode batch {batch}: engine {row['engine_s'] * 1e3:.2f} ms/step, transformers "
                     f"{row['transformers_s'] * 1e3:.2f} ms/step, ratio {row['ratio']:.2f}, "
                     f"greedy identical {row['greedy_identical']}")
        out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def table(r: dict) -> str:
    m = r["machine"]
    lines = [f"{r['started']}, {m['cpu']} ({m['usable_cpus']} CPUs), load average {m['load_average_at_start']} -> "
             f"{r['load_average_end']}; engine `LLM(ckpt)`: moe form {r['engine_moe_form']}, graphs "
             f"{r['engine_graph_mode']}, {r['engine_setup']}; torch {r['torch']} on {r['torch_threads']} threads, "
             f"transformers {r['transformers']}.", "",
             "| measured | engine (median) | transformers (median) | engine / transformers | fastest / fastest |",
             "|---|---|---|---|---|"]
    for p in r["prefill"]:
        lines.append(f"| prefill {p['tokens']} tokens | {p['engine_s'] * 1e3:.1f} ms | {p['transformers_s'] * 1e3:.1f} ms "
                     f"| **{p['ratio']:.2f}** | {p['ratio_fastest']:.2f} |")
    for d in r["decode"]:
        lines.append(f"| decode batch {d['batch']} (context {d['context']}) | {d['engine_s'] * 1e3:.2f} ms/step | "
                     f"{d['transformers_s'] * 1e3:.2f} ms/step | **{d['ratio']:.2f}** | {d['ratio_fastest']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement")
    parser.add_argument("--decode-steps", type=int, default=32, help="greedy steps timed per decode run")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'loaded: 6 helpers')")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/defaults-yardstick-...json)")
    args = parser.parse_args()
    start = time.perf_counter()
    results = run(args, progress=lambda s: print(s, flush=True))
    results["wall_s"] = round(time.perf_counter() - start, 1)
    out = args.out or (ROOT / "bench" / "results" /
                       f"defaults-yardstick-{machine.slug(results['machine'])}-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json")
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"wrote {out} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
