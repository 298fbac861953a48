"""Cases that kill mutants of engine/graph/capture_sizes.py the other cases let live (bench/mutation.md).

The expected lists are written out by hand from the documented ladders, never computed by the
code under test.
"""

from __future__ import annotations

import pytest

from engine.config import EngineConfig, GraphConfig
from engine.errors import CaptureSizeError
from engine.graph.capture_sizes import CaptureSizes, capture_sizes_for
from engine.graph.guard import DECODE, PREFILL


def test_a_bad_list_is_refused_naming_its_own_label():
    """The label given to the lookup is the one the error names (not a generic one)."""
    with pytest.raises(CaptureSizeError, match=r"^decode_capture_sizes: must be sorted") as err:
        CaptureSizes((8, 4), 8, "decode_capture_sizes")
    assert err.value.field == "decode_capture_sizes"


def test_engine_lookups_hold_each_phases_list_and_the_token_limit():
    """Defaults for 64 tokens and 8 sequences: the prefill ladder's steps of 4 up to 32, then 48
    and 64; the decode ladder 1, 2, 4 and then max_num_seqs itself."""
    lookups = capture_sizes_for(EngineConfig(max_num_batched_tokens=64, max_num_seqs=8))
    assert set(lookups) == {PREFILL, DECODE}
    assert lookups[PREFILL].sizes == (4, 8, 12, 16, 20, 24, 28, 32, 48, 64)
    assert lookups[DECODE].sizes == (1, 2, 4, 8)
    assert lookups[PREFILL].limit == lookups[DECODE].limit == 64
    assert lookups[PREFILL].padded_size(33) == 48 and lookups[PREFILL].padded_size(65) is None
    assert lookups[DECODE].padded_size(3) == 4 and lookups[DECODE].padded_size(9) is None


def test_engine_lookups_take_the_graph_configs_own_lists():
    graph = GraphConfig(mode="piecewise", prefill_capture_sizes=(6, 10), decode_capture_sizes=(3,))
    lookups = capture_sizes_for(EngineConfig(max_num_batched_tokens=10, max_num_seqs=3, graph=graph))
    assert (lookups[PREFILL].sizes, lookups[DECODE].sizes) == ((6, 10), (3,))
    assert lookups[PREFILL].limit == lookups[DECODE].limit == 10
