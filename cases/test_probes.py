"""First-divergence localisation (verifier/probes.py): probes only read, and a planted fault is
located at the piece, layer and tensor where the engine's code says it starts.

Expected sites come from the checkpoint's config and the fault's meaning, never from the probe:
  - `moe.route_padding` (padded rows pick experts): the first MoE layer's routing, i.e. the piece
    that finishes it (piece = first MoE layer + 1), in padded rows;
  - `graph.stale_positions` (a replay keeps the capture's positions): piece 0, and only the
    rotated tensors q and k;
  - `graph.stale_padding` (padded input rows keep the previous step's values): piece 0, in a
    padded row;
  - `kv.write_padded_rows` (a whole-step decode writes padded rows' k/v at slot 0, the first
    sequence's first key) and `kv.stale_block_table` (a whole-step decode reads a table missing the
    newest block): the first attention reads the wrong keys, so the first divergence is piece 1,
    in real rows (the whole-step graph keeps no attention output, and its padded rows differ).
Engines are fresh and use backend `uncompiled` (no compile cost); the faults live in the graph
runner and the model, not in a backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest
from batches import Composition, Part, staged

from engine.config import EngineConfig, GraphConfig
from engine.failpoints import Failpoints
from engine.hf_config import read_model_config
from engine.llm import LLM
from engine.runner import ModelRunner
from fixtures.pytest_fixtures import CHECKPOINT_NAMES, checkpoint_dir, rewrite_config
from verifier.probes import (
    compare_probed,
    from_arrays,
    localise,
    merge_ranks,
    probe_padded_eager,
    probing,
)
from verifier.recording import recording
from verifier.tolerance import EXACT, tolerance_for

# The dense MoE form, the reference: graph and eager run the same kernels on the same rows, so
# the bitwise contracts below hold (the sparse form's graphs run a fixed capacity: test_moe_forms.py).
ENGINE = {"max_num_batched_tokens": 32, "max_num_seqs": 8,
          "moe_form": "dense"}
FLOAT32 = tolerance_for("float32")
pytestmark = pytest.mark.gate_area("verifier")  # the probes are the verifier's own machinery
PADDED = Composition((Part(3, 4), Part(9, 1, decode=True), Part(0, 5, rest=3)), seed=11)  # 10 tokens -> 16
FULLER = Composition((Part(0, 14), Part(2, 1, decode=True)), seed=12)  # 15 tokens -> 16
ONE_DECODE = Composition((Part(5, 1, decode=True),), seed=15)  # 1 -> 4: one-row tensors are padded too
DECODES = Composition((Part(20, 1, decode=True), Part(7, 1, decode=True), Part(33, 1, decode=True)), seed=14)  # 3 -> 4


def runner(name: str, faults=(), mode: str | None = "piecewise", backend: str = "uncompiled") -> ModelRunner:
    """A fresh engine's runner (mode None: eager) with these faults planted."""
    graph = GraphConfig() if mode is None else GraphConfig(mode=mode, backend=backend, prefill_capture_sizes=(16,),
                                                            decode_capture_sizes=(4,))
    return LLM(checkpoint_dir(name), EngineConfig(**ENGINE, graph=graph, faults=Failpoints(frozenset(faults)))).runner


@pytest.fixture(scope="module")
def eager():
    """eager(name) -> one fault-free eager runner per checkpoint for this module."""
    cache: dict[str, ModelRunner] = {}

    def get(name: str) -> ModelRunner:
        if name not in cache:
            cache[name] = runner(name, mode=None)
        return cache[name]

    return get


def located(graph: ModelRunner, reference: ModelRunner, composition: Composition, before=(), again: bool = False):
    """Stage `composition` on both runners and localise its step; first the `before` compositions
    run on the graph runner, and with `again` the step itself once (in the same staging)."""
    for earlier in before:
        with staged(graph, earlier) as batch:
            graph.forward(graph.prepare(batch))
    with staged(graph, composition) as graph_batch, staged(reference, composition) as eager_batch:
        if again:
            graph.forward(graph.prepare(graph_batch))
        return localise(reference, graph, eager_batch, graph_batch)


# ---------------------------------------------------------------------------- probes only read


def step_outputs(model_runner: ModelRunner, batch) -> list[np.ndarray]:
    """Everything a step hands out, copied: hidden (all rows), routing, and the k/v it wrote."""
    ctx = model_runner.prepare(batch)
    out = model_runner.forward(ctx)
    slots = ctx.attention.slot_mapping
    kv = [model_runner.cache.read(layer, slots) for layer in range(model_runner.model.cfg.num_layers)]
    return ([out.hidden.numpy().copy()] + [ids.numpy().copy() for ids, _ in out.routing.values()]
            + [t.numpy().copy() for pair in kv for t in pair])


def probe_problems(model_runner: ModelRunner, composition: Composition, probe=None) -> list[str]:
    """The step with probes off, then on (or with `probe` in their place): bitwise the same outputs,
    and the probes saw every piece."""
    with staged(model_runner, composition) as batch:
        off = step_outputs(model_runner, batch)
        with probing(model_runner) as seen:
            model_runner.probe = probe or model_runner.probe
            on = step_outputs(model_runner, batch)
    problems = [f"output {i} changed by probing" for i, (a, b) in enumerate(zip(off, on))
                if a.shape != b.shape or not np.array_equal(a, b)]
    pieces = sum(kind == "piece" for kind, _ in seen)
    if probe is None and pieces != model_runner.model.num_pieces:
        problems.append(f"probes saw {pieces} pieces of {model_runner.model.num_pieces}")
    return problems


@pytest.mark.parametrize("mode, backend, composition", [
    (None, "", PADDED), ("piecewise", "uncompiled", PADDED), ("piecewise", "static", PADDED),
    ("full_and_piecewise", "uncompiled", DECODES)], ids=["eager", "piecewise", "piecewise-static", "whole"])
def test_probes_do_not_change_outputs(mode, backend, composition):
    assert probe_problems(runner("glm4_moe", mode=mode, backend=backend), composition) == []


def test_a_probe_that_writes_what_it_sees_is_caught():
    """The check above can fail: a probe that scales an attention output in place (before the next
    piece reads it) changes the step."""

    def meddle(kind, index, outputs):
        if kind == "attention":
            paddle.assign(outputs["attn_out"] * 2, output=outputs["attn_out"])

    assert "changed by probing" in " ".join(probe_problems(runner("glm4_moe", mode=None), PADDED, meddle))


# ---------------------------------------------------------------------------- no fault, no divergence


@pytest.mark.parametrize("mode, composition", [("piecewise", PADDED), ("piecewise", ONE_DECODE),
                                               ("full_and_piecewise", DECODES)], ids=["piecewise", "one", "whole"])
def test_without_faults_no_site_diverges(eager, mode, composition):
    loc = located(runner("qwen3_moe", mode=mode), eager("qwen3_moe"), composition)
    assert loc.first is None, loc.render()
    layers = read_model_config(checkpoint_dir("qwen3_moe")).num_layers
    pieces = {("piece", i) for i in range(layers + 1)}
    attention = set() if mode == "full_and_piecewise" else {("attention", layer) for layer in range(layers)}
    assert {e.site for e in loc.errors} == pieces | attention  # every site compared (a whole-step graph has no attention outputs)


def test_unpadded_piecewise_steps_are_bitwise_equal_at_every_site(eager):
    """A piecewise step at exactly its capture size runs the pieces on the same rows as eager."""
    graph = runner("glm4_moe")
    with staged(graph, FULLER) as graph_batch, staged(eager("glm4_moe"), FULLER) as eager_batch:
        loc = localise(eager("glm4_moe"), graph, eager_batch, graph_batch, EXACT)
    assert loc.first is None, loc.render()


# ---------------------------------------------------------------------------- planted faults


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_route_padding_is_located_at_the_first_moe_layer(eager, name):
    graph = runner(name, {"moe.route_padding"})
    loc = located(graph, eager(name), PADDED)
    want = graph.model.cfg.moe_layers[0] + 1  # the piece that finishes the first MoE layer
    assert loc.first is not None and loc.first.site == ("piece", want), loc.render()
    assert "topk_ids" in loc.first_tensors, loc.render()
    ids = next(e.comparison for e in loc.errors if e.site == ("piece", want) and e.tensor == "topk_ids")
    assert ids.first_mismatch_index[0] >= PADDED.num_tokens, loc.render()  # a padded row


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_stale_positions_are_located_at_piece_0_q_and_k(eager, name):
    loc = located(runner(name, {"graph.stale_positions"}), eager(name), PADDED)
    assert loc.first is not None and loc.first.site == ("piece", 0), loc.render()
    assert loc.first_tensors == ("q", "k"), loc.render()


def test_stale_padding_is_located_at_piece_0_in_a_padded_row(eager):
    loc = located(runner("glm4_moe", {"graph.stale_padding"}), eager("glm4_moe"), PADDED, before=[FULLER])
    assert loc.first is not None and loc.first.site == ("piece", 0), loc.render()
    assert loc.first.comparison.first_mismatch_index[0] >= PADDED.num_tokens, loc.render()


@pytest.mark.parametrize("fault, again", [("kv.write_padded_rows", True), ("kv.stale_block_table", False)])
def test_whole_step_cache_faults_are_located_after_the_first_attention(eager, fault, again):
    """Both corrupt what a whole-step decode's attention reads from the cache (`again`: the first
    replay corrupts slot 0, the second reads it); piece 0 reads no cache, piece 1 is the first after."""
    graph = runner("glm4_moe", {fault}, mode="full_and_piecewise")
    loc = located(graph, eager("glm4_moe"), DECODES, again=again)
    assert loc.first is not None and loc.first.site == ("piece", 1), loc.render()
    assert not loc.padded_rows_compared


def test_probe_comparisons_feed_the_per_layer_picture_not_the_failures(eager):
    """Inside a case's recording the rerun adds the per-layer picture (q of layers 0..L-1, from
    pieces 0..L-1) but no counted comparison and no failure: the case's own failures stay the ones shown."""
    graph = runner("qwen3_moe", {"graph.stale_positions"})
    with recording() as recorder:
        loc = located(graph, eager("qwen3_moe"), PADDED)
    data = recorder.to_dict()
    assert loc.first is not None and data["counts"] == {} and data["failures"] == []
    q_layers = [entry["layer"] for entry in data["layers"] if entry["tensor"] == "probe q[]"]
    assert q_layers == list(range(graph.model.cfg.num_layers)), data["layers"]  # pieces 0..L-1 return q


# ---------------------------------------------------------------------------- names: the layer a tensor belongs to
# The GLM fixture cut to 2 layers (layer 0 dense, layer 1 MoE; its layer 2 is then read as the MTP
# layer and not run). Written by hand from engine/models/moe_decoder.py's cut: piece 0 embeds and
# starts layer 0 (q/k/v); piece 1 finishes layer 0 (its residual) and starts layer 1; piece 2
# finishes layer 1 (routing, then the residual add) and applies the final norm.
TWO_LAYER_NAMES = [
    (("piece", 0), "residual (embedding)", "piece 0, embedding"), (("piece", 0), "q[0]", "piece 0, layer 0"),
    (("piece", 0), "k[0]", "piece 0, layer 0"), (("piece", 0), "v[0]", "piece 0, layer 0"),
    (("attention", 0), "attn_out[0]", "attention 0, layer 0"),
    (("piece", 1), "residual[0]", "piece 1, layer 0"), (("piece", 1), "q[1]", "piece 1, layer 1"),
    (("piece", 1), "k[1]", "piece 1, layer 1"), (("piece", 1), "v[1]", "piece 1, layer 1"),
    (("attention", 1), "attn_out[1]", "attention 1, layer 1"),
    (("piece", 2), "topk_ids[1]", "piece 2, layer 1"), (("piece", 2), "nonfinite[1]", "piece 2, layer 1"),
    (("piece", 2), "hidden (final norm)", "piece 2, final norm"),
]
TWO_LAYER_PICTURE = {(f"probe {t}[]", layer) for t in ("q", "k", "v", "attn_out") for layer in (0, 1)}


def keep_layers(folder: Path, layers: tuple[int, ...]) -> None:
    """Rewrite a checkpoint's weights to hold only `layers`, renumbered 0, 1, ... in that order."""
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    renumber = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(layers)}
    kept = {}
    for name, tensor in load_file(path).items():
        if not name.startswith("model.layers."):
            kept[name] = tensor
        for old, new in renumber.items():
            if name.startswith(old):
                kept[new + name[len(old):]] = tensor
    save_file(kept, path)


def test_probe_names_follow_the_decoder_cut_on_a_two_layer_model(copy_checkpoint):
    folder = copy_checkpoint("glm4_moe")
    keep_layers(folder, (0, 2))  # the fixture's first dense layer and its first MoE layer
    rewrite_config(folder, num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    two = LLM(folder, EngineConfig(**ENGINE)).runner
    with staged(two, PADDED) as batch, recording() as recorder:
        loc = localise(two, two, batch, tol=EXACT)  # the step against itself: every site, nothing diverges
    assert [(e.site, e.name, e.where) for e in loc.errors] == TWO_LAYER_NAMES
    # the report's per-layer picture: tensors seen at both layers, each at its own layer, none at "layer 2"
    assert {(entry["tensor"], entry["layer"]) for entry in recorder.to_dict()["layers"]} == TWO_LAYER_PICTURE


# ---------------------------------------------------------------------------- N ranks vs 1
# A 2-rank TP job (cases/rank_programs/probe_server.py, cases/conftest.py's `probe_rank_pool`,
# planting the run's --failpoints) probes the eager step; its ranks' tensors, merged (head shards
# joined), are compared with one rank's. `dist.skip_allreduce` drops the all-reduce after layer
# 0's attention output projection, which piece 1 runs (it finishes layer 0): the first divergence
# is piece 1, whose residual is the sum the all-reduce should have made.


@pytest.fixture(scope="module")
def two_ranks(probe_rank_pool):
    return probe_rank_pool


def ranks_located(pool, reference: ModelRunner, name: str, composition: Composition, failpoints: str = ""):
    parts = [[p.cached, p.new, p.rest, int(p.decode)] for p in composition.parts]
    replies = pool.request({"checkpoint": name, "tp": 2, "ep": 1, "failpoints": failpoints, "parts": parts,
                            "seed": composition.seed})
    with staged(reference, composition) as batch:
        one = probe_padded_eager(reference, batch, composition.num_tokens)
    return compare_probed(merge_ranks([from_arrays(reply) for reply in replies], one), one, FLOAT32)


@pytest.mark.xdist_group("probe_ranks")
def test_two_ranks_match_one_rank_at_every_site(two_ranks, eager):
    loc = ranks_located(two_ranks, eager("glm4_moe"), "glm4_moe", PADDED)
    assert loc.first is None, loc.render()
    assert {e.tensor for e in loc.errors} >= {"q", "k", "v", "attn_out", "residual"}  # sharded ones merged


@pytest.mark.xdist_group("probe_ranks")
def test_a_skipped_all_reduce_is_located_at_piece_1(two_ranks, eager):
    loc = ranks_located(two_ranks, eager("glm4_moe"), "glm4_moe", PADDED, "dist.skip_allreduce")
    assert loc.first is not None and loc.first.site == ("piece", 1), loc.render()
    assert "residual" in loc.first_tensors, loc.render()
