"""RoutingRecorder: the per-step routing buffer and each request's table of routed expert ids.

Every step, each MoE layer's top-k ids reach the recorder as that step's outputs ([P, k] per layer,
P = the padded row count of a replay, or the real count when eager; padded rows hold -1 because the
router is told which rows are padding). The recorder places them in one static buffer
[max_tokens_per_step, moe_layers, top_k] that it owns (-1 where empty) and, after the step, copies
each segment's real rows into its request's table at the segment's token positions, so prefix,
chunked-prefill, mixed and decode steps land in the right rows. Tokens a request took from the
prefix cache never pass the router in its steps: their rows are the ones kept with the cached
blocks (engine/prefix_cache.py), written when the hit's step is recorded.

The recording is host work after the step, never a Python side effect inside a piece: a side
effect runs only when a piece is traced, so a replayed step would record nothing (the seed bug).
The recorder therefore refuses to run while the capture guard says a capture is in progress, and
counts the steps it recorded per kind (captured, replayed, eager, fallback) for the cases to check
against the graph runner's counters.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable

import numpy as np

from engine.failpoints import NO_FAULTS, Failpoints
from engine.graph.guard import CaptureGuard
from engine.graph.stats import Snapshot
from engine.routing_replay.errors import RoutingRecordError
from engine.routing_replay.table_file import ids_dtype

CAPTURED, REPLAYED, EAGER, FALLBACK = "captured", "replayed", "eager", "fallback"
STEP_KINDS = (CAPTURED, REPLAYED, EAGER, FALLBACK)


def step_kind(gained: Snapshot) -> str:
    """How a step ran, from what the graph runner's counters gained during it (`CaptureStats.since`):
    captured (it captured its size first; that step then replays too), replayed, fallback (graphs,
    but the step ran eagerly, including a replay whose sparse-MoE buckets overflowed and was run
    again eagerly: what the step's outputs came from decides) or eager (no graph runner)."""
    if sum(gained["fallbacks"].values()):
        return FALLBACK
    if sum(gained["captures"].values()):
        return CAPTURED
    if sum(gained["replays"].values()):
        return REPLAYED
    return EAGER


class RoutingRecorder:
    def __init__(self, moe_layers: tuple[int, ...], top_k: int, num_experts: int, max_tokens_per_step: int,
                 agree: Callable[[list[int], str], None] | None = None, faults: Failpoints = NO_FAULTS,
                 rank: int = 0):
        """`agree(values, what)` raises unless every rank passed the same values (the ranks'
        collectives; None on one rank)."""
        self.rank = rank
        self.num_experts = num_experts
        self.moe_layers = tuple(moe_layers)
        self.top_k = top_k
        self.dtype = ids_dtype(num_experts)
        self.buffer = np.full((max_tokens_per_step, len(self.moe_layers), top_k), -1, self.dtype)  # [T, L, k]
        self.agree = agree
        self.faults = faults
        self.steps: Counter = Counter()  # step kind -> steps recorded
        self._tables: dict[int, np.ndarray] = {}  # request id -> [capacity, L, k]
        self._lengths: dict[int, int] = {}  # request id -> rows past the last recorded position

    def record_step(self, batch, routing: dict, kind: str, guard: CaptureGuard) -> None:
        """Record one finished step. `routing`: MoE layer -> (topk_ids [P, k], ...) as the forward
        returned them (graph buffers are read here, before the next replay overwrites them)."""
        if guard.capturing:
            raise RoutingRecordError("the routing recorder was driven inside a graph capture; it must run "
                                     "on the host after the step, or replays would record nothing")
        if kind not in STEP_KINDS:
            raise RoutingRecordError(f"unknown step kind {kind!r}; expected one of {STEP_KINDS}")
        if self._skipped(kind):
            return
        rows = self._fill_buffer(routing, batch.num_tokens)
        self._check_ranks_agree(rows)
        for hit in getattr(batch, "hits", ()):  # prefix-cache hits: rows kept with the cached blocks
            self._write(hit.seq.request.request_id, 0, hit.rows)
        self._copy_rows(batch, rows)
        self.steps[kind] += 1

    def _skipped(self, kind: str) -> bool:
        """The planted bugs that lose graph steps: a recorder that only sees eager steps, and one
        that is a Python side effect of tracing (it sees eager and capturing steps, never replays)."""
        if self.faults.on("r3.skip_in_graph") and kind in (CAPTURED, REPLAYED):
            return True
        return self.faults.on("r3.trace_time_only") and kind == REPLAYED

    def _fill_buffer(self, routing: dict, num_tokens: int) -> int:
        """Copy the step's ids into the buffer; return how many rows the host keeps (the real ones)."""
        self.buffer.fill(-1)
        padded = num_tokens
        for column, layer in enumerate(self.moe_layers):
            ids = _numpy(routing[layer][0])  # [P, k]
            padded = ids.shape[0]
            if padded > self.buffer.shape[0] or padded < num_tokens:
                raise RoutingRecordError(f"layer {layer} returned {padded} rows of ids for a {num_tokens}-token "
                                         f"step (buffer holds {self.buffer.shape[0]})")
            self.buffer[:padded, column] = ids
        if self.faults.on("r3.rank_skews_ids") and self.rank == 1:
            self.buffer[:num_tokens] = (self.buffer[:num_tokens] + 1) % self.num_experts
        if (self.buffer[num_tokens:] != -1).any():
            raise RoutingRecordError(f"padded rows {num_tokens}..{padded} of the step hold expert ids; "
                                     "the router must leave them at -1")
        return padded if self.faults.on("r3.record_padding") else num_tokens

    def _check_ranks_agree(self, rows: int) -> None:
        if self.agree is not None:
            digest = zlib.crc32(self.buffer[:rows].tobytes()) & 0x7FFFFFFF
            self.agree([rows, digest], "the step's routed expert ids (rows, crc32)")

    def _copy_rows(self, batch, rows: int) -> None:
        row = 0
        for i, seg in enumerate(batch.segments):
            count = seg.num_tokens if i < len(batch.segments) - 1 else rows - row
            self._write(seg.seq.request.request_id, seg.start, self.buffer[row:row + count])
            row += count

    def _write(self, request_id: int, start: int, rows: np.ndarray) -> None:
        table = self._tables.get(request_id)
        end = start + len(rows)
        if table is None or table.shape[0] < end:
            grown = np.full((max(end, 2 * (0 if table is None else table.shape[0]), 16),) + rows.shape[1:], -1,
                            self.dtype)
            if table is not None:
                grown[:table.shape[0]] = table
            self._tables[request_id] = table = grown
        table[start:end] = rows
        self._lengths[request_id] = max(self._lengths.get(request_id, 0), end)

    def finish(self, request_id: int, num_tokens: int) -> np.ndarray:
        """Hand over (and forget) a finished request's table [num_tokens, L, k]. It must hold exactly
        `num_tokens` recorded rows (prompt + generated tokens fed back), none of them -1."""
        table = self._tables.pop(request_id, None)
        length = self._lengths.pop(request_id, 0)
        if table is None or length != num_tokens:
            raise RoutingRecordError(f"request {request_id}: {length} rows recorded, expected {num_tokens}")
        table = table[:num_tokens].copy()
        missing = np.flatnonzero((table == -1).any(axis=(1, 2)))
        if missing.size:
            raise RoutingRecordError(f"request {request_id}: {missing.size} of {num_tokens} rows never recorded "
                                     f"(first at token {missing[0]})")
        return table

    def drop_all(self) -> None:
        """Forget every unfinished request (the workload ended without them)."""
        self._tables.clear()
        self._lengths.clear()


def _numpy(ids) -> np.ndarray:
    return ids.numpy() if hasattr(ids, "numpy") else np.asarray(ids)
