"""Second detectors for the graph modes' cache bugs: graph engines against the outside reference.

cases/test_graph.py compares a graph engine with the eager engine step by step; that is where
`kv.stale_block_table` and `kv.write_padded_rows` (both in the whole-step decode graph of mode
full_and_piecewise) are caught. Here the graph engine generates the fixture prompts end to end and
is held to the Hugging Face goldens with the bounds of cases/test_golden.py, never compared with
the eager engine: a decode that misses its newest cache block, or a replay that writes its padded
rows into slot 0 (another sequence's first block), moves later logits away from the reference.

Backend `uncompiled` (the pieces and the whole-step program run eagerly on the padded buffers) keeps
the compile cost out; the faults live in the runner and the decoder, above the backend.
"""

from __future__ import annotations

import pytest

from engine.config import GraphConfig
from engine.dump import dump_arrays
from verifier.dumps import compare_dumps
from verifier.tolerance import GOLDEN_LOGITS, GOLDEN_MAX_REL_L2

pytestmark = pytest.mark.gate_area("reference")  # the report area (verifier/report.py)

# The four fixture prompts decode together, padded to the decode size 8: each decode replay has padded rows.
GRAPH = {"prefill_capture_sizes": (16, 32), "decode_capture_sizes": (8,), "backend": "uncompiled"}


@pytest.mark.parametrize("mode", ("piecewise", "full_and_piecewise"))
@pytest.mark.parametrize("name", ("glm4_moe", "qwen3_moe"))
def test_graph_engine_matches_the_reference(name, mode, engine_for, prompts, golden):
    reference = golden(name)
    llm = engine_for(name, max_num_batched_tokens=32, max_num_seqs=4, graph=GraphConfig(mode=mode, **GRAPH))
    dump = dump_arrays(llm.generate(prompts, int(reference["meta_max_new_tokens"])), llm.model_config.moe_layers)
    compare_dumps(dump, reference, logits_tol=GOLDEN_LOGITS, max_rel_l2=GOLDEN_MAX_REL_L2).assert_ok()
    assert llm.runner.stats.total("replays", "decode"), "the decode steps must replay a graph"
