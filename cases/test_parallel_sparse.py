"""The sparse MoE form (`--moe-form sparse`, engine/moe/experts.py) on 4 ranks against 1 rank.

TP4 and TP4+EP4, eager and piecewise, on the warm 4-rank job test_parallel.py uses (cases/conftest.py's
`four_rank_pool`; same xdist group, so the same worker and the same ranks). Each 4-rank run is
checked against two 1-rank eager runs: the sparse form (same form, so only the parallelism differs)
and the dense form (the reference the gate trusts): greedy tokens and expert ids exactly, logits
within the float32 tolerance, and every rank bitwise equal to rank 0.

Why the sparse form needs its own rank cases: its bucket capacity depends on how many experts a
rank holds (EP4: 4 of glm4_moe's 16, so a bucket holds every row; TP4: all 16, so the default
prompts' 119-token prefill overflows a bucket and every rank must redo that step eagerly,
together), and its gathers index the local experts that `dist.wrong_expert_map` shifts.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_parallel import FLOAT32, LAYOUTS, MAX_NEW_TOKENS, rank_disagreements, request

from engine.config import MoEForm
from engine.dump import dump_arrays
from engine.llm import Prompt
from verifier.dumps import compare_dumps, with_margins

pytestmark = [pytest.mark.xdist_group("four_ranks"), pytest.mark.gate_area("ranks")]

SPARSE = MoEForm.SPARSE.value
# glm4_moe: noaux_tc grouping, bias, shared expert, 16 experts top-4; qwen3_moe: softmax top-2 of 8,
# so EP4 leaves 2 experts a rank. glm4_moe_nobias adds nothing here the dense cases miss.
NAMES = ("glm4_moe", "qwen3_moe")
NIGHTLY = settings.default.max_examples >= 100  # the `nightly` hypothesis profile (conftest.py)
# ci draws workloads the matrix's piecewise engines replay without a new capture: 4 prompts of 13-32
# tokens (one prefill step of 52-128 tokens padded to 128, decodes of 4), so an example costs the
# ranks a run, not a compile of new sizes on all 4 of them; nightly draws 1-5 prompts of 1-50 tokens.
LENGTHS = (st.lists(st.integers(1, 50), min_size=1, max_size=5) if NIGHTLY
           else st.lists(st.integers(13, 32), min_size=4, max_size=4))


@pytest.fixture(scope="module")
def planted(faults) -> str:
    """The run's `--failpoints`, planted on every rank too."""
    return ",".join(sorted(faults.active))


@pytest.fixture(scope="session")
def one_rank(engine_for):
    """one_rank(name, form, prompts) -> the 1-rank eager dump (the default prompts' runs cached, for the
    session: xdist interleaves the group's modules, and a module fixture was rebuilt each time)."""
    cache: dict = {}

    def run(name: str, form: str, prompts) -> dict:
        key = (name, form, tuple(p.input_ids for p in prompts))
        if key not in cache:
            llm = engine_for(name, moe_form=form)
            cache[key] = dump_arrays(llm.generate(prompts, MAX_NEW_TOKENS), llm.model_config.moe_layers)
        return cache[key]

    return run


def sparse_on_ranks(pool, name: str, layout: str, mode: str, prompts, planted: str) -> tuple[dict, list[dict]]:
    """One sparse-form run on the 4 ranks -> (rank 0's dump, every rank's CaptureStats totals); all
    ranks must have produced the same dump bitwise."""
    replies = pool.request(request(name, layout, mode, prompts, planted, moe_form=SPARSE))
    dumps = [{k: v for k, v in reply.items() if k not in ("rank", "stats", "failpoints")} for reply in replies]
    disagreements = rank_disagreements(dumps)
    assert not disagreements, "\n".join(disagreements[:5])
    return dumps[0], [reply["stats"] for reply in replies]


def divergences(four: dict, one_rank, name: str, prompts, margins: dict | None = None) -> list[str]:
    """The 4-rank dump against the 1-rank sparse and dense eager dumps (tokens and experts exact)."""
    problems = []
    for form in (SPARSE, MoEForm.DENSE.value):
        reference = one_rank(name, form, prompts)
        reference = with_margins(reference, margins) if margins else reference
        problems += [f"vs 1 rank {form}: {p}" for p in compare_dumps(four, reference, logits_tol=FLOAT32).failures()]
    return problems


# ci leaves out glm4_moe TP4+EP4 piecewise (nightly runs it): qwen3_moe TP4+EP4 piecewise replays the
# sparse pieces with EP's local experts (2 a rank) and glm4_moe TP4+EP4 eager gathers glm4_moe's local
# experts; that run cost each rank as much CPU as a whole eager matrix of one checkpoint.
MATRIX = [(name, layout, mode) for name in NAMES for layout in LAYOUTS for mode in ("eager", "piecewise")
          if NIGHTLY or (name, layout, mode) != ("glm4_moe", "tp4_ep4", "piecewise")]
# The drawn workloads run on piecewise engines the matrix built: glm4_moe's (nightly: as always), in
# ci glm4_moe TP4 and qwen3_moe TP4+EP4 (so an EP layout is still drawn without a new engine).
DRAWN_ENGINES = ([("glm4_moe", layout) for layout in sorted(LAYOUTS)] if NIGHTLY
                 else [("glm4_moe", "tp4"), ("qwen3_moe", "tp4_ep4")])


@pytest.mark.parametrize("name, layout, mode", MATRIX, ids=["-".join(m) for m in MATRIX])
def test_sparse_four_ranks_match_one_rank(four_rank_pool, one_rank, prompts, golden, planted, name, layout, mode):
    four, stats = sparse_on_ranks(four_rank_pool, name, layout, mode, prompts, planted)
    problems = divergences(four, one_rank, name, prompts, margins=golden(name))
    assert not problems, f"{len(problems)} divergence(s):\n" + "\n".join(problems[:20])
    assert all(s == stats[0] for s in stats), f"ranks took different graph-or-eager decisions: {stats}"
    if mode == "piecewise":
        assert stats[0]["replays"] > 0, "the piecewise run must have replayed captured sparse pieces"
    if mode == "piecewise" and layout == "tp4":
        # A dense run never falls back at these sizes; the sparse one must redo its overflowing
        # prefill step eagerly (test_moe_forms.py sees the same overflow on 1 rank).
        assert stats[0]["fallbacks"] > 0, "the overflowing prefill step was not redone eagerly on the ranks"


# ci (25 examples): 2 drawn workloads, each a request to the serial four_ranks group (no failpoint has
# this case as one of its only detectors: bench/results/detector-census-*.json); other profiles keep
# 1/8 of theirs (nightly 250).
@settings(max_examples=2 if settings().max_examples <= 25 else settings().max_examples // 8)
@given(lengths=LENGTHS, engine=st.sampled_from(DRAWN_ENGINES), seed=st.integers(0, 2**16))
def test_drawn_sparse_batches_on_four_ranks(four_rank_pool, one_rank, planted, lengths, engine, seed):
    """Drawn prompts (one prefill step of at most 250 tokens, padded to a capture size, then decodes)
    through the sparse pieces on 4 ranks equal both 1-rank eager forms."""
    rng = np.random.default_rng(seed)
    prompts = [Prompt(tuple(int(t) for t in rng.integers(0, 512, n)), f"p{i}") for i, n in enumerate(lengths)]
    name, layout = engine
    four, _ = sparse_on_ranks(four_rank_pool, name, layout, "piecewise", prompts, planted)
    problems = divergences(four, one_rank, name, prompts)
    assert not problems, f"{len(problems)} divergence(s):\n" + "\n".join(problems[:20])
