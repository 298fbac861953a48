"""Where one prefill's time goes, engine against transformers, by layer part (issue 22, goal 1).

    python -m bench.prefill_profile [--tokens 128,512,2048] [--reps 5]

The yardstick's checkpoint and set-up (bench/defaults_yardstick.py: `LLM(ckpt)` with the defaults,
transformers on the engine's thread count). Each side's functions for a layer part are wrapped by a
timer that keeps *exclusive* wall time (a part's time minus the parts called inside it), so the
rows add up to the step. Both libraries' CPU ops are synchronous, so wall time around a call is
that call's cost. On a loaded machine use `--clock cpu` with OMP_NUM_THREADS=1 (each side's
own CPU seconds on one thread, as bench/step_cpu_time.py). Per part the median over `--reps` prefills (after one warm-up each) is printed
as a table part -> engine ms / transformers ms, and written as JSON with `--out`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.hf_yardstick import ARCH, build_checkpoint, engine_steps, hf_prefill, load_hf


class Timers:
    """Exclusive wall time per part name: nested parts subtract from their caller."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [name, start, child time]

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.stack.append([name, self.clock(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                part, start, children = self.stack.pop()
                spent = self.clock() - start
                self.totals[part] += spent - children
                if self.stack:
                    self.stack[-1][2] += spent
        timed.__wrapped__ = fn
        return timed

    def take(self) -> dict[str, float]:
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


def patch_engine(timers: Timers) -> None:
    import engine.layers.attention as att
    import engine.models.moe_decoder as md
    from engine.kv_cache import KVCache

    md.vocab_parallel_embed = timers.wrap("embedding", md.vocab_parallel_embed)
    md.rms_norm = timers.wrap("norms (input, final, q/k)", md.rms_norm)
    md.all_reduce_add_rms_norm = timers.wrap("residual add + post/next norm", md.all_reduce_add_rms_norm)
    md.linear = timers.wrap("qkv / o projections", md.linear)
    md.apply_rotary = timers.wrap("rotary", md.apply_rotary)
    md.MoEDecoder._qkv = timers.wrap("rotary", md.MoEDecoder._qkv)  # split/reshape/gather of cos, sin
    md.paged_attention = timers.wrap("attention (plan, gathers, score/softmax/value)", md.paged_attention)
    att.build_plan = timers.wrap("attention plan (host)", att.build_plan)
    KVCache.write = timers.wrap("kv cache write", KVCache.write)
    md.MoEDecoder._moe = timers.wrap("router (logits, noaux_tc, finite flags)", md.MoEDecoder._moe)
    md.routed_experts = timers.wrap("routed experts (dispatch + GEMMs)", md.routed_experts)
    md.dense_mlp = timers.wrap("dense MLP + shared expert", md.dense_mlp)
    md.MoEDecoder.logits = timers.wrap("lm head", md.MoEDecoder.logits)


def patch_hf(timers: Timers, model) -> None:
    import transformers.models.glm4_moe.modeling_glm4_moe as hm
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def wrap_forward(module, name):
        module.forward = timers.wrap(name, module.forward)

    inner = model.model
    wrap_forward(inner.embed_tokens, "embedding")
    wrap_forward(inner.rotary_emb, "rotary")
    wrap_forward(inner.norm, "norms (input, final, q/k)")
    wrap_forward(model.lm_head, "lm head")
    hm.apply_rotary_pos_emb = timers.wrap("rotary", hm.apply_rotary_pos_emb)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = timers.wrap("attention (plan, gathers, score/softmax/value)", sdpa)
    for layer in inner.layers:
        wrap_forward(layer, "residual add + post/next norm")  # what is left of the layer: adds
        wrap_forward(layer.input_layernorm, "norms (input, final, q/k)")
        wrap_forward(layer.post_attention_layernorm, "residual add + post/next norm")
        attn = layer.self_attn
        wrap_forward(attn, "qkv / o projections")  # the rest of attention's forward: views, cache update
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            wrap_forward(proj, "qkv / o projections")
        for norm in (attn.q_norm, attn.k_norm):
            wrap_forward(norm, "norms (input, final, q/k)")
        mlp = layer.mlp
        if isinstance(mlp, hm.Glm4MoeMoE):
            wrap_forward(mlp, "router (logits, noaux_tc, finite flags)")
            wrap_forward(mlp.gate, "router (logits, noaux_tc, finite flags)")
            wrap_forward(mlp.experts, "routed experts (dispatch + GEMMs)")
            wrap_forward(mlp.shared_experts, "dense MLP + shared expert")
        else:
            wrap_forward(mlp, "dense MLP + shared expert")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="128,512,2048")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--side", choices=("both", "engine", "transformers"), default="both")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time, the loaded machine's proxy (run with OMP_NUM_THREADS=1)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    from engine.llm import LLM

    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="prefill-profile-"))
    results = {"clock": args.clock, "omp_num_threads": __import__("os").environ.get("OMP_NUM_THREADS"), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "reps": args.reps,
               "load_average_start": [round(x, 2) for x in __import__("os").getloadavg()], "sizes": []}
    try:
        build_checkpoint(tmp, args.experts, max_positions=2048 + 64)
        llm = LLM(tmp)
        torch.set_num_threads(llm.setup.threads or torch.get_num_threads())
        hf = load_hf(tmp, None)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        timers = Timers(clock)
        patch_engine(timers)
        patch_hf(timers, hf)
        sides = {"engine": lambda ids: engine_steps(llm, ids, 1),
                 "transformers": lambda ids: hf_prefill(hf, ids)}
        if args.side != "both":
            sides = {args.side: sides[args.side]}
        for n in (int(t) for t in args.tokens.split(",")):
            ids = rng.integers(0, ARCH["vocab_size"], (1, n))
            parts = {side: defaultdict(list) for side in sides}
            totals = {side: [] for side in sides}
            for side, fn in sides.items():
                fn(ids)
                timers.take()
            for rep in range(args.reps):
                for side in (list(sides) if rep % 2 == 0 else list(reversed(sides))):
                    time.sleep(0.3)
                    start = clock()
                    sides[side](ids)
                    totals[side].append(clock() - start)
                    for part, spent in timers.take().items():
                        parts[side][part].append(spent)
            row = {"tokens": n, "total_ms": {s: statistics.median(v) * 1e3 for s, v in totals.items()},
                   "parts_ms": {s: {p: statistics.median(v) * 1e3 for p, v in d.items()} for s, d in parts.items()}}
            results["sizes"].append(row)
            names = sorted({p for d in row["parts_ms"].values() for p in d},
                           key=lambda p: -max(d.get(p, 0) for d in row["parts_ms"].values()))
            print(f"\nprefill {n} tokens (medians of {args.reps}, ms)")
            print("| part | " + " | ".join(sides) + " |")
            for p in names:
                print(f"| {p} | " + " | ".join(f"{row['parts_ms'][s].get(p, 0):.2f}" for s in sides) + " |")
            print("| **step (outside the parts: scheduler, prepare, logits copy)** | " + " | ".join(
                f"{row['total_ms'][s] - sum(row['parts_ms'][s].values()):.2f}" for s in sides) + " |")
            print("| **whole step** | " + " | ".join(f"{row['total_ms'][s]:.2f}" for s in sides) + " |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_average_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
