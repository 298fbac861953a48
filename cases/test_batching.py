"""Results must not depend on how requests were batched or chunked (beyond float32 rounding)."""

from __future__ import annotations

import pytest

from engine.dump import dump_arrays
from fixtures.pytest_fixtures import CHECKPOINT_NAMES
from verifier.dumps import compare_dumps, with_margins
from verifier.tolerance import tolerance_for

FLOAT32 = tolerance_for("float32")
MAX_NEW_TOKENS = 6


def alone(llm, prompts):
    """Each prompt in a workload of its own, merged into one dump in prompt order."""
    merged = {}
    for i, prompt in enumerate(prompts):
        single = dump_arrays(llm.generate([prompt], MAX_NEW_TOKENS), llm.model_config.moe_layers)
        merged.update({key.replace("_p0", f"_p{i}", 1): value for key, value in single.items() if "_p0" in key})
    return merged


def together(llm, prompts):
    return dump_arrays(llm.generate(prompts, MAX_NEW_TOKENS), llm.model_config.moe_layers)


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_alone_together_and_chunked_agree(name, engine_for, prompts, golden):
    reference = with_margins(alone(engine_for(name), prompts), golden(name))
    batched = together(engine_for(name), prompts)
    chunked = together(engine_for(name, max_num_batched_tokens=7, max_num_seqs=3), prompts)
    compare_dumps(batched, reference, logits_tol=FLOAT32).assert_ok()
    compare_dumps(chunked, reference, logits_tol=FLOAT32).assert_ok()


def test_chunking_really_chunks(engine_for, prompts, monkeypatch):
    """The engine's own run of the chunked configuration (every batch its runner is handed) mixes
    prefill chunks and decodes in one step and keeps within the budget, as intended."""
    llm = engine_for("glm4_moe", max_num_batched_tokens=7, max_num_seqs=3)
    batches = []
    step = llm.runner.step

    def recording_step(batch, *args, **kwargs):
        batches.append([(seg.is_prefill, seg.num_tokens, seg.seq.prompt_len) for seg in batch.segments])
        return step(batch, *args, **kwargs)

    monkeypatch.setattr(llm.runner, "step", recording_step)
    llm.generate(prompts, MAX_NEW_TOKENS)
    assert batches and all(sum(n for _, n, _ in b) <= 7 and len(b) <= 3 for b in batches)
    assert any({prefill for prefill, _, _ in b} == {True, False} for b in batches), "no mixed step"
    assert any(prefill and n < length for b in batches for prefill, n, length in b), "no prefill chunk"
    assert llm.runner.cache.allocator.num_free == llm.runner.cache.allocator.num_blocks
