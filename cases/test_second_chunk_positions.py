"""Second detectors for a prefill chunk after a cached prefix (`rotary.chunk_positions_from_zero`).

The batching check (cases/test_batching.py) compares the engine with itself: the same prompts run
alone, together and chunked must agree. These cases observe the chunk differently:

- against an outside reference: the engine chunking every prompt at 4 tokens a step must still
  match the Hugging Face goldens (fixtures/build_fixtures.py ran each prompt whole), by the same
  bounds as cases/test_golden.py. A chunk rotated from position 0 attends to its prefix with the
  wrong relative distances, so its logits leave the reference; a chunk that ignores its prefix
  (`attention.drop_cached_prefix`) or writes k/v to the wrong slot (`kv.slot_off_by_one`) does too.
- at the step's inputs: the positions the runner hands the model for a staged batch are each
  token's index in its sequence (cached prefix length + offset in the chunk), computed here from
  the composition alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from batches import Composition, Part, staged

from engine.dump import dump_arrays
from verifier.dumps import compare_dumps
from verifier.tolerance import GOLDEN_LOGITS, GOLDEN_MAX_REL_L2

pytestmark = pytest.mark.gate_area("reference")  # the report area (verifier/report.py)

ARCHITECTURES = ("glm4_moe", "qwen3_moe")  # the two rotary layouts; the no-bias variant adds nothing here
CHUNKED = {"max_num_batched_tokens": 4, "max_num_seqs": 3}  # the fixture prompts have 5 to 64 tokens


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_chunked_prefill_matches_the_reference(name, engine_for, prompts, golden):
    reference = golden(name)
    assert min(len(p.input_ids) for p in prompts) > CHUNKED["max_num_batched_tokens"], "every prompt must be chunked"
    llm = engine_for(name, **CHUNKED)
    dump = dump_arrays(llm.generate(prompts, int(reference["meta_max_new_tokens"])), llm.model_config.moe_layers)
    compare_dumps(dump, reference, logits_tol=GOLDEN_LOGITS, max_rel_l2=GOLDEN_MAX_REL_L2).assert_ok()


# A chunk after a cached prefix, a prompt's first chunk, a decode, and a chunk crossing a KV block.
STEP = Composition((Part(5, 4, rest=2), Part(0, 3, rest=1), Part(9, 1, decode=True), Part(14, 6)), seed=3)


def test_step_positions_continue_after_the_cached_prefix(engine_for):
    runner = engine_for("glm4_moe").runner
    want = np.concatenate([np.arange(part.cached, part.cached + part.new) for part in STEP.parts])
    with staged(runner, STEP) as batch:
        positions = runner.prepare(batch).positions.numpy()
    np.testing.assert_array_equal(positions, want, err_msg="positions of the step's tokens, in batch order")
