"""The decoder of GLM-4.5 (`Glm4MoeForCausalLM`) and Qwen3-MoE (`Qwen3MoeForCausalLM`), as pieces.

Both architectures are the same pre-norm decoder; they differ only in facts the config carries
(router kind, shared experts, q/k norm, q/k/v bias, partial rotary), so one class serves both.

The stack is an explicit list cut at attention: `piece_0, attn_0, piece_1, ..., attn_{L-1}, piece_L`.

  piece_0      embed, input norm of layer 0, q/k/v projection, q/k norm, rotary
  piece_i      o-proj of layer i-1, residual add, post-attention norm, MLP or MoE, residual add,
               input norm of layer i and its q/k/v (or, for i = L, the final norm)
  attn_i       paged causal attention, eager (it reads per-sequence metadata and writes the cache)

Every piece is a pure function of fixed-shape tensors, so the graph runner can compile it once
per padded size; called directly, it is the eager path. `num_real` ([1] int64) tells the router
which rows are padding.

Under tensor parallelism the weights are this rank's `Partition` (engine/distributed.py) and the
pieces hold the all-reduces: after the vocabulary-parallel embedding, after each row-parallel
projection (o-proj, MLP down, experts), the latter fused with the residual add and the next norm.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import paddle

from engine.config import ModelConfig
from engine.distributed import Collectives, Partition
from engine.failpoints import NO_FAULTS, Failpoints
from engine.forward_context import ForwardContext
from engine.kv_cache import KVCache
from engine.layers.attention import (
    AttentionMetadata,
    paged_attention,
    static_decode_attention,
)
from engine.layers.embedding import lm_head, vocab_parallel_embed
from engine.layers.linear import frozen, linear, weight_param
from engine.layers.norm import all_reduce_add_rms_norm, rms_norm
from engine.layers.rotary import apply_rotary, rope_table
from engine.moe import router
from engine.moe.experts import dense_mlp, pack_experts, routed_experts

Tensors = tuple[paddle.Tensor, ...]
PieceFn = Callable[[int, Tensors], Tensors]


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
    gate: paddle.Tensor  # dense form [H, E_local * I], expert e in columns [e*I, (e+1)*I); sparse [E_local, H, I]
    up: paddle.Tensor  # as gate
    down: paddle.Tensor  # dense [E_local * I, H]; sparse [E_local, I, H]
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


class MoEDecoder:
    """Weights plus the pieces and attention ops of one decoder. Holds no per-step state."""

    RESIDUAL_OUTPUT = 3  # outputs of a piece followed by attention: (q, k, v, residual, ...)

    def __init__(self, cfg: ModelConfig, hub: dict[str, np.ndarray], faults: Failpoints = NO_FAULTS,
                 partition: Partition | None = None, comm: Collectives | None = None,
                 fused_allreduce_max_tokens: int = 2048):
        """`hub` holds this rank's slices of the Hub tensors (all of them with one rank)."""
        self.cfg = cfg
        self.faults = faults
        self.partition = partition = partition or Partition()
        self.comm = comm or Collectives()
        self.fused_max_tokens = fused_allreduce_max_tokens
        self.heads, self.kv_heads = len(partition.q_heads(cfg)), len(partition.kv_heads(cfg))  # local counts
        self.first_token_id = partition.vocab(cfg).start
        self.first_expert = self._first_expert()
        self.embed_table = frozen(hub["model.embed_tokens.weight"])  # [V/W, H]
        self.head_table = self.embed_table if cfg.tie_word_embeddings else frozen(hub["lm_head.weight"])
        self.final_norm = frozen(hub["model.norm.weight"])
        local = self.partition.experts(cfg) if cfg.moe_layers else range(0)
        self.layers = [_layer_weights(cfg, hub, i, local, partition.rank) for i in range(cfg.num_layers)]
        cos, sin = rope_table(cfg.rotary_dim, cfg.rope_theta, cfg.max_position_embeddings)
        self.cos, self.sin = frozen(cos[:, None, :]), frozen(sin[:, None, :])  # [P, 1, rd/2]: broadcast over heads
        self.scale = cfg.head_dim ** -0.5

    def _first_expert(self) -> int:
        """Global id of this rank's first expert; the planted wrong map shifts it by one rank."""
        if not self.cfg.moe_layers:
            return 0
        first = self.partition.experts(self.cfg).start
        if self.faults.on("dist.wrong_expert_map") and self.partition.expert_parallel:
            first = (first + self.cfg.num_experts // self.partition.world) % self.cfg.num_experts
        return first

    @property
    def num_pieces(self) -> int:
        return self.cfg.num_layers + 1

    def piece_has_moe(self, index: int) -> bool:
        """Piece i (i >= 1) finishes layer i - 1; it routes when that layer is a MoE layer."""
        return index >= 1 and self.cfg.is_moe_layer(index - 1)

    def with_weights(self, convert: Callable[[paddle.Tensor], paddle.Tensor], index: int | None) -> MoEDecoder:
        """A shallow copy in which the tensors piece `index` reads (None: every piece, the whole-model
        decode step) are `convert(tensor)`. The graph backends use it to turn exactly those weights
        into parameters of the program being traced, and no others."""
        last = self.cfg.num_layers
        pieces = range(last + 1) if index is None else (index,)
        view = copy.copy(self)
        if 0 in pieces:
            view.embed_table = convert(self.embed_table)
        if last in pieces:
            view.final_norm = convert(self.final_norm)
        if any(i < last for i in pieces):
            view.cos, view.sin = convert(self.cos), convert(self.sin)
        view.layers = list(self.layers)
        for i in pieces:
            if i < last:  # piece i starts layer i ...
                view.layers[i] = _map_fields(view.layers[i], LayerWeights.STARTS, convert)
            if i > 0:  # ... and finishes layer i - 1
                view.layers[i - 1] = _map_fields(view.layers[i - 1], LayerWeights.FINISHES, convert)
        return view

    # ---- pieces ---------------------------------------------------------------------------

    def piece(self, index: int, *inputs: paddle.Tensor) -> Tensors:
        """Run piece `index`. Inputs: piece 0 (token_ids, positions, num_real); others
        (attn_out, residual, positions, num_real). Outputs: (q, k, v, residual) for a piece
        followed by attention, (hidden,) for the last; a MoE piece appends (topk_ids, nonfinite)."""
        if index == 0:
            token_ids, positions, _ = inputs
            hidden = vocab_parallel_embed(token_ids, self.embed_table, self.first_token_id, self.comm.all_reduce)
            normed = rms_norm(hidden, self.layers[0].input_norm, self.cfg.rms_norm_eps)
            return self._qkv(0, normed, positions) + (hidden,)
        attn_out, residual, positions, num_real = inputs
        partial, residual, routing = self._finish_layer(index - 1, attn_out, residual, num_real)
        last = index == self.cfg.num_layers
        norm = self.final_norm if last else self.layers[index].input_norm
        normed, residual = self._reduce_add_norm(partial, residual, norm)
        if last:
            return (normed,) + routing
        return self._qkv(index, normed, positions) + (residual,) + routing

    def _reduce_add_norm(self, partial: paddle.Tensor, residual: paddle.Tensor, weight: paddle.Tensor,
                         reduce: bool = True) -> Tensors:
        all_reduce = self.comm.all_reduce if reduce else (lambda x: x)
        return all_reduce_add_rms_norm(partial, residual, weight, self.cfg.rms_norm_eps, all_reduce,
                                       self.comm.world, self.fused_max_tokens)

    def _qkv(self, layer: int, x: paddle.Tensor, positions: paddle.Tensor) -> Tensors:
        cfg, w = self.cfg, self.layers[layer]
        qkv = linear(x, w.qkv, w.qkv_bias)  # [T, Q + 2 KV], this rank's heads
        q_size, kv_size = self.heads * cfg.head_dim, self.kv_heads * cfg.head_dim
        q, k, v = paddle.split(qkv, [q_size, kv_size, kv_size], axis=-1)
        q = q.reshape([-1, self.heads, cfg.head_dim])  # [T, Hq, D]
        k = k.reshape([-1, self.kv_heads, cfg.head_dim])  # [T, Hkv, D]
        v = v.reshape([-1, self.kv_heads, cfg.head_dim])
        if w.q_norm is not None:
            q = rms_norm(q, w.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, w.k_norm, cfg.rms_norm_eps)
        cos, sin = paddle.gather(self.cos, positions), paddle.gather(self.sin, positions)  # [T, 1, rd/2]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _finish_layer(self, layer: int, attn_out: paddle.Tensor, residual: paddle.Tensor,
                      num_real: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor, Tensors]:
        """o-proj, all-reduce, residual add, post-attention norm, MLP/MoE; returns (this rank's partial
        MLP/MoE output, residual, routing)."""
        w = self.layers[layer]
        attn = linear(attn_out, w.o_proj, w.o_bias)  # [T, H], partial over ranks
        reduce = not self.faults.on("dist.skip_allreduce")
        normed, residual = self._reduce_add_norm(attn, residual, w.post_norm, reduce)
        if isinstance(w.mlp, MLPWeights):
            return dense_mlp(normed, w.mlp.gate, w.mlp.up, w.mlp.down), residual, ()
        out, ids, nonfinite = self._moe(w.mlp, normed, num_real)
        return out, residual, (ids, nonfinite)

    def _moe(self, w: MoEWeights, x: paddle.Tensor, num_real: paddle.Tensor) -> Tensors:
        logits = paddle.matmul(x, w.router)  # [T, E]
        ids, weights = self._route(logits, w.bias, num_real)  # [T, k] each
        local = weights * self.cfg.routed_scaling_factor if self.faults.on("dist.double_scale") else weights
        out = routed_experts(x, ids - self.first_expert, local, w.num_local, w.gate, w.up, w.down,
                             self.cfg.moe_form)  # this rank's
        if w.shared is not None:
            out = out + dense_mlp(x, w.shared.gate, w.shared.up, w.shared.down)
        return out, ids, router.nonfinite_rows(logits, num_real)

    def _route(self, logits: paddle.Tensor, bias: paddle.Tensor | None, num_real: paddle.Tensor) -> Tensors:
        cfg = self.cfg
        if self.faults.on("moe.route_padding"):
            num_real = None
        if cfg.router == "softmax_topk":
            return router.softmax_topk(logits, top_k=cfg.top_k, norm_topk_prob=cfg.norm_topk_prob,
                                       num_real=num_real, faults=self.faults)
        return router.noaux_tc(logits, bias, top_k=cfg.top_k, n_group=cfg.n_group, topk_group=cfg.topk_group,
                               norm_topk_prob=cfg.norm_topk_prob,
                               routed_scaling_factor=cfg.routed_scaling_factor, num_real=num_real,
                               faults=self.faults)

    # ---- the eager ops between pieces -------------------------------------------------------

    def attention(self, layer: int, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor,
                  cache: KVCache, meta: AttentionMetadata) -> paddle.Tensor:
        if self.faults.on("attention.drop_cached_prefix"):
            meta = _without_cached_prefix(meta)
        return paged_attention(layer, q, k, v, cache, meta, self.scale)

    def logits(self, hidden: paddle.Tensor) -> paddle.Tensor:
        """Final hidden rows [N, H] -> logits [N, V] (each rank computes its vocabulary slice)."""
        return self.comm.all_gather_last(lm_head(hidden, self.head_table))

    def forward(self, ctx: ForwardContext, cache: KVCache, run_piece: PieceFn | None = None) -> ForwardOutput:
        """Run the whole stack. `run_piece(i, inputs)` executes piece i; the default runs it eagerly,
        the graph runner passes one that replays a captured piece (outputs then have padded rows)."""
        run_piece = run_piece or (lambda i, inputs: self.piece(i, *inputs))
        out = run_piece(0, (ctx.token_ids, ctx.positions, ctx.num_real))
        routing: dict[int, Tensors] = {}
        for layer in range(self.cfg.num_layers):
            q, k, v, residual = out[:4]
            attn = self.attention(layer, q, k, v, cache, ctx.attention)
            out = run_piece(layer + 1, (attn, residual, ctx.positions, ctx.num_real))
            if self.piece_has_moe(layer + 1):
                routing[layer] = out[-2:]
        return ForwardOutput(hidden=out[0], routing=routing)


    def full_decode(self, token_ids: paddle.Tensor, positions: paddle.Tensor, num_real: paddle.Tensor,
                    slots: paddle.Tensor, context_lens: paddle.Tensor, caches: list[paddle.Tensor]) -> Tensors:
        """The whole stack for a decode-only step as one fixed-shape function (what full_and_piecewise
        captures). `caches` is [k_0, v_0, k_1, v_1, ...], read only. Returns (hidden, k_0, v_0, ...,
        then (topk_ids, nonfinite) per MoE layer): the caller writes each layer's k/v to the cache."""
        out = self.piece(0, token_ids, positions, num_real)
        new_kv: list[paddle.Tensor] = []
        routing: list[paddle.Tensor] = []
        for layer in range(self.cfg.num_layers):
            q, k, v, residual = out[:4]
            attn = static_decode_attention(q, k, v, caches[2 * layer], caches[2 * layer + 1], slots, context_lens,
                                           self.scale)
            new_kv += [k, v]
            out = self.piece(layer + 1, attn, residual, positions, num_real)
            if self.piece_has_moe(layer + 1):
                routing += list(out[-2:])
        return (out[0], *new_kv, *routing)


@dataclass(frozen=True)
class ForwardOutput:
    hidden: paddle.Tensor  # [P, H] final-normed hidden states (P = padded rows)
    routing: dict[int, Tensors]  # MoE layer -> (topk_ids [P, k], nonfinite [P])


def _map_fields(weights: LayerWeights, fields: tuple[str, ...], convert: Callable[[paddle.Tensor], paddle.Tensor]):
    return replace(weights, **{name: _map_tensors(getattr(weights, name), convert) for name in fields})


def _map_tensors(weights, convert: Callable[[paddle.Tensor], paddle.Tensor]):
    """The weights dataclass with every tensor field (nested ones too) passed through `convert`."""
    if isinstance(weights, paddle.Tensor):
        return convert(weights)
    if dataclasses.is_dataclass(weights):
        return replace(weights, **{f.name: _map_tensors(getattr(weights, f.name), convert)
                                   for f in dataclasses.fields(weights)})
    return weights


def _without_cached_prefix(meta: AttentionMetadata) -> AttentionMetadata:
    """The planted bug: every sequence sees only this step's tokens, as if nothing were cached."""
    spans = tuple(replace(s, context_len=0, slots=s.slots[s.context_len:]) for s in meta.spans)
    return replace(meta, spans=spans)


# ---------------------------------------------------------------------------------------------
# Hub tensors -> weights


def _layer_weights(cfg: ModelConfig, hub: dict[str, np.ndarray], layer: int, experts: range,
                   rank: int) -> LayerWeights:
    p = f"model.layers.{layer}."
    qkv = np.concatenate([hub[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], axis=0)
    bias = np.concatenate([hub[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]) if cfg.attention_bias else None
    return LayerWeights(
        input_norm=frozen(hub[p + "input_layernorm.weight"]), post_norm=frozen(hub[p + "post_attention_layernorm.weight"]),
        qkv=weight_param(qkv), qkv_bias=None if bias is None else frozen(bias),
        q_norm=frozen(hub[p + "self_attn.q_norm.weight"]) if cfg.use_qk_norm else None,
        k_norm=frozen(hub[p + "self_attn.k_norm.weight"]) if cfg.use_qk_norm else None,
        o_proj=weight_param(hub[p + "self_attn.o_proj.weight"]),
        o_bias=_row_parallel_bias(hub[p + "self_attn.o_proj.bias"], rank) if cfg.o_proj_bias else None,
        mlp=_moe_weights(cfg, hub, p + "mlp.", experts) if cfg.is_moe_layer(layer) else _mlp_weights(hub, p + "mlp."),
    )


def _mlp_weights(hub: dict[str, np.ndarray], prefix: str) -> MLPWeights:
    return MLPWeights(gate=weight_param(hub[prefix + "gate_proj.weight"]), up=weight_param(hub[prefix + "up_proj.weight"]),
                      down=weight_param(hub[prefix + "down_proj.weight"]))


def _row_parallel_bias(bias: np.ndarray, rank: int) -> paddle.Tensor:
    """The bias of a row-parallel projection is added once, by rank 0, so the all-reduce sums it once."""
    return frozen(bias if rank == 0 else np.zeros_like(bias))


def _moe_weights(cfg: ModelConfig, hub: dict[str, np.ndarray], prefix: str, local: range) -> MoEWeights:
    experts = [f"{prefix}experts.{e}." for e in local]

    gate, up, down = pack_experts(*([hub[f"{e}{n}_proj.weight"] for e in experts] for n in ("gate", "up", "down")),
                                  cfg.moe_form)
    bias = hub.get(prefix + "gate.e_score_correction_bias")
    shared = _mlp_weights(hub, prefix + "shared_experts.") if cfg.n_shared_experts else None
    return MoEWeights(router=weight_param(hub[prefix + "gate.weight"]), bias=None if bias is None else frozen(bias),
                      num_local=len(experts), gate=frozen(gate), up=frozen(up), down=frozen(down), shared=shared)
