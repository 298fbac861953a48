"""Routing replay: force each MoE layer to use a recording's expert ids, token by token.

`RoutingReplayer.load` reads one file per prompt (`<dir>/<prompt name>.safetensors`) and refuses,
with a RoutingMismatch naming the file, a recording from another model (config hash, MoE layers,
top_k), of another prompt (its length or its token ids' digest) or too short for the tokens the
workload will feed. Before each step the runner asks `step_ids(batch)` for the step's rows
[T, moe_layers, top_k] at each segment's token positions.

`replayed_routing` is the router with the selection replaced by the given ids: the weights are
recomputed from the router's scores at those ids with the router's own formula and op order, so a
run replaying its own recording (same ids, same order within a row) reproduces its weights, and
therefore its logits, bitwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle

from engine.config import RouterKind
from engine.layers.scalars import operand
from engine.moe import router
from engine.routing_replay import model_identity
from engine.routing_replay.errors import RoutingMismatch
from engine.routing_replay.reader import load_routing
from engine.routing_replay.store import file_name
from engine.routing_replay.table_file import prompt_digest


class RoutingReplayer:
    def __init__(self, directory: str | Path, model_config):
        self.directory, self.cfg = Path(directory), model_config
        self._tables: dict[int, np.ndarray] = {}  # request id -> [tokens, L, k] int64

    def load(self, prompts, max_new_tokens: int) -> None:
        """Read and check the recording of every prompt of a workload (request id = prompt index)."""
        cfg, tables = self.cfg, {}
        for i, prompt in enumerate(prompts):
            path = self.directory / file_name(prompt.name or f"request-{i}")
            table = load_routing(path, model=model_identity(cfg), moe_layers=cfg.moe_layers, top_k=cfg.top_k)
            _check_fits(path, table, prompt.input_ids, max_new_tokens)
            tables[i] = table.ids.astype(np.int64)
        self._tables = tables

    def recorded_ids(self, request_id: int) -> np.ndarray:
        """[tokens, moe_layers, top_k] int64: what request `request_id` of the loaded workload routes by."""
        return self._tables[request_id]

    def step_ids(self, batch) -> paddle.Tensor:
        """[T, moe_layers, top_k] int64: the recorded ids of the step's tokens, in batch row order."""
        rows = [self._tables[seg.seq.request.request_id][seg.start:seg.start + seg.num_tokens]
                for seg in batch.segments]
        return paddle.to_tensor(np.concatenate(rows))


def _check_fits(path: Path, table, prompt_ids, max_new_tokens: int) -> None:
    if table.prompt_length != len(prompt_ids) or table.prompt != prompt_digest(prompt_ids):
        raise RoutingMismatch(path, f"recorded for another prompt ({table.prompt_length} tokens, digest "
                                    f"{table.prompt[:12]}), not this {len(prompt_ids)}-token prompt")
    needed = len(prompt_ids) + max_new_tokens - 1
    if table.num_tokens < needed:
        raise RoutingMismatch(path, f"{table.num_tokens} recorded tokens, the workload feeds {needed} "
                                    f"({len(prompt_ids)} prompt + {max_new_tokens} new - 1)")


def replayed_routing(cfg, logits: paddle.Tensor, ids: paddle.Tensor,
                     num_real: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """(ids, weights) [T, k] for forced `ids`, weights as the router computes them for its own
    choice (softmax_topk: the probabilities; noaux_tc: the unbiased sigmoid scores, renormalised,
    scaled; the correction bias only selects, so replay has no use for it). Graph-safe: fixed shapes,
    no host reads."""
    ids = ids.astype("int64")  # [T, k]
    if cfg.router is RouterKind.SOFTMAX_TOPK:
        probs = paddle.nn.functional.softmax(logits.astype(router._compute_dtype(logits)), axis=-1)  # [T, E]
        weights = paddle.take_along_axis(probs, ids, axis=-1)  # [T, k]
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdim=True)
        return router._mask_padding(ids, weights, num_real)
    scores = router._sigmoid(logits)  # [T, E]
    weights = paddle.take_along_axis(scores, ids, axis=-1)  # [T, k]
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdim=True) + operand(router.RENORM_EPS, weights))
    return router._mask_padding(ids, weights * operand(cfg.routed_scaling_factor, weights), num_real)
