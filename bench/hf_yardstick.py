"""Issue 16, item 4, second yardstick: this engine against Hugging Face transformers on one checkpoint.

    nice -n 10 python -m bench.hf_yardstick [--quick] [--experts 64] [--dense-sizes 512]

Needs torch and transformers (the dev-only `goldens` extra: `pip install -e .[goldens]`); nothing
on the gate's path imports this module. It builds a random GLM-4.5-style checkpoint with
transformers (64 routed experts top-8 in 8 groups, hidden 512, 2 layers, layer 0 dense) and saves
it with `save_pretrained` into a temp dir (deleted at exit; weights are never committed). Both
runtimes load that directory. In one process, at the same thread count (2: torch.set_num_threads
and engine/threads.py), it then

1. checks agreement on one 512-token prompt: prompt logits relative L2, argmax at every position,
   and 8 greedy tokens through each runtime's KV cache;
2. times prefill steps of 512, 2048 and 8192 tokens (sequences of 512 tokens each, one batch; the
   engine runs them as one scheduler step) - transformers forward with its defaults (sdpa
   attention, its default experts implementation, logits for the last position only, as generate
   does) against `engine.llm.LLM` eager with moe_form sparse and dense - interleaved, after one
   warm-up each, median of the repetitions;
3. times greedy decode steps (batch 1 and batch 16, 512-token contexts) through both KV caches.

Writes bench/results/hf-yardstick-<date>.json. Ratios are engine tokens/s over transformers
tokens/s (>= 1.0: the engine is at least as fast).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from bench import machine
from bench.machine import ROOT

SEQ_LEN = 512
SETTLE_S = 0.3
THREADS = 2
ARCH = dict(  # noqa: C408 (the keyword spelling of Glm4MoeConfig, as in fixtures/build_fixtures.py)
    vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=1, head_dim=128, rms_norm_eps=1e-5, hidden_act="silu", attention_bias=True,
    use_qk_norm=True, tie_word_embeddings=False, first_k_dense_replace=1, moe_intermediate_size=128,
    num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1, routed_scaling_factor=2.5,
    norm_topk_prob=True)
ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.5}


# ------------------------------------------------------------------------------------- transformers side

def build_checkpoint(out_dir: Path, experts: int, max_positions: int) -> dict:
    """Random weights in the fixture recipe (fixtures/build_fixtures.py), saved in Hub layout."""
    import torch
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    from fixtures.build_fixtures import InitScales, randomize_weights

    config = Glm4MoeConfig(**ARCH, n_routed_experts=experts, max_position_embeddings=max_positions,
                           rope_parameters=dict(ROPE))
    torch.manual_seed(5)
    model = Glm4MoeForCausalLM(config)
    randomize_weights(model, InitScales(seed=5, correction_bias_max=0.5))
    model.save_pretrained(out_dir)
    (out_dir / "generation_config.json").unlink(missing_ok=True)
    return {k: v for k, v in config.to_dict().items() if k in ARCH or k in ("n_routed_experts", "max_position_embeddings")}


def load_hf(ckpt: Path, experts: str | None):
    """`experts` None: transformers' default experts implementation (grouped_mm in 5.24); "eager": a loop
    over the experts that have tokens. Attention stays at its default (sdpa)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"experts_implementation": experts} if experts else {}
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, **kwargs).eval()


def hf_prefill(model, ids: np.ndarray, all_logits: bool = False):
    """ids [B, L]: one forward, a fresh cache; returns (logits, cache)."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.from_numpy(ids), cache=cache, use_cache=True,
                    logits_to_keep=0 if all_logits else 1)
    return out.logits.numpy(), cache


def hf_decode(model, ids: np.ndarray, steps: int) -> tuple[list[float], np.ndarray, np.ndarray]:
    """Prefill `ids` [B, L], then `steps` greedy steps; returns step times, tokens [B, steps], last logits."""
    import torch

    logits, cache = hf_prefill(model, ids)
    tokens, times = [logits[:, -1].argmax(-1)], []
    greedy_logits = [logits[:, -1]]
    with torch.inference_mode():
        for _ in range(steps - 1):
            start = time.perf_counter()
            out = model(input_ids=torch.from_numpy(tokens[-1][:, None].astype(np.int64)), cache=cache,
                        use_cache=True, logits_to_keep=1)
            step_logits = out.logits[:, -1].numpy()
            tokens.append(step_logits.argmax(-1))
            times.append(time.perf_counter() - start)
            greedy_logits.append(step_logits)
    return times, np.stack(tokens, 1), np.stack(greedy_logits, 1)


# ------------------------------------------------------------------------------------------ engine side

def load_engine(ckpt: Path, form: str, max_seqs: int):
    from engine.config import EngineConfig
    from engine.llm import LLM

    return LLM(ckpt, EngineConfig(moe_form=form, max_num_batched_tokens=8192, max_num_seqs=max_seqs))


def engine_steps(llm, ids: np.ndarray, max_new: int, all_logits: bool = False):
    """Run the rows of `ids` as prompts through the scheduler, timing each step; returns
    (prefill step times, decode step times, tokens [B, max_new], prompt logits of row 0 or None)."""
    from engine.llm import RequestOutput, _collect
    from engine.scheduler import Request, Scheduler

    sched = Scheduler(llm.engine.max_num_batched_tokens, llm.engine.max_num_seqs, llm.runner.cache.allocator,
                      llm.engine.block_size)
    outputs = {}
    for i, row in enumerate(ids):
        sched.add(Request(i, tuple(int(t) for t in row), max_new, f"p{i}"))
        outputs[i] = RequestOutput(f"p{i}", row.astype(np.int64), max_new)
    prefill, decode = [], []
    while sched.has_work:
        batch = sched.schedule()
        start = time.perf_counter()
        result = llm.runner.step(batch, all_prompt_logits=all_logits)
        elapsed = time.perf_counter() - start
        (prefill if any(s.is_prefill for s in batch.segments) else decode).append(elapsed)
        _collect(batch, result, outputs)
        sched.update(batch, result.next_tokens)
    tokens = np.array([outputs[i].greedy for i in range(len(ids))])
    logits0 = outputs[0].logits() if all_logits else None
    greedy_logits = np.array([np.stack(outputs[i].greedy_logits) for i in range(len(ids))])
    return prefill, decode, tokens, logits0, greedy_logits


# ------------------------------------------------------------------------------------------------ run

def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def run(args: argparse.Namespace, progress=print) -> dict:
    import torch

    from engine.threads import set_threads

    torch.set_num_threads(THREADS)
    threads = set_threads(THREADS)
    sizes = (512, 2048) if args.quick else (512, 2048, 8192)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="hf-yardstick-"))
    try:
        arch = build_checkpoint(tmp, args.experts, max_positions=8192 + 64)
        hfs = {"hf_eager": load_hf(tmp, "eager"), "hf_default": load_hf(tmp, None)}
        hf = hfs["hf_default"]
        forms = ["sparse"] + (["dense"] if args.dense_sizes else [])
        engines = {form: load_engine(tmp, form, max_seqs=max(sizes) // SEQ_LEN) for form in forms}
        progress(f"checkpoint in {tmp}; hf attn={hf.config._attn_implementation}, "
                 f"experts={getattr(hf.config, '_experts_implementation', None)}; RSS {machine.rss_mib():.0f} MiB")
        results = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "threads": threads,
                   "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                   "hf_attn_implementation": hf.config._attn_implementation,
                   "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None),
                   "config": arch, "seq_len": SEQ_LEN, "machine": machine.describe(threads),
                   "git": machine.git_state(), "load_average_start": list(__import__("os").getloadavg())}

        results["gemm"] = gemm_table()
        progress(f"gemm: {results['gemm']}")

        # 1. agreement
        prompt = rng.integers(0, ARCH["vocab_size"], (1, SEQ_LEN))
        hf_logits, _ = hf_prefill(hf, prompt, all_logits=True)
        _, hf_tokens, _ = hf_decode(hf, prompt, 8)
        agree = {"hf_eager_vs_default_rel_l2": rel_l2(hf_prefill(hfs["hf_eager"], prompt, all_logits=True)[0], hf_logits)}
        for form, llm in engines.items():
            _, _, tokens, logits, _ = engine_steps(llm, prompt, 8, all_logits=True)
            agree[form] = {"prompt_logits_rel_l2": rel_l2(logits, hf_logits[0]),
                           "argmax_identical": bool((logits.argmax(-1) == hf_logits[0].argmax(-1)).all()),
                           "greedy_identical": bool((tokens == hf_tokens).all())}
            progress(f"agreement {form}: {agree[form]}")
        results["agreement"] = agree

        # 2. prefill, interleaved
        prefill = []
        for n in sizes:
            ids = rng.integers(0, ARCH["vocab_size"], (n // SEQ_LEN, SEQ_LEN))
            runners = {k: partial(_settled, _time, partial(hf_prefill, m, ids)) for k, m in hfs.items()}
            for form, llm in engines.items():
                if form == "sparse" or n in args.dense_sizes:
                    runners[form] = partial(_settled, _first_prefill, llm, ids)
            times = {k: [] for k in runners}
            for k, fn in runners.items():  # warm-up
                fn()
            reps = args.reps if n < 8192 else max(1, args.reps - 1)
            for rep in range(reps):
                order = list(runners) if rep % 2 == 0 else list(reversed(runners))
                for k in order:
                    times[k].append(runners[k]())
            row = {"tokens": n, "sequences": n // SEQ_LEN, "times_s": times}
            row.update({f"{k}_s": statistics.median(v) for k, v in times.items()})
            row["hf_s"] = min(row["hf_eager_s"], row["hf_default_s"])  # the faster transformers setting
            row.update({f"{k}_tok_s": n / row[f"{k}_s"] for k in [*times, "hf"]})
            row.update({f"ratio_{k}": row["hf_s"] / row[f"{k}_s"] for k in engines if f"{k}_s" in row})
            row["engine_sparse_profile"] = _settled(profile_step, engines["sparse"], ids)
            prefill.append(row)
            progress(f"prefill {n}: " + ", ".join(f"{k} {row[f'{k}_s']:.3f} s" for k in times))
        results["prefill"] = prefill

        # 3. decode
        decode = []
        for batch in (1, 16) if not args.quick else (1,):
            ids = rng.integers(0, ARCH["vocab_size"], (batch, SEQ_LEN))
            times = {}
            row = {"batch": batch, "context": SEQ_LEN, "steps": args.decode_steps}
            for k, m in hfs.items():
                times[k], hf_tok, _ = _settled(hf_decode, m, ids, args.decode_steps + 1)
            for form, llm in engines.items():
                _, dec, tok, _, _ = _settled(engine_steps, llm, ids, args.decode_steps + 1)
                times[form] = dec
                row[f"greedy_identical_{form}"] = bool((tok == hf_tok).all())
            row["times_s"] = times
            row.update({f"{k}_s": statistics.median(v) for k, v in times.items()})
            row["hf_s"] = min(row["hf_eager_s"], row["hf_default_s"])
            row.update({f"{k}_tok_s": batch / row[f"{k}_s"] for k in [*times, "hf"]})
            row.update({f"ratio_{k}": row["hf_s"] / row[f"{k}_s"] for k in engines})
            row["engine_sparse_profile"] = _settled(profile_step, engines["sparse"], ids, args.decode_steps)
            decode.append(row)
            progress(f"decode batch {batch}: " + ", ".join(f"{k} {row[f'{k}_s'] * 1e3:.1f} ms/step" for k in times))
        results["decode"] = decode
        results["load_average_end"] = list(__import__("os").getloadavg())
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


GEMM_SHAPES = (  # [m, k] x [k, n] of this checkpoint's prefill, 8192 tokens, 64 experts top-8
    (8192, 512, 1024),  # the dense layer's gate/up
    (8192, 512, 640),  # qkv (4 heads + 2 x 1 kv head of 128)
    (1024, 512, 128),  # one expert's gate or up at its balanced share (8192 * 8 / 64 rows)
    (1024, 128, 512),  # that expert's down
    (128, 512, 128),  # a small expert run (a 2048-token step's balanced share at 128 experts)
)


def gemm_pair(m: int = 8192, k: int = 512, n: int = 1024, reps: int = 5) -> dict:
    """The same float32 [m, k] x [k, n] matmul through torch and through Paddle, interleaved, median
    seconds and GFLOP/s: how far apart the two libraries' CPU GEMMs are at this shape. Neither side
    copies its result out (both CPU kernels are synchronous)."""
    import paddle
    import torch

    a = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    b = np.random.default_rng(2).standard_normal((k, n), dtype=np.float32)
    ta, tb, pa, pb = torch.from_numpy(a), torch.from_numpy(b), paddle.to_tensor(a), paddle.to_tensor(b)
    inner = max(1, round(2e8 / (2 * m * k * n)))  # small shapes: time a batch of calls, report per call
    calls = {"torch": lambda: [torch.matmul(ta, tb) for _ in range(inner)],
             "paddle": lambda: [paddle.matmul(pa, pb) for _ in range(inner)]}
    times = {name: [] for name in calls}
    for name, fn in calls.items():  # warm-up
        _settled(fn)
    for _ in range(reps):
        for name, fn in calls.items():
            times[name].append(_settled(_time, fn) / inner)
    out = {"shape": [m, k, n]}
    for name, t in times.items():
        out[f"{name}_s"] = statistics.median(t)
        out[f"{name}_gflops"] = 2 * m * k * n / out[f"{name}_s"] / 1e9
    out["torch_over_paddle"] = out["paddle_s"] / out["torch_s"]
    return out


def gemm_table(reps: int = 5) -> list[dict]:
    """`gemm_pair` at every shape of GEMM_SHAPES."""
    return [gemm_pair(*shape, reps=reps) for shape in GEMM_SHAPES]


def _first_prefill(llm, ids: np.ndarray) -> float:
    return engine_steps(llm, ids, 1)[0][0]


def _settled(fn, *args):
    """Call `fn` after SETTLE_S idle: torch (libgomp) and Paddle (libiomp5, KMP_BLOCKTIME 200 ms) each keep
    their OpenMP workers spinning after a parallel region, so a call right after the other library's
    would share the 2 cores with those spinning threads."""
    time.sleep(SETTLE_S)
    return fn(*args)


def profile_step(llm, ids: np.ndarray, decode_steps: int = 0) -> dict:
    """Where the engine's eager step time goes: seconds per part of the prefill step of `ids` (or,
    with `decode_steps`, summed over that many decode steps after it), by wrapping the functions the
    decoder calls (Paddle CPU kernels are synchronous, so wall time per call is the op's time)."""
    from engine.models import moe_decoder
    from engine.moe import experts

    clock = {}
    originals = {}
    on = [decode_steps == 0]

    def wrap(module, name, bucket):
        fn = getattr(module, name)
        originals[(module, name)] = fn

        def timed(*a, **kw):
            if not on[0]:
                return fn(*a, **kw)
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                clock[bucket] = clock.get(bucket, 0.0) + time.perf_counter() - start
        setattr(module, name, timed)

    wrap(moe_decoder, "paged_attention", "attention")
    wrap(moe_decoder, "routed_experts", "routed experts")
    wrap(moe_decoder, "dense_mlp", "dense MLP + shared expert")
    wrap(moe_decoder, "linear", "qkv + o projections")
    wrap(moe_decoder, "apply_rotary", "rotary")
    wrap(moe_decoder, "rms_norm", "q/k + input norms")
    wrap(moe_decoder, "all_reduce_add_rms_norm", "residual add + norms")
    wrap(moe_decoder.router, "noaux_tc", "router")
    wrap(experts, "_bucket_pass", "  of which bucket passes")
    wrap(experts, "_segment_loop", "  of which per-expert loop")
    wrap(experts, "_sort_by_expert", "  of which sort by expert")
    passes = []  # `first` of each bucket pass: 0, then the bucket capacity when a step overflowed
    bucket = experts._bucket_pass
    experts._bucket_pass = lambda *a, **kw: (on[0] and passes.append(a[2]), bucket(*a, **kw))[1]
    step = llm.runner.step

    def switched(batch, **kw):
        on[0] = decode_steps == 0 or not any(s.is_prefill for s in batch.segments)
        return step(batch, **kw)

    llm.runner.step = switched
    try:
        prefill, decode, *_ = engine_steps(llm, ids, decode_steps + 1)
        total = sum(decode) if decode_steps else prefill[0]
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)
        del llm.runner.step
    clock = {k: round(v, 4) for k, v in clock.items()}
    clock["step"] = round(total, 4)
    clock["other (embedding, logits, host side)"] = round(total - sum(
        v for k, v in clock.items() if not k.startswith(" ") and k != "step"), 4)
    clock["bucket pass starts"] = passes
    return clock


def table(r: dict) -> str:
    lines = [(f"Run {r['started']}, {r['threads']} threads, torch {r['torch']}, transformers {r['transformers']} "
              f"(attention {r['hf_attn_implementation']}, experts {r['hf_experts_implementation']}); "
              f"{r['config']['n_routed_experts']} experts top-8, 8 groups, hidden 512, 2 layers."), "",
             "Ratio: engine tokens/s over the faster transformers setting.", "",
             ("| measured | transformers, experts eager | transformers, default experts | engine sparse | ratio "
              "| engine dense | ratio |"), "|---|---|---|---|---|---|---|"]
    for p in r["prefill"]:
        dense = (f"{p['dense_tok_s']:.0f} tok/s | {p['ratio_dense']:.2f}" if "dense_s" in p else "- | -")
        lines.append(f"| prefill {p['tokens']} tokens ({p['sequences']} x {r['seq_len']}) | {p['hf_eager_tok_s']:.0f} tok/s | "
                     f"{p['hf_default_tok_s']:.0f} tok/s | "
                     f"{p['sparse_tok_s']:.0f} tok/s | {p['ratio_sparse']:.2f} | {dense} |")
    for d in r["decode"]:
        dense = (f"{d['dense_tok_s']:.1f} tok/s | {d['ratio_dense']:.2f}" if "dense_s" in d else "- | -")
        lines.append(f"| decode, batch {d['batch']}, context {d['context']} | {d['hf_eager_tok_s']:.1f} tok/s | "
                     f"{d['hf_default_tok_s']:.1f} tok/s | "
                     f"{d['sparse_tok_s']:.1f} tok/s | {d['ratio_sparse']:.2f} | {dense} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 and 2048 tokens, decode batch 1 only")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per size (one fewer at 8192)")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--dense-sizes", type=lambda s: tuple(int(x) for x in s.split(",") if x), default=(512,),
                        help="prefill sizes at which the dense MoE form is also timed ('' for none)")
    parser.add_argument("--gemm-only", action="store_true", help="only the torch-vs-Paddle GEMM rates")
    args = parser.parse_args()
    if args.gemm_only:
        import torch

        from engine.threads import set_threads

        torch.set_num_threads(THREADS)
        set_threads(THREADS)
        print(json.dumps(gemm_table(), indent=1))
        return
    results = run(args)
    out = ROOT / "bench" / "results" / f"hf-yardstick-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json"
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
