"""A second detector for `graph.copy_outputs`, independent of the alias check.

What the fault changes: the graph runner hands out copies of a replay's output buffers instead of
the buffers themselves. Two contracts rest on handing out the buffers:

1. a reference kept across replays sees the later replay's values (the alias check in
   cases/test_graph.py and cases/test_graph_toy.py holds a step's output across the next replay);
2. the residual stream never leaves the graphs' memory: piece i + 1 was captured reading piece i's
   output buffer, and the runner skips copying a chained input that *is* that buffer. Handed a
   copy, the runner takes the chained value for fresh step data and copies it in, resetting its
   padded rows to 0 on the way, so the padded rows of every later piece start from 0 instead of
   from what piece i computed (engine/graph/runner.py's module docstring states the contract).

This file observes the second consequence, within one step and without holding anything across
replays: the padded rows of a graph step's hidden output must equal those of the model's own pieces
chained by hand on the same zero-padded inputs (attention output padded with 0, as the runner pads
every fresh input). On a fixture the padded rows start from the embedding of token 0, which is not
0, so the fault shows as padded rows that are 0.
"""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from batches import Composition, Part, staged

from engine.config import EngineConfig, GraphConfig
from engine.graph.protocol import run_pieces
from engine.llm import LLM
from engine.runner import ForwardContext, ModelRunner
from fixtures.pytest_fixtures import CHECKPOINT_NAMES, checkpoint_dir
from verifier.compare import compare
from verifier.tolerance import tolerance_for

pytestmark = pytest.mark.gate_area("graph vs eager")  # the report area (verifier/report.py)

# A prefill chunk after a cached prefix and a prompt start: 9 tokens padded to the capture size 16.
STEP = Composition((Part(3, 4), Part(0, 5, rest=3)), seed=11)
BACKENDS = ("static", "uncompiled")


def graph_runner(name: str, backend: str, faults) -> ModelRunner:
    graph = GraphConfig(mode="piecewise", backend=backend, prefill_capture_sizes=(16,), decode_capture_sizes=(4,))
    config = EngineConfig(max_num_batched_tokens=32, max_num_seqs=8, graph=graph, faults=faults)
    return LLM(checkpoint_dir(name), config).runner


def padded_rows(tensor: paddle.Tensor, size: int) -> paddle.Tensor:
    """`tensor` with zero rows appended up to `size` rows, as the runner fills a fresh input buffer."""
    missing = size - tensor.shape[0]
    return paddle.concat([tensor, paddle.zeros([missing, *tensor.shape[1:]], tensor.dtype)])


def chained_by_hand(runner: ModelRunner, ctx: ForwardContext) -> np.ndarray:
    """The step's final hidden rows [P, H] from the model's eager pieces, each piece's outputs fed
    to the next as they are (padded rows included), step inputs and attention output zero-padded."""
    size, model = ctx.padded_size, runner.model
    step = model.step_values(ctx.token_ids, ctx.positions, ctx.num_real)
    step |= {"token_ids": padded_rows(ctx.token_ids, size), "positions": padded_rows(ctx.positions, size)}

    def attend(layer, outputs):
        out = model.attention(layer, outputs, runner.cache, ctx.attention)["attn_out"]  # [n, H]
        return {"attn_out": padded_rows(out, size)}

    return run_pieces(model.num_pieces, model.piece, attend, step)[-1]["hidden"].numpy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_padded_rows_flow_through_the_chained_residual(faults, name, backend):
    runner = graph_runner(name, backend, faults)
    with staged(runner, STEP) as batch:
        ctx = runner.prepare(batch)
        n = batch.num_tokens
        assert ctx.padded_size == 16 and n == 9, "the step must replay a padded graph"
        want = chained_by_hand(runner, ctx)[n:]  # before the replay: it rewrites the same cache slots
        got = runner.forward(ctx).hidden.numpy()[n:]
    assert np.abs(want).max() > 0, "padded rows that are 0 anyway cannot show a reset residual"
    result = compare(got, want, tolerance_for("float32"), name="padded rows of the final hidden")
    assert result.passed, ("padded rows of the graph step differ from the hand-chained pieces (a chained "
                           f"residual reset to 0?): {result.message()}")
