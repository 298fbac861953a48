"""The decoder's weights as frozen dataclasses, built from this rank's Hub tensors.

Projections are stored [in, out] (one matmul each), a layer's q/k/v side by side in one matrix,
and a MoE layer's experts side by side (gate, up: [H, E*I]) and stacked (down: [E*I, H]), the
layout `engine/moe/experts.py` computes on. Every Hub name is spelled in
`engine/checkpoint/hub_schema.py`; this module only asks it where a tensor lives.

`LayerWeights.STARTS` / `FINISHES` say which piece reads which field: the piece before a layer's
attention starts it, the piece after finishes it. `map_fields` applies a conversion to exactly
those fields (the static backend turns them into program parameters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import paddle

from engine.checkpoint import hub_schema as hub
from engine.config import ModelConfig
from engine.layers.linear import frozen, weight_param
from engine.moe.experts import pack_experts

Convert = Callable[[paddle.Tensor], paddle.Tensor]


@dataclass(frozen=True)
class MLPWeights:
    gate: paddle.Tensor  # [H, I]
    up: paddle.Tensor  # [H, I]
    down: paddle.Tensor  # [I, H]


@dataclass(frozen=True)
class MoEWeights:
    router: paddle.Tensor  # [H, E] (all experts: every rank routes every token)
    bias: paddle.Tensor | None  # [E]; None when the checkpoint has no correction bias
    num_local: int  # experts held by this rank
    gate: paddle.Tensor  # [H, E_local * I], expert e in columns [e*I, (e+1)*I)
    up: paddle.Tensor  # [H, E_local * I]
    down: paddle.Tensor  # [E_local * I, H]
    shared: MLPWeights | None


@dataclass(frozen=True)
class LayerWeights:
    input_norm: paddle.Tensor
    post_norm: paddle.Tensor
    qkv: paddle.Tensor  # [H, Q + 2 KV]
    qkv_bias: paddle.Tensor | None
    q_norm: paddle.Tensor | None
    k_norm: paddle.Tensor | None
    o_proj: paddle.Tensor  # [Q, H]
    o_bias: paddle.Tensor | None
    mlp: MLPWeights | MoEWeights

    STARTS: ClassVar = ("input_norm", "qkv", "qkv_bias", "q_norm", "k_norm")  # read by the piece that starts the layer
    FINISHES: ClassVar = ("o_proj", "o_bias", "post_norm", "mlp")  # read by the piece after its attention


def map_fields(weights: LayerWeights, fields: tuple[str, ...], convert: Convert) -> LayerWeights:
    """`weights` with the tensors of `fields` (nested ones too) passed through `convert`."""
    return replace(weights, **{name: _map_tensors(getattr(weights, name), convert) for name in fields})


def _map_tensors(weights, convert: Convert):
    if isinstance(weights, paddle.Tensor):
        return convert(weights)
    if dataclasses.is_dataclass(weights):
        return replace(weights, **{f.name: _map_tensors(getattr(weights, f.name), convert)
                                   for f in dataclasses.fields(weights)})
    return weights


def layer_weights(cfg: ModelConfig, tensors: dict[str, np.ndarray], layer: int, experts: range,
                  rank: int) -> LayerWeights:
    """Layer `layer` from this rank's Hub tensors; `experts` are the global ids this rank holds."""
    names = hub.attention_names(layer)
    qkv = np.concatenate([tensors[names.q], tensors[names.k], tensors[names.v]], axis=0)
    bias = (np.concatenate([tensors[names.q_bias], tensors[names.k_bias], tensors[names.v_bias]])
            if cfg.attention_bias else None)
    return LayerWeights(
        input_norm=frozen(tensors[names.input_norm]), post_norm=frozen(tensors[names.post_norm]),
        qkv=weight_param(qkv), qkv_bias=None if bias is None else frozen(bias),
        q_norm=frozen(tensors[names.q_norm]) if cfg.use_qk_norm else None,
        k_norm=frozen(tensors[names.k_norm]) if cfg.use_qk_norm else None,
        o_proj=weight_param(tensors[names.o]),
        o_bias=_row_parallel_bias(tensors[names.o_bias], rank) if cfg.o_proj_bias else None,
        mlp=(_moe_weights(cfg, tensors, layer, experts) if cfg.is_moe_layer(layer)
             else _mlp_weights(tensors, hub.mlp_names(layer))),
    )


def _mlp_weights(tensors: dict[str, np.ndarray], names: hub.MLPNames) -> MLPWeights:
    return MLPWeights(gate=weight_param(tensors[names.gate]), up=weight_param(tensors[names.up]),
                      down=weight_param(tensors[names.down]))


def _row_parallel_bias(bias: np.ndarray, rank: int) -> paddle.Tensor:
    """The bias of a row-parallel projection is added once, by rank 0, so the all-reduce sums it once."""
    return frozen(bias if rank == 0 else np.zeros_like(bias))


def _moe_weights(cfg: ModelConfig, tensors: dict[str, np.ndarray], layer: int, local: range) -> MoEWeights:
    experts = [hub.expert_names(layer, e) for e in local]
    gate, up, down = pack_experts([tensors[e.gate] for e in experts], [tensors[e.up] for e in experts],
                                  [tensors[e.down] for e in experts], cfg.moe_form)
    router = hub.router_names(layer)
    bias = tensors.get(router.bias)
    shared = _mlp_weights(tensors, hub.shared_expert_names(layer)) if cfg.n_shared_experts else None
    return MoEWeights(router=weight_param(tensors[router.weight]), bias=None if bias is None else frozen(bias),
                      num_local=len(experts), gate=frozen(gate), up=frozen(up), down=frozen(down), shared=shared)
