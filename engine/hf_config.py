"""A Hugging Face config.json -> `ModelConfig`, for the two MoE architectures this runtime runs.

A key absent from the file takes transformers' default for that architecture (checked against
transformers 5.24's Glm4MoeConfig and Qwen3MoeConfig: GLM rms_norm_eps 1e-5, Qwen 1e-6;
num_experts_per_tok 8; GLM n_shared_experts 1 and num_nextn_predict_layers 1), so an absent key
means what it means there.

Both spellings found on the Hub are read: transformers 4.x files (top-level `rope_theta`,
`partial_rotary_factor`, the architecture's own expert-count key) and transformers 5.x files
(`rope_parameters`, `num_local_experts`). Where a value can be spelled both ways, both may be
present only if they agree. A field this parser does not understand, a feature the runtime does
not implement, or a value the validator in engine/config.py refuses raises `ConfigError` with the
file path and the Hub key at fault; nothing is silently dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from engine.config import GLM4_MOE, QWEN3_MOE, SUPPORTED_ARCHITECTURES, ModelConfig, RouterKind
from engine.errors import ConfigError

# ModelConfig attribute -> the Hub key a reader of config.json knows it by, where they differ.
_HUB_KEYS = {
    "architecture": "architectures", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads", "top_k": "num_experts_per_tok", "rotary_dim": "partial_rotary_factor",
}
_HUB_KEYS_BY_ARCH = {
    GLM4_MOE: {"num_experts": "n_routed_experts", "moe_layers": "first_k_dense_replace",
               "num_mtp_layers": "num_nextn_predict_layers"},
    QWEN3_MOE: {"moe_layers": "mlp_only_layers"},
}


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """Read `model_dir/config.json`; errors name the file and the Hub key."""
    path = Path(model_dir) / "config.json"
    raw = read_config_json(path)
    try:
        return parse(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {_in_hub_terms(err, raw)}", field=err.field) from None


def parse(raw: dict[str, Any]) -> ModelConfig:
    """A config.json's contents -> ModelConfig (validated by its constructor)."""
    arch = _architecture(raw)
    common = _common_fields(raw, arch)
    moe = _glm_moe_fields(raw, common["num_layers"]) if arch == GLM4_MOE else \
        _qwen_moe_fields(raw, common["num_layers"])
    return ModelConfig(architecture=arch, **common, **moe)


def _in_hub_terms(err: ConfigError, raw: dict[str, Any]) -> str:
    """The validator's message, prefixed with the Hub key when the validator calls it otherwise."""
    archs = raw.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    key = _HUB_KEYS_BY_ARCH.get(arch, {}).get(err.field) or _HUB_KEYS.get(err.field)
    return f"field '{key}': {err}" if key else str(err)


def read_config_json(path: Path) -> dict[str, Any]:
    """A checkpoint's config.json as a dict, or a ConfigError naming the file and what is wrong."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (a Hugging Face checkpoint directory has config.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return raw


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        raise ConfigError(f"field 'architectures' must list exactly one architecture, got {archs!r}")
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"field 'architectures': {archs[0]!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return archs[0]


def _common_fields(raw: dict[str, Any], arch: str) -> dict[str, Any]:
    _unsupported(raw)
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    head_dim = _int(raw, "head_dim", default=None)
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"field 'head_dim' is absent and hidden_size={hidden} is not divisible "
                              f"by num_attention_heads={heads}")
        head_dim = hidden // heads
    theta, partial = _rope(raw, arch)
    if not float(head_dim * partial).is_integer():
        raise ConfigError(f"partial_rotary_factor={partial} gives a rotary width of {head_dim * partial} "
                          f"channels of head_dim={head_dim}: it must be a whole number", field="partial_rotary_factor")
    attention_bias = _bool(raw, "attention_bias", default=False)
    return dict(
        vocab_size=_int(raw, "vocab_size"), hidden_size=hidden, num_layers=_int(raw, "num_hidden_layers"),
        num_heads=heads, num_kv_heads=_kv_heads(raw, arch, heads), head_dim=head_dim,
        rotary_dim=int(head_dim * partial), rope_theta=theta, rms_norm_eps=_float(raw, "rms_norm_eps", default=1e-5 if arch == GLM4_MOE else 1e-6),
        max_position_embeddings=_int(raw, "max_position_embeddings"),
        intermediate_size=_int(raw, "intermediate_size"),
        attention_bias=attention_bias,
        o_proj_bias=attention_bias and arch == QWEN3_MOE,
        tie_word_embeddings=_bool(raw, "tie_word_embeddings", default=False),
        use_qk_norm=_bool(raw, "use_qk_norm", default=False) if arch == GLM4_MOE else True,
    )


def _unsupported(raw: dict[str, Any]) -> None:
    """Features of these architectures the runtime does not implement: refuse, never ignore."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"field 'hidden_act': {act!r} is not supported (only 'silu')")
    if raw.get("use_sliding_window"):
        raise ConfigError("field 'use_sliding_window': sliding-window attention is not supported")


def _rope(raw: dict[str, Any], arch: str) -> tuple[float, float]:
    """rope_theta and partial_rotary_factor from either spelling; contradictions are errors."""
    params = raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"field 'rope_parameters' must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"field 'rope_parameters.rope_type': {rope_type!r} is not supported (only 'default')")
    if raw.get("rope_scaling"):
        raise ConfigError(f"field 'rope_scaling': {raw['rope_scaling']!r} is not supported")
    default_partial = 0.5 if arch == GLM4_MOE else 1.0
    theta = _one_of(raw, params, "rope_theta", float, 10000.0)
    partial = _one_of(raw, params, "partial_rotary_factor", float, default_partial)
    if not 0.0 < partial <= 1.0:
        raise ConfigError(f"field 'partial_rotary_factor' must be in (0, 1], got {partial}")
    return theta, partial


def _one_of(raw: dict, params: dict, key: str, kind: type, default: Any) -> Any:
    """A value that may sit at the top level (4.x) or in rope_parameters (5.x), but must agree."""
    top = _number(raw, key, kind, None)
    nested = _number(params, f"rope_parameters.{key}", kind, None, lookup=key)
    if top is not None and nested is not None and not math.isclose(top, nested):
        raise ConfigError(f"fields '{key}'={top} and 'rope_parameters.{key}'={nested} disagree")
    return next((v for v in (nested, top) if v is not None), default)


def _glm_moe_fields(raw: dict[str, Any], num_layers: int) -> dict[str, Any]:
    experts = _expert_count(raw, "n_routed_experts")
    first_dense = _int(raw, "first_k_dense_replace", default=1)
    if not 0 <= first_dense <= num_layers:
        raise ConfigError(f"field 'first_k_dense_replace': {first_dense} is not a layer count within "
                          f"num_hidden_layers={num_layers}")
    return dict(
        router=RouterKind.NOAUX_TC, moe_layers=tuple(range(first_dense, num_layers)) if experts else (),
        num_experts=experts or 0, top_k=_int(raw, "num_experts_per_tok", default=8),
        moe_intermediate_size=_int(raw, "moe_intermediate_size"),
        norm_topk_prob=_bool(raw, "norm_topk_prob", default=True),
        n_group=_int(raw, "n_group", default=1), topk_group=_int(raw, "topk_group", default=1),
        routed_scaling_factor=_float(raw, "routed_scaling_factor", default=1.0),
        n_shared_experts=_int(raw, "n_shared_experts", default=1) or 0,
        num_mtp_layers=_int(raw, "num_nextn_predict_layers", default=1),
    )


def _qwen_moe_fields(raw: dict[str, Any], num_layers: int) -> dict[str, Any]:
    experts = _expert_count(raw, "num_experts")
    step = _int(raw, "decoder_sparse_step", default=1)
    if step <= 0:
        raise ConfigError(f"field 'decoder_sparse_step' must be a positive integer, got {step}")
    dense_only = raw.get("mlp_only_layers") or []
    if not isinstance(dense_only, list) or not all(type(i) is int and 0 <= i < num_layers for i in dense_only):
        raise ConfigError(f"field 'mlp_only_layers' must be a list of layer indices below num_hidden_layers="
                          f"{num_layers}, got {dense_only!r}")
    moe_layers = tuple(i for i in range(num_layers)
                       if experts and i not in dense_only and (i + 1) % step == 0)
    return dict(
        router=RouterKind.SOFTMAX_TOPK, moe_layers=moe_layers, num_experts=experts or 0,
        top_k=_int(raw, "num_experts_per_tok", default=8),
        moe_intermediate_size=_int(raw, "moe_intermediate_size"),
        norm_topk_prob=_bool(raw, "norm_topk_prob", default=False),
    )


def _kv_heads(raw: dict[str, Any], arch: str, heads: int) -> int:
    """num_key_value_heads, absent: transformers' default (8 GLM, 4 Qwen3-MoE), refused by name when
    it cannot serve this file's query heads (an error about a value the file never wrote is no help)."""
    if "num_key_value_heads" in raw:
        return _int(raw, "num_key_value_heads")
    default = 8 if arch == GLM4_MOE else 4
    if heads % default:
        raise ConfigError(f"field 'num_key_value_heads' is absent and transformers' default of {default} "
                          f"does not divide num_attention_heads={heads}", field="num_key_value_heads")
    return default


def _expert_count(raw: dict[str, Any], own_key: str) -> int:
    """The routed expert count under the architecture's own key or the 5.x alias; both must agree.
    Absent from both: 128, transformers' default for both architectures (0 means a dense model)."""
    own = _int(raw, own_key, default=None)
    alias = _int(raw, "num_local_experts", default=None)
    if own is not None and alias is not None and own != alias:
        raise ConfigError(f"fields '{own_key}'={own} and 'num_local_experts'={alias} disagree")
    return next((n for n in (own, alias) if n is not None), 128)


# ---------------------------------------------------------------------------------------------
# Typed field access with errors that name the field

_MISSING = object()


def _number(raw: dict, name: str, kind: type, default: Any, lookup: str | None = None) -> Any:
    value = raw.get(lookup or name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise ConfigError(f"required field '{name}' is missing")
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise ConfigError(f"field '{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _int(raw: dict, name: str, default: Any = _MISSING) -> Any:
    return _number(raw, name, int, default)


def _float(raw: dict, name: str, default: Any = _MISSING) -> Any:
    return _number(raw, name, float, default)


def _bool(raw: dict, name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"field '{name}' must be true or false, got {value!r}")
    return value
