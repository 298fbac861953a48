"""What a piecewise model exposes to the graph machinery, and the one loop that runs its pieces.

A piecewise model is a stack `piece_0, attn_0, piece_1, ..., attn_{L-1}, piece_L`. The graph
machinery knows nothing of what the pieces compute; it sees only names:

  - each piece takes a mapping name -> tensor and returns one; `piece_inputs(i)` says, in order,
    which names piece i reads and their dtype and per-token shape, `piece_outputs(i)` which names
    it returns, in the order a captured program lays them out;
  - inputs named in `step_inputs` are the same for every piece of a step (token ids, positions,
    the real-row count): the graph runner keeps one buffer per name and size, filled once a step;
  - an input named like an output of the previous piece is that output (the residual stream):
    the graph runner captures piece i + 1 reading piece i's output buffer directly;
  - every other input comes from the attention between the pieces.

A model implements this structurally (`engine/models/` imports nothing from here). Specs are plain
`(name, dtype, row_shape)` triples; `row_shape` is the per-token trailing shape, or None for a
one-element tensor such as the real-row count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import paddle

Named = dict[str, paddle.Tensor]
PieceRunner = Callable[[int, Named], Named]  # (piece index, inputs) -> outputs
Attention = Callable[[int, Named], Named]  # (layer, outputs of the piece before it) -> inputs it adds


class TensorSpec(NamedTuple):
    """One input of a piece: what the graph runner needs to own a static buffer for it."""

    name: str
    dtype: str
    row_shape: tuple[int, ...] | None  # per-token trailing shape; None for a [1] tensor

    def buffer(self, size: int) -> paddle.Tensor:
        shape = [1] if self.row_shape is None else [size, *self.row_shape]
        return paddle.zeros(shape, dtype=self.dtype)


@runtime_checkable
class PiecewiseModel(Protocol):
    """What the graph runner, the backends and the loop below need from a model."""

    num_pieces: int
    step_inputs: tuple[str, ...]

    def piece_inputs(self, index: int) -> Sequence[tuple]:
        """(name, dtype, row_shape) of every input of piece `index`, in a fixed order."""

    def piece_outputs(self, index: int) -> tuple[str, ...]:
        """The names piece `index` returns, in a fixed order."""

    def piece(self, index: int, inputs: Named) -> Named:
        """Run piece `index`: a pure function of fixed-shape tensors (extra names are ignored)."""

    def with_weights(self, convert: Callable[[paddle.Tensor], paddle.Tensor], index: int | None) -> PiecewiseModel:
        """A view whose weights read by piece `index` (None: every piece) are `convert(weight)`."""


@runtime_checkable
class WholeStepModel(PiecewiseModel, Protocol):
    """What a model adds to have a decode-only step captured as one graph (full_and_piecewise)."""

    def whole_step_inputs(self, table_width: int) -> Sequence[tuple]:
        """(name, dtype, row_shape) of the whole step's inputs; `table_width` is each row's slot-table width."""

    def whole_step_outputs(self, index: int) -> tuple[str, ...]:
        """Which outputs of piece `index` the whole-step graph returns."""

    def static_attention(self, layer: int, outputs: Named, step: Named, keys: list[paddle.Tensor],
                         values: list[paddle.Tensor]) -> Named:
        """Fixed-shape attention of `layer` reading the cache (`keys`/`values`: one tensor per layer)."""


def input_specs(model: PiecewiseModel, index: int) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(*spec) for spec in model.piece_inputs(index))


def run_pieces(num_pieces: int, run_piece: PieceRunner, attend: Attention, step: Named) -> list[Named]:
    """The stack, in order: piece 0 on the step's inputs, then for every layer the attention on the
    previous piece's outputs and the next piece on the step's inputs, the previous piece's outputs
    and the attention's. Returns every piece's outputs, piece 0 first.

    `run_piece` runs a piece eagerly, replays its graph, or traces it into a whole-step program;
    `attend` is the model's eager attention or a fixed-shape one inside a whole-step graph."""
    outputs = [run_piece(0, step)]
    for layer in range(num_pieces - 1):
        previous = outputs[-1]
        outputs.append(run_piece(layer + 1, {**step, **previous, **attend(layer, previous)}))
    return outputs
