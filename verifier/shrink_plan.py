"""What a shrunk checkpoint keeps of a big one: its sizes, which layers and experts, its config.json.

The new config.json is the big one's, key for key in the big one's spelling (transformers 4.x or
5.x), with only the size keys changed: every other field (model_type, architectures, rope
settings, partial rotary, q/k-norm, biases, scaling factor, norm_topk_prob, tied embeddings, MTP
layers, dtype, token ids) is copied as written. A key the big file leaves to transformers' default
is added only when the small model's value differs from that default (`ShrinkPlan.added_keys`).

Layers: the first layers of each kind (dense MLP, MoE), in the big model's order, so a dense-then-
MoE pattern stays one. Experts: the first experts of each group, so the grouping (n_group) holds;
topk_group grows when the kept groups would hold fewer than top_k experts. Widths: leading
channels (and, with --vocab, leading token ids); head_dim is kept and the query heads per KV head too, so each kept query head still
reads the KV head it read in the big model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import GLM4_MOE, QWEN3_MOE, ModelConfig
from engine.errors import ConfigError, UserError
from engine.hf_config import parse

MODEL_TYPES = {"glm4_moe": GLM4_MOE, "qwen3_moe": QWEN3_MOE}  # model_type -> architecture


class ShrinkError(UserError, ValueError):
    """A shrink request that cannot be met; the message names the option or the file and field."""


@dataclass(frozen=True)
class Options:
    """The user's targets; None takes the default (see `_default_*`)."""

    layers: int | None = None
    experts: int | None = None
    hidden: int | None = None
    heads: int | None = None
    intermediate: int | None = None
    moe_intermediate: int | None = None
    vocab: int | None = None  # leading token ids; default: the whole vocabulary


@dataclass(frozen=True)
class ShrinkPlan:
    """Big model -> small model. `layers[i]` is the big layer small layer i comes from;
    `experts[j]` the big expert small expert j comes from."""

    big: ModelConfig
    small: ModelConfig
    layers: tuple[int, ...]
    experts: tuple[int, ...]
    config: dict[str, Any]  # the small config.json
    added_keys: tuple[str, ...]

    def small_layer(self, big_layer: int) -> int | None:
        """The small index of a big decoder or MTP layer; None when it is not kept."""
        if big_layer >= self.big.num_layers:  # MTP layers follow the decoder in both
            return self.small.num_layers + big_layer - self.big.num_layers
        return self.layers.index(big_layer) if big_layer in self.layers else None

    def small_expert(self, big_expert: int) -> int | None:
        return self.experts.index(big_expert) if big_expert in self.experts else None


def make_plan(raw: dict[str, Any], path: Path, options: Options) -> ShrinkPlan:
    """The plan for the checkpoint whose config.json (at `path`) holds `raw`."""
    big = _big_config(raw, path)
    layers = _kept_layers(big, options.layers)
    experts, n_group, topk_group = _kept_experts(big, options.experts, raw, path)
    widths = _widths(big, options)
    config, added = _small_config(raw, big, layers, len(experts), n_group, topk_group, widths)
    try:
        small = parse(config)
    except ConfigError as err:
        raise ShrinkError(f"the shrunk config.json would be refused: {err}") from None
    if small.moe_layers != tuple(i for i, big_i in enumerate(layers) if big.is_moe_layer(big_i)):
        raise ShrinkError(f"{path}: the kept layers' dense/MoE pattern cannot be written with "
                          f"decoder_sparse_step={raw.get('decoder_sparse_step')}; choose another --layers")
    return ShrinkPlan(big, small, layers, experts, config, tuple(added))


def _big_config(raw: dict[str, Any], path: Path) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ShrinkError(f"{path}: field 'model_type': {model_type!r} is not supported "
                          f"(supported: {', '.join(MODEL_TYPES)})")
    try:
        big = parse(raw)
    except ConfigError as err:
        raise ShrinkError(f"{path}: {err}") from None
    if big.architecture != MODEL_TYPES[model_type]:
        raise ShrinkError(f"{path}: field 'architectures': {big.architecture!r} does not match "
                          f"model_type {model_type!r}")
    return big


# ---------------------------------------------------------------------------------------------
# Layers


def _kept_layers(big: ModelConfig, wanted: int | None) -> tuple[int, ...]:
    """The first layers of each kind, in the big model's order."""
    moe = [i for i in range(big.num_layers) if big.is_moe_layer(i)]
    dense = [i for i in range(big.num_layers) if not big.is_moe_layer(i)]
    count = wanted if wanted is not None else min(big.num_layers, min(len(dense), 1) + min(len(moe), 2))
    if not 1 <= count <= big.num_layers:
        raise ShrinkError(f"--layers {count}: must be between 1 and the big model's "
                          f"num_hidden_layers={big.num_layers}")
    if dense and moe and count < 2:
        raise ShrinkError(f"--layers {count}: keeping both a dense and a MoE layer needs at least 2")
    n_dense = min(len(dense), max(1, count // 2)) if moe else count
    n_dense = max(n_dense, count - len(moe))
    return tuple(sorted(dense[:n_dense] + moe[:count - n_dense]))


# ---------------------------------------------------------------------------------------------
# Experts and grouping


def _kept_experts(big: ModelConfig, wanted: int | None, raw: dict, path: Path) -> tuple[tuple[int, ...], int, int]:
    """(kept big expert ids, n_group, topk_group) of the small model."""
    if not big.moe_layers:
        return (), big.n_group, big.topk_group
    key = _expert_key(raw)
    count = wanted if wanted is not None else _default_experts(big)
    if count > big.num_experts:
        raise ShrinkError(f"--experts {count} exceeds the {big.num_experts} routed experts of {path} "
                          f"(field '{key}')")
    if count < big.top_k:
        raise ShrinkError(f"--experts {count} is fewer than the {big.top_k} experts each token is routed to "
                          f"({path}, field 'num_experts_per_tok')")
    n_group = _kept_groups(big.n_group, count)
    per_group, big_per_group = count // n_group, big.num_experts // big.n_group
    experts = tuple(g * big_per_group + j for g in range(n_group) for j in range(per_group))
    topk_group = min(n_group, max(big.topk_group if n_group == big.n_group else 1, math.ceil(big.top_k / per_group)))
    return experts, n_group, topk_group


def _default_experts(big: ModelConfig) -> int:
    want = max(2 * big.top_k, 2 * big.n_group)
    return min(big.num_experts, want + (-want) % big.n_group)


def _kept_groups(n_group: int, experts: int) -> int:
    """The largest divisor of n_group that splits `experts` evenly into groups of >= 2 (or 1 group)."""
    return max(d for d in range(1, n_group + 1)
               if n_group % d == 0 and experts % d == 0 and (d == 1 or experts // d >= 2))


def _expert_key(raw: dict) -> str:
    return next((k for k in ("n_routed_experts", "num_experts", "num_local_experts") if k in raw),
                "n_routed_experts" if raw.get("model_type") == "glm4_moe" else "num_experts")


# ---------------------------------------------------------------------------------------------
# Widths


def _widths(big: ModelConfig, options: Options) -> dict[str, int]:
    per_kv = big.num_heads // big.num_kv_heads
    hidden = _pick("--hidden", options.hidden, min(big.hidden_size, 256), big.hidden_size)
    heads = _pick("--heads", options.heads, per_kv * min(big.num_kv_heads, 2), big.num_heads)
    if heads % per_kv:
        raise ShrinkError(f"--heads {heads}: must be a multiple of the big model's {per_kv} query heads per "
                          f"KV head (num_attention_heads={big.num_heads}, num_key_value_heads={big.num_kv_heads})")
    return dict(hidden=hidden, heads=heads, kv_heads=heads // per_kv,
                intermediate=_pick("--intermediate", options.intermediate, min(big.intermediate_size, 512),
                                   big.intermediate_size),
                moe_intermediate=_pick("--moe-intermediate", options.moe_intermediate,
                                       min(big.moe_intermediate_size, 128), big.moe_intermediate_size),
                vocab=_pick("--vocab", options.vocab, big.vocab_size, big.vocab_size))


def _pick(flag: str, wanted: int | None, default: int, limit: int) -> int:
    value = default if wanted is None else wanted
    if not 1 <= value <= limit:
        raise ShrinkError(f"{flag} {value}: must be between 1 and the big model's {limit}")
    return value


# ---------------------------------------------------------------------------------------------
# The small config.json


def _small_config(raw: dict, big: ModelConfig, layers: tuple[int, ...], experts: int, n_group: int,
                  topk_group: int, w: dict[str, int]) -> tuple[dict, list[str]]:
    """The big config with the size keys changed in the big file's own spelling."""
    config, added = dict(raw), []
    glm = big.architecture == GLM4_MOE

    def put(key: str, value: Any, default: Any) -> None:
        if key in raw or value != default:
            if key not in raw:
                added.append(key)
            config[key] = value

    put("vocab_size", w["vocab"], None)
    put("hidden_size", w["hidden"], None)
    put("num_hidden_layers", len(layers), None)
    put("num_attention_heads", w["heads"], None)
    put("num_key_value_heads", w["kv_heads"], 8 if glm else 4)
    put("head_dim", big.head_dim, w["hidden"] // w["heads"])
    put("intermediate_size", w["intermediate"], None)
    put("moe_intermediate_size", w["moe_intermediate"], None)
    if big.moe_layers:
        for key in {_expert_key(raw)} | ({"num_local_experts"} & raw.keys()):
            put(key, experts, 128)
    if glm:
        put("n_group", n_group, 1)
        put("topk_group", topk_group, 1)
        put("first_k_dense_replace", sum(not big.is_moe_layer(i) for i in layers), 1)
    else:
        big_dense_only = set(raw.get("mlp_only_layers") or [])
        put("mlp_only_layers", [i for i, b in enumerate(layers) if b in big_dense_only], [])
        if isinstance(raw.get("max_window_layers"), int):
            config["max_window_layers"] = min(raw["max_window_layers"], len(layers)) \
                if raw["max_window_layers"] < big.num_layers else len(layers)
    return config, added
