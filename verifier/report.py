"""The gate's report as data: one entry per case, merged on the pytest controller, saved as JSON.

JSON schema "graphgate.report", version 2 (`SCHEMA` below is the normative JSON Schema; bump
`VERSION` on any change a reader could notice):

  schema, version          "graphgate.report", 2
  created                  ISO 8601 UTC time the report was written
  command                  the pytest arguments of the run
  failpoints               the planted failpoints ("" when none)
  verdict                  "pass" | "divergence" | "could not run"
  totals                   {passed, failed, error, skipped, xfailed, xpassed}: cases by outcome
  areas[]                  per area: cases, comparisons, failed_comparisons, failed_cases, near_ties
  shard                    optional; only a sharded run's report (`--shard I/N`, verifier/shards.py):
                           {index, count, collected: every nodeid of the whole collection, sorted,
                           selected: the nodeids this shard ran, sorted}; merge-reports reads it
  models[]                 optional; only a run with `--model DIR` (the battery, cases/test_user_model.py):
                           per model {model: the folder, cases, comparisons, failed_cases, skipped,
                           areas[]: {area (the battery's own names), cases, comparisons,
                           failed_comparisons, failed_cases, skipped}, skips[]: {nodeid, area, reason}}
  cases[]                  per case (sorted by nodeid, one entry per nodeid):
    nodeid, area, outcome (one of OUTCOMES, filed by `fold` below), failed_in (the phase whose
    failure filed the case: "collection" | "setup" | "call" | "teardown", null when none failed),
    teardown (head of a teardown error, "" when teardown was clean: shown whatever the outcome),
    duration (s, every phase), message (head of the first failure, "" when none),
    example (hypothesis's minimised input or null), reproduce (one shell command, or null unless
    failed / error), worker (xdist id or null), model (optional: a battery case's {dir, area,
    skip_reason when skipped}),
    comparisons: {counts: {kind: {ran, failed}}, failures[], layers[], near_ties[]}
      failures[]: name, passed, message, tolerance, tolerance_source, and for numeric
                  comparisons dtype, shape, mismatches, total, max_abs_err / max_abs_index,
                  max_rel_err / max_rel_index, first_mismatch_index, rel_l2
                  (non-finite floats are the strings "nan", "inf", "-inf")
      layers[]:   {tensor, layer, max_abs_err}: the per-layer error picture
      near_ties[]: {key, rows}: routing rows within the near-tie margin, never failures
      truth[]:    (optional: cases judged against a float64 truth, verifier/truth.py) per float key
                  {kind "float", key, actual_error, reference_error (rel L2 to the truth), bound,
                  ratio, floor, rows, times, passed, verdict}; per flip {kind "flip", key, position,
                  actual, reference, truth (ids), margin, margin_of, bound, wrong ("" | "actual" |
                  "reference" | "both"), reason, noise, verdict}. A failure item judged so carries
                  the same object under `truth` (a key's flips as {kind "flips", flips[], unjudged}).

A failed comparison inside a passed case is a check that was meant to fail (a planted-fault case
asserting its check fires); it counts in `failed_comparisons` only when its case's check (the call
phase) failed.

How a case's phases are filed (`fold`; version 2, after a call failure followed by a teardown
error was misfiled as "could not run"):
  a failed call (an assertion, a strict xpass) "failed" (a divergence), whatever set-up or
                                               teardown did; a teardown error is kept beside it
  a set-up error, a collection error           "error" (could not run: the check was never reached)
  a teardown error after a check that passed   "failed" (failed_in "teardown": the case reached its
                                               check and did not end cleanly); after a skip: "error"
  a skip (set-up or call)                      "skipped"
  an expected failure / an unexpected pass     "xfailed" / "xpassed" (pytest's xfail marker, not strict;
                                               as in pytest, the marker also covers a set-up or teardown
                                               error: "xfailed", the teardown error still shown)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

SCHEMA_NAME = "graphgate.report"
VERSION = 2
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
PHASES = ("collection", "setup", "call", "teardown")
CHECK_REACHED = ("passed", "xfailed", "xpassed")  # outcomes of a case whose check ran to its verdict
XDIST_GROUP = re.compile(r"@[^\[\]:@]+$")  # `--dist loadgroup` appends "@group" to a nodeid; pytest rejects it
# Areas in display order; a case outside them is "other".
AREAS = ("graph vs eager", "ranks", "routing", "routing replay", "prefix cache", "reference", "truth", "capture lint",
         "config", "verifier", "other")
# Case file stem -> area, for cases without a `gate_area` mark.
AREA_OF_FILE = {
    "test_graph": "graph vs eager", "test_graph_toy": "graph vs eager", "test_pieces": "graph vs eager",
    "test_parallel": "ranks", "test_launch": "ranks", "test_cli_ranks": "ranks",
    "test_router": "routing", "test_seed_regression": "routing",
    "test_golden": "reference", "test_batching": "reference", "test_user_model": "graph vs eager",
    "test_verifier_compare": "verifier", "test_report": "verifier", "test_verifier_cli": "verifier",
    "test_probes": "graph vs eager", "test_probes_replay": "routing replay",
    "test_moe_forms": "reference", "test_attention": "reference",
    "test_threads": "config", "test_selftest": "verifier", "test_capture_lint": "capture lint", "test_layering": "verifier",
    "test_config": "config", "test_config_fields": "config", "test_cli": "config", "test_loader": "config",
}
AREA_OF_PREFIX = {"test_routing_replay": "routing replay", "test_prefix": "prefix cache",  # families of case files
                  "test_truth": "truth", "test_float64": "truth"}


def area_of_file(stem: str) -> str:
    """The report area of a case file (by its name without .py); "other" when not listed."""
    if stem in AREA_OF_FILE:
        return AREA_OF_FILE[stem]
    return next((area for prefix, area in AREA_OF_PREFIX.items() if stem.startswith(prefix)), "other")


def bare_nodeid(nodeid: str) -> str:
    """A nodeid as pytest accepts it on a command line: without the "@group" xdist's loadgroup adds."""
    return XDIST_GROUP.sub("", nodeid)


def area_of_nodeid(nodeid: str) -> str:
    """The report area of a case by its file (what a case's `gate_area` mark does not override)."""
    return area_of_file(Path(nodeid.split("::", 1)[0]).stem)


_NUMBER_OR_TEXT = {"type": ["number", "string"]}
_INDEX = {"type": ["array", "null"], "items": {"type": "integer"}}
_COMPARISON = {
    "type": "object",
    "required": ["name", "passed", "message", "tolerance", "tolerance_source"],
    "properties": {
        "name": {"type": "string"}, "passed": {"type": "boolean"}, "message": {"type": "string"},
        "tolerance": {"type": "string"}, "tolerance_source": {"type": "string"},
        "dtype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
        "mismatches": {"type": "integer"}, "total": {"type": "integer"},
        "max_abs_err": _NUMBER_OR_TEXT, "max_abs_index": _INDEX, "max_rel_err": _NUMBER_OR_TEXT,
        "max_rel_index": _INDEX, "first_mismatch_index": _INDEX, "rel_l2": _NUMBER_OR_TEXT,
    },
}
_COUNT = {"type": "object", "required": ["ran", "failed"], "additionalProperties": False,
          "properties": {"ran": {"type": "integer", "minimum": 0}, "failed": {"type": "integer", "minimum": 0}}}
_COMPARISONS = {
    "type": "object",
    "required": ["counts", "failures", "layers", "near_ties"],
    "properties": {
        "counts": {"type": "object", "additionalProperties": _COUNT},
        "failures": {"type": "array", "items": _COMPARISON},
        "layers": {"type": "array", "items": {
            "type": "object", "required": ["tensor", "layer", "max_abs_err"],
            "properties": {"tensor": {"type": "string"}, "layer": {"type": "integer"}, "max_abs_err": {"type": "number"}}}},
        "near_ties": {"type": "array", "items": {
            "type": "object", "required": ["key", "rows"],
            "properties": {"key": {"type": "string"}, "rows": {"type": "array", "items": {"type": "integer"}}}}},
        "truth": {"type": "array", "items": {"type": "object", "required": ["kind", "key", "verdict"],
                                             "properties": {"kind": {"enum": ["float", "flip"]}}}},
    },
}
_CASE = {
    "type": "object",
    "required": ["nodeid", "area", "outcome", "failed_in", "teardown", "duration", "message", "example",
                 "reproduce", "worker", "comparisons"],
    "properties": {
        "nodeid": {"type": "string"}, "area": {"enum": list(AREAS)}, "outcome": {"enum": list(OUTCOMES)},
        "failed_in": {"enum": [*PHASES, None]}, "teardown": {"type": "string"},
        "duration": {"type": "number", "minimum": 0}, "message": {"type": "string"},
        "example": {"type": ["string", "null"]}, "reproduce": {"type": ["string", "null"]},
        "worker": {"type": ["string", "null"]}, "comparisons": _COMPARISONS,
    },
}
_AREA = {"type": "object",
         "required": ["area", "cases", "comparisons", "failed_comparisons", "failed_cases", "near_ties"],
         "properties": {"area": {"enum": list(AREAS)}, **{k: {"type": "integer", "minimum": 0} for k in (
             "cases", "comparisons", "failed_comparisons", "failed_cases", "near_ties")}}}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://graphgate.invalid/report-v1.json",
    "title": "graphgate gate report",
    "type": "object",
    "required": ["schema", "version", "created", "command", "failpoints", "verdict", "totals", "areas", "cases"],
    "properties": {
        "schema": {"const": SCHEMA_NAME}, "version": {"const": VERSION}, "created": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}}, "failpoints": {"type": "string"},
        "verdict": {"enum": ["pass", "divergence", "could not run"]},
        "totals": {"type": "object", "required": list(OUTCOMES),
                   "properties": {k: {"type": "integer", "minimum": 0} for k in OUTCOMES}},
        "areas": {"type": "array", "items": _AREA},
        "cases": {"type": "array", "items": _CASE},
        "models": {"type": "array", "items": {
            "type": "object", "required": ["model", "cases", "comparisons", "failed_cases", "skipped", "areas", "skips"],
            "properties": {"model": {"type": "string"}, "areas": {"type": "array", "items": {
                "type": "object", "required": ["area", "cases", "comparisons", "failed_comparisons", "failed_cases",
                                               "skipped"]}}, "skips": {"type": "array", "items": {
                "type": "object", "required": ["nodeid", "area", "reason"]}}}}},
        "shard": {"type": "object", "required": ["index", "count", "collected", "selected"],
                  "properties": {"index": {"type": "integer", "minimum": 1}, "count": {"type": "integer", "minimum": 1},
                                 "collected": {"type": "array", "items": {"type": "string"}},
                                 "selected": {"type": "array", "items": {"type": "string"}}}},
    },
}


def empty_comparisons() -> dict:
    return {"counts": {}, "failures": [], "layers": [], "near_ties": []}


@dataclass
class Case:
    """One case's entry (see the module docstring for the fields)."""

    nodeid: str
    area: str = "other"
    outcome: str = "passed"
    failed_in: str | None = None
    teardown: str = ""
    duration: float = 0.0
    message: str = ""
    example: str | None = None
    reproduce: str | None = None
    worker: str | None = None
    comparisons: dict = field(default_factory=empty_comparisons)
    model: dict | None = None  # a battery case's {"dir", "area"} (+ "skip_reason"); None otherwise

    def ran_failed(self) -> tuple[int, int]:
        """(comparisons made, comparisons failed); failures count only when the check itself failed
        (not a passing check followed by a teardown error; failed_in None: a Case built directly
        as failed, such as the compare CLI's)."""
        counts = self.comparisons["counts"].values()
        ran = sum(c["ran"] for c in counts)
        check_failed = self.outcome == "failed" and self.failed_in in ("call", None)
        return ran, sum(c["failed"] for c in counts) if check_failed else 0

    def near_tie_rows(self) -> int:
        return sum(len(t["rows"]) for t in self.comparisons["near_ties"])


@dataclass(frozen=True)
class Phase:
    """One phase of a case as the controller hears of it: pytest's setup, call or teardown report."""

    when: str  # "setup" | "call" | "teardown"
    outcome: str  # pytest's: "passed" | "failed" | "skipped"
    message: str = ""  # head of the failure, when it failed
    xfail: bool = False  # pytest's xfail marker decided this outcome (the report's `wasxfail`)
    duration: float = 0.0
    worker: str | None = None
    record: dict | None = None  # the call's record: area, comparisons, example, message


def fold(case: Case, phase: Phase) -> None:
    """File one phase into its case (phases of a case arrive in order: setup, call, teardown).

    The table in the module docstring is the contract; `cases/test_report_oracle.py` restates it
    independently and checks this function against it."""
    case.duration += phase.duration
    case.worker = phase.worker or case.worker
    if phase.when == "call":
        _fold_call(case, phase)
    elif phase.outcome == "failed" and phase.when == "setup":
        _file_failure(case, "error", "setup", phase.message)
    elif phase.outcome == "failed":  # teardown: kept beside whatever the case was filed as
        case.teardown = phase.message
        if case.failed_in is None:  # the check passed (or was skipped): the teardown files the case
            _file_failure(case, "failed" if case.outcome in CHECK_REACHED else "error", "teardown", phase.message)
    elif phase.when == "teardown" and phase.xfail:  # an xfail marker covers teardown errors too: shown, not filed
        case.teardown = phase.message
    elif phase.outcome == "skipped" and phase.when == "setup":
        case.outcome = "xfailed" if phase.xfail else "skipped"


def _fold_call(case: Case, phase: Phase) -> None:
    if phase.record is not None:
        case.area, case.comparisons, case.example = (phase.record["area"], phase.record["comparisons"],
                                                     phase.record["example"])
    if phase.outcome == "failed":
        _file_failure(case, "failed", "call", (phase.record or {}).get("message") or phase.message)
    elif phase.outcome == "skipped":
        case.outcome = "xfailed" if phase.xfail else "skipped"
    else:
        case.outcome = "xpassed" if phase.xfail else "passed"


def _file_failure(case: Case, outcome: str, when: str, message: str) -> None:
    case.outcome, case.failed_in = outcome, when
    case.message = case.message or message


@dataclass
class GateReport:
    """Every case of one run, keyed by nodeid: adding a case twice replaces it, never duplicates."""

    command: list[str] = field(default_factory=list)
    failpoints: str = ""
    cases: dict[str, Case] = field(default_factory=dict)
    shard: dict | None = None  # a sharded run's shard and whole collection (see the module docstring)

    def add(self, case: Case) -> None:
        self.cases[case.nodeid] = case

    def totals(self) -> dict[str, int]:
        return {outcome: sum(c.outcome == outcome for c in self.cases.values()) for outcome in OUTCOMES}

    def verdict(self) -> str:
        """A failed case is a divergence; only errors (a case that could not start) or no case at all make
        "could not run" (a shard whose part of a non-empty collection is empty passes: nothing to run)."""
        totals = self.totals()
        if totals["failed"]:
            return "divergence"
        empty_shard = self.shard is not None and not self.shard["selected"] and bool(self.shard["collected"])
        return "could not run" if totals["error"] or not (self.cases or empty_shard) else "pass"

    def areas(self) -> list[dict]:
        rows = []
        for area in AREAS:
            cases = [c for c in self.cases.values() if c.area == area]
            if not cases:
                continue
            ran_failed = [c.ran_failed() for c in cases]
            rows.append({"area": area, "cases": len(cases), "comparisons": sum(r for r, _ in ran_failed),
                         "failed_comparisons": sum(f for _, f in ran_failed),
                         "failed_cases": sum(c.outcome in ("failed", "error") for c in cases),
                         "near_ties": sum(c.near_tie_rows() for c in cases)})
        return rows

    def models(self) -> list[dict]:
        """The per-model sections of a run with --model: each model's battery areas (sorted by name)
        with counts, and every skip's reason."""
        by_model: dict[str, list[Case]] = {}
        for case in self.sorted_cases():
            if case.model is not None:
                by_model.setdefault(case.model["dir"], []).append(case)
        return [_model_section(model, cases) for model, cases in by_model.items()]

    def failed(self) -> list[Case]:
        return [c for c in self.sorted_cases() if c.outcome in ("failed", "error")]

    def sorted_cases(self) -> list[Case]:
        return [self.cases[k] for k in sorted(self.cases)]

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA_NAME, "version": VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": list(self.command), "failpoints": self.failpoints, "verdict": self.verdict(),
            "totals": self.totals(), "areas": self.areas(),
            "cases": [_case_dict(case) for case in self.sorted_cases()],
        } | ({"shard": self.shard} if self.shard is not None else {}) | (
            {"models": self.models()} if any(c.model for c in self.cases.values()) else {})

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _case_dict(case: Case) -> dict:
    """A case as JSON; `model` only on battery cases, so reports without --model are unchanged."""
    return {k: v for k, v in case.__dict__.items() if k != "model" or v is not None}


def _model_section(model: str, cases: list[Case]) -> dict:
    areas: dict[str, dict] = {}
    for case in cases:
        row = areas.setdefault(case.model["area"], {"area": case.model["area"], "cases": 0, "comparisons": 0,
                                                    "failed_comparisons": 0, "failed_cases": 0, "skipped": 0})
        ran, failed = case.ran_failed()
        row["cases"] += 1
        row["comparisons"] += ran
        row["failed_comparisons"] += failed
        row["failed_cases"] += case.outcome in ("failed", "error")
        row["skipped"] += case.outcome == "skipped"
    skips = [{"nodeid": c.nodeid, "area": c.model["area"], "reason": c.model.get("skip_reason", "")}
             for c in cases if c.outcome == "skipped"]
    return {"model": model, "cases": len(cases), "comparisons": sum(r["comparisons"] for r in areas.values()),
            "failed_cases": sum(r["failed_cases"] for r in areas.values()), "skipped": len(skips),
            "areas": [areas[name] for name in sorted(areas)], "skips": skips}


def read_json(path: str | Path) -> GateReport:
    """Load a report written by `write_json`; raises ValueError naming the file on another schema."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA_NAME or data.get("version") != VERSION:
        raise ValueError(f"{path}: not a {SCHEMA_NAME} v{VERSION} report "
                         f"(schema {data.get('schema')!r}, version {data.get('version')!r})")
    report = GateReport(command=data["command"], failpoints=data["failpoints"], shard=data.get("shard"))
    for entry in data["cases"]:
        report.add(Case(**entry))
    return report
