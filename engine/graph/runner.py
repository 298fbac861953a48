"""GraphRunner: captured graphs per (phase, padded size), their static buffers, and replay.

For every capture size the runner holds, per piece, the input buffers the piece was captured
with and a replay. Running a step copies each piece's real rows into its buffers, sets the padded
rows to 0 (`num_real` tells the router which rows are padding), and replays. What a replay returns
are the backend's output buffers: the next replay of that piece and size overwrites them.

Buffers are shared where the data is (engine/graph/protocol.py says how names decide it): the
pieces of one size read one buffer per step input (positions, the real-row count), filled once a
step, and piece i + 1 is captured reading piece i's output buffer of the same name (the residual
stream), which so never leaves the graphs' memory, as in vLLM's piecewise runner. Its padded rows
are then whatever piece i computed from its own (defined) padded rows.

With a whole-step decode graph (mode full_and_piecewise), a decode-only step replays one graph of
the whole stack instead of the pieces; it reads the KV cache in place and returns each layer's new
k/v, which the caller writes to the cache after the replay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import paddle

from engine.failpoints import NO_FAULTS, Failpoints
from engine.graph.backends import GraphBackend, Replay
from engine.graph.capture_sizes import CaptureSizes
from engine.graph.guard import DECODE, CaptureGuard
from engine.graph.pieces import piece_program, whole_step_layout, whole_step_program
from engine.graph.protocol import Attention, Named, PiecewiseModel, TensorSpec, input_specs, run_pieces
from engine.graph.stats import CaptureStats
from engine.kv_cache import KVCache

log = logging.getLogger(__name__)

Watch = Callable[[str, str], AbstractContextManager]


@dataclass(frozen=True)
class GraphEntry:
    """One function captured at one size: its input specs and buffers (same order), its replay and
    the name of each replay output."""

    specs: tuple[TensorSpec, ...]
    buffers: list[paddle.Tensor]
    replay: Replay
    output_names: tuple
    label: str = ""  # "piece 3 at size 16": how the collective watchdog names its replays

    def output(self, name) -> paddle.Tensor:
        return self.replay.outputs[self.output_names.index(name)]


@dataclass(frozen=True)
class WholeStep:
    """What a whole-step decode graph reads besides its inputs: the cache (in place) and the width of
    each row's slot table."""

    cache: KVCache
    table_width: int


class GraphRunner:
    def __init__(self, model: PiecewiseModel, backend: GraphBackend, sizes: dict[str, CaptureSizes],
                 guard: CaptureGuard, stats: CaptureStats, faults: Failpoints = NO_FAULTS,
                 whole_step: WholeStep | None = None, watch: Watch | None = None):
        """`whole_step`: capture decode steps as one whole-step graph; None captures them piecewise
        like prefill. `watch(kind, what)`: a context manager that bounds each capture and replay (the
        collective watchdog's, engine/distributed.py: inside a program the collectives are program
        ops, so the bound covers the whole call); None: unbounded."""
        self.model = model
        self.whole_step = whole_step
        self.backend = backend
        self.sizes = sizes  # phase -> capture sizes
        self.guard = guard
        self.stats = stats
        self.faults = faults
        self.watch = watch or _unbounded
        self._entries: dict[tuple[str, int], list[GraphEntry]] = {}
        # One function object per piece, reused for every size (the static backend compiles per function).
        self._pieces = [piece_program(model, i) for i in range(model.num_pieces)]
        self._whole = whole_step_program(model, whole_step.table_width) if whole_step else None

    def padded_size(self, phase: str, num_tokens: int) -> int | None:
        """The capture size a step of `num_tokens` replays, or None when it must run eagerly."""
        sizes = self.sizes[phase]
        if self.faults.on("graph.round_down"):
            fitting = [s for s in sizes.sizes if s <= num_tokens]
            return fitting[-1] if fitting else sizes.sizes[0]
        return sizes.padded_size(num_tokens)

    def is_captured(self, phase: str, size: int) -> bool:
        return (phase, size) in self._entries

    def replays_whole_step(self, phase: str) -> bool:
        return phase == DECODE and self.whole_step is not None

    def capture(self, phase: str, size: int) -> None:
        """Capture every piece at `size` (again, if it was captured before: counted as a recapture)."""
        with self.guard.scope(phase, size, capturing=True):
            if self.replays_whole_step(phase):
                self._entries[(phase, size)] = [self._capture_whole_step(size)]
            else:
                self._entries[(phase, size)] = self._capture_pieces(size)
        self.stats.record_capture(phase, size)
        log.debug("captured %s graphs at size %d", phase, size)

    def capture_all(self) -> None:
        """Eager capture: every size of every phase, largest first. Logs a progress line per size
        at INFO (a whole ladder takes tens of seconds; the CLI shows these lines)."""
        todo = [(phase, size) for phase, sizes in self.sizes.items() for size in sizes.largest_first()]
        start = time.perf_counter()
        for done, (phase, size) in enumerate(todo, start=1):
            self.capture(phase, size)
            log.info("captured %s size %d (%d/%d sizes, %.1f s)", phase, size, done, len(todo),
                     time.perf_counter() - start)

    def _capture_pieces(self, size: int) -> list[GraphEntry]:
        step = {name: None for name in self.model.step_inputs}  # one buffer per step input, made on first use
        entries: list[GraphEntry] = []
        for index in range(self.model.num_pieces):
            chained = dict(zip(entries[-1].output_names, entries[-1].replay.outputs)) if entries else {}
            specs = input_specs(self.model, index)
            buffers = [self._buffer(spec, size, step, chained) for spec in specs]
            label = f"piece {index} at size {size}"
            with self.watch("capture", label):
                replay = self.backend.capture(self._pieces[index], [buffers])
            entries.append(GraphEntry(specs, buffers, replay, self.model.piece_outputs(index), label))
        return entries

    @staticmethod
    def _buffer(spec: TensorSpec, size: int, step: dict, chained: Named) -> paddle.Tensor:
        """The previous piece's output of this name, as it is; else the size's buffer of a step
        input; else a buffer of the piece's own."""
        if spec.name in chained:
            return chained[spec.name]
        if spec.name not in step:
            return spec.buffer(size)
        if step[spec.name] is None:
            step[spec.name] = spec.buffer(size)
        return step[spec.name]

    def _capture_whole_step(self, size: int) -> GraphEntry:
        cache, width = self.whole_step.cache, self.whole_step.table_width
        specs = tuple(TensorSpec(*spec) for spec in self.model.whole_step_inputs(width))
        buffers = [spec.buffer(size) for spec in specs]
        label = f"the whole-step decode graph at size {size}"
        with self.watch("capture", label):
            replay = self.backend.capture(self._whole, [buffers, cache.keys, cache.values])
        return GraphEntry(specs, buffers, replay, tuple(whole_step_layout(self.model)), label)

    def _entries_for(self, phase: str, size: int) -> list[GraphEntry]:
        """The entries captured at (phase, size), capturing them first if new; counts one replay."""
        if not self.is_captured(phase, size):
            self.capture(phase, size)
        self.stats.record_replay(phase, size)
        return self._entries[(phase, size)]

    def run_pieces(self, phase: str, size: int, num_tokens: int, step: Named, attend: Attention) -> list[Named]:
        """One step through the pieces captured at `size` (capturing them first if new), with the
        model's eager `attend` between them. Returns every piece's outputs: the graphs' buffers,
        overwritten by the next replay of this size."""
        entries = self._entries_for(phase, size)
        filled: set[int] = set()  # ids of the shared buffers this step has filled

        def replay(index: int, inputs: Named) -> Named:
            return self._replay(entries[index], inputs, num_tokens, filled)

        return run_pieces(len(entries), replay, attend, step)

    def run_whole_step(self, size: int, num_tokens: int, step: Named) -> list[Named]:
        """Replay the whole-step decode graph at `size` (capturing it first if new). Returns each
        piece's kept outputs (`whole_step_outputs`), the graph's buffers; the caller writes the new
        k/v to the cache."""
        entry = self._entries_for(DECODE, size)[0]
        outputs = self._replay(entry, step, num_tokens, set())
        per_piece: list[Named] = [{} for _ in range(self.model.num_pieces)]
        for (index, name), tensor in outputs.items():
            per_piece[index][name] = tensor
        return per_piece

    def _replay(self, entry: GraphEntry, inputs: Named, num_tokens: int, filled: set[int]) -> dict:
        for spec, buffer in zip(entry.specs, entry.buffers):
            value = inputs[spec.name]
            if value is buffer or id(buffer) in filled:
                continue  # chained from the previous piece, or a shared buffer already filled this step
            if spec.name == "positions" and self.faults.on("graph.stale_positions"):
                continue
            self._copy_in(spec, buffer, value, num_tokens)
            filled.add(id(buffer))
        with self.watch("replay", entry.label):
            outputs = entry.replay()
        if self.faults.on("graph.copy_outputs"):
            outputs = tuple(paddle.assign(t) for t in outputs)
        return dict(zip(entry.output_names, outputs))

    def _copy_in(self, spec: TensorSpec, buffer: paddle.Tensor, value: paddle.Tensor, num_tokens: int) -> None:
        """Real rows in, padded rows to 0; `num_real` gets the real-row count."""
        if spec.row_shape is None:
            paddle.assign(value, output=buffer)
            return
        rows = min(num_tokens, buffer.shape[0])
        buffer[:rows] = value[:rows]
        if rows < buffer.shape[0] and not self.faults.on("graph.stale_padding"):
            buffer[rows:] = 0


def _unbounded(kind: str, what: str) -> AbstractContextManager:
    return nullcontext()
