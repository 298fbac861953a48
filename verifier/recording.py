"""Capture the comparisons a case makes, so the gate's report can show them.

`verifier.compare.compare` hands every `Comparison` it makes to `note`, and
`verifier.dumps.compare_dumps` is wrapped by `dump_level`; both are no-ops unless a
`recording()` context is open. The pytest plugin opens one around each case's call; the
`compare` CLI opens one around its dump comparison. The context lives in a ContextVar and is
restored in `finally`, so nothing leaks between cases, threads or nested recordings.

Recording is cheap on purpose (a case may compare thousands of arrays under hypothesis): it
counts every comparison and keeps the objects of only the latest failures and the latest few
comparisons (for the per-layer picture). Under hypothesis the latest run of a failing case is
the minimised example, so "latest" is what the report should show. Conversion to plain data
happens once, in `Recorder.to_dict`.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from verifier.tolerance import DEFAULT_TOLERANCES, EXACT, Tolerance

KEPT_FAILURES = 3  # failed comparisons shown per case: the minimised example's, not every shrink step's
KEPT_RECENT = 96  # comparisons kept for the per-layer picture (a fixture model has < 10 layers x 4)
LAYER = re.compile(r"\[(\d+)\]|layer\s*(\d+)")

_ACTIVE: ContextVar["Recorder | None"] = ContextVar("graphgate_recorder", default=None)


@dataclass
class Recorder:
    """The comparisons of one case (or one CLI comparison), as counts plus a bounded sample."""

    counts: dict[str, list[int]] = field(default_factory=dict)  # kind -> [ran, failed]
    failures: deque = field(default_factory=lambda: deque(maxlen=KEPT_FAILURES))
    recent: deque = field(default_factory=lambda: deque(maxlen=KEPT_RECENT))
    near_ties: dict[str, tuple[int, ...]] = field(default_factory=dict)
    paused: int = 0

    def add(self, kind: str, passed: bool, item: dict | Any) -> None:
        """Count one comparison of `kind` ("numeric", "tokens", "routing"); keep it if it failed."""
        ran_failed = self.counts.setdefault(kind, [0, 0])
        ran_failed[0] += 1
        ran_failed[1] += not passed
        self.recent.append(item)
        if not passed:
            self.failures.append(item)

    def to_dict(self) -> dict:
        """Plain JSON-safe data (the `comparisons` object of the report schema)."""
        return {
            "counts": {kind: {"ran": rf[0], "failed": rf[1]} for kind, rf in sorted(self.counts.items())},
            "failures": _unique([_plain(item) for item in self.failures]),
            "layers": _layer_errors([_plain(item) for item in self.recent]),
            "near_ties": [{"key": key, "rows": list(rows)} for key, rows in sorted(self.near_ties.items())],
        }


@contextlib.contextmanager
def recording(keep_failures: int | None = KEPT_FAILURES) -> Iterator[Recorder]:
    """Record every comparison made inside the block into a fresh Recorder that keeps the latest
    `keep_failures` failures (None: all of them, for a one-shot comparison such as two dumps)."""
    recorder = Recorder(failures=deque(maxlen=keep_failures))
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def note(comparison):
    """Record a `Comparison` (if a recording is open) and return it unchanged."""
    recorder = _ACTIVE.get()
    if recorder is not None and not recorder.paused:
        recorder.add("numeric", comparison.passed, comparison)
    return comparison


@contextlib.contextmanager
def as_diagnosis() -> Iterator[Callable[[list], None]]:
    """For comparisons that explain a failure (the probes' rerun of a failed step): inside the block
    `note` records nothing; the yielded `keep(comparisons)` adds them to the per-layer picture only,
    neither counted nor kept as failures, so the case's own failed comparisons stay the ones shown."""
    recorder = _ACTIVE.get()
    if recorder is None:
        yield lambda comparisons: None
        return
    recorder.paused += 1
    try:
        yield recorder.recent.extend
    finally:
        recorder.paused -= 1


def note_verdict(kind: str, passed: bool, item: dict, near_tie_rows: tuple[int, ...] = ()) -> None:
    """Record one verdict already in the report's plain form (verifier/truth.py: a key judged
    against a float64 truth), and the rows it found within noise, if a recording is open."""
    recorder = _ACTIVE.get()
    if recorder is None or recorder.paused:
        return
    recorder.add(kind, passed, item)
    if near_tie_rows:
        recorder.near_ties[item["name"]] = tuple(near_tie_rows)


def dump_level(compare_dumps: Callable) -> Callable:
    """Decorate `compare_dumps`: record its verdict per key instead of its inner comparisons.

    The inner `compare` calls are paused because a rel-L2-only check compares under EXACT just to
    measure the error; counting that as an exact comparison would report a failure that is none.
    """

    @functools.wraps(compare_dumps)
    def wrapper(actual, expected, *args, **kwargs):
        recorder = _ACTIVE.get()
        if recorder is None:
            return compare_dumps(actual, expected, *args, **kwargs)
        recorder.paused += 1
        try:
            diff = compare_dumps(actual, expected, *args, **kwargs)
        finally:
            recorder.paused -= 1
        _note_dump(recorder, diff, expected, kwargs.get("max_rel_l2"))
        return diff

    return wrapper


def _note_dump(recorder: Recorder, diff, expected: dict, max_rel_l2: float | None) -> None:
    """One record per compared key: numeric comparisons, rel-L2 bounds, token lists, routing."""
    for comparison in diff.comparisons:
        recorder.add("numeric", comparison.passed, comparison)
    rel_failed = {line.split(":", 1)[0]: line for line in diff.rel_l2_failures}
    if max_rel_l2 is not None:
        for key in sorted(k for k in expected if k.startswith(("logits_p", "greedy_logits_p"))):
            recorder.add("numeric", key not in rel_failed, _rule(key, f"rel L2 < {max_rel_l2:g}", rel_failed.get(key)))
    token_failed = {line.split(":", 1)[0]: line for line in diff.token_failures}
    for key in sorted(k for k in expected if k.startswith(("greedy_p", "input_ids_p"))):
        recorder.add("tokens", key not in token_failed, _rule(key, "exact", token_failed.get(key)))
    for routing in diff.routing:
        text = None if routing.passed else routing.message()  # names each failed row's ids and why
        recorder.add("routing", routing.passed, _rule(routing.key, "exact outside near-ties", text))
        if routing.near_tie_rows:
            recorder.near_ties[routing.key] = routing.near_tie_rows


def _rule(name: str, rule: str, failure: str | None) -> dict:
    return {"name": name, "tolerance": rule, "tolerance_source": "verifier/dumps.py",
            "passed": failure is None, "message": failure or ""}


def tolerance_source(tol: Tolerance, dtype: str) -> str:
    """Where a tolerance comes from: the table row for the dtype, EXACT, or a case's override."""
    if tol == DEFAULT_TOLERANCES.get(dtype):
        return f"verifier/tolerance.py, {dtype} row"
    if tol == EXACT:
        return "verifier/tolerance.py, EXACT"
    return "the case's own override"


def _plain(item) -> dict:
    """A Comparison (or an already plain rule record) as the schema's comparison object."""
    if isinstance(item, dict):
        return item
    data = item.to_dict()
    return {
        "name": data["name"], "passed": data["passed"], "message": item.message(),
        "tolerance": str(item.tol), "tolerance_source": tolerance_source(item.tol, item.dtype),
        "dtype": data["dtype"], "shape": data["shape"], "mismatches": data["mismatches"], "total": data["total"],
        "max_abs_err": data["max_abs_err"], "max_abs_index": data["max_abs_index"],
        "max_rel_err": data["max_rel_err"], "max_rel_index": data["max_rel_index"],
        "first_mismatch_index": data["first_mismatch_index"], "rel_l2": data["rel_l2"],
    }


def _layer_errors(items: list[dict]) -> list[dict]:
    """Greatest absolute error per (tensor, layer) among numeric comparisons named with a layer.

    A name like "keys[3]" or "expert ids layer 3" gives tensor "keys[]" / "expert ids layer", layer 3.
    Only tensors seen at two or more layers make a picture. The latest comparison of each layer
    wins: under hypothesis that is the minimised example's (a layer it never reached keeps an
    earlier example's value).
    """
    latest: dict[tuple[str, int], float] = {}
    for item in items:
        match = LAYER.search(item.get("name", ""))
        error = item.get("max_abs_err")
        if match is None or not isinstance(error, (int, float)):
            continue
        layer = int(match.group(1) or match.group(2))
        tensor = LAYER.sub(lambda m: "[]" if m.group(1) else "layer", item["name"])
        latest[(tensor, layer)] = float(error)
    layered = {tensor for tensor, _ in latest if sum(t == tensor for t, _ in latest) >= 2}
    return [{"tensor": t, "layer": layer, "max_abs_err": err} for (t, layer), err in sorted(latest.items())
            if t in layered]


def _unique(items: list[dict]) -> list[dict]:
    """Drop repeats (hypothesis replays a failing example while shrinking), keeping the latest."""
    seen: dict[str, dict] = {}
    for item in items:
        key = f"{item['name']}\0{item['message']}"
        seen.pop(key, None)
        seen[key] = item
    return list(seen.values())
