"""The battery: every area of the gate on each checkpoint the user names with `--model DIR`
(`python -m verifier gate --model DIR`, repeatable, or `pytest --model DIR`).

Each case runs a check of the fixtures' own case files (imported, not copied) on the user's
folder, parametrised per model as the fixtures' cases are per fixture. A user checkpoint has no
committed goldens, so each area takes the reference its fixture cases take where that is a run of
the engine (eager for graphs, prompts alone for batching, dense for the sparse form, 1 rank for 4,
the eager recording for routing replay, the unedited config for liveness, the float64 engine for
the truth) and builds the transformers goldens on the spot when the `goldens` extra is installed.

Without --model, cases/conftest.py does not collect this file: the default gate pays nothing.
Areas (model_battery.AREAS) and the report: every case carries `gate_model` marks naming its
model and battery area, from which the report builds a section per model (verifier/report.py).
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_battery import (
    AREAS,
    battery_prompts,
    four_rank_problem,
    goldens_missing,
    liveness_edits,
    model_id,
    read_raw,
    transformers_goldens,
    variant,
)
from strategies import prompt_sets
from test_batching import alone, together
from test_config_fields import SPELLINGS, outputs, respell, set_field
from test_golden import golden_diff, run_dump
from test_graph import (
    ABOVE_LARGEST,
    AT_THE_EDGES,
    DECODE_ONLY,
    ENGINE,
    FEW,
    FULLER,
    MODES,
    PADDED,
    ROUNDS_DOWN,
    SOME,
    check_replays,
    check_step,
    drawn_pairs,
    drawn_steps,
    eager_llm,
    generate_problems,
    graph_llm,
    raise_problems,
    shape_event,
)
from test_moe_forms import ENGINE as MOE_ENGINE
from test_moe_forms import GRAPH as MOE_GRAPH
from test_moe_forms import dump as moe_dump
from test_parallel import LAYOUTS, one_rank, request, run_on_ranks
from test_prefix_gate import BS as PREFIX_BS
from test_prefix_gate import MAX_NEW as PREFIX_MAX_NEW
from test_prefix_gate import (
    check_hit_equals_miss,
    check_replays_keep_their_own_routing,
    engine_cache,
    shared_prefix_workloads,
)
from r3_checks import ENGINE as R3_ENGINE
from r3_checks import MAX_NEW as R3_MAX_NEW
from r3_checks import build, check_matches_outputs, check_same_outputs, check_same_tables, check_tables
from r3_checks import record as record_routing

from engine.config import EngineConfig
from engine.dump import dump_arrays
from engine.errors import UserError
from engine.failpoints import NO_FAULTS
from engine.hf_config import read_model_config
from engine.llm import LLM, Prompt
from engine.routing_replay.recorder import CAPTURED, REPLAYED
from engine.routing_replay.store import RoutingStore
from verifier.cli_gate import model_problem
from verifier.dumps import compare_dumps
from verifier.tolerance import tolerance_for
from verifier.truth import assert_truth

FLOAT32 = tolerance_for("float32")
# Steps of the graph area at fixed shapes, every model: the fixtures' edge and planted-fault steps.
FIXED_STEPS = {"positions_to_511": AT_THE_EDGES[0], "exactly_16": AT_THE_EDGES[1], "decode_only": DECODE_ONLY,
               "10_padded_to_16": PADDED, "15_padded_to_16": FULLER, "20_padded_to_32": ROUNDS_DOWN}
GENERATE_NEW = 4
# 4 ranks: the battery prompts run one 119-token prefill step (padded to 128), then 4-sequence decodes.
RANK_SIZES = {"capture_sizes": [128], "decode_capture_sizes": [4]}
TWO_SPELLED = ("rope_theta", "partial_rotary_factor", "num_experts")  # test_config_fields.TWO_SPELLINGS' fields


# ----------------------------------------------------------------------------- parametrisation


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every case runs once per --model folder (refused by name at collection, before any case, when
    the battery cannot gate it); liveness cases once per (folder, field edit)."""
    models = [str(Path(m).resolve()) for m in metafunc.config.getoption("--model")]
    for model in models:
        problem = model_problem(model)
        if problem:
            raise pytest.UsageError(problem)
    if "edit" in metafunc.fixturenames:
        params = [pytest.param(m, e, id=f"{model_id(m)}-{e[0]}-{e[3]}", marks=_marks(m)) for m in models
                  for e in _spelled_edits(m)]
        metafunc.parametrize("model_dir,edit", params)
    elif "model_dir" in metafunc.fixturenames:
        metafunc.parametrize("model_dir", [pytest.param(m, id=model_id(m), marks=_marks(m)) for m in models])


def _marks(model: str) -> list:
    # One xdist worker per model holds its engines and captured graphs (function marks win: the
    # rank cases join the "four_ranks" group of test_parallel.py, so they share its warm pool).
    return [pytest.mark.gate_model(model), pytest.mark.xdist_group(f"battery-{model_id(model)}")]


def _spelled_edits(model: str) -> list[tuple]:
    raw = read_raw(model)
    own = "5.x" if "rope_parameters" in raw else "4.x"
    edits = []
    for key, value, expect in liveness_edits(raw, model_config(model)):
        edits += [(key, value, expect, s) for s in (SPELLINGS if key in TWO_SPELLED else (own,))]
    return edits


def area(name: str):
    """Mark a case as the battery's area `name` (and the gate report's area it files under)."""
    def mark(case):
        return pytest.mark.gate_area(AREAS[name])(pytest.mark.gate_model(area=name)(case))
    return mark


@cache
def model_config(model_dir: str):
    return read_model_config(model_dir)


@cache
def prompts_of(model_dir: str) -> tuple[Prompt, ...]:
    return tuple(battery_prompts(model_config(model_dir).vocab_size))


def skip_beyond_positions(model_dir: str, positions: int) -> None:
    limit = model_config(model_dir).max_position_embeddings
    if positions > limit:
        pytest.skip(f"needs {positions} positions; max_position_embeddings={limit}")


# ----------------------------------------------------------------------------- graph vs eager


@area("graph vs eager")
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=SOME)
@given(composition=drawn_steps)
def test_drawn_step_matches_eager(engine_for, model_dir, mode, composition):
    """test_graph.py's drawn steps (chunks with and without cached prefix, decodes, sizes at the
    capture boundaries): logits, experts, cache writes, padding, padded routing and counters."""
    skip_beyond_positions(model_dir, max(p.cached + p.new + p.rest for p in composition.parts))
    shape_event(composition)
    check_step(graph_llm(engine_for, model_dir, mode).runner, eager_llm(engine_for, model_dir).runner, composition)


@area("graph vs eager")
@pytest.mark.parametrize("step", FIXED_STEPS)
@pytest.mark.parametrize("mode", MODES)
def test_fixed_step_matches_eager(engine_for, model_dir, mode, step):
    composition = FIXED_STEPS[step]
    skip_beyond_positions(model_dir, max(p.cached + p.new + p.rest for p in composition.parts))
    check_step(graph_llm(engine_for, model_dir, mode).runner, eager_llm(engine_for, model_dir).runner, composition)


@area("graph vs eager")
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=FEW)
@given(pair=drawn_pairs)
def test_replays_overwrite_outputs_and_repeat_exactly(engine_for, model_dir, mode, pair):
    skip_beyond_positions(model_dir, max(p.cached + p.new + p.rest for c in pair for p in c.parts))
    check_replays(graph_llm(engine_for, model_dir, mode).runner, *pair)


@area("graph vs eager")
@pytest.mark.parametrize("kind", ABOVE_LARGEST)
def test_steps_above_the_largest_size_fall_back_and_match(engine_for, model_dir, kind):
    graph, composition = graph_llm(engine_for, model_dir).runner, ABOVE_LARGEST[kind]
    phase = "decode" if composition.is_decode_only else "prefill"
    with graph.stats.expect(fallbacks={(phase, composition.num_tokens): 1}, replays={}, captures={}):
        check_step(graph, eager_llm(engine_for, model_dir).runner, composition)


@area("graph vs eager")
@pytest.mark.parametrize("mode", MODES)
def test_generate_matches_eager(engine_for, model_dir, mode):
    """Whole workloads (chunked prefill, mixed and decode steps), every step replaying a graph."""
    graph, eager = graph_llm(engine_for, model_dir, mode), eager_llm(engine_for, model_dir)
    prompts = list(prompts_of(model_dir))
    raise_problems(generate_problems(graph, eager, prompts, GENERATE_NEW), f"{model_dir}, battery prompts")


@area("graph vs eager")
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=FEW)
@given(data=st.data())
def test_generate_matches_eager_on_drawn_prompts(engine_for, model_dir, mode, data):
    graph, eager = graph_llm(engine_for, model_dir, mode), eager_llm(engine_for, model_dir)
    prompts = [Prompt(ids) for ids in data.draw(prompt_sets(eager.model_config.vocab_size, max_len=48))]
    new_tokens = data.draw(st.integers(2, 5))
    raise_problems(generate_problems(graph, eager, prompts, new_tokens), f"{[len(p.input_ids) for p in prompts]}")


# ----------------------------------------------------------------------------- chunked vs whole


@pytest.fixture(scope="module")
def alone_runs(engine_for):
    """alone_runs(dir) -> each battery prompt run in a workload of its own (test_batching.alone)."""
    memo: dict = {}
    return lambda model_dir: memo.setdefault(model_dir, alone(engine_for(model_dir), list(prompts_of(model_dir))))


@area("chunked")
@pytest.mark.parametrize("budget,seqs", [(8192, 256), (7, 3), (13, 2)], ids=["together", "chunks_of_7", "chunks_of_13"])
def test_batched_and_chunked_match_prompts_alone(engine_for, alone_runs, model_dir, budget, seqs):
    """Prompts together, and with prefill chunked and mixed with decodes, give what each gives alone."""
    llm = engine_for(model_dir) if budget == 8192 else engine_for(model_dir, max_num_batched_tokens=budget,
                                                                    max_num_seqs=seqs)
    compare_dumps(together(llm, list(prompts_of(model_dir))), alone_runs(model_dir), logits_tol=FLOAT32).assert_ok()


# ----------------------------------------------------------------------------- sparse vs dense


@area("moe forms")
def test_sparse_form_matches_dense_form(engine_for, model_dir):
    sparse = engine_for(model_dir, moe_form="sparse", **MOE_ENGINE)
    dense = engine_for(model_dir, moe_form="dense", **MOE_ENGINE)
    prompts = list(prompts_of(model_dir))
    failures = compare_dumps(moe_dump(sparse, prompts), moe_dump(dense, prompts), logits_tol=FLOAT32).failures()
    assert not failures, failures


@area("moe forms")
def test_sparse_form_graph_matches_its_eager_run(engine_for, model_dir):
    """The sparse form's fixed-capacity pieces replayed: an overflowing replay must be redone eagerly."""
    graph = engine_for(model_dir, moe_form="sparse", graph=MOE_GRAPH, **MOE_ENGINE)
    eager = engine_for(model_dir, moe_form="sparse", **MOE_ENGINE)
    prompts = list(prompts_of(model_dir))
    failures = compare_dumps(moe_dump(graph, prompts), moe_dump(eager, prompts), logits_tol=FLOAT32).failures()
    assert not failures, failures
    assert graph.runner.stats.total("replays") > 0, "the graph engine must have replayed captured pieces"


# ----------------------------------------------------------------------------- 4 ranks against 1


@area("ranks")
@pytest.mark.xdist_group("four_ranks")
@pytest.mark.parametrize("mode", ["eager", "piecewise"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_four_ranks_match_one_rank(request, engine_for, faults, model_dir, layout, mode):
    """TP4 and TP4+EP4 (test_parallel.py's rank servers) against 1 rank: every rank bitwise equal to
    rank 0, tokens and experts exactly, logits within float32. A model whose shapes do not split
    over 4 ranks is skipped, naming the field and value."""
    problem = four_rank_problem(model_config(model_dir), LAYOUTS[layout][1])
    if problem:
        pytest.skip(f"{layout}: {problem}")
    pool = request.getfixturevalue("four_rank_pool")  # started only when a rank case runs
    prompts = list(prompts_of(model_dir))
    sizes = RANK_SIZES if mode != "eager" else {}
    four = run_on_ranks(pool, request_for(model_dir, layout, mode, prompts, faults.names, sizes))
    compare_dumps(four, one_rank(engine_for, model_dir, prompts), logits_tol=FLOAT32).assert_ok()


def request_for(model_dir: str, layout: str, mode: str, prompts, planted: str, sizes: dict) -> dict:
    return request(model_dir, layout, mode, prompts, failpoints=planted, **sizes)


# ----------------------------------------------------------------------------- routing replay


@pytest.fixture(scope="module")
def r3_engines(faults):
    """r3_engines(dir, mode) -> r3_checks.build's engine (every size captured at
    start-up), cached per model and mode."""
    memo: dict = {}

    def get(model_dir: str, mode: str = "eager") -> LLM:
        if (model_dir, mode) not in memo:
            memo[(model_dir, mode)] = build(faults, model_dir, mode)
        return memo[(model_dir, mode)]

    return get


@area("routing replay")
def test_eager_recording_matches_the_step_outputs(r3_engines, model_dir, tmp_path):
    llm, prompts = r3_engines(model_dir), list(prompts_of(model_dir))
    cfg = llm.model_config
    outputs, tables, _, _ = record_routing(llm, prompts, tmp_path)
    assert check_tables(tables, prompts, R3_MAX_NEW, cfg.moe_layers, cfg.top_k) == []
    assert check_matches_outputs(tables, outputs, cfg.moe_layers) == []


@area("routing replay")
@pytest.mark.parametrize("mode", MODES)
def test_graph_recording_equals_eager_recording(r3_engines, model_dir, tmp_path, mode):
    prompts = list(prompts_of(model_dir))
    _, reference, _, _ = record_routing(r3_engines(model_dir), prompts, tmp_path / "eager")
    _, tables, kinds, counters = record_routing(r3_engines(model_dir, mode), prompts, tmp_path / mode)
    assert check_same_tables(tables, reference, mode) == []
    assert kinds[REPLAYED] == counters["replays"] > 0 and kinds[CAPTURED] == 0


def replayer(faults, model_dir: str, folder: Path) -> LLM:
    return LLM(model_dir, EngineConfig(**R3_ENGINE, faults=faults), replay_routing_dir=folder)


@area("routing replay")
def test_replaying_a_run_reproduces_its_logits_bitwise(faults, r3_engines, model_dir, tmp_path):
    prompts = list(prompts_of(model_dir))
    recorded, _, _, _ = record_routing(r3_engines(model_dir), prompts, tmp_path)
    replayed = replayer(faults, model_dir, tmp_path).generate(prompts, R3_MAX_NEW)
    assert check_same_outputs(replayed, recorded) == []


@area("routing replay")
def test_replay_routes_by_the_recorded_ids(faults, model_dir, tmp_path):
    """Every recorded id moved to the next expert: the replaying run must route exactly so."""
    prompts, cfg = list(prompts_of(model_dir)), model_config(model_dir)
    _, tables, _, _ = record_routing(build(NO_FAULTS, model_dir), prompts, tmp_path)
    moved = {name: replace(t, ids=((t.ids.astype(np.int64) + 1) % cfg.num_experts).astype(t.ids.dtype))
             for name, t in tables.items()}
    store = RoutingStore(tmp_path)
    for table in moved.values():
        store.save(table)
    outputs = replayer(faults, model_dir, tmp_path).generate(prompts, R3_MAX_NEW)
    assert check_matches_outputs(moved, outputs, cfg.moe_layers) == []


# ----------------------------------------------------------------------------- config liveness


@pytest.fixture(scope="module")
def unedited(faults):
    """unedited(dir) -> test_config_fields.outputs of the folder as the user gave it, cached."""
    memo: dict = {}

    def get(model_dir: str) -> np.ndarray:
        if model_dir not in memo:
            memo[model_dir] = outputs(Path(model_dir), faults)
        return memo[model_dir]

    return get


@area("config liveness")
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_both_config_spellings_give_the_same_outputs(faults, unedited, model_dir, spelling, tmp_path):
    raw = respell(read_raw(model_dir), read_raw(model_dir)["model_type"], spelling)
    assert np.array_equal(outputs(variant(Path(model_dir), tmp_path / "variant", raw), faults), unedited(model_dir))


@area("config liveness")
def test_every_field_read_is_live(faults, unedited, model_dir, edit, tmp_path):
    """test_config_fields.py's liveness on this model: the edited field changes the outputs, or the
    checkpoint is refused with words that say what the value implies."""
    key, value, expect, spelling = edit
    model_type = read_raw(model_dir)["model_type"]
    raw = respell(read_raw(model_dir), model_type, spelling)
    set_field(raw, model_type, spelling, key, value)
    edited = variant(Path(model_dir), tmp_path / "variant", raw)
    if expect == "changes":
        assert not np.array_equal(outputs(edited, faults), unedited(model_dir)), \
            f"{key}={value!r} ({spelling}) changed nothing"
    else:
        with pytest.raises(UserError, match=expect):
            outputs(edited, faults)


# ----------------------------------------------------------------------------- capture lint


@area("capture lint")
@pytest.mark.parametrize("layout", ["tp1", "tp4_ep4"])
def test_pieces_have_no_capture_finding(model_dir, layout):
    """test_capture_lint.py's engine check: every piece and the whole-model decode graph traced at
    sizes from both ends of the ladders, on 1 rank and as each of 4 TP+EP ranks."""
    from verifier.capture_lint import lint_model

    tp = 1 if layout == "tp1" else 4
    problem = four_rank_problem(model_config(model_dir), 4) if tp > 1 else None
    if problem:
        pytest.skip(f"{layout}: {problem}")
    report = lint_model(model_dir, sizes=(4, 24), tp=tp, ep=tp)
    assert report.programs == tp * 2 * (model_config(model_dir).num_layers + 2)
    assert report.findings == [], "\n".join(map(str, report.findings[:10]))


# ----------------------------------------------------------------------------- goldens


@area("goldens")
def test_eager_matches_transformers(engine_for, model_dir):
    """test_golden.py's comparison against transformers run on this checkpoint now (the goldens
    builder of fixtures/build_fixtures.py): logits within the golden bounds, greedy tokens exactly,
    experts exactly outside near-ties of transformers' float64 deciding values."""
    missing = goldens_missing()
    if missing:
        pytest.skip(missing)
    prompts = list(prompts_of(model_dir))
    reference = transformers_goldens(Path(model_dir), model_config(model_dir), prompts)
    dump = run_dump(engine_for(model_dir), prompts, int(reference["meta_max_new_tokens"]))
    golden_diff(dump, reference).assert_ok()


# ----------------------------------------------------------------------------- the float64 truth


@area("truth")
@pytest.mark.parametrize("mode", MODES)
def test_graph_is_as_close_to_the_float64_truth_as_eager(engine_for, model_dir, mode):
    """verifier/truth.py's verdict: the graph run against the eager run, both judged on the float64
    engine's run of the same prompts and schedule."""
    prompts = list(prompts_of(model_dir))

    def run(llm):
        return dump_arrays(llm.generate(prompts, GENERATE_NEW), llm.model_config.moe_layers)

    truth = run(engine_for(model_dir, dtype="float64", **ENGINE))
    assert_truth(run(graph_llm(engine_for, model_dir, mode)), run(eager_llm(engine_for, model_dir)), truth)


# ----------------------------------------------------------------------------- prefix cache


@pytest.fixture(scope="module")
def prefix_engines(faults):
    """prefix_engines(mode, dir, **config) -> test_prefix_gate.build's engine (blocks of 4 tokens, a
    few capture sizes), cached per model, mode and config."""
    return engine_cache(faults)


@area("prefix cache")
@pytest.mark.parametrize("form,mode", [("sparse", "eager"), *(("sparse", m) for m in MODES), ("dense", "eager")])
def test_prefix_cache_hit_matches_miss(prefix_engines, model_dir, form, mode, tmp_path):
    """test_prefix_gate.py's hit vs miss: a prompt run alone, then again beside two that share its
    first 9 tokens, in chunks of 8 (hits end mid-prompt, chunks start mid-block), against the same
    requests computing every token: tokens, experts and R3 tables exactly, logits within float32,
    after the counters show the repeat reused every full block before its last token."""
    skip_beyond_positions(model_dir, 2 * PREFIX_BS + 1 + 5 + PREFIX_MAX_NEW)
    llm = prefix_engines(mode, model_dir, max_num_batched_tokens=8, moe_form=form)
    workloads = shared_prefix_workloads(2 * PREFIX_BS + 1, [2, 5], seed=2, vocab=model_config(model_dir).vocab_size)
    reused = check_hit_equals_miss(llm, workloads, tmp_path)
    assert reused >= (len(workloads[0][0].input_ids) - 1) // PREFIX_BS * PREFIX_BS > 0, f"{reused} tokens reused"


@area("prefix cache")
def test_prefix_cache_keeps_each_replays_routing(prefix_engines, faults, model_dir, tmp_path):
    """test_prefix_gate.py's replay case: two recordings of one prompt prefix that differ from the
    third block on, replayed by one engine with the cache, each equal to a replay without it."""
    recorder = prefix_engines("eager", model_dir, prefix_caching=False)
    assert check_replays_keep_their_own_routing(recorder, faults, tmp_path, model_dir,
                                                model_config(model_dir).vocab_size) > 0
