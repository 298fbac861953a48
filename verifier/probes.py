"""First-divergence localisation: where, inside the stack, two runs of one step part ways.

When a graph step disagrees with the eager step of the same batch (or any runner with a
reference runner), `localise` runs the step again with probes on: the actual runner's own
forward (graph replay, whole-step graph or eager) with `ModelRunner.probe` set, and a reference
that runs the expected runner's pieces eagerly on the same padded shape (real rows in, padded
rows zero, the real-row count: what a graph replay is contractually given). Every piece's
outputs and every attention output between pieces are copied to NumPy as they are produced
(graph outputs are buffers the next replay overwrites) and compared site by site, in stack
order: piece 0, attention 0, piece 1, ... The first site and tensor out of tolerance is the
first divergence; the table of errors at every site shows how it grows.

Padded rows are compared too when the actual step is piecewise: their reference is the padded
eager run, so a fault that only corrupts padded rows (stale padding, padded rows routed to
experts) is located where it starts. A whole-step decode graph runs its own attention on padded
rows, so there only real rows are compared (and it returns only the outputs it keeps).

Probes only read: a probe copies each tensor to NumPy and changes nothing the step computes
(cases/test_probes.py checks outputs with probes on are bitwise the outputs with probes off).
Tensors are named by the layer they belong to, as the decoder's cut places them (`layer_of`):
piece i finishes layer i - 1 (its residual and routing are layer i - 1's) and starts layer i (its
q/k/v are layer i's); attention l is layer l's. Comparisons are named "probe q[1]", "probe
topk_ids[1]", "probe residual (embedding)", "probe hidden (final norm)" and handed to an open
recording as diagnosis (verifier/recording.py `as_diagnosis`): they make the report's per-layer
table without being counted as the case's comparisons or crowding out its own failures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import paddle

from engine.graph.protocol import run_pieces
from verifier.compare import Comparison, compare
from verifier.recording import as_diagnosis
from verifier.tolerance import EXACT, Tolerance, tolerance_for

Site = tuple[str, int]  # ("piece", i) or ("attention", layer)
Seen = dict[Site, dict[str, np.ndarray]]


@dataclass(frozen=True)
class Probed:
    """One step's every piece and attention output, copied off the device."""

    num_tokens: int
    padded_size: int | None  # None: the step ran eagerly
    whole_graph: bool  # a decode step replayed as one whole-model graph
    seen: Seen


# Where the decoder's cut puts each probed tensor (engine/models/moe_decoder.py, `piece_outputs`):
# piece i finishes layer i - 1 (o-proj, residual add, MLP or MoE with its routing) and starts layer
# i (input norm, q/k/v); piece 0 starts with the embedding, the last piece ends with the final norm.
STARTS = ("q", "k", "v")  # computed by piece i for the layer it starts, i
ORDER = ("topk_ids", "nonfinite", "residual", "hidden", *STARTS)  # within a piece, in the order computed


def stack_position(site: Site) -> tuple[int, bool]:
    """Sort key of sites in the order the stack runs them: piece 0, attention 0, piece 1, ..."""
    return site[1], site[0] == "attention"


def layer_of(site: Site, tensor: str) -> int | None:
    """The decoder layer a probed tensor belongs to; None for piece 0's residual (the embedding)
    and the last piece's hidden rows (the final norm)."""
    kind, index = site
    if kind == "attention" or tensor in STARTS:
        return index
    return None if index == 0 or tensor == "hidden" else index - 1


def part_of(site: Site, tensor: str) -> str:
    """"layer 1", "embedding" or "final norm": the part of the model a probed tensor belongs to."""
    layer = layer_of(site, tensor)
    if layer is not None:
        return f"layer {layer}"
    return "embedding" if site[1] == 0 and tensor != "hidden" else "final norm"


def probe_name(site: Site, tensor: str) -> str:
    """The report's name of a probed tensor: "q[1]", "topk_ids[1]" (tensor[layer], so the report's
    per-layer picture puts it at its layer), "residual (embedding)", "hidden (final norm)"."""
    layer = layer_of(site, tensor)
    return f"{tensor} ({part_of(site, tensor)})" if layer is None else f"{tensor}[{layer}]"


def _in_computed_order(named: dict) -> list[str]:
    """A site's tensor names in the order the piece computes them (unknown names keep their place
    after the known finishing ones): a fault in the layer a piece finishes shows first there,
    not in the next layer's q/k/v computed from it."""
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(named, key=lambda name: rank.get(name, rank["hidden"]))


@dataclass(frozen=True)
class SiteError:
    """One tensor at one site: its comparison (actual vs reference)."""

    site: Site
    tensor: str
    comparison: Comparison

    @property
    def layer(self) -> int | None:
        return layer_of(self.site, self.tensor)

    @property
    def name(self) -> str:
        return probe_name(self.site, self.tensor)

    @property
    def where(self) -> str:
        """"piece 2, layer 1" (this tensor's piece and layer), "piece 0, embedding", "attention 1, layer 1"."""
        return f"{self.site[0]} {self.site[1]}, {part_of(self.site, self.tensor)}"


@dataclass(frozen=True)
class Localisation:
    """Every site's errors in stack order and the first tensor out of tolerance (None: none)."""

    num_tokens: int
    padded_size: int | None
    padded_rows_compared: bool
    tol: Tolerance
    errors: tuple[SiteError, ...]
    first: SiteError | None

    @property
    def first_tensors(self) -> tuple[str, ...]:
        """Every tensor out of tolerance at the first divergent site, in the order the piece computes them."""
        return tuple(e.tensor for e in self.first_failures())

    def first_failures(self) -> list[SiteError]:
        """The first divergent site's errors out of tolerance (empty when nothing diverged)."""
        return [e for e in self.errors if self.first and e.site == self.first.site and not e.comparison.passed]

    def render(self) -> str:
        return render(self)


# ---------------------------------------------------------------------------- probing a step


@contextmanager
def probing(runner) -> Iterator[Seen]:
    """Set `runner.probe` for the block; yields what it saw (the latest forward's, by site). The
    runner calls it with each attention output as produced and with every piece's outputs after
    the step's last piece: a piece's graph output buffers are rewritten only by its own replay."""
    seen: Seen = {}

    def probe(kind: str, index: int, outputs: dict) -> None:
        seen[(kind, index)] = _copied(outputs)

    previous, runner.probe = runner.probe, probe
    try:
        yield seen
    finally:
        runner.probe = previous


def probe_forward(runner, batch) -> Probed:
    """Run `batch` through `runner.forward` (whatever it replays) with probes on."""
    ctx = runner.prepare(batch)
    with probing(runner) as seen:
        runner.forward(ctx)
    return Probed(batch.num_tokens, ctx.padded_size, ctx.attention.decode is not None, dict(seen))


@contextmanager
def probing_steps(runner) -> Iterator[list[Probed]]:
    """Probe every step `runner` runs inside the block (a whole workload: `LLM.generate`); yields
    the list the steps' `Probed` are appended to, in order. The runner's `forward` is wrapped on
    the instance for the block only, because the probe hook alone does not say where a step ends
    or how many of its rows are real."""
    steps: list[Probed] = []
    forward = runner.forward

    def probed_forward(ctx):
        with probing(runner) as seen:
            out = forward(ctx)
        steps.append(Probed(ctx.num_tokens, ctx.padded_size, ctx.attention.decode is not None, dict(seen)))
        return out

    runner.forward = probed_forward
    try:
        yield steps
    finally:
        del runner.forward  # the class's method again


def probe_padded_eager(runner, batch, size: int) -> Probed:
    """The reference: `runner`'s pieces run eagerly on inputs padded with zero rows to `size`, the
    real-row count set, its eager attention between them (which reads and writes real rows only)."""
    n, model = batch.num_tokens, runner.model
    ctx = replace(runner.prepare(batch), padded_size=None)
    whole = {spec[0] for index in range(model.num_pieces) for spec in model.piece_inputs(index) if spec[2] is None}

    def padded(inputs: dict) -> dict:  # rows [n, size) zero, as in a replay's input buffers
        return {name: t if name in whole else _padded(t, size, n) for name, t in inputs.items()}

    seen: Seen = {}

    def run_piece(index: int, inputs: dict) -> dict:
        outputs = model.piece(index, padded(inputs))
        seen[("piece", index)] = _copied(outputs)
        return outputs

    def attend(layer: int, outputs: dict) -> dict:
        out = model.attention(layer, outputs, runner.cache, ctx.attention)
        seen[("attention", layer)] = _copied(out)
        return out

    step = padded(model.step_values(ctx.token_ids, ctx.positions, ctx.num_real, replay_ids=ctx.replay_ids))
    run_pieces(model.num_pieces, run_piece, attend, step)  # inserts piece 0, attention 0, piece 1, ...
    return Probed(n, size if size != n else None, False, seen)


def _padded(tensor: paddle.Tensor, size: int, num_tokens: int) -> paddle.Tensor:
    if tensor.shape[0] == size:
        return tensor
    pad = paddle.zeros([size - num_tokens, *tensor.shape[1:]], dtype=tensor.dtype)
    return paddle.concat([tensor[:num_tokens], pad])


def _copied(outputs: dict) -> dict[str, np.ndarray]:
    return {name: tensor.numpy().copy() for name, tensor in outputs.items()}


def to_arrays(probed: Probed) -> dict[str, np.ndarray]:
    """Flat arrays ("piece/2/q", ..., "num_tokens", "padded_size" (0: eager), "whole_graph") for a
    rank program's reply; `from_arrays` reads them back."""
    head = {"num_tokens": np.asarray(probed.num_tokens), "padded_size": np.asarray(probed.padded_size or 0),
            "whole_graph": np.asarray(probed.whole_graph)}
    return head | {f"{kind}/{index}/{name}": array for (kind, index), named in probed.seen.items()
                   for name, array in named.items()}


def from_arrays(arrays: dict) -> Probed:
    seen: Seen = {}
    for key, array in arrays.items():
        if key.count("/") == 2:
            kind, index, name = key.split("/")
            seen.setdefault((kind, int(index)), {})[name] = np.asarray(array)
    order = sorted(seen, key=stack_position)
    return Probed(int(arrays["num_tokens"]), int(arrays["padded_size"]) or None, bool(arrays["whole_graph"]),
                  {site: seen[site] for site in order})


def merge_ranks(ranks: list[Probed], like: Probed) -> Probed:
    """One probed step from every TP rank's, shaped like the one-rank step `like`: a tensor that
    already has `like`'s shape on rank 0 is replicated (rank 0's is taken); a head-sharded one is
    the ranks' tensors joined along the one axis where rank 0's is smaller (ranks hold contiguous
    heads). Anything else (kv heads replicated over more ranks than heads) stays rank 0's, and its
    shape difference shows as a divergence."""
    seen: Seen = {}
    for site, named in ranks[0].seen.items():
        seen[site] = {}
        for name, first in named.items():
            want = like.seen.get(site, {}).get(name)
            smaller = [] if want is None or want.ndim != first.ndim else \
                [axis for axis, (a, b) in enumerate(zip(first.shape, want.shape)) if a != b]
            parts = [rank.seen[site][name] for rank in ranks]
            seen[site][name] = np.concatenate(parts, axis=smaller[0]) if len(smaller) == 1 else first
    return replace(ranks[0], seen=seen)


# ---------------------------------------------------------------------------- comparing


def localise(expected, actual, expected_batch, actual_batch=None, tol: Tolerance | None = None) -> Localisation:
    """Rerun one step with probes on: `actual`'s forward vs `expected`'s pieces run eagerly at the
    actual step's padded size. The batches are the same step staged on each runner (identical
    caches before the step); one batch serves both when the runners share a cache. Both runners
    write the step's k/v again, to the step's own slots, as the first run did."""
    actual_batch = actual_batch or expected_batch
    got = probe_forward(actual, actual_batch)
    want = probe_padded_eager(expected, expected_batch, got.padded_size or got.num_tokens)
    with as_diagnosis() as keep:  # for the report's per-layer picture, not as the case's failures
        loc = compare_probed(got, want, tol or tolerance_for("float32"))
        keep([e.comparison for e in loc.errors])
    return loc


def compare_probed(actual: Probed, expected: Probed, tol: Tolerance) -> Localisation:
    """Site by site in stack order, each site's tensors in computed order, those both sides saw;
    integer tensors exactly (`*_ids` compared as sets per row)."""
    all_rows = not actual.whole_graph
    rows = slice(None) if all_rows else slice(0, actual.num_tokens)
    errors = []
    for site in sorted(expected.seen, key=stack_position):  # a runner's probe sees attention first
        named = expected.seen[site]
        for name in _in_computed_order(named):
            want, got = named[name], actual.seen.get(site, {}).get(name)
            if got is not None:
                errors.append(SiteError(site, name, _compare(site, name, got[rows], want[rows], tol)))
    first = next((e for e in errors if not e.comparison.passed), None)
    return Localisation(actual.num_tokens, actual.padded_size, all_rows, tol, tuple(errors), first)


@dataclass(frozen=True)
class StepDivergence:
    """The first step of a workload whose probes leave tolerance, and its localisation."""

    step: int
    loc: Localisation | None  # None: one run ended here, the other went on
    steps: tuple[int, int] = (0, 0)  # (actual, expected) step counts

    def render(self) -> str:
        if self.loc is None:
            return f"step {self.step}: the runs differ in length ({self.steps[0]} steps vs {self.steps[1]} expected)"
        return f"step {self.step} of {self.steps[1]}: {self.loc.render()}"  # the summary stays one line


def first_divergent_step(actual: list[Probed], expected: list[Probed], tol: Tolerance) -> StepDivergence | None:
    """Two runs of one workload (the same steps in the same order: a replay of a recorded run),
    compared step by step at every probe; the first step that leaves tolerance (None: none does).
    A run with more or fewer steps diverges at the first step the other lacks. Its comparisons go
    to an open recording as diagnosis (the per-layer picture), like `localise`'s."""
    with as_diagnosis() as keep:
        for step, (got, want) in enumerate(zip(actual, expected)):
            loc = compare_probed(got, want, tol)
            if loc.first is not None:
                keep([e.comparison for e in loc.errors])
                return StepDivergence(step, loc, (len(actual), len(expected)))
    if len(actual) != len(expected):
        return StepDivergence(min(len(actual), len(expected)), None, (len(actual), len(expected)))
    return None


def _compare(site: Site, name: str, got: np.ndarray, want: np.ndarray, tol: Tolerance) -> Comparison:
    exact = not np.issubdtype(want.dtype, np.floating)
    if name.endswith("_ids") and got.shape == want.shape:
        got, want = np.sort(got, axis=-1), np.sort(want, axis=-1)
    label = f"probe {probe_name(site, name)}"
    if got.shape != want.shape:  # a shape mismatch is a divergence, shown by compare's own message
        got = np.full(want.shape, np.nan) if want.size else got
    return compare(got, want, EXACT if exact else tol, name=label)


# ---------------------------------------------------------------------------- text


def render(loc: Localisation) -> str:
    """Two summary lines (the first divergence: its piece and layer, every tensor out of tolerance
    there, the worst element of the first; the step and tolerance), then max |error| per layer (rows:
    embedding, layer 0, ..., final norm) and tensor, "!" where out of tolerance."""
    rows = "real rows only" if not loc.padded_rows_compared else "padded rows included" if loc.padded_size \
        else "every row"
    size = f"padded to {loc.padded_size}" if loc.padded_size else "unpadded"
    step = f"probes: {loc.num_tokens}-token step {size}, {rows}, tolerance {loc.tol}"
    if loc.first is None:
        head = [("probes: no piece or attention output leaves tolerance (the divergence is in what the check "
                 "compares beyond them, or in a contract both runs break alike)"), step]
    else:
        c = loc.first.comparison
        padded = c.max_abs_index and c.max_abs_index[0] >= loc.num_tokens
        out = ", ".join(e.name for e in loc.first_failures())
        head = [(f"first divergence: {loc.first.where} / {out}; {loc.first.name}: "
                 f"{c.mismatches} of {c.total} out, worst |err| {c.max_abs_err:.3g} at {c.max_abs_index}"
                 f"{' (a padded row)' if padded else ''}"), step]
    return "\n".join(head + _table(loc.errors))


COLUMNS = (*STARTS, "attn_out", "topk_ids", "nonfinite", "residual", "hidden")  # a layer's, in computed order


def _table(errors: tuple[SiteError, ...]) -> list[str]:
    """One row per part of the model in stack order (a layer's tensors come from pieces l and l + 1
    and attention l), one column per tensor name."""
    seen = list(dict.fromkeys(e.tensor for e in errors))
    names = [n for n in COLUMNS if n in seen] + [n for n in seen if n not in COLUMNS]
    widths = [max(len(n), 7) + 2 for n in names]
    cells: dict[str, dict[str, str]] = {}
    for e in errors:
        c = e.comparison
        cells.setdefault(part_of(e.site, e.tensor), {})[e.tensor] = f"{c.max_abs_err:.2g}{'' if c.passed else '!'}"
    lines = ["max |err|".ljust(12) + "".join(n.rjust(w) for n, w in zip(names, widths))]
    for where, row in cells.items():
        lines.append(where.ljust(12) + "".join(row.get(n, "-").rjust(w) for n, w in zip(names, widths)))
    return lines


def localised_problems(expected, actual, expected_batch, actual_batch=None, tol: Tolerance | None = None) -> list[str]:
    """For a check's failure message: the localisation's text as lines (the first two summarise).
    Never raises: a probe that cannot run says so instead of hiding the failure it was asked to explain."""
    try:
        return localise(expected, actual, expected_batch, actual_batch, tol).render().splitlines()
    except Exception as error:  # noqa: BLE001 - the diagnosis must not mask the failure it explains
        return [f"probes could not run: {type(error).__name__}: {error}"]
