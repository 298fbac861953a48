"""GraphRunner: captured graphs per (phase, padded size), their static buffers, and replay.

For every capture size the runner holds, per piece, the input buffers the piece was captured
with and a replay. Running a step copies each piece's real rows into its buffers, sets the padded
rows to 0 (`num_real` tells the router which rows are padding), and replays. What a replay returns
are the backend's output buffers: the next replay of that piece and size overwrites them.

Buffers are shared where the data is: the pieces of one size read one `positions` and one
`num_real` buffer (filled once per step), and piece i + 1 is captured reading piece i's residual
output buffer, so the residual stream never leaves the graphs' memory, as in vLLM's piecewise
runner. Its padded rows are then whatever piece i computed from its own (defined) padded rows.

With a whole-model decode graph (mode full_and_piecewise), a decode-only step replays one graph
of `MoEDecoder.full_decode` instead of the pieces; it reads the KV cache in place and returns each
layer's new k/v, which the runner writes to the cache after the replay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import paddle

from engine.failpoints import NO_FAULTS, Failpoints
from engine.forward_context import ForwardContext
from engine.graph.backends import GraphBackend, Replay, Tensors
from engine.graph.capture_sizes import CaptureSizes
from engine.graph.guard import DECODE, CaptureGuard
from engine.graph.pieces import (
    NUM_REAL,
    POSITIONS,
    RESIDUAL,
    PieceInput,
    full_decode_function,
    full_decode_inputs,
    piece_function,
    piece_inputs,
    replay_input,
)
from engine.graph.stats import CaptureStats
from engine.kv_cache import KVCache
from engine.models.moe_decoder import ForwardOutput, MoEDecoder, PieceFn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphEntry:
    """One piece captured at one size: its input buffers and its replay."""

    slots: tuple[PieceInput, ...]
    inputs: list  # one buffer per slot, then (full decode graph only) the KV cache tensors as they are
    replay: Replay


class GraphRunner:
    def __init__(self, model: MoEDecoder, backend: GraphBackend, sizes: dict[str, CaptureSizes],
                 guard: CaptureGuard, stats: CaptureStats, faults: Failpoints = NO_FAULTS,
                 full_decode: tuple[KVCache, int] | None = None, replay_shape: tuple[int, int] | None = None):
        """`full_decode`: (the KV cache, slot-table width) to capture decode steps as one whole-model
        graph; None captures them piecewise like prefill. `replay_shape` (moe_layers, top_k): the
        graphs take routing-replay ids as an input (ForwardContext.replay_ids, required then)."""
        self.replay_shape = replay_shape
        self.model = model
        self.full_decode = full_decode
        self.backend = backend
        self.sizes = sizes  # phase -> capture sizes
        self.guard = guard
        self.stats = stats
        self.faults = faults
        self._entries: dict[tuple[str, int], list[GraphEntry]] = {}
        # One function object per piece, reused for every size (the static backend compiles per function).
        replays = replay_shape is not None
        self._pieces = [piece_function(model, i, replays) for i in range(model.num_pieces)]
        self._full_decode = full_decode_function(model, replays) if full_decode else None

    def padded_size(self, phase: str, num_tokens: int) -> int | None:
        """The capture size a step of `num_tokens` replays, or None when it must run eagerly."""
        sizes = self.sizes[phase]
        if self.faults.on("graph.round_down"):
            fitting = [s for s in sizes.sizes if s <= num_tokens]
            return fitting[-1] if fitting else sizes.sizes[0]
        return sizes.padded_size(num_tokens)

    def is_captured(self, phase: str, size: int) -> bool:
        return (phase, size) in self._entries

    def capture(self, phase: str, size: int) -> None:
        """Capture every piece at `size` (again, if it was captured before: counted as a recapture)."""
        with self.guard.scope(phase, size, capturing=True):
            if phase == DECODE and self.full_decode:
                self._entries[(phase, size)] = [self._capture_full_decode(size)]
            else:
                self._entries[(phase, size)] = self._capture_pieces(size)
        self.stats.record_capture(phase, size)
        log.debug("captured %s graphs at size %d", phase, size)

    def capture_all(self) -> None:
        """Eager capture: every size of every phase, largest first."""
        for phase, sizes in self.sizes.items():
            for size in sizes.largest_first():
                self.capture(phase, size)

    def _capture_pieces(self, size: int) -> list[GraphEntry]:
        cfg = self.model.cfg
        shared = {POSITIONS.name: POSITIONS.buffer(size), NUM_REAL.name: NUM_REAL.buffer(size)}
        shared.update({slot.name: slot.buffer(size) for slot in replay_input(self.replay_shape)})
        entries: list[GraphEntry] = []
        for index in range(self.model.num_pieces):
            slots = piece_inputs(index, self.model.heads * cfg.head_dim, cfg.hidden_size, self.replay_shape)
            if index > 0:  # the residual stream: the previous piece's output buffer, as it is
                shared[RESIDUAL] = entries[-1].replay.outputs[self.model.RESIDUAL_OUTPUT]
            inputs = [shared[slot.name] if slot.name in shared else slot.buffer(size) for slot in slots]
            entries.append(GraphEntry(slots, inputs, self.backend.capture(self._pieces[index], inputs)))
        return entries

    def _capture_full_decode(self, size: int) -> GraphEntry:
        cache, width = self.full_decode
        slots = full_decode_inputs(width)
        caches = [t for layer in zip(cache.keys, cache.values) for t in layer]
        slots += replay_input(self.replay_shape)
        inputs = [slot.buffer(size) for slot in slots] + [caches]
        return GraphEntry(slots, inputs, self.backend.capture(self._full_decode, inputs))

    def run_full_decode(self, ctx: ForwardContext) -> ForwardOutput:
        """Replay the whole-model decode graph at ctx.padded_size (capturing it first if new), then
        write every layer's new k/v to the cache. The output tensors are the graph's buffers."""
        size, n, cache = ctx.padded_size, ctx.num_tokens, self.full_decode[0]
        if not self.is_captured(DECODE, size):
            self.capture(DECODE, size)
        self.stats.record_replay(DECODE, size)
        tables = ctx.attention.decode
        values = (ctx.token_ids, ctx.positions, ctx.num_real, tables.slots, tables.context_lens)
        if self.replay_shape is not None:
            values += (ctx.replay_ids,)
        outputs = self._replay(self._entries[(DECODE, size)][0], values, n, set())
        layers = self.model.cfg.num_layers
        for layer in range(layers):
            k, v = outputs[1 + 2 * layer], outputs[2 + 2 * layer]
            cache.write(layer, ctx.attention.slot_mapping, k[:n], v[:n])
        flat = outputs[1 + 2 * layers:]
        routing = {layer: tuple(flat[2 * j: 2 * j + 2]) for j, layer in enumerate(self.model.cfg.moe_layers)}
        return ForwardOutput(hidden=outputs[0], routing=routing)

    def piece_fn(self, phase: str, size: int, num_tokens: int) -> PieceFn:
        """A `run_piece` for `MoEDecoder.forward` that replays the pieces captured at `size`,
        capturing them first if this size is new. Counts one replay for the step."""
        if not self.is_captured(phase, size):
            self.capture(phase, size)
        entries = self._entries[(phase, size)]
        self.stats.record_replay(phase, size)
        filled: set[int] = set()  # ids of the shared buffers this step has filled
        return lambda index, inputs: self._replay(entries[index], inputs, num_tokens, filled)

    def _replay(self, entry: GraphEntry, inputs: Tensors, num_tokens: int, filled: set[int]) -> Tensors:
        for slot, buffer, value in zip(entry.slots, entry.inputs, inputs):
            if value is buffer or id(buffer) in filled:
                continue  # chained from the previous piece, or a shared buffer already filled this step
            self._copy_in(slot, buffer, value, num_tokens)
            filled.add(id(buffer))
        outputs = entry.replay()
        if self.faults.on("graph.copy_outputs"):
            return tuple(paddle.assign(t) for t in outputs)
        return outputs

    def _copy_in(self, slot: PieceInput, buffer: paddle.Tensor, value: paddle.Tensor, num_tokens: int) -> None:
        """Real rows in, padded rows to 0; `num_real` gets the real-row count."""
        if slot.row_shape is None:
            paddle.assign(value, output=buffer)
            return
        rows = min(num_tokens, buffer.shape[0])
        buffer[:rows] = value[:rows]
        if rows < buffer.shape[0] and not self.faults.on("graph.stale_padding"):
            buffer[rows:] = 0

