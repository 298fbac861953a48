"""A second detector for `dist.fused_bound_off_by_one`, in one process instead of a 4-rank job.

cases/test_parallel.py runs TP4 jobs with the bound at 4 and at 3 and needs the two paths'
rounding to differ. Here the path is made visible on one rank: the fused path adds `residual /
world` to this rank's partial sum before the all-reduce, the unfused path adds the whole residual
after it. Give the model a stand-in for the collectives that says world = 4 but sums nothing (the
identity, as one rank's all-reduce is), and the fused path's result is off by 3/4 of the residual
while the unfused path's is the true one-rank answer, bit for bit. So a prefill step of exactly
`BOUND` tokens must differ from the one-rank engine (fused, the bound is inclusive) and a step of
`BOUND + 1` tokens must equal it (unfused).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import EngineConfig, ParallelConfig
from engine.distributed import Collectives
from engine.llm import LLM, Prompt
from fixtures.pytest_fixtures import checkpoint_dir

pytestmark = pytest.mark.gate_area("ranks")  # the report area (verifier/report.py)

BOUND = 8


class FourRanksInName(Collectives):
    """world = 4 for the model's arithmetic; every collective is the identity (nothing to sum with)."""

    def __init__(self):
        super().__init__(world=4)

    def all_reduce(self, x, what=""):
        return x

    def all_gather_last(self, x, what=""):
        return x

    def agree(self, values, what):
        return None


def prompt_logits(llm: LLM, length: int) -> np.ndarray:
    """The logits of a one-step prefill of `length` tokens (a token budget above it: one step)."""
    [out] = llm.generate([Prompt(tuple(range(5, 5 + length)))], 1)
    return out.logits()


@pytest.mark.parametrize("name", ("glm4_moe", "qwen3_moe"))
def test_fused_path_up_to_the_bound_and_not_above(faults, name):
    config = EngineConfig(parallel=ParallelConfig(fused_allreduce_max_tokens=BOUND), faults=faults)
    one_rank = LLM(checkpoint_dir(name), config)
    pretending = LLM(checkpoint_dir(name), config)
    pretending.model.comm = FourRanksInName()
    above = prompt_logits(pretending, BOUND + 1)
    np.testing.assert_array_equal(above, prompt_logits(one_rank, BOUND + 1),
                                  err_msg=f"a {BOUND + 1}-token step took the fused path above its bound {BOUND}")
    at = prompt_logits(pretending, BOUND)
    assert not np.array_equal(at, prompt_logits(one_rank, BOUND)), \
        f"a {BOUND}-token step did not take the fused path at its bound {BOUND}"
