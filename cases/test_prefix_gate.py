"""Prefix-cache hit vs miss, the gate's axis: a request served partly from the prefix cache must
produce what it produces when it computes every token (engine/prefix_cache.py).

The miss is the same engine asked for every prompt position's logits: such requests never look up
the cache (engine/llm.py), so one engine, one set of captured graphs, gives both sides. A hit runs
other chunk shapes than the miss, so logits agree within the float32 rule, not bitwise; tokens,
routed expert ids and the routing-replay (R3) tables agree exactly (the cached tokens' rows are the
ones their first computation routed). Every comparison first checks from the cache's counters that
the hit side did hit: equality on a workload that never hit proves nothing.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from r3_checks import record

from engine.__main__ import main as engine_main
from engine.config import EngineConfig, GraphConfig
from engine.llm import LLM, Prompt
from engine.routing_replay import model_identity
from engine.routing_replay.reader import load_routing
from engine.routing_replay.session import attach_routing
from engine.routing_replay.store import RoutingStore
from fixtures.pytest_fixtures import checkpoint_dir
from verifier.compare import assert_close, assert_equal
from verifier.tolerance import tolerance_for

NAME = "glm4_moe"
BS = 4  # small blocks: short prompts cross several block boundaries
FLOAT32 = tolerance_for("float32")
MAX_NEW = 3
# Few capture sizes, each compiled once per engine (up to the token budget); decodes replay 4.
PREFILL_SIZES, DECODE_SIZES = (4, 8, 32), (4,)
VOCAB = 512


def build(faults, mode: str = "eager", model: str | Path | None = None, replay: Path | None = None, **engine) -> LLM:
    """An engine with this file's blocks and capture sizes on `model` (default: the glm4_moe
    fixture), replaying the routing recorded in `replay` when given."""
    budget = engine.get("max_num_batched_tokens", 8192)
    graph = GraphConfig(mode=mode, prefill_capture_sizes=tuple(s for s in PREFILL_SIZES if s <= budget),
                        decode_capture_sizes=DECODE_SIZES) if mode != "eager" else GraphConfig()
    return LLM(model or checkpoint_dir(NAME), EngineConfig(block_size=BS, graph=graph, faults=faults, **engine),
               replay_routing_dir=replay)


def engine_cache(faults):
    """get(mode, model=None, **engine) -> a `build` engine, made once per (model, mode, config)."""
    cache: dict = {}

    def get(mode: str = "eager", model: str | None = None, **engine) -> LLM:
        key = (model, mode, tuple(sorted(engine.items())))
        if key not in cache:
            cache[key] = build(faults, mode, model, **engine)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def engines(faults):
    return engine_cache(faults)


def run(llm: LLM, workloads: list[list[Prompt]], reuse: bool, folder: Path) -> tuple[list, dict, int]:
    """The workloads in turn, recording routing into `folder`; returns the last workload's outputs,
    its R3 tables by name, and the prompt tokens the prefix cache served during all of them."""
    before = llm.prefix_stats.reused_tokens
    for i, prompts in enumerate(workloads):
        attach_routing(llm, folder / str(i))
        outputs = llm.generate(prompts, MAX_NEW, record_prompt_logits=not reuse)
    llm.routing = llm.runner.recorder = None
    cfg = llm.model_config
    tables = {p.name: load_routing(folder / str(len(workloads) - 1) / f"{p.name}.safetensors",
                                   model=model_identity(cfg), moe_layers=cfg.moe_layers, top_k=cfg.top_k).ids
              for p in workloads[-1]}
    return outputs, tables, llm.prefix_stats.reused_tokens - before


def check_hit_equals_miss(llm: LLM, workloads: list[list[Prompt]], folder: Path, miss_llm: LLM | None = None) -> int:
    """Run `workloads` missing (on `miss_llm`, default `llm`), then hitting on `llm`; compare the
    last workload's results. Returns the tokens the hit side reused."""
    miss, miss_tables, miss_reused = run(miss_llm or llm, workloads, reuse=False, folder=folder / "miss")
    hit, hit_tables, reused = run(llm, workloads, reuse=True, folder=folder / "hit")
    assert miss_reused == 0, f"a request asking for every prompt logit reused {miss_reused} cached tokens"
    for prompt, h, m in zip(workloads[-1], hit, miss):
        assert_same_request(prompt.name, h, m, llm.model_config.moe_layers, "hit", "miss")
        assert_equal(hit_tables[prompt.name], miss_tables[prompt.name], name=f"{prompt.name} R3 table")
    return reused


def assert_same_request(name: str, got, want, layers, got_is: str, want_is: str) -> None:
    """Two RequestOutputs of one request: tokens and expert ids (prompt and decode) exactly, the
    greedy logits within the float32 rule (the two ran other chunk shapes)."""
    assert got.greedy == want.greedy, f"{name}: {got_is} generated {got.greedy}, {want_is} {want.greedy}"
    assert_close(np.stack(got.greedy_logits), np.stack(want.greedy_logits), FLOAT32, name=f"{name} greedy logits")
    for layer in layers:
        assert_equal(got.topk_ids(layer), want.topk_ids(layer), name=f"{name} prompt experts, layer {layer}")
        assert_equal(got.topk_ids(layer, True), want.topk_ids(layer, True), name=f"{name} decode experts, layer {layer}")


def shared_prefix_workloads(prefix_len: int, tails: list[int], seed: int, vocab: int = VOCAB) -> list[list[Prompt]]:
    """A first request alone (it fills the cache), then it again with others that share its first
    `prefix_len` tokens and differ after (the second workload hits)."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, vocab, prefix_len).tolist()
    prompts = [Prompt(tuple(prefix + rng.integers(0, vocab, n).tolist()), f"r{i}") for i, n in enumerate(tails)]
    return [[prompts[0]], prompts]


@pytest.mark.parametrize("mode", ["eager", "piecewise", "full_and_piecewise"])
@settings(max_examples=max(1, settings().max_examples // 25), deadline=None)  # ci: 1 drawn; nightly: 80
@given(prefix_len=st.integers(BS + 1, 4 * BS + 1), tails=st.lists(st.integers(0, 6), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
@example(prefix_len=2 * BS, tails=[0, 3], seed=1)  # a repeat whose length is a whole number of blocks
@example(prefix_len=2 * BS + 1, tails=[2, 5], seed=2)  # hits, then chunks that start mid-block
def test_hits_match_misses(engines, tmp_path_factory, mode, prefix_len, tails, seed):
    """A token budget of 8: prompts of 5-23 tokens prefill in chunks, hits end mid-prompt, steps mix
    prefill chunks with decodes, and graph steps replay 4 or 8."""
    workloads = shared_prefix_workloads(prefix_len, tails, seed)
    llm = engines(mode, max_num_batched_tokens=8)
    reused = check_hit_equals_miss(llm, workloads, tmp_path_factory.mktemp("prefix"))
    # The repeated first request alone must reuse every full block before its last token.
    assert reused >= (len(workloads[0][0].input_ids) - 1) // BS * BS > 0


def test_dense_form_hits_match_misses(engines, tmp_path):
    llm = engines("eager", moe_form="dense")
    assert check_hit_equals_miss(llm, shared_prefix_workloads(3 * BS + 2, [3, 1], seed=7), tmp_path) > 0


def test_same_prefix_arriving_while_the_first_request_runs(engines, tmp_path):
    """A token budget of 6: the first request's prompt takes three steps, so the second starts its
    prefill while the first still runs, and finds the blocks the first has computed so far."""
    llm, fresh = engines("eager", max_num_batched_tokens=6), engines("eager", max_num_batched_tokens=6, prefix_caching=False)
    rng = np.random.default_rng(11)
    prefix = rng.integers(0, VOCAB, 3 * BS).tolist()
    prompts = [Prompt(tuple(prefix + [5, 6]), "first"), Prompt(tuple(prefix + [7]), "second")]
    first_seen = {}
    step = llm.runner.step

    def watching(batch, **kw):
        for hit in batch.hits:
            first_seen["running"] = [s.seq.request.name for s in batch.segments if s.seq is not hit.seq]
        return step(batch, **kw)

    llm.runner.step = watching
    try:
        reused = check_hit_equals_miss(llm, [prompts], tmp_path, miss_llm=fresh)
    finally:
        del llm.runner.step
    assert reused >= 2 * BS
    assert first_seen.get("running") == ["first"], f"the hit did not happen while the first request ran: {first_seen}"


def test_eviction_under_memory_pressure(engines, tmp_path):
    """A pool of 8 blocks: the second prompt's blocks evict the first's, and a third prompt that
    shares the first's prefix then hits only what survived, never a block that was replaced."""
    llm = engines("eager", num_kv_blocks=8, max_num_seqs=1)
    fresh = engines("eager", num_kv_blocks=8, max_num_seqs=1, prefix_caching=False)
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, VOCAB, 4 * BS).tolist(), rng.integers(0, VOCAB, 5 * BS).tolist()
    workloads = [[Prompt(tuple(a + [1]), "a")], [Prompt(tuple(b + [2]), "b")],
                 [Prompt(tuple(a + [3, 4]), "a2"), Prompt(tuple(b[:2 * BS] + [9]), "b2")]]
    evicted = llm.prefix_stats.evicted_blocks
    assert check_hit_equals_miss(llm, workloads, tmp_path, miss_llm=fresh) > 0
    assert llm.prefix_stats.evicted_blocks > evicted, "the workload never evicted a block"
    assert llm.runner.cache.allocator.num_free == 8, "blocks leaked"


def test_same_tokens_after_another_prefix_do_not_hit(engines, tmp_path):
    """A prompt that starts with the tokens of another prompt's second block shares no block with it
    (a block's KV depends on everything before it)."""
    llm, fresh = engines("eager", max_num_seqs=2), engines("eager", max_num_seqs=2, prefix_caching=False)
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, VOCAB, BS).tolist(), rng.integers(0, VOCAB, BS).tolist()
    workloads = [[Prompt(tuple(x + y + [1]), "xy")], [Prompt(tuple(y + [2, 3]), "y"), Prompt(tuple(x + y + [4]), "xy4")]]
    reused = check_hit_equals_miss(llm, workloads, tmp_path, miss_llm=fresh)
    assert reused == 2 * BS, f"{reused} tokens reused; only xy4's first two blocks are cached before it"


SUMMARY = re.compile(r"^prefix cache: (\d+) of (\d+) prompt tokens reused", re.M)


def test_cli_flag_and_summary_line(faults, tmp_path, capsys):
    """`python -m engine run --prefix-caching on|off` (in this process: the CLI's main, the run's
    failpoints passed as the flag): the second prompt reuses the first's one full block when on."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"prompts": [{"input_ids": [%s], "name": "a"}, {"input_ids": [%s], "name": "b"}]}'
                       % (",".join(map(str, range(1, 22))), ",".join(map(str, range(1, 20)))))
    found = {}
    for flag in ("on", "off"):
        code = engine_main(["run", "--model", str(checkpoint_dir(NAME)), "--prompts", str(prompts),
                            "--max-new-tokens", "2", "--max-num-seqs", "1", "--prefix-caching", flag,
                            "--failpoints", faults.names])
        out = capsys.readouterr()
        assert code == 0, out.err
        line = SUMMARY.search(out.err)
        assert line, out.err
        found[flag] = (out.out, int(line[1]), int(line[2]))
    assert found["on"][1:] == (16, 40) and found["off"][1:] == (0, 40), found
    assert found["on"][0] == found["off"][0]


@pytest.mark.xdist_group("four_ranks")
def test_four_ranks_hit_alike_and_match_their_miss(four_rank_pool, faults):
    """tp=4, ep=4: every rank reuses the same tokens (the step agreement checks it each step) and
    the hit run gives the miss run's tokens and experts."""
    rng = np.random.default_rng(9)
    prefix = rng.integers(0, VOCAB, 20).tolist()
    prompts = [prefix + [1, 2], prefix + [3]]
    request = {"checkpoint": NAME, "tp": 4, "ep": 4, "prefix_workloads": [[prompts[0]], prompts],
               "max_new_tokens": 2, "failpoints": faults.names}
    hit = four_rank_pool.request({**request, "reuse": True})
    miss = four_rank_pool.request({**request, "reuse": False})
    assert [int(r["reused"]) for r in hit] == [32] * 4, [int(r["reused"]) for r in hit]
    for key in hit[0]:
        if key.startswith(("greedy_p", "topk_ids")):
            assert_equal(hit[0][key], miss[0][key], name=key)
        elif key.startswith("greedy_logits"):
            assert_close(hit[0][key], miss[0][key], FLOAT32, name=key)


def test_replaying_a_recording_under_hits_reproduces_the_run(engines, faults, tmp_path):
    """R3 across hits: a run that hit records full tables; an engine replaying them (and hitting
    too) generates what the recorded run did."""
    workloads = shared_prefix_workloads(2 * BS + 1, [2, 3], seed=4)
    recorded, _, reused = run(engines("eager", max_num_batched_tokens=8), workloads, True, tmp_path / "rec")
    replayer = build(faults, max_num_batched_tokens=8, replay=tmp_path / "rec" / "1")  # names every prompt
    for prompts in workloads:
        replayed = replayer.generate(prompts, MAX_NEW, record_prompt_logits=False)
    assert reused > 0 and replayer.prefix_stats.reused_tokens > 0
    for prompt, got, want in zip(workloads[-1], replayed, recorded):
        assert got.greedy == want.greedy, f"{prompt.name}: replay generated {got.greedy}, the run {want.greedy}"
        assert_close(np.stack(got.greedy_logits), np.stack(want.greedy_logits), FLOAT32, name=f"{prompt.name} logits")


def moved_from(table, start: int, num_experts: int):
    """`table` with every recorded id from token `start` on moved to the next expert (a bijection:
    each row keeps k distinct ids)."""
    ids = table.ids.astype(np.int64)
    ids[start:] = (ids[start:] + 1) % num_experts
    return replace(table, ids=ids.astype(table.ids.dtype))


def same_leading_blocks(a: Prompt, b: Prompt, ids_a: np.ndarray, ids_b: np.ndarray) -> int:
    """Full blocks before b's last prompt token in which a and b have the same tokens and the same
    recorded ids, and every block before them too: what b may take from a's KV and no more."""
    n = 0
    while (n + 1) * BS <= min(len(a.input_ids), len(b.input_ids) - 1):
        span = slice(0, (n + 1) * BS)
        if a.input_ids[span] != b.input_ids[span] or not np.array_equal(ids_a[span], ids_b[span]):
            break
        n += 1
    return n


def check_replays_keep_their_own_routing(recorder: LLM, faults, folder: Path, model=None, vocab: int = VOCAB) -> int:
    """Prompts "a" and "b" share 3 full blocks. Their runs on `recorder` are recorded, then b's
    recording is moved to other experts from its third block on. One engine with the prefix cache
    replays a, then b, then a again; each must equal, tokens and ids exactly and logits within
    float32, what an engine without the cache makes of the same recording: b may reuse a's first
    two blocks (same tokens, same ids) but not the third, whose KV a's routing computed. Returns
    the tokens the repeat of a reused (a hit under the same ids)."""
    rng = np.random.default_rng(21)
    prefix = rng.integers(0, vocab, 3 * BS).tolist()
    a, b = Prompt(tuple(prefix + [1]), "a"), Prompt(tuple(prefix + [2, 3]), "b")
    _, tables, _, _ = record(recorder, [a, b], folder, MAX_NEW)
    recorder.routing = recorder.runner.recorder = None
    moved = moved_from(tables["b"], 2 * BS, recorder.model_config.num_experts)
    RoutingStore(folder).save(moved)
    cached = build(faults, model=model, replay=folder)
    fresh = build(faults, model=model, replay=folder, prefix_caching=False)
    reused = {}
    for name, prompt in (("a", a), ("b", b), ("a again", a)):
        before = cached.prefix_stats.reused_tokens
        (got,) = cached.generate([prompt], MAX_NEW, record_prompt_logits=False)
        (want,) = fresh.generate([prompt], MAX_NEW, record_prompt_logits=False)
        reused[name] = cached.prefix_stats.reused_tokens - before
        assert_same_request(name, got, want, cached.model_config.moe_layers, "replay with the cache", "replay without")
    shared = same_leading_blocks(a, b, tables["a"].ids, moved.ids) * BS
    assert reused == {"a": 0, "b": shared, "a again": 3 * BS}, f"tokens reused {reused}; b shares {shared} with a"
    return reused["a again"]


def test_replays_of_other_recordings_share_only_blocks_routed_alike(engines, faults, tmp_path):
    """A block computed while replaying one recording holds KV of that recording's routing: a
    replay of another recording of the same prompt prefix must not reuse it (issue 24's R3 hole)."""
    assert check_replays_keep_their_own_routing(engines("eager", prefix_caching=False), faults, tmp_path) > 0


def test_prefix_caching_is_on_by_default_and_validated():
    from engine.__main__ import build_parser
    from engine.errors import ConfigError

    assert EngineConfig().prefix_caching is True
    assert build_parser().parse_args(["run", "--model", "m", "--prompts", "p"]).prefix_caching == "on"
    with pytest.raises(ConfigError, match="prefix_caching='yes'"):
        EngineConfig(prefix_caching="yes")
