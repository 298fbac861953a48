"""Frozen, validated configuration: the model, parallelism, graph execution and the engine.

Every dataclass here checks itself when it is built, with the validators of this module (plain
Python, no Paddle), and raises `ConfigError` naming the field and its value; nothing invalid
exists past construction. The router uses the same grouping check for its own arguments
(`check_grouping`), so the two cannot drift apart. Derived values are computed once, at
construction. Reading a Hugging Face config.json into a `ModelConfig` is `engine/hf_config.py`'s
job; the default capture-size ladders live here because the list of sizes is configuration
(`engine/graph/capture_sizes.py` builds its padding lookup on them).
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from engine.errors import CaptureSizeError, ConfigError
from engine.failpoints import NO_FAULTS, Failpoints

GLM4_MOE = "Glm4MoeForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"
SUPPORTED_ARCHITECTURES = (GLM4_MOE, QWEN3_MOE)


class _Choice(str, enum.Enum):
    """A closed set of string values. Members compare, hash and format as their value, so code and
    files that spell a value as a plain string keep working."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, name: str, value: Any):
        """The member for `value`, or ConfigError naming the field `name` and the allowed values."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ConfigError(f"{name}={value!r} is not one of {allowed}", field=name) from None


class RouterKind(_Choice):
    NOAUX_TC = "noaux_tc"  # DeepSeek-V3 / GLM-4.5: sigmoid, correction bias, expert groups
    SOFTMAX_TOPK = "softmax_topk"  # Qwen3-MoE


class MoEForm(_Choice):
    DENSE = "dense"  # every expert on every row, masked: the reference
    SPARSE = "sparse"  # rows grouped by expert: exact counts eagerly, fixed capacity in graphs (engine/moe/experts.py)


class GraphMode(_Choice):
    EAGER = "eager"  # no graphs
    PIECEWISE = "piecewise"  # every step replays the pieces between attention ops
    FULL_AND_PIECEWISE = "full_and_piecewise"  # pure-decode steps replay one whole-model graph


class GraphBackend(_Choice):
    AUTO = "auto"  # cudagraph on a CUDA build, else static
    STATIC = "static"  # paddle.jit.to_static programs, one per piece and size
    CUDAGRAPH = "cudagraph"  # Paddle's CUDA graph capture
    UNCOMPILED = "uncompiled"  # the same pieces run eagerly on the padded buffers


class CaptureTiming(_Choice):
    LAZY = "lazy"  # a size is captured on first use
    EAGER = "eager"  # every size is captured at start-up


# ---------------------------------------------------------------------------------------------
# The validators: each names the field and the value it refuses


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{name}={value!r} is not a positive integer", field=name)


def check_non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"{name}={value!r} is not a non-negative integer", field=name)


def check_positive_float(name: str, value: Any) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} is not a positive finite number", field=name)


def check_grouping(num_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    """noaux_tc grouping: groups split the experts evenly into groups of at least 2 (a group's score
    is the sum of its top-2 scores), `topk_group <= n_group`, and the kept groups hold >= top_k
    experts. The message starts with the field at fault."""
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("n_group", n_group),
                        ("topk_group", topk_group)):
        check_positive_int(name, value)
    if num_experts % n_group:
        raise ConfigError(f"n_group={n_group} does not divide the {num_experts} routed experts", field="n_group")
    per_group = num_experts // n_group
    if per_group < 2:
        raise ConfigError(f"n_group={n_group} splits the {num_experts} routed experts into groups of 1; a group's "
                          "score (the sum of its top-2 scores) needs at least 2 per group", field="n_group")
    if topk_group > n_group:
        raise ConfigError(f"topk_group={topk_group} exceeds n_group={n_group}", field="topk_group")
    if top_k > topk_group * per_group:
        raise ConfigError(f"top_k={top_k} exceeds the {topk_group * per_group} experts in topk_group="
                          f"{topk_group} groups of {per_group}", field="top_k")


def check_capture_sizes(sizes: tuple[int, ...], limit: int, label: str) -> None:
    """A capture-size list: non-empty, positive integers, sorted, unique, none above `limit` (the
    step's token budget, max_num_batched_tokens). Raises CaptureSizeError naming `label`."""
    if not sizes:
        raise CaptureSizeError(f"{label}: the list is empty", field=label)
    bad = next((s for s in sizes if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0), None)
    if bad is not None:
        raise CaptureSizeError(f"{label}: {bad!r} is not a positive integer", field=label)
    for a, b in zip(sizes, sizes[1:]):
        if a >= b:
            raise CaptureSizeError(f"{label}: must be sorted and unique, but {a} comes before {b}", field=label)
    if sizes[-1] > limit:
        raise CaptureSizeError(f"{label}: largest size {sizes[-1]} exceeds max_num_batched_tokens={limit}",
                               field=label)


def default_prefill_sizes(max_tokens: int = 8192) -> tuple[int, ...]:
    """A 4..8192 ladder in the shape of SGLang's piecewise list: every 4 up to 32, then coarser
    steps (16, 32, 128, 256, 512) as sizes grow, 58 sizes in all; cut at `max_tokens`."""
    ladder = [range(4, 33, 4), range(48, 257, 16), range(288, 513, 32), range(640, 2049, 128),
              range(2304, 4097, 256), range(4608, 8193, 512)]
    return tuple(s for r in ladder for s in r if s <= max_tokens) or (max_tokens,)


def default_decode_sizes(max_num_seqs: int = 64) -> tuple[int, ...]:
    """FastDeploy's decode shape, [1, 2, 4] + multiples of 8 up to 128, then of 16; the last size
    covers `max_num_seqs` so no decode step falls back."""
    ladder = [1, 2, 4, *range(8, 129, 8), *range(144, 1025, 16)]
    sizes = [s for s in ladder if s < max_num_seqs]
    return tuple(sizes + [max_num_seqs])


# ---------------------------------------------------------------------------------------------
# The model


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
    router: RouterKind
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
    # The engine's choice, not from config.json: an engine copies EngineConfig.moe_form (default sparse)
    # here; a model description built on its own keeps the dense reference.
    moe_form: MoEForm = MoEForm.DENSE
    dtype: str = "float32"  # the engine's compute dtype, not from config.json (EngineConfig.dtype)

    def __post_init__(self) -> None:
        object.__setattr__(self, "router", RouterKind.parse("router", self.router))
        object.__setattr__(self, "moe_form", MoEForm.parse("moe_form", self.moe_form))
        check_dtype(self.dtype)
        _check_model(self)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers


def _check_model(cfg: ModelConfig) -> None:
    if cfg.architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"architecture={cfg.architecture!r} is not supported (supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)})", field="architecture")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "max_position_embeddings", "intermediate_size"):
        check_positive_int(name, getattr(cfg, name))
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(f"num_kv_heads={cfg.num_kv_heads} does not divide num_heads={cfg.num_heads}",
                          field="num_kv_heads")
    check_positive_int("rotary_dim", cfg.rotary_dim)
    if cfg.rotary_dim > cfg.head_dim or cfg.rotary_dim % 2:
        raise ConfigError(f"rotary_dim={cfg.rotary_dim} (head_dim * partial_rotary_factor) must be even and "
                          f"within head_dim={cfg.head_dim}", field="rotary_dim")
    check_positive_float("rope_theta", cfg.rope_theta)
    check_positive_float("rms_norm_eps", cfg.rms_norm_eps)
    check_non_negative_int("n_shared_experts", cfg.n_shared_experts)
    check_non_negative_int("num_mtp_layers", cfg.num_mtp_layers)
    _check_moe_layers(cfg)
    if cfg.moe_layers:
        _check_experts(cfg)


def _check_moe_layers(cfg: ModelConfig) -> None:
    layers = cfg.moe_layers
    ok = all(isinstance(i, int) and 0 <= i < cfg.num_layers for i in layers) and list(layers) == sorted(set(layers))
    if not ok:
        raise ConfigError(f"moe_layers={layers!r} must be sorted, unique layer indices below num_layers="
                          f"{cfg.num_layers}", field="moe_layers")


def _check_experts(cfg: ModelConfig) -> None:
    check_positive_int("moe_intermediate_size", cfg.moe_intermediate_size)
    check_positive_float("routed_scaling_factor", cfg.routed_scaling_factor)
    if cfg.router is RouterKind.NOAUX_TC:
        check_grouping(cfg.num_experts, cfg.top_k, cfg.n_group, cfg.topk_group)
        return
    check_positive_int("num_experts", cfg.num_experts)
    check_positive_int("top_k", cfg.top_k)
    if cfg.top_k > cfg.num_experts:
        raise ConfigError(f"top_k={cfg.top_k} exceeds the {cfg.num_experts} routed experts", field="top_k")


# ---------------------------------------------------------------------------------------------
# Parallelism, graphs, the engine


DTYPES = ("float32", "float64")  # the CPU kernels this engine runs exist in both


def check_dtype(value: Any) -> None:
    if not isinstance(value, str) or value not in DTYPES:
        raise ConfigError(f"dtype={value!r} is not one of {', '.join(DTYPES)}", field="dtype")


@dataclass(frozen=True)
class ParallelConfig:
    """tp ranks (the world size); ep is 1 (experts split by intermediate dimension across the TP
    ranks) or tp (experts placed on ranks). Steps of up to `fused_allreduce_max_tokens` tokens take
    the fused all-reduce + residual + RMSNorm path; larger ones the unfused path. A rank waiting
    longer than `collective_timeout_s` in one collective (plus slack for the work it has just done:
    engine/launch/watchdog.py) is named and ended; 0 turns that watchdog off."""

    tp: int = 1
    ep: int = 1
    fused_allreduce_max_tokens: int = 2048
    collective_timeout_s: float = 5.0  # why 5: the measured waits in engine/launch/watchdog.py

    def __post_init__(self) -> None:
        for name in ("tp", "ep", "fused_allreduce_max_tokens"):
            check_positive_int(name, getattr(self, name))
        timeout = self.collective_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout >= 0:
            raise ConfigError(f"collective_timeout_s={timeout!r} must be a number of seconds >= 0 (0: off)",
                              field="collective_timeout_s")
        if self.ep not in (1, self.tp):
            raise ConfigError(f"ep={self.ep} must be 1 or equal to tp={self.tp}", field="ep")


@dataclass(frozen=True)
class GraphConfig:
    """Graph execution (see GraphMode, GraphBackend, CaptureTiming; plain strings are accepted and
    turned into members). Capture sizes of None take the defaults, cut to the engine's limits."""

    mode: GraphMode = GraphMode.EAGER
    backend: GraphBackend = GraphBackend.AUTO  # see engine/graph/backends.py
    prefill_capture_sizes: tuple[int, ...] | None = None
    decode_capture_sizes: tuple[int, ...] | None = None
    capture: CaptureTiming = CaptureTiming.LAZY

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", GraphMode.parse("graph.mode", self.mode))
        object.__setattr__(self, "backend", GraphBackend.parse("graph.backend", self.backend))
        object.__setattr__(self, "capture", CaptureTiming.parse("graph.capture", self.capture))


@dataclass(frozen=True)
class CaptureSizeLists:
    """The validated capture sizes per phase: `prefill` covers mixed steps too."""

    prefill: tuple[int, ...]
    decode: tuple[int, ...]


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, caches and runs graphs. `capture_sizes` is derived at construction:
    the graph config's lists, or the default ladders cut to the token budget, validated."""

    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 64
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: enough for max_num_seqs full-length sequences
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    graph: GraphConfig = field(default_factory=GraphConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    faults: Failpoints = field(default=NO_FAULTS)
    capture_sizes: CaptureSizeLists = field(init=False, repr=False, compare=False)
    # Routed-expert form, copied into ModelConfig.moe_form by the engine. Sparse is the fast exact path
    # (exact eagerly, fixed capacity in graphs with overflowing replays redone eagerly); dense, the
    # reference, is chosen by name.
    moe_form: MoEForm = MoEForm.SPARSE
    # Compute dtype of every weight, activation, cache and dump, copied into ModelConfig.dtype by the
    # engine. float64 exists to be compared against a float64 reference (fixtures/reference64.py).
    dtype: str = "float32"
    # Share the KV of full prompt blocks between requests whose prompts start alike (engine/prefix_cache.py).
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        if not isinstance(self.prefix_caching, bool):
            raise ConfigError(f"prefix_caching={self.prefix_caching!r} must be True or False", field="prefix_caching")
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("num_kv_blocks", "max_model_len"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        object.__setattr__(self, "capture_sizes", self._capture_sizes())

    def _capture_sizes(self) -> CaptureSizeLists:
        g, limit = self.graph, self.max_num_batched_tokens
        prefill = tuple(default_prefill_sizes(limit) if g.prefill_capture_sizes is None else g.prefill_capture_sizes)
        decode = tuple(default_decode_sizes(min(self.max_num_seqs, limit)) if g.decode_capture_sizes is None
                       else g.decode_capture_sizes)
        check_capture_sizes(prefill, limit, "prefill_capture_sizes")
        check_capture_sizes(decode, limit, "decode_capture_sizes")
        return CaptureSizeLists(prefill, decode)

    def max_len(self, model: ModelConfig) -> int:
        """The longest sequence (prompt + generated tokens) this engine runs on `model`."""
        return self.max_model_len or model.max_position_embeddings
