"""Replayed routing vs recorded routing, probed: a run that replays its own recording must equal
that recording at every piece and attention output of every step, and a replay fault is located
at the piece and layer where it starts (verifier/probes.py `probing_steps`, `first_divergent_step`).

A recording engine runs a workload with routing recording on (engine/routing_replay/session.py)
and probes on; a second engine of the same mode replays that recording on the same workload, probes
on too. The replay recomputes the weights from the router's own scores at the recorded ids, so the
two runs are bitwise equal (engine/routing_replay/replay.py): every comparison here is EXACT.

The planted fault `r3.replay_layer_off_by_one` routes the last MoE layer by the previous MoE
layer's recorded ids. The expected place comes from the checkpoint's config and the fault's
meaning, not from the probes: step 0 (the first prefill already routes by the wrong ids), the piece
that finishes the last MoE layer (piece = layer + 1), its first tensor out of tolerance that
layer's topk_ids; every earlier site equal.
Graph modes use backend `uncompiled` (no compile cost): the fault lives in the model's pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.config import EngineConfig, GraphConfig
from engine.failpoints import Failpoints
from engine.hf_config import read_model_config
from engine.llm import LLM
from engine.routing_replay.session import attach_routing
from fixtures.pytest_fixtures import checkpoint_dir
from verifier.compare import compare
from verifier.probes import Probed, first_divergent_step, probing_steps
from verifier.tolerance import EXACT

ENGINE = {"max_num_batched_tokens": 32, "max_num_seqs": 8}  # chunked prefill and mixed steps
SIZES = {"prefill_capture_sizes": (16, 32), "decode_capture_sizes": (4,)}
MODES = ("eager", "piecewise", "full_and_piecewise")
NAME = "glm4_moe"
MAX_NEW = 3  # prefill, a mixed step and decodes: enough to see every step kind
FAULT = "r3.replay_layer_off_by_one"


@dataclass
class Run:
    outputs: list
    steps: list[Probed]


def build(name: str, mode: str, faults: Failpoints, replay_dir: Path | None = None) -> LLM:
    graph = GraphConfig() if mode == "eager" else GraphConfig(mode=mode, backend="uncompiled", **SIZES)
    return LLM(checkpoint_dir(name), EngineConfig(**ENGINE, graph=graph, faults=faults),
               replay_routing_dir=replay_dir)


def probed_run(llm: LLM, prompts) -> Run:
    with probing_steps(llm.runner) as steps:
        outputs = llm.generate(prompts, MAX_NEW)
    return Run(outputs, steps)


@pytest.fixture(scope="module")
def recordings(prompts, faults, tmp_path_factory):
    """recordings(name, mode) -> (the probed run that recorded the fixture prompts, its folder),
    made once per module: the clean replay and the planted off-by-one replay read the same one."""
    cache: dict = {}

    def get(name: str, mode: str) -> tuple[Run, Path]:
        if (name, mode) not in cache:
            folder = tmp_path_factory.mktemp(f"recorded-{name}-{mode}")
            recorder = build(name, mode, faults)
            attach_routing(recorder, folder)
            cache[(name, mode)] = (probed_run(recorder, prompts), folder)
        return cache[(name, mode)]

    return get


def record_and_replay(recordings, name: str, mode: str, prompts, replay_faults: Failpoints) -> tuple[Run, Run]:
    """(the recorded run, a fresh engine's run replaying its recording), both probed at every step."""
    recorded, folder = recordings(name, mode)
    return recorded, probed_run(build(name, mode, replay_faults, replay_dir=folder), prompts)


def replay_problems(recorded: Run, replayed: Run) -> list[str]:
    """Prompt logits and greedy tokens bitwise equal request by request, and every probe of every
    step. On a divergence the localisation comes first (where it starts, then the step and the
    tolerance: what a shortened report shows), the outputs that differ next, the per-site table last."""
    problems = []
    for got, want in zip(replayed.outputs, recorded.outputs):
        logits = compare(got.logits(), want.logits(), EXACT, name=f"{got.name} prompt logits")
        if not logits.passed:
            problems.append(f"{got.name}: prompt logits differ ({logits.mismatches} of {logits.total}, "
                            f"worst |err| {logits.max_abs_err:.3g} at {logits.max_abs_index})")
        if got.greedy != want.greedy:
            problems.append(f"{got.name}: replayed tokens {got.greedy}, recorded {want.greedy}")
    divergence = first_divergent_step(replayed.steps, recorded.steps, EXACT)
    where = [] if divergence is None else divergence.render().splitlines()
    return where[:2] + problems + where[2:]


def check_replay(recorded: Run, replayed: Run) -> None:
    problems = replay_problems(recorded, replayed)
    if problems:
        raise AssertionError("the replay differs from its recording:\n" + "\n".join(problems))


@pytest.mark.parametrize("mode", MODES)
def test_a_replay_equals_its_recording_at_every_probe(recordings, prompts, faults, mode):
    recorded, replayed = record_and_replay(recordings, NAME, mode, prompts, faults)
    check_replay(recorded, replayed)
    assert len(replayed.steps) == len(recorded.steps) > MAX_NEW - 1  # every step was probed
    pieces = {site for site in recorded.steps[0].seen if site[0] == "piece"}
    assert len(pieces) == read_model_config(checkpoint_dir(NAME)).num_layers + 1


@pytest.mark.parametrize("name, mode", [(NAME, mode) for mode in MODES] + [("qwen3_moe", "piecewise")])
def test_a_replay_off_by_one_layer_is_located_at_the_last_moe_layer(recordings, prompts, faults, name, mode):
    planted = Failpoints(faults.active | {FAULT})
    recorded, replayed = record_and_replay(recordings, name, mode, prompts, planted)
    assert replay_problems(recorded, replayed) != []  # the check above fires on it
    divergence = first_divergent_step(replayed.steps, recorded.steps, EXACT)
    last_moe = read_model_config(checkpoint_dir(name)).moe_layers[-1]
    assert divergence is not None and divergence.step == 0, divergence and divergence.render()
    loc = divergence.loc
    assert loc.first.site == ("piece", last_moe + 1), divergence.render()
    assert (loc.first.tensor, loc.first.layer) == ("topk_ids", last_moe), divergence.render()
