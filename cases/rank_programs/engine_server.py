"""A RankPool server that runs the engine on every rank of a TP/EP job (for cases/test_parallel.py).

Request: {"checkpoint": name, "tp": N, "ep": N, "mode": graph mode, "capture_sizes": [...],
"decode_capture_sizes": [...], "capture": "lazy" | "eager", "max_num_batched_tokens": T,
"prompts": [[ids], ...], "max_new_tokens": N, "failpoints": "a,b", "fused_max_tokens": T, "moe_form": "dense" | "sparse",
"dtype": "float32" | "float64", "names": [prompt names], "routing_replay_dir": DIR}; or
{"hang": rank} / {"exit": rank} to plant a hung or dead rank. Reply: the run's dump arrays
(engine/dump.py keys) plus "rank", "stats" and "failpoints" (the names planted in the engine that
ran: the pool's, i.e. the gate run's, plus the request's). Engines are cached per configuration,
so a module's examples reuse loaded weights and captured graphs; a run with "routing_replay_dir"
builds its own engine (the directory is the engine's, and the writer closes when the run ends).
"""

from __future__ import annotations

import os
import time

import numpy as np
import paddle.distributed as dist

from engine.config import EngineConfig, GraphConfig, ParallelConfig
from engine.dump import dump_arrays
from engine.failpoints import Failpoints
from engine.llm import LLM, Prompt
from fixtures.pytest_fixtures import checkpoint_dir
from engine.launch import serve
from engine.launch.rank_entry import pool_failpoints, wait_for_store

ENGINES: dict[tuple, LLM] = {}


def engine_for(request: dict) -> LLM:
    """The cached engine of the request's configuration; a fresh one for a routing-replay run."""
    graph = GraphConfig(mode=request.get("mode", "eager"), backend="static",
                        prefill_capture_sizes=tuple(request.get("capture_sizes") or ()) or None,
                        decode_capture_sizes=tuple(request.get("decode_capture_sizes") or ()) or None,
                        capture=request.get("capture", "lazy"))
    config = EngineConfig(max_num_batched_tokens=request.get("max_num_batched_tokens", 8192), graph=graph,
                          parallel=ParallelConfig(tp=request["tp"], ep=request.get("ep", 1),
                                                  fused_allreduce_max_tokens=request.get("fused_max_tokens", 2048)),
                          faults=pool_failpoints().with_(Failpoints.parse(request.get("failpoints", ""))),
                          moe_form=request.get("moe_form", "dense"), dtype=request.get("dtype", "float32"))
    if request.get("routing_replay_dir"):
        return LLM(checkpoint_dir(request["checkpoint"]), config, routing_replay_dir=request["routing_replay_dir"])
    key = (request["checkpoint"], config)
    if key not in ENGINES:
        ENGINES[key] = LLM(checkpoint_dir(request["checkpoint"]), config)
    return ENGINES[key]


def plant(request: dict) -> None:
    rank = dist.get_rank()
    if request.get("exit") == rank:
        os._exit(3)
    if request.get("hang") == rank:
        while True:
            time.sleep(1)


def handle(request: dict) -> dict:
    plant(request)
    llm = engine_for(request)
    if "prefix_workloads" in request:
        return prefix_reply(llm, request)
    names = request.get("names") or [f"p{i}" for i in range(len(request["prompts"]))]
    prompts = [Prompt(tuple(ids), name) for ids, name in zip(request["prompts"], names, strict=True)]
    outputs = llm.generate(prompts, request.get("max_new_tokens", 4))
    stats = llm.runner.stats.summary()
    return {**dump_arrays(outputs, llm.model_config.moe_layers), "rank": dist.get_rank(), "stats": stats,
            "failpoints": llm.engine.faults.names}


def prefix_reply(llm: LLM, request: dict) -> dict:
    """{"prefix_workloads": [[[ids], ...], ...], "reuse": bool}: the workloads in turn (reuse: without
    prompt logits, so requests look up the prefix cache; else every token computed). Reply: the last
    workload's greedy tokens, greedy logits and routed ids (dump keys), and the prompt tokens this
    rank reused from the prefix cache during the request (cases/test_prefix_gate.py)."""
    before = llm.prefix_stats.reused_tokens
    for prompts in request["prefix_workloads"]:
        outputs = llm.generate([Prompt(tuple(ids), f"p{i}") for i, ids in enumerate(prompts)],
                               request.get("max_new_tokens", 4), record_prompt_logits=not request["reuse"])
    arrays = {"rank": dist.get_rank(), "reused": llm.prefix_stats.reused_tokens - before}
    for i, out in enumerate(outputs):
        arrays[f"greedy_p{i}"] = np.asarray(out.greedy)
        arrays[f"greedy_logits_p{i}"] = np.stack(out.greedy_logits)
        for layer in llm.model_config.moe_layers:
            arrays[f"topk_ids_p{i}_layer{layer}"] = out.topk_ids(layer)
    return arrays


if __name__ == "__main__":
    wait_for_store()  # engine/launch/rank_entry.py: no 3 s retry at the start
    dist.init_parallel_env()
    serve(handle)
