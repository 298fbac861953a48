"""How each Hub tensor of a big checkpoint becomes a tensor of the shrunk one: its new name, the
part of it read, and the factor it is scaled by.

Every axis of a tensor has a kind (the table `_RULES`): hidden channels (H), query heads x head_dim
(Q), KV heads x head_dim (KV), dense intermediate (I), expert intermediate (M), shared-expert
intermediate (S), routed experts (E), head_dim (D, kept), vocabulary (V, kept), and GLM's MTP
`eh_proj` input, [embedding; hidden] (H2: the leading channels of each half). An axis is cut to its
leading entries, except E, which keeps the plan's experts.

Fan-in: a projection that reads fewer input channels gives outputs with a smaller spread (a sum of
fewer terms). Matrices whose input axis was cut are scaled by sqrt(big / small input width), so
router logits, attention scores and logits keep the big model's spread (the router spread report
in verifier/shrink.py measures it). Embedding lookups and 1-D tensors are never scaled; neither
are tied embeddings, which serve as both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from verifier.shrink_plan import ShrinkError, ShrinkPlan

# (name pattern, axis kinds, scaled by fan-in). Layer patterns match what follows "model.layers.N.".
_TOP = [
    (r"model\.embed_tokens\.weight", ("V", "H"), False),
    (r"lm_head\.weight", ("V", "H"), True),
    (r"model\.norm\.weight", ("H",), False),
]
_LAYER = [
    (r"(input_layernorm|post_attention_layernorm|enorm|hnorm|shared_head\.norm)\.weight", ("H",), False),
    (r"self_attn\.q_proj\.weight", ("Q", "H"), True),
    (r"self_attn\.q_proj\.bias", ("Q",), False),
    (r"self_attn\.[kv]_proj\.weight", ("KV", "H"), True),
    (r"self_attn\.[kv]_proj\.bias", ("KV",), False),
    (r"self_attn\.o_proj\.weight", ("H", "Q"), True),
    (r"self_attn\.o_proj\.bias", ("H",), False),
    (r"self_attn\.[qk]_norm\.weight", ("D",), False),
    (r"mlp\.(gate|up)_proj\.weight", ("I", "H"), True),
    (r"mlp\.down_proj\.weight", ("H", "I"), True),
    (r"mlp\.experts\.\d+\.(gate|up)_proj\.weight", ("M", "H"), True),
    (r"mlp\.experts\.\d+\.down_proj\.weight", ("H", "M"), True),
    (r"mlp\.shared_experts\.(gate|up)_proj\.weight", ("S", "H"), True),
    (r"mlp\.shared_experts\.down_proj\.weight", ("H", "S"), True),
    (r"mlp\.gate\.weight", ("E", "H"), True),
    (r"mlp\.gate\.e_score_correction_bias", ("E",), False),
    (r"eh_proj\.weight", ("H", "H2"), True),
    (r"embed_tokens\.weight", ("V", "H"), False),
    (r"shared_head\.head\.weight", ("V", "H"), True),
]
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Cut:
    """Read `parts` of the big tensor (concatenated along the last axis), keep `rows` of the result
    when set (routers: the kept experts), multiply by `scale`; store it as `name`."""

    name: str
    parts: tuple[tuple[slice, ...], ...]
    rows: tuple[int, ...] | None
    scale: float


def cut_for(big_name: str, big_shape: tuple[int, ...], plan: ShrinkPlan, where: str) -> Cut | None:
    """The cut of one big tensor, or None when the shrunk model does not keep it (a layer or an
    expert left out). A name or shape this table does not know is an error naming it."""
    name, axes, fan_in = _rule(big_name, plan, where)
    if name is None:
        return None
    sizes = _axis_sizes(plan)
    want = tuple(sizes[a][0] for a in axes)
    if tuple(big_shape) != want:
        raise ShrinkError(f"{where}: tensor {big_name} has shape {list(big_shape)}; its config implies {list(want)}")
    scale = math.sqrt(sizes[axes[-1]][0] / sizes[axes[-1]][1]) if fan_in and len(axes) == 2 else 1.0
    rows = plan.experts if axes[0] == "E" else None
    return Cut(name, _parts(axes, sizes), rows, scale)


def _rule(big_name: str, plan: ShrinkPlan, where: str) -> tuple[str | None, tuple[str, ...], bool]:
    for pattern, axes, fan_in in _TOP:
        if re.fullmatch(pattern, big_name):
            return big_name, axes, fan_in
    match = _LAYER_NAME.fullmatch(big_name)
    if match:
        for pattern, axes, fan_in in _LAYER:
            if re.fullmatch(pattern, match[2]):
                return _small_name(int(match[1]), match[2], plan), axes, fan_in
    raise ShrinkError(f"{where}: tensor {big_name} is not one shrink knows how to cut")


def _small_name(big_layer: int, rest: str, plan: ShrinkPlan) -> str | None:
    layer = plan.small_layer(big_layer)
    if layer is None:
        return None
    expert = _EXPERT.match(rest)
    if expert:
        small = plan.small_expert(int(expert[1]))
        if small is None:
            return None
        rest = f"mlp.experts.{small}." + rest[expert.end():]
    return f"model.layers.{layer}.{rest}"


def _axis_sizes(plan: ShrinkPlan) -> dict[str, tuple[int, int]]:
    """Axis kind -> (big size, small size)."""
    big, small = plan.big, plan.small
    return {
        "H": (big.hidden_size, small.hidden_size), "H2": (2 * big.hidden_size, 2 * small.hidden_size),
        "Q": (big.q_size, small.q_size), "KV": (big.kv_size, small.kv_size),
        "I": (big.intermediate_size, small.intermediate_size),
        "M": (big.moe_intermediate_size, small.moe_intermediate_size),
        "S": (big.moe_intermediate_size * big.n_shared_experts, small.moe_intermediate_size * small.n_shared_experts),
        "E": (big.num_experts, small.num_experts), "D": (big.head_dim, small.head_dim),
        "V": (big.vocab_size, small.vocab_size),
    }


def _parts(axes: tuple[str, ...], sizes: dict[str, tuple[int, int]]) -> tuple[tuple[slice, ...], ...]:
    lead = tuple(slice(None) if a == "E" else slice(0, sizes[a][1]) for a in axes[:-1])
    last = axes[-1]
    if last == "H2":  # [embedding channels; hidden channels]: the leading ones of each half
        big_h, small_h = sizes["H"]
        return (lead + (slice(0, small_h),), lead + (slice(big_h, big_h + small_h),))
    return (lead + (slice(None) if last == "E" else slice(0, sizes[last][1]),),)
