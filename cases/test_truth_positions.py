"""Rotary embedding at every position a checkpoint allows, against the float64 reference's formula.

Rotary angles are position times inverse frequency: computed in float32, their error grows with the
position (about position * 2^-24 radians on the fastest frequency: 3e-5 at position 511, 5e-4 at
8192), so the default prompts (positions 0..71) see a small part of it (a tenth, measured below). These cases rotate one vector
at every position up to max_position_embeddings (512 on the bundled fixtures, the longest prompt
they take) with the engine's own tables and gather (`apply_rotary`) and with
fixtures/reference64.py's `rotary`, which imports nothing from the engine and is float64 throughout.

A float64 engine must match to float64 rounding; transformers' float32 angles (which it keeps even
in float64) fail that by 6 orders of magnitude, and the float32 gate cannot see them (its goldens
share them). No model run: the check costs milliseconds.
"""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from engine.layers.rotary import apply_rotary
from fixtures.pytest_fixtures import CHECKPOINT_NAMES
from fixtures.reference64 import rotary
from verifier.tolerance import F64_MAX_ROTARY_ERROR


def rotated_everywhere(llm) -> tuple[np.ndarray, np.ndarray]:
    """(engine, reference): one fixed head vector [P, 1, D] rotated at every position 0..P-1."""
    cfg = llm.model_config
    positions = np.arange(cfg.max_position_embeddings)
    x = np.random.default_rng(0).standard_normal((1, 1, cfg.head_dim)).repeat(len(positions), axis=0)  # [P, 1, D]
    cos, sin = llm.model.cos, llm.model.sin  # [P, 1, rd/2]
    index = paddle.to_tensor(positions)
    engine = apply_rotary(paddle.to_tensor(x.astype(cfg.dtype)), paddle.index_select(cos, index),
                          paddle.index_select(sin, index)).numpy()
    return engine, rotary(x, positions, cfg.rotary_dim, cfg.rope_theta)


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_float64_rotary_matches_the_reference_at_every_position(engine_for, name):
    engine, reference = rotated_everywhere(engine_for(name, dtype="float64"))
    error = np.abs(engine - reference).max(axis=(1, 2))  # [P]
    worst = int(error.argmax())
    assert error[worst] <= F64_MAX_ROTARY_ERROR, (
        f"{name}: rotary error {error[worst]:.3g} at position {worst} (bound {F64_MAX_ROTARY_ERROR:g}); "
        f"at position 71, the default prompts' last, {error[71]:.3g}")


def test_float32_rotary_error_grows_with_the_position(engine_for):
    """The float32 engine (transformers' way) is within float32 rounding of the formula, and its error
    at the last positions is larger than at the default prompts' positions: what the case above
    guards in float64, and why drawn batches in `nightly` reach past position 71."""
    engine, reference = rotated_everywhere(engine_for("qwen3_moe"))
    error = np.abs(engine - reference).max(axis=(1, 2))  # [P]
    assert error.max() <= 1e-4
    assert error[-64:].max() > 4 * error[:72].max(), (error[-64:].max(), error[:72].max())
