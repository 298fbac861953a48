"""ModelRunner: one scheduled batch -> device tensors -> forward -> logits -> greedy tokens.

The runner owns the KV cache and turns a `Batch` into the flat tensors and attention metadata
the decoder needs. What it returns per step is plain NumPy, copied off the device, so a caller
can keep it across steps (unlike graph output buffers, which the next replay overwrites).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paddle

from engine.config import CaptureTiming, EngineConfig, GraphMode, ModelConfig, MoEForm
from engine.forward_context import ForwardContext
from engine.graph.backends import make_backend
from engine.graph.capture_sizes import capture_sizes_for
from engine.graph.guard import DECODE, PREFILL, CaptureGuard
from engine.graph.protocol import Named, run_pieces
from engine.graph.runner import GraphRunner, WholeStep
from engine.graph.stats import CaptureStats
from engine.kv_cache import KVCache, blocks_needed, slots_for
from engine.layers.attention import AttentionMetadata, DecodeTables, SequenceSpan
from engine.models.moe_decoder import ForwardOutput, MoEDecoder
from engine.moe.experts import buckets_overflow
from engine.moe.router import check_finite
from engine.prefix_cache import PrefixCache, cache_identity
from engine.routing_replay.recorder import RoutingRecorder, step_kind
from engine.routing_replay.replay import RoutingReplayer
from engine.scheduler import Batch


@dataclass(frozen=True)
class StepResult:
    """What one step produced, per segment of the batch (same order)."""

    next_tokens: dict[int, int]  # request id -> greedy token, for segments that sample
    logits: list[np.ndarray]  # per segment: [rows, V] for the rows asked for (see ModelRunner.step)
    routing: dict[int, list[np.ndarray]]  # MoE layer -> per segment [num_tokens, k], ids sorted ascending
    routed: list[np.ndarray]  # per segment [num_tokens, moe_layers, top_k], ids as routed (what R3 records)


PHASE_CODES = {PREFILL: 1, DECODE: 2}


def default_num_blocks(model: ModelConfig, engine: EngineConfig) -> int:
    return engine.num_kv_blocks or engine.max_num_seqs * blocks_needed(engine.max_len(model), engine.block_size)


class ModelRunner:
    """Runs steps of one decoder against the KV cache it owns."""

    def __init__(self, model: MoEDecoder, engine: EngineConfig, replay: RoutingReplayer | None = None):
        """With `replay`, every step routes by the recorded expert ids it hands out (R3 replay): the
        runner drives the model's replaying view, whose pieces read them as the step input `replay_ids`."""
        self.model = model.with_replayed_routing() if replay is not None else model
        self.replay = replay
        self.engine = engine
        cfg = model.cfg
        self.cache = KVCache(cfg.num_layers, default_num_blocks(cfg, engine), engine.block_size,
                             model.kv_heads, cfg.head_dim, cfg.dtype)
        self.decode_table_width = blocks_needed(engine.max_len(cfg), engine.block_size) * engine.block_size
        self.prefix = self._prefix_cache(model) if engine.prefix_caching else None
        self.guard = CaptureGuard()
        self.stats = CaptureStats()
        self.graphs = self._graph_runner()
        self.recorder: RoutingRecorder | None = None  # routing replay (R3): set by the engine to record
        # verifier/probes.py's hook: called (kind, index, outputs) with every piece's outputs ("piece")
        # and every attention's ("attention") of each forward; it must only read them. None: off.
        self.probe: Callable[[str, int, Named], None] | None = None

    def _prefix_cache(self, model: MoEDecoder) -> PrefixCache:
        """The prefix cache over this runner's KV blocks; its blocks' identity includes this rank's layout."""
        identity = cache_identity(model.cfg, self.engine, model.kv_heads, model.partition.world)
        return PrefixCache(self.cache.allocator, self.engine.block_size, identity, self.engine.faults,
                           model.partition.rank)

    def _graph_runner(self) -> GraphRunner | None:
        graph = self.engine.graph
        if graph.mode is GraphMode.EAGER:
            return None
        whole = WholeStep(self.cache, self.decode_table_width) if graph.mode is GraphMode.FULL_AND_PIECEWISE else None
        runner = GraphRunner(self.model, make_backend(graph.backend), capture_sizes_for(self.engine), self.guard,
                             self.stats, self.engine.faults, whole_step=whole, watch=self.model.comm.watch)
        if graph.capture is CaptureTiming.EAGER:
            runner.capture_all()
        return runner

    def prepare(self, batch: Batch) -> ForwardContext:
        """The step's tensors and attention metadata, and the graph-or-eager decision."""
        phase = DECODE if batch.is_decode_only else PREFILL
        token_ids = paddle.to_tensor(np.asarray(batch.token_ids(), dtype=np.int64))
        positions = paddle.to_tensor(self._positions(batch))
        slots = paddle.to_tensor(self._slot_mapping(batch))
        size = self._agreed_size(phase, batch.num_tokens, batch.reused_tokens)
        tables = self._decode_tables(batch) if size is not None and self.graphs.replays_whole_step(phase) else None
        meta = AttentionMetadata(self._spans(batch), slots, batch.num_tokens, tables)
        num_real = paddle.to_tensor([batch.num_tokens], dtype="int64")
        replay_ids = self.replay.step_ids(batch) if self.replay is not None else None
        return ForwardContext(token_ids, positions, num_real, meta, phase, size, self.guard, replay_ids)

    def _positions(self, batch: Batch) -> np.ndarray:
        positions = np.asarray(batch.positions(), dtype=np.int64)  # [T]
        if self.engine.faults.on("rotary.chunk_positions_from_zero"):
            starts = np.repeat([seg.start for seg in batch.segments], [seg.num_tokens for seg in batch.segments])
            prefill = np.repeat([seg.is_prefill for seg in batch.segments], [seg.num_tokens for seg in batch.segments])
            positions = np.where(prefill, positions - starts, positions)
        return positions

    def _slot_mapping(self, batch: Batch) -> np.ndarray:
        slots = np.asarray(batch.slot_mapping(self.cache.block_size), dtype=np.int64)  # [T]
        return slots + 1 if self.engine.faults.on("kv.slot_off_by_one") else slots

    def _agreed_size(self, phase: str, num_tokens: int, reused_tokens: int = 0) -> int | None:
        """The padded size to replay (None: eager), checked to be the same on every rank together
        with the step's prefix-cache hits: a rank that decided otherwise would wait in a different
        collective (or attend to other KV), so disagreement is an error."""
        size = self.graphs.padded_size(phase, num_tokens) if self.graphs else None
        if self.engine.faults.on("dist.rank_disagrees") and self.model.partition.rank == 1:
            size = None
        decision = [PHASE_CODES[phase], num_tokens, size or 0, reused_tokens]
        if not self.engine.faults.on("dist.skip_agreement_check"):
            self.model.comm.agree(decision, "the step (phase, tokens, padded size; 0 = eager) and its "
                                            "prefix-cache hits (tokens reused)")
        return size

    def _decode_tables(self, batch: Batch) -> DecodeTables:
        width, bs = self.decode_table_width, self.cache.block_size
        slots = np.zeros((batch.num_tokens, width), dtype=np.int64)
        stale = self.engine.faults.on("kv.stale_block_table")
        for row, seg in enumerate(batch.segments):
            filled = (len(seg.seq.block_table) - stale) * bs
            slots[row, :filled] = slots_for(seg.seq.block_table, 0, filled, bs)
        context = np.asarray([seg.start for seg in batch.segments], dtype=np.int64)
        return DecodeTables(paddle.to_tensor(slots), paddle.to_tensor(context))

    def _spans(self, batch: Batch) -> tuple[SequenceSpan, ...]:
        spans, row = [], 0
        for seg in batch.segments:
            end = seg.start + seg.num_tokens
            slots = slots_for(seg.seq.block_table, 0, end, self.cache.block_size)
            spans.append(SequenceSpan(row, seg.num_tokens, seg.start, np.asarray(slots, dtype=np.int64)))
            row += seg.num_tokens
        return tuple(spans)

    def step(self, batch: Batch, all_prompt_logits: bool = False) -> StepResult:
        """Run one step. Logits come back for each sampling row; with `all_prompt_logits`, for every
        prefill row as well (what a dump of prompt logits needs)."""
        self.model.comm.begin_step()
        ctx, before = self.prepare(batch), self.stats.snapshot() if self.recorder is not None else None
        out = self.forward(ctx)
        self._check_routing(out.routing, batch.num_tokens)
        if self.recorder is not None:  # R3: host side, after the step (graph buffers are still this step's)
            self.recorder.record_step(batch, out.routing, step_kind(self.stats.since(before)), self.guard)
        rows = _logit_rows(batch, all_prompt_logits)
        logits = self.model.logits(_rows(out.hidden, np.concatenate(rows))).numpy()
        per_segment = np.split(logits, np.cumsum([len(r) for r in rows])[:-1])
        routed = self._routed(batch, out.routing)
        return StepResult(_greedy(batch, per_segment), per_segment, _sorted_by_layer(routed, self.model.cfg.moe_layers),
                          routed)

    def forward(self, ctx: ForwardContext) -> ForwardOutput:
        """Eager, or a replay of the graphs captured at `ctx.padded_size`. In the replay case the
        returned tensors are the graph's output buffers, overwritten by the next replay."""
        if ctx.padded_size is None:
            if self.graphs is not None:
                self.stats.record_fallback(ctx.phase, ctx.num_tokens)
            return self.eager_forward(ctx)
        step = self.model.step_values(ctx.token_ids, ctx.positions, ctx.num_real, ctx.attention.decode,
                                      ctx.replay_ids)
        with ctx.guard.scope(ctx.phase, ctx.padded_size):
            if ctx.attention.decode is None:
                outputs = self.graphs.run_pieces(ctx.phase, ctx.padded_size, ctx.num_tokens, step,
                                                 self._attention(ctx))
            else:
                outputs = self.graphs.run_whole_step(ctx.padded_size, ctx.num_tokens, step)
                self.model.write_step_kv(outputs, self.cache, ctx.attention)
        out = self.model.forward_output(self._observed(outputs))
        if self._buckets_overflowed(out):  # the sparse MoE form's exact path: this step again, eagerly
            self.stats.record_fallback(ctx.phase, ctx.num_tokens)
            return self.eager_forward(ctx)
        return out

    def eager_forward(self, ctx: ForwardContext) -> ForwardOutput:
        """The step run eagerly, piece by piece, whatever `ctx.padded_size` says; counts nothing."""
        step = self.model.step_values(ctx.token_ids, ctx.positions, ctx.num_real, replay_ids=ctx.replay_ids)
        outputs = run_pieces(self.model.num_pieces, self.model.piece, self._attention(ctx), step)
        return self.model.forward_output(self._observed(outputs))

    def _observed(self, outputs: list[Named]) -> list[Named]:
        for index, named in enumerate(outputs if self.probe is not None else ()):
            self.probe("piece", index, named)
        return outputs

    def _attention(self, ctx: ForwardContext):
        """The model's eager attention between pieces, on this runner's cache and the step's metadata."""

        def attend(layer: int, outputs: Named) -> Named:
            out = self.model.attention(layer, outputs, self.cache, ctx.attention)
            if self.probe is not None:
                self.probe("attention", layer, out)
            return out

        return attend

    def _buckets_overflowed(self, out: ForwardOutput) -> bool:
        cfg = self.model.cfg
        if cfg.moe_form is not MoEForm.SPARSE:
            return False
        local = len(self.model.partition.experts(cfg))
        return any(buckets_overflow(ids.numpy(), cfg.num_experts, local) for ids, _ in out.routing.values())

    def _routed(self, batch: Batch, routing: dict) -> list[np.ndarray]:
        """Per segment, its real rows' expert ids [num_tokens, moe_layers, top_k] as routed."""
        cfg = self.model.cfg
        if not cfg.moe_layers:
            return [np.zeros((seg.num_tokens, 0, cfg.top_k), np.int64) for seg in batch.segments]
        ids = np.stack([_real(routing[layer][0], batch.num_tokens).numpy() for layer in cfg.moe_layers], axis=1)  # [T, L, k]
        bounds = np.cumsum([seg.num_tokens for seg in batch.segments])[:-1]
        return np.split(ids.astype(np.int64), bounds)

    def _check_routing(self, routing: dict, num_tokens: int) -> None:
        for layer, (_, nonfinite) in routing.items():
            check_finite(_real(nonfinite, num_tokens).numpy(), layer)


def _real(rows: paddle.Tensor, num_tokens: int) -> paddle.Tensor:
    """The first `num_tokens` rows (a replay's buffers are padded); an eager step's rows as they are."""
    return rows if rows.shape[0] == num_tokens else rows[:num_tokens]


def _rows(hidden: paddle.Tensor, rows: np.ndarray) -> paddle.Tensor:
    """hidden[rows]: the rows logits are wanted for. When they are all of `hidden`, in order (a decode
    step samples every row), `hidden` itself: the gather would copy the same values."""
    if rows.size == hidden.shape[0] and (rows == np.arange(rows.size)).all():
        return hidden
    return paddle.gather(hidden, paddle.to_tensor(rows))


def _logit_rows(batch: Batch, all_prompt_logits: bool) -> list[np.ndarray]:
    rows, row = [], 0
    for seg in batch.segments:
        keep_all = all_prompt_logits and seg.is_prefill
        first = row if keep_all else row + seg.num_tokens - 1
        wanted = keep_all or seg.samples
        rows.append(np.arange(first, row + seg.num_tokens) if wanted else np.zeros(0, dtype=np.int64))
        row += seg.num_tokens
    return rows


def _greedy(batch: Batch, per_segment: list[np.ndarray]) -> dict[int, int]:
    return {seg.seq.request.request_id: int(np.argmax(logits[-1]))
            for seg, logits in zip(batch.segments, per_segment) if seg.samples}


def _sorted_by_layer(routed: list[np.ndarray], moe_layers: tuple[int, ...]) -> dict[int, list[np.ndarray]]:
    """MoE layer -> per segment [num_tokens, k], each row's ids ascending."""
    return {layer: [np.sort(rows[:, column], axis=-1) for rows in routed] for column, layer in enumerate(moe_layers)}
