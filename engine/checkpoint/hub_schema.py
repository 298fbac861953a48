"""The Hugging Face tensor names of `Glm4MoeForCausalLM` / `Qwen3MoeForCausalLM` checkpoints, and
their shapes: the one place they are spelled.

The loader checks a checkpoint against `expected_tensors`, the sharding rules ask `role(name)`
what kind of tensor a name is, and the model's weight structures (`engine/models/weights.py`)
ask the `*_names` functions where each tensor lives. Hub projections are stored [out, in].
"""

from __future__ import annotations

import re
from typing import NamedTuple

from engine.config import GLM4_MOE, ModelConfig

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"
_LAYER = "model.layers.{layer}."


class AttentionNames(NamedTuple):
    input_norm: str
    post_norm: str
    q: str
    k: str
    v: str
    o: str
    q_bias: str
    k_bias: str
    v_bias: str
    o_bias: str
    q_norm: str
    k_norm: str


class MLPNames(NamedTuple):
    gate: str
    up: str
    down: str


class RouterNames(NamedTuple):
    weight: str  # [E, H]
    bias: str  # [E], GLM's e_score_correction_bias; may be absent


def attention_names(layer: int) -> AttentionNames:
    p = _LAYER.format(layer=layer)
    a = p + "self_attn."
    return AttentionNames(p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                          *(f"{a}{n}_proj.weight" for n in "qkvo"), *(f"{a}{n}_proj.bias" for n in "qkvo"),
                          a + "q_norm.weight", a + "k_norm.weight")


def _mlp(prefix: str) -> MLPNames:
    return MLPNames(*(f"{prefix}{n}_proj.weight" for n in ("gate", "up", "down")))


def mlp_names(layer: int) -> MLPNames:
    """The dense MLP of a layer that is not a MoE layer."""
    return _mlp(_LAYER.format(layer=layer) + "mlp.")


def expert_names(layer: int, expert: int) -> MLPNames:
    return _mlp(_LAYER.format(layer=layer) + f"mlp.experts.{expert}.")


def shared_expert_names(layer: int) -> MLPNames:
    return _mlp(_LAYER.format(layer=layer) + "mlp.shared_experts.")


def router_names(layer: int) -> RouterNames:
    p = _LAYER.format(layer=layer) + "mlp.gate."
    return RouterNames(p + "weight", p + "e_score_correction_bias")


# ---------------------------------------------------------------------------------------------
# What a config's checkpoint must hold


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hub tensor name -> shape for every tensor of `cfg`'s architecture (optional ones included)."""
    h = cfg.hidden_size
    shapes = {EMBED: (cfg.vocab_size, h), FINAL_NORM: (h,)}
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (cfg.vocab_size, h)
    for layer in range(cfg.num_layers):
        shapes.update(_attention_shapes(cfg, attention_names(layer)))
        shapes.update(_moe_shapes(cfg, layer) if cfg.is_moe_layer(layer)
                      else _mlp_shapes(cfg, mlp_names(layer), cfg.intermediate_size))
    return shapes


def optional_tensors(cfg: ModelConfig) -> set[str]:
    """Names that may be absent: GLM's correction bias (absent means zero bias)."""
    if cfg.architecture != GLM4_MOE:
        return set()
    return {router_names(layer).bias for layer in cfg.moe_layers}


def _attention_shapes(cfg: ModelConfig, n: AttentionNames) -> dict[str, tuple[int, ...]]:
    h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    out = {n.input_norm: (h,), n.post_norm: (h,), n.q: (q, h), n.k: (kv, h), n.v: (kv, h), n.o: (h, q)}
    if cfg.attention_bias:
        out.update({n.q_bias: (q,), n.k_bias: (kv,), n.v_bias: (kv,)})
    if cfg.o_proj_bias:
        out[n.o_bias] = (h,)
    if cfg.use_qk_norm:
        out.update({n.q_norm: (cfg.head_dim,), n.k_norm: (cfg.head_dim,)})
    return out


def _mlp_shapes(cfg: ModelConfig, n: MLPNames, inter: int) -> dict[str, tuple[int, ...]]:
    h = cfg.hidden_size
    return {n.gate: (inter, h), n.up: (inter, h), n.down: (h, inter)}


def _moe_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    router = router_names(layer)
    out = {router.weight: (cfg.num_experts, cfg.hidden_size)}
    for e in range(cfg.num_experts):
        out.update(_mlp_shapes(cfg, expert_names(layer, e), cfg.moe_intermediate_size))
    if cfg.architecture == GLM4_MOE:
        out[router.bias] = (cfg.num_experts,)
        if cfg.n_shared_experts:
            out.update(_mlp_shapes(cfg, shared_expert_names(layer), cfg.moe_intermediate_size * cfg.n_shared_experts))
    return out


# ---------------------------------------------------------------------------------------------
# Reading a name back: what the sharding rules split by


class Role(NamedTuple):
    """What a Hub tensor is, as far as sharding cares. `kind` is one of vocab, q_proj, kv_proj,
    o_proj, expert, dense_mlp, shared_expert; `proj` (gate, up, down) and `expert` (its global id)
    are set for the MLP kinds."""

    kind: str
    proj: str | None = None
    expert: int | None = None


_ROLES = [
    (re.compile(r"^(model\.embed_tokens|lm_head)\.weight$"), "vocab"),
    (re.compile(r"self_attn\.q_proj\.(weight|bias)$"), "q_proj"),
    (re.compile(r"self_attn\.[kv]_proj\.(weight|bias)$"), "kv_proj"),
    (re.compile(r"self_attn\.o_proj\.weight$"), "o_proj"),
    (re.compile(r"mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$"), "expert"),
    (re.compile(r"mlp\.shared_experts\.(?P<proj>gate|up|down)_proj\.weight$"), "shared_expert"),
    (re.compile(r"mlp\.(?P<proj>gate|up|down)_proj\.weight$"), "dense_mlp"),
]


def role(name: str) -> Role | None:
    """The sharding role of Hub tensor `name`; None for replicated tensors (norms, routers, biases
    of row-parallel projections, correction biases)."""
    for pattern, kind in _ROLES:
        match = pattern.search(name)
        if match:
            groups = match.groupdict()
            expert = groups.get("expert")
            return Role(kind, groups.get("proj"), None if expert is None else int(expert))
    return None


def layer_of(name: str) -> int | None:
    """The decoder layer a Hub tensor belongs to (None outside the layers)."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match[1]) if match else None
