"""4-rank tensor and expert parallelism against 1 rank, in eager and piecewise-graph mode.

One 4-rank job (a RankPool running cases/rank_programs/engine_server.py, cases/conftest.py's
`four_rank_pool`) serves the whole module and test_parallel_sparse.py: ranks start once and take
many requests, so hypothesis examples cost a request, not a launch. The modules run on one xdist
worker (xdist_group), so the gate never starts two such jobs at once.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from four_ranks import ROOT, SERVER, RememberingPool
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.dump import dump_arrays
from engine.launch import RankJobError, job_pids
from engine.llm import Prompt
from fixtures.pytest_fixtures import CHECKPOINT_NAMES
from verifier.dumps import compare_dumps, with_margins
from verifier.rank_pool import RankPool
from verifier.tolerance import GOLDEN_LOGITS, GOLDEN_MAX_REL_L2, tolerance_for

pytestmark = pytest.mark.xdist_group("four_ranks")

FLOAT32 = tolerance_for("float32")
LAYOUTS = {"tp4": (4, 1), "tp4_ep4": (4, 4)}
# Few sizes: every size is compiled per piece on each of the 4 ranks sharing 2 cores. The default
# prompts (119 tokens, 4 sequences) replay 128 and 4; drawn workloads (<= 5 sequences) the rest.
GRAPH = {"capture_sizes": [16, 48, 128, 256], "decode_capture_sizes": [2, 4, 5]}
# 4 new tokens (a prefill and 3 decode steps) where the goldens hold 8: a 4-rank request costs each rank
# per engine step (Paddle's per-op dispatch), and no failpoint the 4-rank modules catch needs the later
# decode steps (every dist.* one re-run red at 4). The goldens are cut to the same steps (`first_tokens`).
MAX_NEW_TOKENS = 4
NIGHTLY = settings.default.max_examples >= 100  # the `nightly` hypothesis profile (conftest.py)
# ci: glm4_moe alone in the dense matrix. The census (bench/results/detector-census-*.json) has no
# failpoint that a glm4_moe_nobias or qwen3_moe 4-rank dense run catches and the glm4_moe ones miss
# (each of those 8 runs captured its own graphs on all 4 ranks: about a fifth of the group's rank CPU);
# qwen3_moe still runs on 4 ranks in test_parallel_sparse.py. nightly: every checkpoint.
NAMES = CHECKPOINT_NAMES if NIGHTLY else ("glm4_moe",)


@pytest.fixture(scope="module")
def pool(four_rank_pool):
    return four_rank_pool  # cases/conftest.py: shared with test_parallel_sparse.py


def first_tokens(dump: dict, n: int = MAX_NEW_TOKENS) -> dict:
    """A dump (a golden) of more new tokens cut to its first `n`: the first n steps are the same run
    (greedy, one batch). Per-token keys keep n rows, decode routing keys n - 1; prompt keys whole."""
    cut = {}
    for key, values in dump.items():
        if key.startswith(("greedy_p", "greedy_logits_p", "greedy_gap_p")):
            cut[key] = values[:n]
        elif key.startswith(("decode_topk_ids_p", "decode_topk_margin_p")):
            cut[key] = values[: n - 1]
        else:
            cut[key] = values
    return cut


@pytest.fixture(scope="module")
def planted(faults) -> str:
    """The run's `--failpoints`, as the rank servers take them: every 4-rank run plants them."""
    return ",".join(sorted(faults.active))


@pytest.fixture(scope="module")
def default_runs(pool, prompts, planted):
    """run(name, layout, mode, **extra) -> rank 0's dump of the default prompts, each computed once."""
    cache: dict = {}

    def run(name: str, layout: str, mode: str, **extra) -> dict:
        key = (name, layout, mode, tuple(sorted(extra.items())))
        if key not in cache:
            cache[key] = run_on_ranks(pool, request(name, layout, mode, prompts, failpoints=planted, **extra))
        return cache[key]

    return run


def request(name: str, layout: str, mode: str, prompts, failpoints: str, **extra) -> dict:
    """One run for the rank servers; `failpoints` is explicit so that no run forgets the planted ones."""
    tp, ep = LAYOUTS[layout]
    budget = extra.get("max_num_batched_tokens", 8192)
    graph = {key: [s for s in sizes if s <= budget] for key, sizes in GRAPH.items()} if mode != "eager" else {}
    return {"checkpoint": name, "tp": tp, "ep": ep, "mode": mode, "prompts": [list(p.input_ids) for p in prompts],
            "max_new_tokens": MAX_NEW_TOKENS, "failpoints": failpoints, **graph, **extra}


def dumps_by_rank(pool: RankPool, payload: dict, **asking) -> list[dict]:
    return [{k: v for k, v in reply.items() if k not in ("rank", "stats", "failpoints")}
            for reply in pool.request(payload, **asking)]


def rank_disagreements(dumps: list[dict]) -> list[str]:
    """Every rank computes the full outputs (hidden states are replicated, logits gathered): they
    must agree bitwise."""
    return [f"rank {rank} disagrees with rank 0 on {key}" for rank, dump in enumerate(dumps[1:], start=1)
            for key in dumps[0] if not np.array_equal(dump[key], dumps[0][key])]


def run_on_ranks(pool: RankPool, payload: dict, **asking) -> dict:
    """Send one run to all ranks (`asking`: pool.request's options); check every rank produced the
    same dump; return rank 0's."""
    dumps = dumps_by_rank(pool, payload, **asking)
    disagreements = rank_disagreements(dumps)
    assert not disagreements, "\n".join(disagreements[:5])
    return dumps[0]


def one_rank(engine_for, name: str, prompts) -> dict:
    llm = engine_for(name)
    return dump_arrays(llm.generate(prompts, MAX_NEW_TOKENS), llm.model_config.moe_layers)


@pytest.fixture(scope="session")
def one_rank_default(engine_for, prompts):
    """one_rank_default(name) -> the 1-rank eager dump of the default prompts, computed once per checkpoint
    (session scope: xdist interleaves the group's modules, and a module fixture was rebuilt each time)."""
    cache: dict = {}

    def run(name: str) -> dict:
        if name not in cache:
            cache[name] = one_rank(engine_for, name, prompts)
        return cache[name]

    return run


@pytest.mark.parametrize("mode", ["eager", "piecewise"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", NAMES)
def test_four_ranks_match_one_rank(default_runs, one_rank_default, golden, name, layout, mode):
    four = default_runs(name, layout, mode)
    reference = with_margins(one_rank_default(name), golden(name))
    compare_dumps(four, reference, logits_tol=FLOAT32).assert_ok()
    compare_dumps(four, first_tokens(golden(name)), logits_tol=GOLDEN_LOGITS, max_rel_l2=GOLDEN_MAX_REL_L2).assert_ok()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", NAMES)
def test_graph_matches_eager_on_four_ranks(default_runs, golden, name, layout):
    eager, graph = default_runs(name, layout, "eager"), default_runs(name, layout, "piecewise")
    compare_dumps(graph, with_margins(eager, golden(name)), logits_tol=FLOAT32).assert_ok()


def test_fused_and_unfused_all_reduce_agree(default_runs, prompts, golden):
    """Steps above the fused all-reduce + residual + norm bound take the unfused path: with a bound
    of 3 tokens every step of the default prompts does (a 119-token prefill, then decodes of 4), and
    the answer is the same within float32 rounding. (The bound-3 run is the one the next case makes.)"""
    unfused = default_runs("glm4_moe", "tp4", "eager", fused_max_tokens=3)
    fused = default_runs("glm4_moe", "tp4", "eager")
    assert not compare_dumps(unfused, fused).passed_exactly(), "the two paths should round differently"
    compare_dumps(unfused, with_margins(fused, golden("glm4_moe")), logits_tol=FLOAT32).assert_ok()


def test_fused_bound_is_inclusive_on_both_sides(default_runs, prompts):
    """The default prompts run one 119-token prefill step, then decode steps of 4 tokens. With the
    bound at 4 the decode steps take the fused path, with the bound at 3 the unfused one, and the
    two paths round differently (see the case above): so the decode logits must differ bitwise
    between the two runs while the prefill step's (unfused in both) must not. A bound checked
    against the wrong quantity, or off by one, makes both runs take one path."""
    at_bound = default_runs("glm4_moe", "tp4", "eager", fused_max_tokens=4)
    above = default_runs("glm4_moe", "tp4", "eager", fused_max_tokens=3)
    for i in range(len(prompts)):
        first, rest = slice(0, 1), slice(1, None)  # the prefill step's sampled row, then the decode steps'
        key = f"greedy_logits_p{i}"
        assert np.array_equal(at_bound[key][first], above[key][first]), f"{key}: the prefill step changed path"
        assert not np.array_equal(at_bound[key][rest], above[key][rest]), f"{key}: decode steps took one path"


# ci (25 examples): 2 drawn workloads, each a request to the serial four_ranks group (no failpoint has
# this case as one of its only detectors: bench/results/detector-census-*.json), both on the budget
# of 48 (one engine, one set of captures on the ranks); other profiles keep 1/5 of theirs (nightly
# 400) and draw the budget of 256 too.
@settings(max_examples=2 if settings().max_examples <= 25 else settings().max_examples // 5)
@given(lengths=st.lists(st.integers(1, 120), min_size=1, max_size=5), budget=st.sampled_from([48, 256] if NIGHTLY else [48]),
       seed=st.integers(0, 2**16))
def test_drawn_batches_on_four_ranks(pool, engine_for, planted, lengths, budget, seed):
    """Drawn workloads (prompt lengths; a token budget that chunks prefill and mixes it with decodes):
    the TP4+EP4 piecewise run equals the 1-rank eager run of the same workload, tokens and experts
    exactly, logits within the float32 tolerance."""
    layout = "tp4_ep4"
    rng = np.random.default_rng(seed)
    prompts = [Prompt(tuple(int(t) for t in rng.integers(0, 512, n)), f"p{i}") for i, n in enumerate(lengths)]
    four = run_on_ranks(pool, request("glm4_moe", layout, "piecewise", prompts, planted, max_num_batched_tokens=budget))
    llm = engine_for("glm4_moe", max_num_batched_tokens=budget)
    reference = dump_arrays(llm.generate(prompts, MAX_NEW_TOKENS), llm.model_config.moe_layers)
    compare_dumps(four, reference, logits_tol=FLOAT32).assert_ok()


FAULTS = [("dist.skip_allreduce", "tp4"), ("dist.wrong_expert_map", "tp4_ep4"), ("dist.double_scale", "tp4_ep4")]


@pytest.mark.parametrize("fault,layout", FAULTS, ids=[f for f, _ in FAULTS])
def test_planted_parallel_fault_is_caught(pool, one_rank_default, prompts, fault, layout):
    dumps = dumps_by_rank(pool, request("glm4_moe", layout, "eager", prompts, fault))
    reference = one_rank_default("glm4_moe")
    problems = rank_disagreements(dumps) + compare_dumps(dumps[0], reference, logits_tol=FLOAT32).failures()
    assert problems, f"{fault} went unnoticed"


def test_rank_that_disagrees_is_an_error_not_a_hang(pool, prompts, planted):
    faults = ",".join(filter(None, ("dist.rank_disagrees", planted)))  # and the run's --failpoints
    started = time.monotonic()
    with pytest.raises(RankJobError, match="ranks disagree on the step"):
        pool.request(request("glm4_moe", "tp4", "piecewise", prompts, faults))
    assert time.monotonic() - started < 60
    # the pool is still usable (fresh: the ranks answer, not four_ranks.RememberingPool's memo)
    run_on_ranks(pool, request("glm4_moe", "tp4", "eager", prompts[:1], ""), fresh=True)


def test_dead_rank_is_named_within_the_time_bound(prompts, faults):
    """Its own pool, which the death ends: 2 ranks of the engine server (a TP2 run), half the
    start-up of 4; rank 0 waits in the engine's first collective for the rank that died."""
    pool = RankPool([SERVER], 2, failpoints=faults, env={"PYTHONPATH": str(ROOT)}, start_timeout_s=180,
                    request_timeout_s=60)
    started = time.monotonic()
    with pytest.raises(RankJobError) as failure:
        pool.request({**request("glm4_moe", "tp4", "eager", prompts, "", exit=1), "tp": 2})
    assert failure.value.ranks == (1,)
    assert time.monotonic() - started < 60
    assert job_pids(pool.token) == []


def test_the_shared_pool_asks_the_ranks_once_per_request():
    """four_ranks.RememberingPool (the warm pool's wrapper): a repeated request is answered from the
    first replies, as copies; a fresh, failed or side-effecting request reaches the ranks every time."""
    class Ranks:
        asked: list = []

        def request(self, payload, **_):
            self.asked.append(payload)
            if payload.get("fail"):
                raise RankJobError((), "planted", None, "", "")
            return [{"greedy_p0": np.arange(3), "rank": r} for r in range(4)]

    pool = RememberingPool(Ranks())
    first = pool.request({"tp": 4, "prompts": [[1, 2]], "ids": np.arange(2)})
    first[0]["greedy_p0"][0] = 99  # a case changing its copy
    again = pool.request({"ids": np.arange(2), "prompts": [[1, 2]], "tp": 4})  # same request, other key order
    assert len(Ranks.asked) == 1 and again[0]["greedy_p0"].tolist() == [0, 1, 2]
    pool.request({"tp": 4, "prompts": [[1, 2]], "ids": np.arange(3)})  # another array: another request
    pool.request({"tp": 4, "prompts": [[1, 2]], "ids": np.arange(2)}, fresh=True)
    for side_effect in ({"routing_replay_dir": "/x"}, {"exit": 1}, {"hang": 2}):
        pool.request({"tp": 4, **side_effect})
        pool.request({"tp": 4, **side_effect})
    assert len(Ranks.asked) == 9
    for _ in range(2):
        with pytest.raises(RankJobError):
            pool.request({"fail": True})
    assert len(Ranks.asked) == 11 and pool.asked == 11
