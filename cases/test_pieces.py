"""How pieces become programs: the contracts the fast capture path relies on.

The static backend traces each piece as plain Python and turns into program parameters only the
weights `MoEDecoder.with_weights` hands it; a weight the piece reads but the view leaves out would
reach a static op as an eager tensor. The backend keeps one `to_static` per function for every
size, and the graph runner chains the residual buffer from piece to piece and shares one
`positions` / `num_real` buffer per size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import traceback
from itertools import pairwise

import numpy as np
import paddle
import pytest

from engine.checkpoint.loader import load_weights
from engine.graph import paddle_compat
from engine.graph.backends import StaticBackend
from engine.graph.capture_sizes import CaptureSizes
from engine.graph.guard import PREFILL, CaptureGuard
from engine.graph.paddle_compat import short_op_callstacks
from engine.graph.protocol import Named, PiecewiseModel, WholeStepModel, input_specs
from engine.graph.runner import GraphRunner
from engine.graph.stats import CaptureStats
from engine.hf_config import read_model_config
from engine.models.moe_decoder import MoEDecoder
from fixtures.pytest_fixtures import CHECKPOINT_NAMES, checkpoint_dir

NAMES = [pytest.param(name, id=name) for name in CHECKPOINT_NAMES]


def decoder(name: str) -> MoEDecoder:
    cfg = read_model_config(checkpoint_dir(name))
    return MoEDecoder(cfg, load_weights(checkpoint_dir(name), cfg))


def piece_values(model: MoEDecoder, index: int, size: int = 12, real: int = 9) -> Named:
    rng = np.random.default_rng(index)
    values = {}
    for spec in input_specs(model, index):
        if spec.name == "num_real":
            values[spec.name] = paddle.to_tensor([real], dtype="int64")
        elif spec.name == "token_ids":
            values[spec.name] = paddle.to_tensor(rng.integers(0, model.cfg.vocab_size, size), dtype="int64")
        elif spec.name == "positions":
            values[spec.name] = paddle.arange(size, dtype="int64")
        else:
            values[spec.name] = paddle.to_tensor(rng.standard_normal((size, *spec.row_shape)).astype("float32"))
    return values


@pytest.mark.parametrize("name", NAMES)
def test_the_decoder_declares_the_graph_protocol_by_name(name):
    """The decoder implements engine/graph/protocol.py (structurally: it imports nothing from graph),
    and each piece returns exactly the names it declares."""
    model = decoder(name)
    assert isinstance(model, PiecewiseModel) and isinstance(model, WholeStepModel)
    for index in range(model.num_pieces):
        assert tuple(model.piece(index, piece_values(model, index))) == model.piece_outputs(index)
    assert set(model.step_inputs) <= {spec.name for spec in input_specs(model, 0)}


def test_paddle_compat_names_both_versions_when_paddle_moves():
    assert paddle_compat.check_version(paddle_compat.WRITTEN_FOR) is None
    with pytest.warns(RuntimeWarning, match=r"written against PaddlePaddle 3\.3\.1, this is 9\.0\.0"):
        paddle_compat.check_version("9.0.0")


def model_tensors(obj, found: dict[int, paddle.Tensor] | None = None) -> dict[int, paddle.Tensor]:
    """Every tensor reachable from the model's attributes (through dataclasses, lists, tuples and
    dicts), found by walking them, independently of the field lists the model's views use."""
    found = {} if found is None else found
    if isinstance(obj, paddle.Tensor):
        found[id(obj)] = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            model_tensors(getattr(obj, field.name), found)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            model_tensors(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            model_tensors(item, found)
    elif isinstance(obj, MoEDecoder):
        model_tensors(vars(obj), found)
    return found


@contextlib.contextmanager
def poisoned(tensors: list[paddle.Tensor]):
    """These tensors hold NaN inside the block (in place), their values again after it."""
    saved = [t.numpy().copy() for t in tensors]
    try:
        for t, values in zip(tensors, saved):
            t.set_value(np.full_like(values, np.nan))
        yield
    finally:
        for t, values in zip(tensors, saved):
            t.set_value(values)


@pytest.mark.parametrize("name", NAMES)
def test_each_piece_reads_only_the_weights_its_view_converts(name):
    """Every tensor of the model that piece i's view leaves unconverted is poisoned with NaN: the
    piece's outputs must not change, so nothing it reads escaped the conversion (in a trace that
    would be an eager tensor inside a static program). The poisoned set comes from walking the
    model's attributes, not from the view's own field lists, so a weight those lists forget is
    poisoned too."""
    model = decoder(name)
    every = model_tensors(model)
    for index in range(model.num_pieces):
        converted: set[int] = set()

        def mark(tensor: paddle.Tensor, seen: set[int] = converted) -> paddle.Tensor:
            seen.add(id(tensor))
            return tensor

        model.with_weights(mark, index)
        assert converted, f"piece {index}: the view converted no weights"
        inputs = piece_values(model, index)
        expected = {k: v.numpy() for k, v in model.piece(index, inputs).items()}
        with poisoned([t for key, t in every.items() if key not in converted]):
            got = model.piece(index, inputs)
        assert list(got) == list(expected) == list(model.piece_outputs(index))
        for out, values in expected.items():
            np.testing.assert_array_equal(got[out].numpy(), values,
                                          err_msg=f"piece {index} output {out} read a weight its view did not convert")


def test_the_poison_check_can_fail():
    """The check above is not vacuous: poisoning a weight the piece does read changes its output."""
    model = decoder("glm4_moe")
    poisoned = model.with_weights(lambda t: paddle.full_like(t, float("nan")), 1)
    out = poisoned.piece(1, piece_values(model, 1))
    assert np.isnan(out["q"].numpy()).any()


def doubling(x, n):
    rows = paddle.arange(x.shape[0], dtype="int64").unsqueeze(-1)
    return (paddle.where(rows < n, x * 2, paddle.zeros_like(x)),)


def test_static_backend_compiles_a_function_once_and_a_program_per_size():
    backend = StaticBackend()
    replays = {}
    for size in (8, 4):
        x, n = paddle.arange(size, dtype="float32").unsqueeze(-1), paddle.to_tensor([3], dtype="int64")
        replays[size] = (backend.capture(doubling, [x, n]), x)
    assert list(backend._compiled) == [doubling]
    compiled = backend._compiled[doubling]
    programs = {size: compiled.get_concrete_program(x, paddle.to_tensor([3], dtype="int64"), is_train=False)[0]
                for size, (_, x) in replays.items()}
    assert programs[8] is not programs[4]
    for size, (replay, x) in replays.items():
        expected = np.where(np.arange(size) < 3, 2 * np.arange(size), 0).astype("float32")
        np.testing.assert_array_equal(replay()[0].numpy()[:, 0], expected)


def test_pieces_of_a_size_chain_the_residual_and_share_positions():
    model = decoder("glm4_moe")
    guard = CaptureGuard()
    runner = GraphRunner(model, StaticBackend(), {PREFILL: CaptureSizes((8,), 8)}, guard, CaptureStats())
    runner.capture(PREFILL, 8)
    entries = runner._entries[(PREFILL, 8)]
    for before, after in pairwise(entries):
        names = [spec.name for spec in after.specs]
        assert after.buffers[names.index("residual")] is before.output("residual")
    for name in ("positions", "num_real"):
        buffers = {id(e.buffers[[s.name for s in e.specs].index(name)]) for e in entries}
        assert len(buffers) == 1, f"{name}: one buffer per size, found {len(buffers)}"
    attn = {id(e.buffers[[s.name for s in e.specs].index("attn_out")]) for e in entries[1:]}
    assert len(attn) == len(entries) - 1, "each piece fills its own attention-output buffer"


def testshort_op_callstacks_restores_traceback_even_on_error():
    original = traceback.extract_stack
    with pytest.raises(RuntimeError), short_op_callstacks(depth=3):
        stack = traceback.extract_stack()
        assert len(stack) == 3 and stack[-1].name == "testshort_op_callstacks_restores_traceback_even_on_error"
        raise RuntimeError("boom")
    assert traceback.extract_stack is original


def testshort_op_callstacks_start_at_the_caller_of_paddle():
    """Frames inside Paddle's package are skipped: the innermost frame kept is the line that called Paddle."""
    inside_paddle = {}
    exec(compile("import traceback\ndef api():\n    return traceback.extract_stack()\n",
                 os.path.join(os.path.dirname(paddle.__file__), "fake_api.py"), "exec"), inside_paddle)
    with short_op_callstacks(depth=2):
        stack = inside_paddle["api"]()
    assert len(stack) == 2 and stack[-1].name == "testshort_op_callstacks_start_at_the_caller_of_paddle"
