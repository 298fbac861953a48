"""Prefill at 8192 tokens on a synthetic config with real expert shapes, against the matmul ceiling.

The config is bench/synthetic.py's GLM-style decoder with 128 experts, top-8 in 8 groups (keep 4),
expert width hidden/4 (GLM-4.5-Air's 1408/4096 is 0.34), sparse MoE form. The ceiling is one
large float32 GEMM in the same process and thread count. The step's GEMM FLOPs are counted from
the shapes (useful expert FLOPs, not the capacity padding), attention time is measured around the
attention op, and the fraction of the ceiling is taken over the non-attention time.

    nice -n 10 python -m bench.prefill_ceiling [--tokens 8192] [--hidden 512]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import paddle

from bench.synthetic import random_weights, synthetic_config
from bench.workload import prefill_batch
from engine.config import EngineConfig, ModelConfig
from engine.models.moe_decoder import MoEDecoder
from engine.runner import ModelRunner

SEQ_LEN = 512


def ceiling_gflops(size: int = 2048, repeat: int = 2) -> float:
    """Best float32 GFLOP/s of a [size, size] @ [size, size] matmul."""
    rng = np.random.default_rng(0)
    a, b = (paddle.to_tensor(rng.standard_normal((size, size), dtype=np.float32)) for _ in range(2))
    paddle.matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        paddle.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def real_shape_config(hidden: int, layers: int = 2, form: str = "sparse") -> ModelConfig:
    cfg = synthetic_config(hidden=hidden, layers=layers, experts=128, max_positions=SEQ_LEN)
    return replace(cfg, top_k=8, n_group=8, topk_group=4, moe_intermediate_size=hidden // 4, moe_form=form)


def gemm_flops(cfg: ModelConfig, tokens: int, sampled: int) -> float:
    """Matmul FLOPs of one prefill step: projections, dense MLP, router, useful expert and shared-
    expert FLOPs, the LM head on the sampled rows."""
    h = cfg.hidden_size
    per_token = 2 * h * (cfg.q_size + 2 * cfg.kv_size) + 2 * cfg.q_size * h
    flops = cfg.num_layers * per_token * tokens
    for layer in range(cfg.num_layers):
        if cfg.is_moe_layer(layer):
            experts = cfg.top_k + cfg.n_shared_experts
            flops += tokens * (2 * h * cfg.num_experts + 6 * h * cfg.moe_intermediate_size * experts)
        else:
            flops += tokens * 6 * h * cfg.intermediate_size
    return flops + sampled * 2 * h * cfg.vocab_size


def measure(tokens: int = 8192, hidden: int = 512, repeat: int = 2, capacity: bool = False) -> dict:
    """`capacity`: run the sparse MoE form eagerly at the graphs' fixed capacity (plus its overflow
    pass), as eager steps did before the exact path, for a comparison in one run."""
    cfg = real_shape_config(hidden)
    model = MoEDecoder(cfg, random_weights(cfg))
    model.fixed_shapes = capacity
    runner = ModelRunner(model, EngineConfig(max_num_batched_tokens=tokens, max_num_seqs=tokens // SEQ_LEN))
    attention, spent = model.attention, [0.0]

    def timed(*args):  # bench-only wrapper: attention's share of the step
        start = time.perf_counter()
        out = attention(*args)  # Paddle's CPU kernels are synchronous: the op is done when it returns
        spent[0] += time.perf_counter() - start
        return out

    model.attention = timed
    batch = prefill_batch(runner.cache.allocator, runner.cache.block_size, tokens, SEQ_LEN, cfg.vocab_size)
    runner.step(batch)
    best, best_attention = float("inf"), 0.0
    for _ in range(repeat):
        spent[0] = 0.0
        start = time.perf_counter()
        runner.step(batch)
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, best_attention = elapsed, spent[0]
    ceiling = ceiling_gflops()
    flops = gemm_flops(cfg, tokens, len(batch.segments))
    rest = best - best_attention
    return {"tokens": tokens, "hidden": hidden, "experts": 128, "top_k": 8, "moe_form": cfg.moe_form,
            "sparse_path": "capacity" if capacity else "exact",
            "step_s": best, "attention_s": best_attention, "gemm_gflop": flops / 1e9,
            "ceiling_gflops": ceiling, "step_gflops": flops / best / 1e9,
            "fraction_of_ceiling_outside_attention": flops / rest / 1e9 / ceiling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--capacity", action="store_true", help="also time the fixed-capacity sparse path eagerly")
    args = parser.parse_args()
    print(json.dumps(measure(args.tokens, args.hidden), indent=1), flush=True)
    if args.capacity:
        print(json.dumps(measure(args.tokens, args.hidden, capacity=True), indent=1))


if __name__ == "__main__":
    main()
