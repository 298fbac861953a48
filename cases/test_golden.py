"""Eager engine vs the Hugging Face reference (goldens made by fixtures/build_fixtures.py)."""

from __future__ import annotations

import warnings

import pytest

from engine.dump import dump_arrays
from fixtures.pytest_fixtures import CHECKPOINT_NAMES
from verifier.dumps import compare_dumps

GOLDEN_MAX_REL_L2 = 1e-4  # logits vs the reference implementation, per prompt


def run_dump(llm, prompts, max_new_tokens):
    outputs = llm.generate(prompts, max_new_tokens)
    return dump_arrays(outputs, llm.model_config.moe_layers)


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_eager_matches_reference(name, engine_for, prompts, golden):
    reference = golden(name)
    dump = run_dump(engine_for(name), prompts, int(reference["meta_max_new_tokens"]))
    diff = compare_dumps(dump, reference, max_rel_l2=GOLDEN_MAX_REL_L2)
    if diff.near_ties:
        warnings.warn(f"{name}: routing near-ties (not failed): {diff.near_ties}")
    diff.assert_ok()
    assert len(diff.routing) == 2 * len(prompts) * len(engine_for(name).model_config.moe_layers)


def test_golden_check_catches_a_wrong_logit(engine_for, prompts, golden):
    """The golden comparison is not vacuous: one perturbed logit, one flipped expert, one token."""
    reference = golden("glm4_moe")
    dump = run_dump(engine_for("glm4_moe"), prompts, int(reference["meta_max_new_tokens"]))
    dump["logits_p2"] = dump["logits_p2"].copy()
    dump["logits_p2"][3] += 1.0
    dump["topk_ids_p1_layer1"] = dump["topk_ids_p1_layer1"].copy()
    dump["topk_ids_p1_layer1"][0, 0] = (dump["topk_ids_p1_layer1"][0].max() + 1) % 16
    dump["greedy_p0"] = dump["greedy_p0"].copy()
    dump["greedy_p0"][5] += 1
    failures = compare_dumps(dump, reference, max_rel_l2=GOLDEN_MAX_REL_L2).failures()
    assert [f.split(":")[0] for f in failures] == ["logits_p2", "greedy_p0", "topk_ids_p1_layer1"]
    assert "part at step 5" in failures[1]


def test_goldens_have_decisive_greedy_steps(golden):
    """The goldens were built so no greedy choice is a float32 coin flip."""
    for name in CHECKPOINT_NAMES:
        reference = golden(name)
        gaps = [reference[k] for k in reference if k.startswith("greedy_gap_p")]
        assert gaps and min(float(g.min()) for g in gaps) >= 1e-3, name
