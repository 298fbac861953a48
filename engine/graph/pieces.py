"""The functions a graph backend captures: one per piece, and one for a whole decode step.

`piece_program(model, i)` is piece i as a function of one list of tensors (its inputs, in the
order `model.piece_inputs(i)` names them) returning a tuple (its outputs, in the order
`model.piece_outputs(i)` names them): the positional form the backends capture, made once per piece
and reused for every capture size (the static backend keeps one `to_static` per function object and
builds one fixed-shape program per size from it). `whole_step_program` is the same for the whole
stack of a decode-only step, the fixed-shape attention included, reading the KV cache in place.

The functions handed to the backends are marked not_to_static, as the bodies they call are. A new
closure is made per piece per runner and to_static's AST converter caches by function object, so
each engine's capture re-read this module's source (inspect.getsource tokenises the whole file),
rewrote the AST, wrote and imported a temporary module, about 7 ms of CPU a piece (more for the
first), to produce the same ops: the closures only call unconverted code.
"""

from __future__ import annotations

from collections.abc import Callable

import paddle

from engine.graph.paddle_compat import convert_load
from engine.graph.protocol import Named, PiecewiseModel, WholeStepModel, run_pieces

Tensors = tuple[paddle.Tensor, ...]


def piece_program(model: PiecewiseModel, index: int) -> Callable[[list], Tensors]:
    """Piece `index` as a function of its input list."""
    names = tuple(spec[0] for spec in model.piece_inputs(index))
    outputs = model.piece_outputs(index)

    @paddle.jit.not_to_static  # see the module docstring
    def piece(inputs: list) -> Tensors:
        return _trace_piece(model, index, dict(zip(names, inputs)), outputs)

    return piece


def whole_step_program(model: WholeStepModel, table_width: int) -> Callable[[list, list, list], Tensors]:
    """A decode-only step as one function of (its input list, the cache's key tensors, its value
    tensors), one per layer. Outputs: `model.whole_step_outputs(i)` of every piece i, in piece order."""
    names = tuple(spec[0] for spec in model.whole_step_inputs(table_width))

    @paddle.jit.not_to_static  # see the module docstring
    def whole_step(inputs: list, keys: list, values: list) -> Tensors:
        return _trace_whole_step(model, dict(zip(names, inputs)), keys, values)

    return whole_step


def whole_step_layout(model: WholeStepModel) -> list[tuple[int, str]]:
    """(piece, output name) of each output of `whole_step_program`, in order."""
    return [(index, name) for index in range(model.num_pieces) for name in model.whole_step_outputs(index)]


@paddle.jit.not_to_static
def _trace_piece(model: PiecewiseModel, index: int, inputs: Named, outputs: tuple[str, ...]) -> Tensors:
    """Run piece `index` as ordinary Python.

    Marked not_to_static so that Paddle's AST converter leaves the model code alone: the pieces have
    no tensor-dependent control flow, so running them as they are while a program is being built
    records the same ops, without the converter rewriting every method they call on every trace
    (that alone made capture several times slower). The weights must then enter the program as
    parameters, which is what converted code does to each tensor it loads: `convert_load` does the
    same here. Outside a to_static trace it returns the tensor unchanged, so the eager, uncompiled
    and CUDA graph paths run this same function.
    """
    out = model.with_weights(convert_load, index).piece(index, inputs)
    return tuple(out[name] for name in outputs)


@paddle.jit.not_to_static
def _trace_whole_step(model: WholeStepModel, step: Named, keys: list, values: list) -> Tensors:
    """The stack of a decode step with the model's fixed-shape attention between pieces (see
    `_trace_piece` for why it is traced unconverted)."""
    view = model.with_weights(convert_load, None)

    def attend(layer: int, previous: Named) -> Named:
        return view.static_attention(layer, previous, step, keys, values)

    outputs = run_pieces(view.num_pieces, view.piece, attend, step)
    return tuple(outputs[index][name] for index, name in whole_step_layout(view))
