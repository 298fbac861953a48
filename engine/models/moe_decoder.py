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
which rows are padding. Pieces take and return tensors by name, as `engine/graph/protocol.py`
declares; its `run_pieces` is the one loop over them (eager, piecewise replay, whole-step graph).
The weights are `engine/models/weights.py`'s; which Hub tensor is which, `engine/checkpoint/hub_schema.py`'s.

Under tensor parallelism the weights are this rank's `Partition` (engine/distributed.py) and the
pieces hold the all-reduces: after the vocabulary-parallel embedding, after each row-parallel
projection (o-proj, MLP down, experts), the latter fused with the residual add and the next norm.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import paddle

from engine.checkpoint import hub_schema as hub
from engine.config import ModelConfig, MoEForm, RouterKind
from engine.distributed import Collectives, Partition
from engine.failpoints import NO_FAULTS, Failpoints
from engine.kv_cache import KVCache
from engine.layers.attention import (
    AttentionMetadata,
    DecodeTables,
    paged_attention,
    static_decode_attention,
)
from engine.layers.embedding import lm_head, vocab_parallel_embed
from engine.layers.linear import frozen, linear
from engine.layers.norm import all_reduce_add_rms_norm, rms_norm, rms_norm_eps_outside
from engine.layers.rotary import apply_rotary, rope_table
from engine.models.weights import LayerWeights, MoEWeights, layer_weights, map_fields
from engine.moe import router
from engine.moe.experts import dense_mlp, routed_experts
from engine.routing_replay.replay import replayed_routing

Tensors = tuple[paddle.Tensor, ...]
Named = dict[str, paddle.Tensor]
ROUTING = ("topk_ids", "nonfinite")  # what a MoE piece adds to its outputs
REPLAY_IDS = "replay_ids"  # routing replay (R3): [T, moe_layers, top_k] recorded ids, a step input


@dataclass(frozen=True)
class ForwardOutput:
    hidden: paddle.Tensor  # [P, H] final-normed hidden states (P = padded rows)
    routing: dict[int, Tensors]  # MoE layer -> (topk_ids [P, k], nonfinite [P])


class MoEDecoder:
    """Weights plus the pieces and attention ops of one decoder. Holds no per-step state.

    Implements `engine/graph/protocol.py`'s `PiecewiseModel` (and the whole-step extension):
    pieces take and return tensors by name."""

    step_inputs: tuple[str, ...] = ("token_ids", "positions", "num_real")
    replays = False  # True in the view `with_replayed_routing` returns
    fixed_shapes = False  # True in the graph backends' views (`with_weights`): the sparse MoE form at fixed capacity

    def __init__(self, cfg: ModelConfig, tensors: dict[str, np.ndarray], faults: Failpoints = NO_FAULTS,
                 partition: Partition | None = None, comm: Collectives | None = None,
                 fused_allreduce_max_tokens: int = 2048):
        """`tensors` holds this rank's slices of the Hub tensors (all of them with one rank)."""
        self.cfg = cfg
        self.faults = faults
        self.partition = partition = partition or Partition()
        self.comm = comm or Collectives()
        self.fused_max_tokens = fused_allreduce_max_tokens
        self._fused_bound_error = 1 if faults.on("dist.fused_bound_off_by_one") else 0
        self.heads, self.kv_heads = len(partition.q_heads(cfg)), len(partition.kv_heads(cfg))  # local counts
        self.first_token_id = partition.vocab(cfg).start
        self.first_expert = self._first_expert()
        self.embed_table = frozen(tensors[hub.EMBED])  # [V/W, H]
        self.head_table = self.embed_table if cfg.tie_word_embeddings else frozen(tensors[hub.LM_HEAD])
        self.final_norm = frozen(tensors[hub.FINAL_NORM])
        local = self.partition.experts(cfg) if cfg.moe_layers else range(0)
        self.layers = [layer_weights(cfg, tensors, i, local, partition.rank) for i in range(cfg.num_layers)]
        # rotary.float32_angles: the table's angles in float32 (transformers' way, even in float64), widened
        angles_dtype = "float32" if faults.on("rotary.float32_angles") else cfg.dtype
        cos, sin = (t.astype(cfg.dtype) for t in rope_table(cfg.rotary_dim, cfg.rope_theta,
                                                            cfg.max_position_embeddings, angles_dtype))
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

    # ---- what the graph machinery reads (engine/graph/protocol.py) -----------------------------

    @property
    def num_pieces(self) -> int:
        return self.cfg.num_layers + 1

    def piece_has_moe(self, index: int) -> bool:
        """Piece i (i >= 1) finishes layer i - 1; it routes when that layer is a MoE layer."""
        return index >= 1 and self.cfg.is_moe_layer(index - 1)

    def piece_inputs(self, index: int) -> tuple[tuple, ...]:
        """Piece 0 reads the step's tokens; every later piece the attention output and the residual
        stream. All read positions and the real-row count ([1] int64: rows past it are padding); a
        MoE piece of a replaying view also the step's recorded expert ids."""
        shared = (("positions", "int64", ()), ("num_real", "int64", None))
        if index == 0:
            return (("token_ids", "int64", ()), *shared)
        replay = self._replay_spec() if self.piece_has_moe(index) else ()
        return (("attn_out", self.cfg.dtype, (self.heads * self.cfg.head_dim,)),
                ("residual", self.cfg.dtype, (self.cfg.hidden_size,)), *shared, *replay)

    def _replay_spec(self) -> tuple[tuple, ...]:
        """The routing-replay input ([T, moe_layers, top_k] int64), or none when not replaying."""
        return ((REPLAY_IDS, "int64", (len(self.cfg.moe_layers), self.cfg.top_k)),) if self.replays else ()

    def with_replayed_routing(self) -> MoEDecoder:
        """A view whose MoE layers route by recorded expert ids (routing replay, R3): the ids are one
        more step input, `replay_ids`, read by every MoE piece; the weights are recomputed from the
        router's scores at those ids (engine/routing_replay/replay.py)."""
        view = copy.copy(self)
        view.replays, view.step_inputs = True, (*self.step_inputs, REPLAY_IDS)
        return view

    def piece_outputs(self, index: int) -> tuple[str, ...]:
        """A piece followed by attention returns its q/k/v and the residual stream, the last piece the
        final-normed hidden rows; a MoE piece adds its routing (topk_ids [P, k], nonfinite [P])."""
        main = ("hidden",) if index == self.cfg.num_layers else ("q", "k", "v", "residual")
        return main + (ROUTING if self.piece_has_moe(index) else ())

    def with_weights(self, convert: Callable[[paddle.Tensor], paddle.Tensor], index: int | None) -> MoEDecoder:
        """A shallow copy in which the tensors piece `index` reads (None: every piece, the whole-model
        decode step) are `convert(tensor)`. The graph backends use it to turn exactly those weights
        into parameters of the program being traced, and no others. The view runs at fixed shapes
        (`fixed_shapes`): a sparse MoE form sized by a host read would not capture."""
        last = self.cfg.num_layers
        pieces = range(last + 1) if index is None else (index,)
        view = copy.copy(self)
        view.fixed_shapes = True
        if 0 in pieces:
            view.embed_table = convert(self.embed_table)
        if last in pieces:
            view.final_norm = convert(self.final_norm)
        if any(i < last for i in pieces):
            view.cos, view.sin = convert(self.cos), convert(self.sin)
        view.layers = list(self.layers)
        for i in pieces:
            if i < last:  # piece i starts layer i ...
                view.layers[i] = map_fields(view.layers[i], LayerWeights.STARTS, convert)
            if i > 0:  # ... and finishes layer i - 1
                view.layers[i - 1] = map_fields(view.layers[i - 1], LayerWeights.FINISHES, convert)
        return view

    # ---- pieces ---------------------------------------------------------------------------

    def piece(self, index: int, inputs: Named) -> Named:
        """Run piece `index` on the inputs `piece_inputs(index)` names; returns `piece_outputs(index)`."""
        positions = inputs["positions"]
        if index == 0:
            hidden = vocab_parallel_embed(inputs["token_ids"], self.embed_table, self.first_token_id,
                                          lambda rows: self.comm.all_reduce(rows, "embedding"))
            normed = rms_norm(hidden, self.layers[0].input_norm, self.cfg.rms_norm_eps)
            return {**self._qkv(0, normed, positions), "residual": hidden}
        forced = self._forced_ids(index - 1, inputs)
        partial, residual, routing = self._finish_layer(index - 1, inputs["attn_out"], inputs["residual"],
                                                        inputs["num_real"], forced)
        last = index == self.cfg.num_layers
        norm = self.final_norm if last else self.layers[index].input_norm
        ffn = "moe" if self.cfg.is_moe_layer(index - 1) else "mlp"
        normed, residual = self._reduce_add_norm(partial, residual, norm, f"{ffn}, layer {index - 1}")
        if last and self._planted_in_sparse_pieces("norm.eps_outside_sqrt"):
            normed = rms_norm_eps_outside(residual, norm, self.cfg.rms_norm_eps)
        if last:
            return {"hidden": normed, **routing}
        return {**self._qkv(index, normed, positions), "residual": residual, **routing}

    def _planted_in_sparse_pieces(self, name: str) -> bool:
        """Failpoint `name` is planted and this is a captured piece of the sparse form: the slip lives
        in one mode's fast path, as it would in a fused kernel, so comparing modes can see it."""
        return self.fixed_shapes and self.cfg.moe_form == MoEForm.SPARSE and self.faults.on(name)

    def _forced_ids(self, layer: int, inputs: Named) -> paddle.Tensor | None:
        """The recorded ids [T, k] a replaying view routes MoE `layer` by; None otherwise."""
        if not (self.replays and self.cfg.is_moe_layer(layer)):
            return None
        column = self.cfg.moe_layers.index(layer)
        if self.faults.on("r3.replay_layer_off_by_one") and column == len(self.cfg.moe_layers) - 1:
            column = max(column - 1, 0)  # the planted MoE-layer index mix-up: only the last layer is off
        return inputs[REPLAY_IDS][:, column]

    def _reduce_add_norm(self, partial: paddle.Tensor, residual: paddle.Tensor, weight: paddle.Tensor,
                         what: str, reduce: bool = True) -> Tensors:
        """`what` names the all-reduce for the collective watchdog ("o_proj, layer 1")."""
        all_reduce = (lambda x: self.comm.all_reduce(x, what)) if reduce else (lambda x: x)
        return all_reduce_add_rms_norm(partial, residual, weight, self.cfg.rms_norm_eps, all_reduce,
                                       self.comm.world, self.fused_max_tokens + self._fused_bound_error)

    def _qkv(self, layer: int, x: paddle.Tensor, positions: paddle.Tensor) -> Named:
        cfg, w = self.cfg, self.layers[layer]
        qkv = linear(x, w.qkv, w.qkv_bias)  # [T, Q + 2 KV], this rank's heads
        heads, dim = (self.heads, self.kv_heads), cfg.head_dim
        if w.q_norm is None:  # q and k side by side already: one [T, Hq + Hkv, D] tensor
            qk, v = paddle.split(qkv, [qkv.shape[-1] - heads[1] * dim, heads[1] * dim], axis=-1)
            qk = qk.reshape([-1, sum(heads), dim])
        else:  # normalised apart (rsqrt's rounding depends on an element's place in the buffer), then joined
            q, k, v = paddle.split(qkv, [heads[0] * dim, heads[1] * dim, heads[1] * dim], axis=-1)
            qk = paddle.concat([rms_norm(q.reshape([-1, heads[0], dim]), w.q_norm, cfg.rms_norm_eps),
                                rms_norm(k.reshape([-1, heads[1], dim]), w.k_norm, cfg.rms_norm_eps)], axis=1)
        cos, sin = paddle.gather(self.cos, positions), paddle.gather(self.sin, positions)  # [T, 1, rd/2]
        # rotary once over q and k heads together (elementwise: the same bits as apart, half the ops)
        q, k = paddle.split(apply_rotary(qk, cos, sin), list(heads), axis=1)  # [T, Hq, D], [T, Hkv, D]
        return {"q": q, "k": k, "v": v.reshape([-1, heads[1], dim])}

    def _finish_layer(self, layer: int, attn_out: paddle.Tensor, residual: paddle.Tensor, num_real: paddle.Tensor,
                      forced: paddle.Tensor | None = None) -> tuple[paddle.Tensor, paddle.Tensor, Named]:
        """o-proj, all-reduce, residual add, post-attention norm, MLP/MoE (routed by `forced` ids when
        given); returns (this rank's partial MLP/MoE output, residual, routing outputs)."""
        w = self.layers[layer]
        attn = linear(attn_out, w.o_proj, w.o_bias)  # [T, H], partial over ranks
        reduce = not self.faults.on("dist.skip_allreduce")
        normed, residual = self._reduce_add_norm(attn, residual, w.post_norm, f"o_proj, layer {layer}", reduce)
        if not isinstance(w.mlp, MoEWeights):
            return dense_mlp(normed, w.mlp.gate, w.mlp.up, w.mlp.down), residual, {}
        out, ids, nonfinite = self._moe(w.mlp, normed, num_real, forced)
        return out, residual, dict(zip(ROUTING, (ids, nonfinite)))

    def _moe(self, w: MoEWeights, x: paddle.Tensor, num_real: paddle.Tensor,
             forced: paddle.Tensor | None = None) -> Tensors:
        """This rank's share of the MoE output, the routed ids [T, k] and the non-finite row flags;
        with `forced` ids [T, k] the router's choice is replaced by them (routing replay)."""
        logits = paddle.matmul(x, w.router)  # [T, E]
        if forced is None:
            ids, weights = self._route(logits, w.bias, num_real)  # [T, k] each
        else:
            ids, weights = replayed_routing(self.cfg, logits, forced, num_real)
        local = weights * self.cfg.routed_scaling_factor if self.faults.on("dist.double_scale") else weights
        out = routed_experts(x, ids - self.first_expert, local, w.num_local, w.gate, w.up, w.down,
                             self.cfg.moe_form, self.fixed_shapes)  # this rank's
        if w.shared is not None:
            out = out + dense_mlp(x, w.shared.gate, w.shared.up, w.shared.down)
        return out, ids, router.nonfinite_rows(logits, num_real)

    def _route(self, logits: paddle.Tensor, bias: paddle.Tensor | None, num_real: paddle.Tensor) -> Tensors:
        cfg = self.cfg
        if self.faults.on("moe.route_padding"):
            num_real = None
        if cfg.router is RouterKind.SOFTMAX_TOPK:
            return router.softmax_topk(logits, top_k=cfg.top_k, norm_topk_prob=cfg.norm_topk_prob,
                                       num_real=num_real, faults=self.faults)
        return router.noaux_tc(logits, bias, top_k=cfg.top_k, n_group=cfg.n_group, topk_group=cfg.topk_group,
                               norm_topk_prob=cfg.norm_topk_prob,
                               routed_scaling_factor=cfg.routed_scaling_factor, num_real=num_real,
                               faults=self.faults)

    # ---- the ops between pieces, and what a step makes of the pieces' outputs -------------------

    def attention(self, layer: int, outputs: Named, cache: KVCache, meta: AttentionMetadata) -> Named:
        """Eager paged attention of `layer` on the q/k/v a piece returned; writes k/v to the cache."""
        if self.faults.on("attention.drop_cached_prefix"):
            meta = _without_cached_prefix(meta)
        return {"attn_out": paged_attention(layer, outputs["q"], outputs["k"], outputs["v"], cache, meta,
                                            self.scale)}

    def whole_step_inputs(self, table_width: int) -> tuple[tuple, ...]:
        """Inputs of a decode-only step captured as one graph: piece 0's, then each row's slot table
        ([B, table_width]) and cached length ([B]), and a replaying view's recorded ids."""
        return (*self.piece_inputs(0), ("slots", "int64", (table_width,)), ("context_lens", "int64", ()),
                *self._replay_spec())

    def whole_step_outputs(self, index: int) -> tuple[str, ...]:
        """What a whole-step graph keeps of piece `index`: the new k/v of the layer it starts (written
        to the cache after the replay), the final hidden rows, and the routing."""
        kept = ("hidden",) if index == self.cfg.num_layers else ("k", "v")
        return kept + (ROUTING if self.piece_has_moe(index) else ())

    def static_attention(self, layer: int, outputs: Named, step: Named, keys: list[paddle.Tensor],
                         values: list[paddle.Tensor]) -> Named:
        """Fixed-shape decode attention inside a whole-step graph: reads the cache (`keys`, `values`:
        one tensor per layer), never writes it."""
        return {"attn_out": static_decode_attention(outputs["q"], outputs["k"], outputs["v"], keys[layer],
                                                    values[layer], step["slots"], step["context_lens"],
                                                    self.scale)}

    def write_step_kv(self, outputs: list[Named], cache: KVCache, meta: AttentionMetadata) -> None:
        """After a whole-step replay: every layer's new k/v (real rows) into the cache."""
        n, slots = meta.num_tokens, meta.slot_mapping
        if self.faults.on("kv.write_padded_rows"):
            n = outputs[0]["k"].shape[0]
            slots = paddle.concat([slots, paddle.zeros([n - meta.num_tokens], dtype=slots.dtype)])
        for layer in range(self.cfg.num_layers):
            cache.write(layer, slots, outputs[layer]["k"][:n], outputs[layer]["v"][:n])

    def forward_output(self, outputs: list[Named]) -> ForwardOutput:
        """Every piece's outputs, piece 0 first -> the final hidden rows and each MoE layer's routing."""
        routing = {index - 1: tuple(out[name] for name in ROUTING)
                   for index, out in enumerate(outputs) if self.piece_has_moe(index)}
        return ForwardOutput(hidden=outputs[-1]["hidden"], routing=routing)

    def step_values(self, token_ids: paddle.Tensor, positions: paddle.Tensor, num_real: paddle.Tensor,
                    decode: DecodeTables | None = None, replay_ids: paddle.Tensor | None = None) -> Named:
        """A step's inputs by the names the pieces read them; with `decode`, a whole-step graph's too.
        A replaying view requires the step's `replay_ids` [T, moe_layers, top_k]."""
        step = {"token_ids": token_ids, "positions": positions, "num_real": num_real}
        if self.replays:
            if replay_ids is None:
                raise ValueError("a replaying decoder needs the step's recorded expert ids (replay_ids)")
            step[REPLAY_IDS] = replay_ids
        if decode is not None:
            step |= {"slots": decode.slots, "context_lens": decode.context_lens}
        return step

    def logits(self, hidden: paddle.Tensor) -> paddle.Tensor:
        """Final hidden rows [N, H] -> logits [N, V] (each rank computes its vocabulary slice)."""
        return self.comm.all_gather_last(lm_head(hidden, self.head_table), "lm head")


def _without_cached_prefix(meta: AttentionMetadata) -> AttentionMetadata:
    """The planted bug: every sequence sees only this step's tokens, as if nothing were cached."""
    spans = tuple(replace(s, context_len=0, slots=s.slots[s.context_len:]) for s in meta.spans)
    return replace(meta, spans=spans)
