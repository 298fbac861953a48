"""Frozen, validated configuration: the model (read from a Hugging Face config.json) and the engine.

`ModelConfig.from_hf(dir)` understands the two MoE architectures this runtime supports, in both
spellings found on the Hub: transformers 4.x files (top-level `rope_theta`, `partial_rotary_factor`,
`num_experts`) and transformers 5.x files (`rope_parameters`, `num_local_experts`). Anything it does
not understand, or that contradicts itself, raises `ConfigError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.failpoints import NO_FAULTS, Failpoints
from engine.graph.capture_sizes import CaptureSizes, default_decode_sizes, default_prefill_sizes

GLM4_MOE = "Glm4MoeForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"
SUPPORTED_ARCHITECTURES = (GLM4_MOE, QWEN3_MOE)


class ConfigError(ValueError):
    """A configuration file or value the engine cannot accept; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs, as plain numbers. Derived values are fields, computed once."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    intermediate_size: int
    attention_bias: bool  # q/k/v projections carry a bias
    o_proj_bias: bool  # the output projection does too (Qwen3 ties it to attention_bias; GLM never)
    use_qk_norm: bool
    tie_word_embeddings: bool
    # MoE
    router: str  # "noaux_tc" (GLM-4.5) or "softmax_topk" (Qwen3-MoE)
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0
    num_mtp_layers: int = 0  # GLM's multi-token-prediction layers: stored after the decoder, not run
    moe_form: str = "dense"  # engine choice, not from config.json: "dense" (reference) or "sparse" (engine/moe/experts.py)

    def __post_init__(self) -> None:
        _check_positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                        "head_dim", "max_position_embeddings", "intermediate_size")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ConfigError(f"rotary dimension {self.rotary_dim} (head_dim * partial_rotary_factor) "
                              f"must be even and within head_dim={self.head_dim}")
        if self.moe_form not in ("dense", "sparse"):
            raise ConfigError(f"moe_form={self.moe_form!r} is not one of 'dense', 'sparse'")
        if self.moe_layers:
            self._check_moe()

    def _check_moe(self) -> None:
        _check_positive(self, "num_experts", "top_k", "moe_intermediate_size", "n_group", "topk_group")
        if max(self.moe_layers) >= self.num_layers:
            raise ConfigError(f"MoE layer {max(self.moe_layers)} is beyond num_hidden_layers={self.num_layers}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.top_k} exceeds the expert count {self.num_experts}")
        if self.num_experts % self.n_group:
            raise ConfigError(f"n_group={self.n_group} does not divide the expert count {self.num_experts}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.top_k > self.topk_group * self.num_experts // self.n_group:
            raise ConfigError(f"num_experts_per_tok={self.top_k} exceeds the experts in topk_group="
                              f"{self.topk_group} kept groups")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> "ModelConfig":
        """Read `model_dir/config.json` as written by Hugging Face transformers 4.x or 5.x."""
        path = Path(model_dir) / "config.json"
        raw = _read_json(path)
        try:
            return _parse(raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


@dataclass(frozen=True)
class ParallelConfig:
    """tp ranks (the world size); ep is 1 (experts split by intermediate dimension across the TP
    ranks) or tp (experts placed on ranks). Steps of up to `fused_allreduce_max_tokens` tokens take
    the fused all-reduce + residual + RMSNorm path; larger ones the unfused path."""

    tp: int = 1
    ep: int = 1
    fused_allreduce_max_tokens: int = 2048

    def __post_init__(self) -> None:
        _check_positive(self, "tp", "ep", "fused_allreduce_max_tokens")
        if self.ep not in (1, self.tp):
            raise ConfigError(f"ep={self.ep} must be 1 or equal to tp={self.tp}")


GRAPH_MODES = ("eager", "piecewise", "full_and_piecewise")
GRAPH_BACKENDS = ("auto", "static", "cudagraph", "uncompiled")
CAPTURE_TIMING = ("lazy", "eager")


@dataclass(frozen=True)
class GraphConfig:
    """Graph execution. `piecewise`: prefill, mixed and decode steps replay the pieces between
    attention ops; `full_and_piecewise`: pure-decode steps replay one whole-model graph instead.
    Capture sizes of None take the defaults, cut to the engine's limits."""

    mode: str = "eager"
    backend: str = "auto"  # see engine/graph/backends.py
    prefill_capture_sizes: tuple[int, ...] | None = None
    decode_capture_sizes: tuple[int, ...] | None = None
    capture: str = "lazy"  # lazy: a size is captured on first use; eager: all at start-up

    def __post_init__(self) -> None:
        if self.mode not in GRAPH_MODES:
            raise ConfigError(f"graph mode {self.mode!r} is not one of {GRAPH_MODES}")
        if self.backend not in GRAPH_BACKENDS:
            raise ConfigError(f"graph backend {self.backend!r} is not one of {GRAPH_BACKENDS}")
        if self.capture not in CAPTURE_TIMING:
            raise ConfigError(f"graph capture {self.capture!r} is not one of {CAPTURE_TIMING}")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, caches and runs graphs."""

    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 64
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: enough for max_num_seqs full-length sequences
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    graph: GraphConfig = field(default_factory=GraphConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    faults: Failpoints = field(default=NO_FAULTS)
    moe_form: str = "dense"  # routed-expert form, see engine/moe/experts.py; copied into ModelConfig.moe_form

    def __post_init__(self) -> None:
        _check_positive(self, "max_num_batched_tokens", "max_num_seqs", "block_size")
        for name in ("num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.graph.mode != "eager":
            try:
                self.capture_sizes()
            except ValueError as err:
                raise ConfigError(str(err)) from None

    def capture_sizes(self) -> dict[str, CaptureSizes]:
        """Validated capture sizes per phase ("prefill" covers mixed steps too)."""
        g, limit = self.graph, self.max_num_batched_tokens
        prefill = g.prefill_capture_sizes or default_prefill_sizes(limit)
        decode = g.decode_capture_sizes or default_decode_sizes(min(self.max_num_seqs, limit))
        return {"prefill": CaptureSizes(tuple(prefill), limit, "prefill_capture_sizes"),
                "decode": CaptureSizes(tuple(decode), limit, "decode_capture_sizes")}


# ---------------------------------------------------------------------------------------------
# Parsing config.json


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (a Hugging Face checkpoint directory has config.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return raw


def _parse(raw: dict[str, Any]) -> ModelConfig:
    arch = _architecture(raw)
    common = _common_fields(raw)
    moe = _glm_moe_fields(raw, common["num_layers"]) if arch == GLM4_MOE else \
        _qwen_moe_fields(raw, common["num_layers"])
    return ModelConfig(architecture=arch, **common, **moe)


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        raise ConfigError(f"field 'architectures' must list exactly one architecture, got {archs!r}")
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"field 'architectures': {archs[0]!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return archs[0]


def _common_fields(raw: dict[str, Any]) -> dict[str, Any]:
    _unsupported(raw)
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    head_dim = _int(raw, "head_dim", default=None)
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"field 'head_dim' is absent and hidden_size={hidden} is not divisible "
                              f"by num_attention_heads={heads}")
        head_dim = hidden // heads
    theta, partial = _rope(raw)
    rotary_dim = int(head_dim * partial)
    return dict(
        vocab_size=_int(raw, "vocab_size"), hidden_size=hidden, num_layers=_int(raw, "num_hidden_layers"),
        num_heads=heads, num_kv_heads=_int(raw, "num_key_value_heads", default=heads), head_dim=head_dim,
        rotary_dim=rotary_dim, rope_theta=theta, rms_norm_eps=_float(raw, "rms_norm_eps", default=1e-6),
        max_position_embeddings=_int(raw, "max_position_embeddings"),
        intermediate_size=_int(raw, "intermediate_size"),
        attention_bias=_bool(raw, "attention_bias", default=False),
        o_proj_bias=_bool(raw, "attention_bias", default=False) and raw["architectures"][0] == QWEN3_MOE,
        tie_word_embeddings=_bool(raw, "tie_word_embeddings", default=False),
        use_qk_norm=_bool(raw, "use_qk_norm", default=False) if raw["architectures"][0] == GLM4_MOE else True,
    )


def _unsupported(raw: dict[str, Any]) -> None:
    """Features of these architectures the runtime does not implement: refuse, never ignore."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"field 'hidden_act': {act!r} is not supported (only 'silu')")
    if raw.get("use_sliding_window"):
        raise ConfigError("field 'use_sliding_window': sliding-window attention is not supported")


def _rope(raw: dict[str, Any]) -> tuple[float, float]:
    """rope_theta and partial_rotary_factor from either spelling; contradictions are errors."""
    params = raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"field 'rope_parameters' must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"field 'rope_parameters.rope_type': {rope_type!r} is not supported (only 'default')")
    if raw.get("rope_scaling"):
        raise ConfigError(f"field 'rope_scaling': {raw['rope_scaling']!r} is not supported")
    default_partial = 0.5 if raw["architectures"][0] == GLM4_MOE else 1.0
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
    return dict(
        router="noaux_tc", moe_layers=tuple(range(first_dense, num_layers)) if experts else (),
        num_experts=experts or 0, top_k=_int(raw, "num_experts_per_tok", default=1),
        moe_intermediate_size=_int(raw, "moe_intermediate_size"),
        norm_topk_prob=_bool(raw, "norm_topk_prob", default=True),
        n_group=_int(raw, "n_group", default=1), topk_group=_int(raw, "topk_group", default=1),
        routed_scaling_factor=_float(raw, "routed_scaling_factor", default=1.0),
        n_shared_experts=_int(raw, "n_shared_experts", default=0) or 0,
        num_mtp_layers=_int(raw, "num_nextn_predict_layers", default=0),
    )


def _qwen_moe_fields(raw: dict[str, Any], num_layers: int) -> dict[str, Any]:
    experts = _expert_count(raw, "num_experts")
    step = _int(raw, "decoder_sparse_step", default=1)
    dense_only = raw.get("mlp_only_layers") or []
    if not isinstance(dense_only, list) or not all(isinstance(i, int) for i in dense_only):
        raise ConfigError(f"field 'mlp_only_layers' must be a list of layer indices, got {dense_only!r}")
    moe_layers = tuple(i for i in range(num_layers)
                       if experts and i not in dense_only and (i + 1) % step == 0)
    return dict(
        router="softmax_topk", moe_layers=moe_layers, num_experts=experts or 0,
        top_k=_int(raw, "num_experts_per_tok", default=1),
        moe_intermediate_size=_int(raw, "moe_intermediate_size"),
        norm_topk_prob=_bool(raw, "norm_topk_prob", default=False),
    )


def _expert_count(raw: dict[str, Any], own_key: str) -> int | None:
    """The routed expert count under the architecture's own key or the 5.x alias; both must agree."""
    own = _int(raw, own_key, default=None)
    alias = _int(raw, "num_local_experts", default=None)
    if own is not None and alias is not None and own != alias:
        raise ConfigError(f"fields '{own_key}'={own} and 'num_local_experts'={alias} disagree")
    return own if own is not None else alias


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


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
