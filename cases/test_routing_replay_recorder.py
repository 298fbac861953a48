"""The recorder alone, on synthetic steps: rows land at their token positions whatever the step's
kind and padding, padded rows are never recorded, the guard contract holds, and the planted
recorder faults are caught.

The "model" here returns ids that are a known function of (request, position, layer, slot), so the
expected table is computed independently of the recorder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.failpoints import Failpoints
from engine.graph.guard import PREFILL, CaptureGuard
from engine.graph.stats import CaptureStats
from engine.routing_replay.errors import RoutingRecordError
from engine.routing_replay.recorder import CAPTURED, EAGER, FALLBACK, REPLAYED, STEP_KINDS, RoutingRecorder, step_kind

LAYERS, TOP_K, EXPERTS, MAX_STEP = (0, 2, 3), 2, 16, 48


@dataclass(frozen=True)
class _Req:
    request_id: int


@dataclass(frozen=True)
class _Seq:
    request: _Req


@dataclass(frozen=True)
class _Seg:
    seq: _Seq
    start: int
    num_tokens: int


@dataclass(frozen=True)
class _Batch:
    segments: tuple[_Seg, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments)


def expected_ids(request: int, position: int) -> np.ndarray:
    """[L, k]: the ids the fake model routes this token to (distinct per row, in [0, EXPERTS))."""
    base = (request * 7 + position * 3) % EXPERTS
    return np.array([[(base + 5 * col + j) % EXPERTS for j in range(TOP_K)] for col in range(len(LAYERS))])


def model_outputs(batch: _Batch, padded: int) -> dict:
    """What a forward returns: per MoE layer [padded, k] ids, padded rows -1."""
    rows = [expected_ids(s.seq.request.request_id, s.start + t) for s in batch.segments for t in range(s.num_tokens)]
    ids = np.full((padded, len(LAYERS), TOP_K), -1, np.int64)
    ids[: len(rows)] = rows
    return {layer: (ids[:, col], None) for col, layer in enumerate(LAYERS)}


def batch(*segments: tuple[int, int, int]) -> _Batch:
    return _Batch(tuple(_Seg(_Seq(_Req(r)), start, n) for r, start, n in segments))


def recorder(faults: Failpoints, extra: str = "") -> RoutingRecorder:
    """A recorder with the run's planted faults (`--failpoints`) and `extra` ones."""
    return RoutingRecorder(LAYERS, TOP_K, EXPERTS, MAX_STEP, faults=Failpoints(faults.active | {extra} - {""}))


def run(rec: RoutingRecorder, steps, guard: CaptureGuard | None = None) -> None:
    """steps: (batch, padded rows, kind)."""
    for b, padded, kind in steps:
        rec.record_step(b, model_outputs(b, padded), kind, guard or CaptureGuard())


def expected_table(request: int, tokens: int) -> np.ndarray:
    return np.stack([expected_ids(request, p) for p in range(tokens)])


# A workload with a cached-prefix chunk, a mixed step, decodes, a capture, a replay and a fallback:
# request 0 has 10 prompt tokens (chunks 6 + 4) and 2 decodes; request 1 has 3 prompt tokens, 1 decode.
WORKLOAD = [
    (batch((0, 0, 6)), 8, CAPTURED),
    (batch((0, 6, 4), (1, 0, 3)), 8, REPLAYED),
    (batch((0, 10, 1), (1, 3, 1)), 4, REPLAYED),
    (batch((0, 11, 1)), 1, FALLBACK),
]


def test_rows_land_at_their_positions(faults):
    rec = recorder(faults)
    run(rec, WORKLOAD)
    assert np.array_equal(rec.finish(0, 12), expected_table(0, 12))
    assert np.array_equal(rec.finish(1, 4), expected_table(1, 4))
    assert rec.steps == {CAPTURED: 1, REPLAYED: 2, FALLBACK: 1}


def test_table_dtype_is_the_smallest_holding_the_experts(faults):
    rec = recorder(faults)
    run(rec, WORKLOAD[:1])
    assert rec.finish(0, 6).dtype == np.int8


@st.composite
def workloads(draw):
    """Requests of drawn lengths fed in drawn chunks, several per step, each step padded to a
    drawn size (or not: eager/fallback), in drawn kinds."""
    remaining = dict(enumerate(draw(st.lists(st.integers(1, 30), min_size=1, max_size=5))))
    lengths, done, steps = dict(remaining), dict.fromkeys(remaining, 0), []
    while any(remaining.values()):
        segs, budget = [], draw(st.integers(1, 40))
        for r in [r for r in remaining if remaining[r]]:
            n = min(remaining[r], budget - sum(s[2] for s in segs))
            if n <= 0 or not draw(st.booleans()) and segs:
                continue
            n = draw(st.integers(1, n))
            segs.append((r, done[r], n))
            done[r] += n
            remaining[r] -= n
        if not segs:
            continue
        b = batch(*segs)
        kind = draw(st.sampled_from(STEP_KINDS))
        padded = b.num_tokens if kind in (EAGER, FALLBACK) else draw(st.integers(b.num_tokens, MAX_STEP))
        steps.append((b, padded, kind))
    return lengths, steps


@given(workload=workloads())
def test_drawn_workloads_record_the_model_routing(faults, workload):
    lengths, steps = workload
    rec = recorder(faults)
    run(rec, steps)
    for request, tokens in lengths.items():
        assert np.array_equal(rec.finish(request, tokens), expected_table(request, tokens))


def test_refuses_to_run_inside_a_capture(faults):
    guard = CaptureGuard()
    with guard.scope(PREFILL, 8, capturing=True), pytest.raises(RoutingRecordError, match="inside a graph capture"):
        run(recorder(faults), WORKLOAD[:1], guard)


def test_replayed_steps_outside_capture_are_recorded(faults):
    """Inside a replay scope (not capturing) a replayed step is recorded like any other."""
    guard = CaptureGuard()
    rec = recorder(faults)
    with guard.scope(PREFILL, 8):
        rec.record_step(WORKLOAD[1][0], model_outputs(WORKLOAD[1][0], 8), REPLAYED, guard)
    assert rec.steps[REPLAYED] == 1
    assert np.array_equal(rec.finish(1, 3), expected_table(1, 3))


def test_padded_rows_holding_ids_are_refused(faults):
    b = batch((0, 0, 3))
    outputs = model_outputs(b, 8)
    outputs[LAYERS[1]][0][5] = 3  # a padded row routed to a real expert
    with pytest.raises(RoutingRecordError, match="padded rows 3..8"):
        recorder(faults).record_step(b, outputs, REPLAYED, CaptureGuard())


def kind_of(*events) -> str:
    """The step kind of a step during which the graph runner's counters saw `events`."""
    stats = CaptureStats()
    stats.record_capture(PREFILL, 8)  # an earlier step's capture: not this step's
    before = stats.snapshot()
    for event in events:
        getattr(stats, f"record_{event}")(PREFILL, 8)
    return step_kind(stats.since(before))


def test_step_kind_reads_the_capture_counters():
    assert [kind_of(), kind_of("fallback"), kind_of("capture", "replay"), kind_of("replay"),
            kind_of("replay", "fallback")] == [EAGER, FALLBACK, CAPTURED, REPLAYED, FALLBACK]  # last: an overflow re-run


def test_dropped_request_leaves_nothing(faults):
    rec = recorder(faults)
    run(rec, WORKLOAD[:1])
    rec.drop_all()
    with pytest.raises(RoutingRecordError, match="0 rows recorded"):
        rec.finish(0, 6)


def test_ranks_are_asked_to_agree_on_each_step():
    seen = []
    rec = RoutingRecorder(LAYERS, TOP_K, EXPERTS, MAX_STEP, agree=lambda values, what: seen.append(values))
    run(rec, WORKLOAD)
    assert len(seen) == len(WORKLOAD) and seen[0][0] == 6 and seen[1][0] == 7


def test_ranks_that_saw_the_same_routing_send_the_same_check(faults):
    """Each rank's recorder (with the run's planted faults) on the same steps: what every rank hands
    to the cross-rank check must be equal, step by step, or a sound job would fail."""
    sent: dict[int, list] = {0: [], 1: []}
    for rank, values in sent.items():
        rec = RoutingRecorder(LAYERS, TOP_K, EXPERTS, MAX_STEP, agree=lambda v, what, out=values: out.append(v),
                              faults=faults, rank=rank)
        run(rec, WORKLOAD)
    assert len(sent[0]) == len(WORKLOAD) and sent[0] == sent[1]


@pytest.mark.parametrize("fault", ["r3.skip_in_graph", "r3.trace_time_only", "r3.record_padding"])
def test_planted_recorder_faults_are_caught(fault, faults):
    """Each fault loses or corrupts rows of the WORKLOAD; `finish` (or the step) must fail, or the
    table must differ from the model's routing."""
    rec = recorder(faults, fault)
    try:
        run(rec, WORKLOAD)
        tables = [rec.finish(0, 12), rec.finish(1, 4)]
    except RoutingRecordError:
        return
    assert not (np.array_equal(tables[0], expected_table(0, 12)) and np.array_equal(tables[1], expected_table(1, 4)))
