"""Graph machinery on toy functions with known answers, before the real model (test_graph.py).

Capture sizes and their rounding, the capture guard, the counters, both CPU backends on
f(x, n) = 2x on the first n rows (0 below), and the graph runner splitting a two-piece toy model
at an eager op: real rows in, padded rows zero, padded rows routed to -1, outputs aliased.
"""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import boundaries, capture_size_lists, ci_examples, padded_to, token_counts

from engine.config import ConfigError, EngineConfig, GraphConfig
from engine.failpoints import NO_FAULTS, Failpoints
from engine.graph.backends import (
    GraphBackendError,
    StaticBackend,
    UncompiledBackend,
    cuda_graphs_available,
    make_backend,
)
from engine.config import default_decode_sizes, default_prefill_sizes
from engine.errors import CaptureSizeError
from engine.graph.capture_sizes import CaptureSizes
from engine.graph.guard import DECODE, EAGER, PREFILL, CaptureGuard, CaptureState
from engine.graph.protocol import PiecewiseModel, WholeStepModel, run_pieces
from engine.graph.runner import GraphRunner
from engine.graph.stats import CaptureStats

LADDER = default_prefill_sizes()
BACKENDS = (StaticBackend, UncompiledBackend)


# ---------------------------------------------------------------------------- capture sizes


# The ladder written out by hand (SGLang's shape): steps of 4 to 32, 16 to 256, 32 to 512, 128 to
# 2048, 256 to 4096, 512 to 8192.
HAND_LADDER = (tuple(range(4, 33, 4)) + tuple(range(48, 257, 16)) + tuple(range(288, 513, 32))
               + tuple(range(640, 2049, 128)) + tuple(range(2304, 4097, 256)) + tuple(range(4608, 8193, 512)))


def test_default_prefill_ladder_is_58_sizes_from_4_to_8192():
    assert len(HAND_LADDER) == 58
    assert LADDER == HAND_LADDER
    assert CaptureSizes(LADDER, 8192).largest_first() == tuple(reversed(HAND_LADDER))


@pytest.mark.parametrize("limit, want", [(3, (3,)), (4, (4,)), (100, (4, 8, 12, 16, 20, 24, 28, 32, 48, 64, 80, 96)),
                                         (512, HAND_LADDER[:30]), (8191, HAND_LADDER[:-1])])
def test_default_prefill_ladder_is_cut_at_the_token_limit(limit, want):
    assert default_prefill_sizes(limit) == want


@pytest.mark.parametrize("max_num_seqs, last_three", [(1, None), (8, (2, 4, 8)), (64, (48, 56, 64)),
                                                      (200, (176, 192, 200))])
def test_default_decode_sizes_end_at_max_num_seqs(max_num_seqs, last_three):
    sizes = default_decode_sizes(max_num_seqs)
    assert sizes[-1] == max_num_seqs and list(sizes) == sorted(set(sizes))
    assert sizes[:3] == ((1,) if max_num_seqs == 1 else (1, 2, 4))
    if last_three:
        assert sizes[-3:] == last_three


@pytest.mark.parametrize("s", LADDER)
def test_padded_size_at_every_ladder_boundary(s):
    sizes = CaptureSizes(LADDER, 8192)
    below = [x for x in LADDER if x < s]
    above = [x for x in LADDER if x > s]
    assert sizes.padded_size(s) == s
    assert sizes.padded_size(s - 1) == (below[-1] if below and below[-1] == s - 1 else s)
    assert sizes.padded_size(s + 1) == (above[0] if above else None)


@given(token_counts(LADDER, 9000))
def test_padded_size_is_the_smallest_size_not_below(n):
    assert CaptureSizes(LADDER, 8192).padded_size(n) == padded_to(LADDER, n)


@given(st.data(), capture_size_lists())
def test_padded_size_on_any_size_list(data, sizes):
    n = data.draw(token_counts(sizes, max(sizes) + 2))
    padded = CaptureSizes(sizes, 8192).padded_size(n)
    assert padded == padded_to(sizes, n)
    assert (padded is None) == (n > max(sizes))
    assert padded is None or padded >= n


@pytest.mark.parametrize("n", [0, -1])
def test_padded_size_refuses_an_empty_step(n):
    with pytest.raises(ValueError, match=rf"at least one token, got {n}$"):
        CaptureSizes((4, 8), 8).padded_size(n)


@pytest.mark.parametrize("sizes, limit, named", [
    ((), 8, "empty"),
    ((4, 0, 8), 8, "0 is not a positive integer"),
    ((-3,), 8, "-3 is not a positive integer"),
    ((2.5, 4), 8, "2.5 is not a positive integer"),
    ((True, 4), 8, "True is not a positive integer"),
    ((8, 4), 8, "8 comes before 4"),
    ((4, 4), 8, "4 comes before 4"),
    ((4, 16), 8, "largest size 16 exceeds max_num_batched_tokens=8"),
])
def test_bad_capture_sizes_are_refused_naming_the_value(sizes, limit, named):
    with pytest.raises(CaptureSizeError, match=named):
        CaptureSizes(sizes, limit, "prefill_capture_sizes")


@given(capture_size_lists(max_size=512), st.data())
def test_a_list_with_one_bad_value_is_refused_naming_it(sizes, data):
    bad = data.draw(st.sampled_from([0, -1, -512, 1.5]))
    at = data.draw(st.integers(0, len(sizes)))
    with pytest.raises(CaptureSizeError, match=f"{bad!r} is not a positive integer"):
        CaptureSizes((*sizes[:at], bad, *sizes[at:]), 512)


def test_engine_config_names_the_capture_size_field():
    with pytest.raises(ConfigError, match="decode_capture_sizes.*comes before"):
        EngineConfig(graph=GraphConfig(mode="piecewise", decode_capture_sizes=(8, 2)))
    with pytest.raises(ConfigError, match="prefill_capture_sizes.*exceeds max_num_batched_tokens=64"):
        EngineConfig(max_num_batched_tokens=64, graph=GraphConfig(mode="piecewise", prefill_capture_sizes=(128,)))


def test_boundary_helper_weights_the_edges_of_each_size():
    assert boundaries((4, 8), 100) == [3, 4, 5, 7, 8, 9]
    assert boundaries((1, 8), 8) == [1, 2, 7, 8]


# ---------------------------------------------------------------------------- capture guard


def test_guard_starts_eager():
    assert CaptureGuard().state == CaptureState(EAGER, None, False)


def test_guard_scopes_nest_and_restore():
    guard = CaptureGuard()
    with guard.scope(PREFILL, 16) as outer:
        assert guard.state is outer and not guard.capturing
        with guard.scope(PREFILL, 32, capturing=True):
            assert guard.state == CaptureState(PREFILL, 32, True) and guard.capturing
        assert guard.state is outer
    assert guard.state == CaptureState()


def test_guard_restores_after_an_exception_at_any_depth():
    guard = CaptureGuard()
    with guard.scope(DECODE, 4):
        with pytest.raises(RuntimeError), guard.scope(PREFILL, 8, True), guard.scope(PREFILL, 16, True):
            raise RuntimeError("boom")
        assert guard.state == CaptureState(DECODE, 4, False)
    assert guard.state == CaptureState()


def test_two_guards_share_no_state():
    first, second = CaptureGuard(), CaptureGuard()
    with first.scope(PREFILL, 8, capturing=True):
        assert second.state == CaptureState() and not second.capturing
        with second.scope(DECODE, 2):
            assert first.state == CaptureState(PREFILL, 8, True)
        assert second.state == CaptureState()
    assert first.state == CaptureState()


# ---------------------------------------------------------------------------- capture stats


def test_stats_count_per_phase_and_size_and_flag_recaptures():
    stats = CaptureStats()
    stats.record_capture(PREFILL, 16)
    stats.record_capture(DECODE, 4)
    stats.record_replay(PREFILL, 16)
    stats.record_replay(PREFILL, 16)
    stats.record_fallback(PREFILL, 40)
    assert stats.summary() == {"captures": 2, "replays": 2, "fallbacks": 1, "recaptures": 0}
    stats.record_capture(PREFILL, 16)
    assert stats.captures[(PREFILL, 16)] == 2 and stats.recaptures == {(PREFILL, 16): 1}
    assert stats.total("captures", DECODE) == 1 and stats.total("replays", DECODE) == 0


def test_stats_expect_passes_on_the_exact_deltas_only():
    stats = CaptureStats()
    stats.record_capture(PREFILL, 16)  # before the block: not part of any delta
    with stats.expect(captures={(DECODE, 4): 1}, replays={(DECODE, 4): 2}, fallbacks={}):
        stats.record_capture(DECODE, 4)
        stats.record_replay(DECODE, 4)
        stats.record_replay(DECODE, 4)
    with stats.expect(recaptures={}):  # kinds not given are not checked
        stats.record_replay(PREFILL, 16)


@pytest.mark.parametrize("extra, named", [
    (lambda s: s.record_replay(DECODE, 8), r"replays changed by \{\('decode', 4\): 2, \('decode', 8\): 1\}"),
    (lambda s: s.record_capture(DECODE, 4), r"recaptures changed by \{\('decode', 4\): 1\}, want \{\}"),
    (lambda s: s.record_fallback(PREFILL, 40), r"fallbacks changed by \{\('prefill', 40\): 1\}, want \{\}"),
])
def test_stats_expect_fails_naming_the_counter_that_moved(extra, named):
    stats = CaptureStats()
    with pytest.raises(AssertionError, match=named), stats.expect(
            captures={(DECODE, 4): 1}, replays={(DECODE, 4): 2}, fallbacks={}, recaptures={}):
        stats.record_capture(DECODE, 4)
        stats.record_replay(DECODE, 4)
        stats.record_replay(DECODE, 4)
        extra(stats)


def test_stats_expect_refuses_an_unknown_counter():
    with pytest.raises(TypeError, match="no counter 'capture'"), CaptureStats().expect(capture={}):
        pass


# ---------------------------------------------------------------------------- backends on f(x, n)

def doubling(calls: list | None = None):
    """f(x, n): x [T, 2] float32, n [1] int64 -> (2x on rows < n, 0 on the rest,). Each time the
    Python body runs (a trace, or an eager call) it appends to `calls`: a host side effect."""
    calls = [] if calls is None else calls

    def doubled_real_rows(x, n):
        calls.append("ran")
        real = (paddle.arange(x.shape[0], dtype="int64") < n).unsqueeze(-1)  # [T, 1]
        return (paddle.where(real, x * 2, paddle.zeros_like(x)),)

    return doubled_real_rows


def expected(x: np.ndarray, n: int) -> np.ndarray:
    out = 2 * x
    out[n:] = 0
    return out


def buffers(size: int) -> list[paddle.Tensor]:
    return [paddle.zeros([size, 2], dtype="float32"), paddle.zeros([1], dtype="int64")]


def fill(inputs: list[paddle.Tensor], x: np.ndarray, n: int) -> None:
    paddle.assign(paddle.to_tensor(x), output=inputs[0])
    paddle.assign(paddle.to_tensor([n], dtype="int64"), output=inputs[1])


# Each example captures a program (the static backend compiles it: ~35 ms); the gate draws 8, every
# other profile its full count (issue 22).
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@settings(max_examples=ci_examples(8, 1.0))
@given(st.data())
def test_replay_computes_on_the_current_buffer_contents(backend, data):
    size = data.draw(st.sampled_from([1, 3, 8, 16]))
    inputs = buffers(size)
    replay = backend().capture(doubling(), inputs)
    for _ in range(2):
        n = data.draw(st.integers(0, size))
        x = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).normal(size=(size, 2)).astype(np.float32)
        fill(inputs, x, n)
        np.testing.assert_array_equal(replay()[0].numpy(), expected(x, n))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_replay_returns_the_same_buffers_and_overwrites_them(backend):
    inputs = buffers(4)
    replay = backend().capture(doubling(), inputs)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    fill(inputs, x, 4)
    kept = replay()
    np.testing.assert_array_equal(kept[0].numpy(), expected(x, 4))
    fill(inputs, -x, 1)
    again = replay()
    assert again[0] is kept[0]
    np.testing.assert_array_equal(kept[0].numpy(), expected(-x, 1))  # the kept reference moved on


def test_static_backend_traces_once_however_often_it_replays():
    calls = []
    replay = StaticBackend().capture(doubling(calls), buffers(4))
    for _ in range(5):
        replay()
    assert calls == ["ran"]


def test_uncompiled_backend_runs_the_function_on_every_replay():
    calls = []
    replay = UncompiledBackend().capture(doubling(calls), buffers(4))
    for _ in range(5):
        replay()
    assert len(calls) == 6


@pytest.mark.skipif(cuda_graphs_available(), reason="this build has CUDA graphs")
def test_cudagraph_backend_is_refused_clearly_on_a_cpu_build():
    with pytest.raises(GraphBackendError, match="'cudagraph' needs a CUDA build.*'static' or 'auto'"):
        make_backend("cudagraph")
    assert make_backend("auto").name == "static"


def test_unknown_backend_is_refused_naming_it():
    with pytest.raises(GraphBackendError, match="'tensorrt' is not one of"):
        make_backend("tensorrt")
    assert make_backend("uncompiled").name == "uncompiled" and make_backend("static").name == "static"


# ---------------------------------------------------------------------------- graph runner on a toy model


class ToyModel:
    """Two pieces split at an eager op, declared through `engine/graph/protocol.py` as the real
    decoder is (one hidden unit per token).

    piece 0: tokens -> (attn_in = 2 * token, residual = position); eager op: attn_out = attn_in + 1
    on real rows only; piece 1 -> (hidden = attn_out + residual, route = row index on real rows and
    -1 on padding rows). So with a padded size P and n real rows the answer is known: rows < n hold
    2 * token + 1 + position, rows >= n hold 0 and route to -1. Records the guard state whenever a
    piece body runs."""

    num_pieces = 2
    step_inputs = ("token_ids", "positions", "num_real")

    def __init__(self, guard: CaptureGuard):
        self.guard = guard
        self.seen: list[CaptureState] = []

    def piece_inputs(self, index):
        shared = (("positions", "int64", ()), ("num_real", "int64", None))
        if index == 0:
            return (("token_ids", "int64", ()), *shared)
        return (("attn_out", "float32", (1,)), ("residual", "float32", (1,)), *shared)

    def piece_outputs(self, index):
        return ("attn_in", "residual") if index == 0 else ("hidden", "route")

    def with_weights(self, convert, index):
        return self  # no weights to turn into program parameters

    def piece(self, index, inputs):
        self.seen.append(self.guard.state)
        if index == 0:
            return {"attn_in": inputs["token_ids"].astype("float32").unsqueeze(-1) * 2,
                    "residual": inputs["positions"].astype("float32").unsqueeze(-1)}
        rows = paddle.arange(inputs["attn_out"].shape[0], dtype="int64")
        return {"hidden": inputs["attn_out"] + inputs["residual"],
                "route": paddle.where(rows < inputs["num_real"], rows, paddle.full_like(rows, -1))}


def toy_runner(backend=StaticBackend, faults: Failpoints = NO_FAULTS, sizes=(4, 8)):
    guard = CaptureGuard()
    model = ToyModel(guard)
    runner = GraphRunner(model, backend(), {PREFILL: CaptureSizes(sizes, max(sizes))}, guard, CaptureStats(),
                         faults)
    return model, runner


def toy_inputs(tokens: list[int]):
    """The step's inputs and the toy's eager op between its pieces (it sees real rows only)."""
    n = len(tokens)
    step = {"token_ids": paddle.to_tensor(tokens, dtype="int64"), "positions": paddle.arange(n, dtype="int64"),
            "num_real": paddle.to_tensor([n], dtype="int64")}

    def attend(layer, outputs):
        return {"attn_out": outputs["attn_in"][:n] + 1}

    return step, attend


def toy_step(runner: GraphRunner, tokens: list[int]):
    """One step through the split toy model, as `ModelRunner.forward` drives a replay."""
    size = runner.padded_size(PREFILL, len(tokens))
    step, attend = toy_inputs(tokens)
    with runner.guard.scope(PREFILL, size):
        last = runner.run_pieces(PREFILL, size, len(tokens), step, attend)[-1]
    return last["hidden"], last["route"]


def toy_answer(tokens: list[int], size: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(tokens)
    hidden = np.zeros((size, 1), np.float32)
    hidden[:n, 0] = 2 * np.asarray(tokens) + 1 + np.arange(n)
    return hidden, np.where(np.arange(size) < n, np.arange(size), -1)


@pytest.fixture(scope="module")
def shared_toy_runners(faults):
    """One toy runner per backend for a whole property (its buffers carry over between examples),
    with the run's `--failpoints` planted."""
    return {backend: toy_runner(backend, faults)[1] for backend in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@given(st.lists(st.lists(st.integers(0, 100), min_size=1, max_size=8), min_size=1, max_size=4))
def test_toy_steps_pad_and_route_padding_to_minus_one(shared_toy_runners, backend, steps):
    """Steps of any length in any order: real rows exact, padded rows 0 and routed to -1, even
    right after a longer step filled those rows."""
    runner = shared_toy_runners[backend]
    for tokens in steps:
        size = padded_to((4, 8), len(tokens))
        hidden, route = toy_step(runner, tokens)
        want_hidden, want_route = toy_answer(tokens, size)
        np.testing.assert_array_equal(hidden.numpy(), want_hidden)
        np.testing.assert_array_equal(route.numpy(), want_route)


def test_the_eager_toy_runs_the_same_loop_with_no_padding():
    """`run_pieces` with the pieces called directly is the eager path: real rows only, known answer."""
    model = ToyModel(CaptureGuard())
    assert isinstance(model, PiecewiseModel) and not isinstance(model, WholeStepModel)
    tokens = [5, 0, 7]
    step, attend = toy_inputs(tokens)
    last = run_pieces(model.num_pieces, model.piece, attend, step)[-1]
    np.testing.assert_array_equal(last["hidden"].numpy(), toy_answer(tokens, 3)[0])
    np.testing.assert_array_equal(last["route"].numpy(), [0, 1, 2])
    assert model.seen == [CaptureState()] * 2


def test_toy_runner_captures_each_size_once_then_replays(faults):
    model, runner = toy_runner(faults=faults)
    with runner.stats.expect(captures={(PREFILL, 4): 1, (PREFILL, 8): 1}, replays={(PREFILL, 4): 3, (PREFILL, 8): 2},
                             fallbacks={}, recaptures={}):
        for tokens in ([1, 2, 3], [4], [5, 6, 7, 8, 9], [1, 2], [3] * 8):
            toy_step(runner, tokens)
    # Static: piece bodies ran only while tracing, each under a capturing scope of its size.
    assert model.seen == [CaptureState(PREFILL, 4, True)] * 2 + [CaptureState(PREFILL, 8, True)] * 2
    assert runner.guard.state == CaptureState()
    with runner.stats.expect(captures={(PREFILL, 4): 1}, recaptures={(PREFILL, 4): 1}, replays={}):
        runner.capture(PREFILL, 4)


def test_toy_runner_hands_out_its_output_buffers(faults):
    _, runner = toy_runner(faults=faults)
    kept = toy_step(runner, [1, 2, 3])
    latest = toy_step(runner, [7, 7])
    assert kept[0] is latest[0] and kept[1] is latest[1]
    np.testing.assert_array_equal(kept[0].numpy(), toy_answer([7, 7], 4)[0])


# The planted graph faults on the toy model: each breaks one of the properties above.


def test_toy_round_down_pads_below_the_step():
    _, runner = toy_runner(faults=Failpoints(frozenset({"graph.round_down"})))
    assert runner.padded_size(PREFILL, 6) == 4  # the correct answer is 8


def test_toy_stale_padding_leaks_the_previous_step():
    _, runner = toy_runner(faults=Failpoints(frozenset({"graph.stale_padding"})))
    toy_step(runner, [9, 9, 9, 9])
    hidden, route = toy_step(runner, [1])
    assert hidden.numpy()[1:].any()  # the longer step's rows are still there
    np.testing.assert_array_equal(route.numpy(), [0, -1, -1, -1])  # num_real still routes them away


def test_toy_copied_outputs_break_the_buffer_contract():
    _, runner = toy_runner(faults=Failpoints(frozenset({"graph.copy_outputs"})))
    kept = toy_step(runner, [1, 2, 3])
    latest = toy_step(runner, [7, 7])
    assert kept[0] is not latest[0]
    np.testing.assert_array_equal(kept[0].numpy(), toy_answer([1, 2, 3], 4)[0])
