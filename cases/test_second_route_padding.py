"""A second detector for `moe.route_padding`, from the cost side instead of the routing ids.

The graph cases (cases/test_graph.py) read the padded rows' expert ids and require -1. This case
never looks at them: it watches the sparse (bucketed) expert form's counters. Every padded row of a
step holds the same input (token 0 at position 0, attention output 0), so a router that is not told
which rows are padding sends all of them to the same top-k experts. With more padded rows than a
bucket holds, those experts' buckets overflow and the runner has to rerun the step eagerly: a
padded step then costs an eager fallback that a correct router never causes.
"""

from __future__ import annotations

import pytest

from engine.config import EngineConfig, GraphConfig
from engine.llm import LLM, Prompt
from engine.moe.experts import expert_capacity
from fixtures.pytest_fixtures import checkpoint_dir

pytestmark = pytest.mark.gate_area("graph vs eager")  # the report area (verifier/report.py)

SIZE = 32
PROMPT = Prompt(tuple(range(3, 8)))  # 5 tokens: 27 padded rows at size 32


@pytest.mark.parametrize("name", ("glm4_moe", "qwen3_moe"))
def test_padded_rows_take_no_bucket_room(faults, name):
    graph = GraphConfig(mode="piecewise", backend="uncompiled", prefill_capture_sizes=(SIZE,), decode_capture_sizes=(4,))
    llm = LLM(checkpoint_dir(name), EngineConfig(max_num_batched_tokens=SIZE, max_num_seqs=4, moe_form="sparse",
                                                 graph=graph, faults=faults))
    cfg = llm.model_config
    padded = SIZE - len(PROMPT.input_ids)
    assert padded > expert_capacity(SIZE, cfg.top_k, cfg.num_experts), "padded rows must be able to overflow a bucket"
    llm.generate([PROMPT], 1)  # one prefill step, nothing after it
    stats = llm.runner.stats
    assert dict(stats.replays) == {("prefill", SIZE): 1}, "the step must replay the padded graph"
    assert not stats.fallbacks, (f"the padded step fell back to eager {dict(stats.fallbacks)}: its padded rows "
                                 "filled expert buckets (routed to real experts?)")
