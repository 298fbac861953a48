"""The truth rule in the gate: where two runs of one batch are not bitwise equal, A is judged
against B on a float64 answer T of the same batch (verifier/truth.py: A's rel L2 to T within
TRUTH_RATIO times B's or TRUTH_FLOOR; each token or expert flip noise only on T's near-tie margin).

These cases sit beside the float32 checks of each area, which stay: the float32 row (rtol = atol
= 1e-5) admits an error far above the engine's real float32 error (5e-7 rel L2 to the truth), so a
bug that costs one mode 5-20 times the rounding error of the other passes it; against T it fails.

Where T comes from:
  ci       the default prompts, T = the committed float64 goldens (fixtures/goldens/NAME.f64.npz),
           written by the pure NumPy reference (fixtures/reference64.py), which shares no code with
           the engine and carries the routing margins that judge an expert flip. No float64 engine
           runs: one case per area, each two float32 runs of the default prompts.
  nightly  (the hypothesis profile) every bundled checkpoint in every pair, and drawn batches (up to
           80-token prompts, positions past the defaults' 72): T = the same NumPy reference run on
           the drawn batch (0.2 s a batch, margins included); for replay vs recording, T = a float64
           engine built WITHOUT the run's failpoints replaying the same recording (the reference
           cannot replay routing; the replayed ids are shared, so no expert flip can occur there).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import scaled_examples

from engine.config import EngineConfig, GraphConfig
from engine.dump import dump_arrays
from engine.failpoints import NO_FAULTS
from engine.llm import LLM
from engine.prompts import Prompt
from engine.routing_replay.session import attach_routing
from fixtures.pytest_fixtures import CHECKPOINT_NAMES, checkpoint_dir
from fixtures.reference64 import golden_arrays, read_golden
from verifier.tolerance import TRUTH_FLOOR
from verifier.truth import assert_truth

NIGHTLY = settings.default.max_examples >= 100  # the `nightly` hypothesis profile (conftest.py)
NEW_TOKENS = 8  # the float64 goldens' meta_max_new_tokens: T's keys have the dumps' shapes
CHUNKED = {"max_num_batched_tokens": 7, "max_num_seqs": 3}  # test_batching.py's chunked run
STEPS = {"max_num_batched_tokens": 32, "max_num_seqs": 8}  # chunked prefill, mixed and decode steps
SIZES = {"prefill_capture_sizes": (16, 32), "decode_capture_sizes": (4,)}
LAYOUTS = {"tp4": (4, 1), "tp4_ep4": (4, 4)}
# pair -> (report area, A's engine config, B's); eager unless a config names a graph mode. Batching and the
# MoE forms report as "reference" (verifier/report.py AREAS), as their float32 case files do.
PAIRS = {
    "chunked vs whole": ("reference", CHUNKED, {}),
    "sparse vs dense": ("reference", {"moe_form": "sparse", **STEPS}, {"moe_form": "dense", **STEPS}),
    "piecewise vs eager": ("graph vs eager", {"moe_form": "sparse", "graph": "piecewise", **STEPS},
                           {"moe_form": "sparse", **STEPS}),
    "full_and_piecewise vs eager": ("graph vs eager", {"moe_form": "dense", "graph": "full_and_piecewise", **STEPS},
                                    {"moe_form": "dense", **STEPS}),
}


def engine_config(config: dict) -> dict:
    """A PAIRS entry as EngineConfig fields (its graph mode as a static-backend GraphConfig)."""
    config = dict(config)
    if "graph" in config:
        config["graph"] = GraphConfig(mode=config["graph"], backend="static", **SIZES)
    return config


def outputs_dump(llm: LLM, prompts, max_new: int = NEW_TOKENS) -> dict:
    return dump_arrays(llm.generate(prompts, max_new), llm.model_config.moe_layers)


def golden_truth(name: str) -> dict:
    """T for the default prompts: the float64 reference's golden, with its routing margins."""
    truth = read_golden(name)
    assert int(truth["meta_max_new_tokens"]) == NEW_TOKENS, "the goldens were rebuilt with other lengths"
    return truth


def judged(actual: dict, reference: dict, truth: dict, prompts) -> None:
    """assert_truth, that it judged every prompt's two float keys (a verdict over nothing is no check),
    and that B itself is an honest float32 run: within TRUTH_FLOOR of T on every key. The ratio rule
    alone passes a bug A and B share (dist.double_scale planted in both: A's error = B's = 0.5)."""
    verdict = assert_truth(actual, reference, truth)
    assert len(verdict.floats) == 2 * len(prompts), [v.key for v in verdict.floats]
    far = [f"{v.key}: {v.reference_error:.2g}" for v in verdict.floats if not v.reference_error <= TRUTH_FLOOR]
    assert not far, f"B is farther from the truth than an honest float32 run ({TRUTH_FLOOR:.2g}): {far[:4]}"


@pytest.fixture(scope="session")
def default_run(engine_for, prompts):
    """default_run(name, config) -> the float32 dump of the default prompts, computed once per worker
    (the eager run is B for several areas; xdist interleaves modules, so a module cache was rebuilt)."""
    cache: dict = {}

    def run(name: str, config: dict) -> dict:
        key = (name, repr(sorted(config.items())))
        if key not in cache:
            cache[key] = outputs_dump(engine_for(name, **engine_config(config)), prompts)
        return cache[key]

    return run


# ---- one run pair per area on the default prompts, T = the float64 golden (ci) -------------------

def pair_params(runs) -> list:
    """(checkpoint, pair) parameters, each marked with its pair's report area."""
    return [pytest.param(name, pair, marks=pytest.mark.gate_area(PAIRS[pair][0])) for name, pair in runs]


# qwen3_moe for graph vs eager: its final norm is where norm.eps_outside_sqrt passes the float32 row.
CI_PAIRS = [("glm4_moe", "chunked vs whole"), ("glm4_moe", "sparse vs dense"), ("qwen3_moe", "piecewise vs eager")]
ALL_PAIRS = [(name, pair) for name in CHECKPOINT_NAMES for pair in PAIRS]


@pytest.mark.parametrize("name, pair", pair_params(ALL_PAIRS if NIGHTLY else CI_PAIRS))
def test_truth_on_the_default_prompts(default_run, prompts, name, pair):
    _, a_config, b_config = PAIRS[pair]
    judged(default_run(name, a_config), default_run(name, b_config), golden_truth(name), prompts)


@pytest.mark.gate_area("reference")
@pytest.mark.parametrize("name", CHECKPOINT_NAMES if NIGHTLY else ("glm4_moe",))
def test_truth_engine_as_exact_as_transformers(default_run, golden, prompts, name):
    """A = the engine's eager float32 run, B = transformers' float32 run (the committed goldens): the
    engine must be as close to the exact answer as transformers is (measured 0.8 to 1.3 times)."""
    judged(default_run(name, {}), golden(name), golden_truth(name), prompts)


@pytest.mark.gate_area("ranks")
@pytest.mark.xdist_group("four_ranks")
@pytest.mark.parametrize("layout, mode, form", [("tp4_ep4", "eager", "sparse")]
                         + ([("tp4", "piecewise", "dense"), ("tp4", "eager", "sparse")] if NIGHTLY else []))
@pytest.mark.parametrize("name", CHECKPOINT_NAMES if NIGHTLY else ("glm4_moe",))
def test_truth_four_ranks_vs_one(four_rank_pool, faults, default_run, prompts, name, layout, mode, form):
    tp, ep = LAYOUTS[layout]
    payload = {"checkpoint": name, "tp": tp, "ep": ep, "mode": mode, "moe_form": form,
               "prompts": [list(p.input_ids) for p in prompts], "max_new_tokens": NEW_TOKENS,
               "failpoints": ",".join(sorted(faults.active))}
    if mode != "eager":
        payload |= {"capture_sizes": [128], "decode_capture_sizes": [4]}
    four = {k: v for k, v in four_rank_pool.request(payload)[0].items() if k not in ("rank", "stats", "failpoints")}
    judged(four, default_run(name, {"moe_form": form}), golden_truth(name), prompts)


# How the replays run: ci replays the dense eager recording in the sparse form eagerly (as a trainer
# replays an inference engine's routing with other kernels; no capture cost); nightly replays it in
# full_and_piecewise (the whole-step decode graph routes by the recorded ids).
REPLAY_CI = {"moe_form": "sparse"}
REPLAY_NIGHTLY = {"moe_form": "dense", "graph": "full_and_piecewise"}


def replay_pair(name: str, prompts, folder, faults, replaying: dict) -> tuple[dict, dict]:
    """(replayed, recorded): a recording made eagerly in the dense form, replayed by an engine of
    config `replaying`. Own engines: a recorder rewires its runner."""
    recorder = LLM(checkpoint_dir(name), EngineConfig(moe_form="dense", faults=faults, **STEPS))
    attach_routing(recorder, folder, faults)
    recorded = outputs_dump(recorder, prompts)
    replayer = LLM(checkpoint_dir(name), EngineConfig(faults=faults, **STEPS, **engine_config(replaying)),
                   replay_routing_dir=folder)
    return outputs_dump(replayer, prompts), recorded


@pytest.mark.gate_area("routing replay")
def test_truth_replay_vs_recording(faults, prompts, tmp_path):
    """T is the golden: the eager recording routes as the float64 reference does (test_golden.py,
    outside near-ties), so the replay routes by T's own choices too."""
    replayed, recorded = replay_pair("glm4_moe", prompts, tmp_path, faults, REPLAY_CI)
    judged(replayed, recorded, golden_truth("glm4_moe"), prompts)


# ---- drawn batches (nightly only) -------------------------------------------------------------

NIGHTLY_ONLY = pytest.mark.skipif(not NIGHTLY, reason="drawn batches against a float64 run: nightly profile only")


@st.composite
def batches(draw):
    """2 to 4 prompts of 1 to 80 tokens (positions past the default prompts' 72), any token ids."""
    seed = draw(st.integers(0, 2**32 - 1))
    lengths = draw(st.lists(st.integers(1, 80), min_size=2, max_size=4))
    rng = np.random.default_rng(seed)
    return [Prompt(tuple(int(t) for t in rng.integers(0, 512, n)), f"d{i}_len{n}") for i, n in enumerate(lengths)]


def reference_truth(name: str, prompts) -> dict:
    """T for a drawn batch: the pure float64 NumPy reference on it, routing margins included."""
    return golden_arrays(checkpoint_dir(name), [{"name": p.name, "input_ids": list(p.input_ids)} for p in prompts],
                         NEW_TOKENS)


@NIGHTLY_ONLY
@pytest.mark.parametrize("name, pair", pair_params(ALL_PAIRS))
@settings(max_examples=scaled_examples(0.01))  # nightly 20 batches per pair (dev 2): 2 runs + the reference each
@given(drawn=batches())
def test_truth_on_drawn_batches(engine_for, name, pair, drawn):
    _, a_config, b_config = PAIRS[pair]
    actual = outputs_dump(engine_for(name, **engine_config(a_config)), drawn)
    reference = outputs_dump(engine_for(name, **engine_config(b_config)), drawn)
    judged(actual, reference, reference_truth(name, drawn), drawn)


@NIGHTLY_ONLY
@pytest.mark.gate_area("routing replay")
@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
@settings(max_examples=scaled_examples(0.005))  # nightly 10 (dev 2)
@given(drawn=batches())
def test_truth_replay_vs_recording_on_drawn_batches(faults, tmp_path_factory, name, drawn):
    folder = tmp_path_factory.mktemp("truth-replay")
    replayed, recorded = replay_pair(name, drawn, folder, faults, REPLAY_NIGHTLY)
    exact = LLM(checkpoint_dir(name), EngineConfig(dtype="float64", faults=NO_FAULTS, **STEPS),
                replay_routing_dir=folder)
    judged(replayed, recorded, outputs_dump(exact, drawn), drawn)
