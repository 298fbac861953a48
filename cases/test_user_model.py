"""Graph vs eager on checkpoints the user names: `python -m verifier gate --model DIR` (or
`pytest --model DIR`). Skipped when no --model is given; the bundled checkpoints are covered by
test_graph.py.

A user checkpoint has no goldens, so the reference is the engine's own eager run: whole workloads
(chunked prefill, mixed and decode steps) in piecewise and full_and_piecewise must give the eager
tokens and routed experts exactly and the eager logits within the float32 tolerance, every step
replaying a graph (test_graph.generate_problems).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_graph import ENGINE, MODES, generate_problems, graph_config, raise_problems

from engine.config import EngineConfig
from engine.llm import LLM, Prompt

PROMPT_LENGTHS = (5, 17, 30)  # below, across and above the smallest capture size
NEW_TOKENS = 4


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_dir" in metafunc.fixturenames:
        models = metafunc.config.getoption("--model")
        params = models or [pytest.param(None, marks=pytest.mark.skip(reason="no --model DIR given"))]
        metafunc.parametrize("model_dir", params, ids=lambda m: "none" if m is None else str(m).rstrip("/"))


@pytest.fixture(scope="module")
def engines(faults):
    """engines(dir, mode) -> a cached LLM (mode None: eager) with the run's failpoints planted."""
    cache: dict = {}

    def get(model_dir: str, mode: str | None) -> LLM:
        if (model_dir, mode) not in cache:
            graph = {} if mode is None else {"graph": graph_config(mode)}
            cache[(model_dir, mode)] = LLM(model_dir, EngineConfig(faults=faults, **ENGINE, **graph))
        return cache[(model_dir, mode)]

    return get


def prompts_for(vocab_size: int) -> list[Prompt]:
    rng = np.random.default_rng(0)
    return [Prompt(tuple(int(i) for i in rng.integers(0, vocab_size, n)), f"len{n}") for n in PROMPT_LENGTHS]


@pytest.mark.gate_area("graph vs eager")
@pytest.mark.parametrize("mode", MODES)
def test_user_model_graph_matches_eager(user_models, engines, model_dir, mode):
    eager = engines(model_dir, None)
    prompts = prompts_for(eager.model_config.vocab_size)
    problems = generate_problems(engines(model_dir, mode), eager, prompts, NEW_TOKENS)
    raise_problems(problems, f"{model_dir}, prompts of {list(PROMPT_LENGTHS)} tokens")
