"""Joining the N shard reports of one sharded gate into the report the unsharded gate would give.

Each shard report (`gate --shard I/N --json`) carries its cases and a `shard` field: I, N, the whole
collection's nodeids and the ones it selected. `merge(paths)` returns one GateReport with every
case once, and files what stops the merge from vouching for the whole gate as cases of outcome
"error" (so the verdict, totals, console, JSON, JUnit and HTML all say so, by name):

  a report missing, unreadable, of another schema, unsharded, of another N,
  of a shard another report already gave, or of another collection     nodeid: the report's path
  a shard index 1..N that no readable report gave                       nodeid: "shard I/N"
  a case of the collection that no report holds                         nodeid: the case (missing)
  a case that two reports hold                                          the case, re-filed "error"
                                                                        (kept "failed" when a copy failed)

Verdict as the gate's: any failed case -> divergence (exit 1), else any error -> could not run (2),
else pass (0). A collection error (a case file that would not import) is seen by every shard, as
collection happens in each: it is kept once, not counted as a duplicate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from verifier.report import Case, GateReport, area_of_nodeid, read_json

SHARD_FIELDS = {"index": int, "count": int, "collected": list, "selected": list}


@dataclass
class ShardReport:
    path: str
    report: GateReport

    @property
    def shard(self) -> dict:
        return self.report.shard

    @property
    def name(self) -> str:
        return f"{self.path} (shard {self.shard['index']}/{self.shard['count']})"


def load(path: str) -> ShardReport:
    """A readable shard report; ValueError saying what is wrong with it otherwise."""
    if not Path(path).is_file():
        raise ValueError("missing: no such file")
    try:
        report = read_json(path)
    except json.JSONDecodeError as error:
        raise ValueError(f"damaged: not JSON ({error})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"damaged: {error}") from None
    if report.shard is None:
        raise ValueError("not a shard report: no 'shard' field (run the gate with --shard I/N)")
    for name, kind in SHARD_FIELDS.items():
        if not isinstance(report.shard.get(name), kind):
            raise ValueError(f"damaged: shard.{name} is {report.shard.get(name)!r}, want {kind.__name__}")
    return ShardReport(path, report)


def merge(paths: list[str]) -> GateReport:
    """One report from the shard reports at `paths` (see the module docstring)."""
    merged = GateReport(command=["merge-reports", *paths])
    shards = _accepted(paths, merged)
    if not shards:
        return merged
    merged.failpoints = shards[0].report.failpoints
    count, collected = shards[0].shard["count"], set(shards[0].shard["collected"])
    given = {s.shard["index"] for s in shards}
    for index in range(1, count + 1):
        if index not in given:
            _problem(merged, f"shard {index}/{count}", f"no readable report of shard {index}/{count} among the inputs")
    holders = _cases_by_nodeid(shards)
    for nodeid, copies in sorted(holders.items()):
        merged.add(_one_case(nodeid, copies, collected))
    for nodeid in sorted(collected - holders.keys()):
        merged.add(_missing(nodeid, shards))
    return merged


def _accepted(paths: list[str], merged: GateReport) -> list[ShardReport]:
    """The reports that can be merged; each other one is filed as an error named by its path."""
    accepted: list[ShardReport] = []
    for path in paths:
        try:
            shard = load(path)
            _check_against(shard, accepted)
        except ValueError as error:
            _problem(merged, path, f"shard report {error}")
            continue
        accepted.append(shard)
    return accepted


def _check_against(shard: ShardReport, accepted: list[ShardReport]) -> None:
    if not accepted:
        return
    first = accepted[0]
    if shard.shard["count"] != first.shard["count"]:
        raise ValueError(f"of another split: shard {shard.shard['index']}/{shard.shard['count']}, "
                         f"but {first.name} is of {first.shard['count']} shards")
    same = next((s for s in accepted if s.shard["index"] == shard.shard["index"]), None)
    if same is not None:
        raise ValueError(f"repeated: shard {shard.shard['index']}/{shard.shard['count']} was already given by {same.path}")
    if shard.shard["collected"] != first.shard["collected"]:
        extra = sorted(set(shard.shard["collected"]) - set(first.shard["collected"]))[:3]
        lacks = sorted(set(first.shard["collected"]) - set(shard.shard["collected"]))[:3]
        raise ValueError(f"of another collection than {first.name}: {len(shard.shard['collected'])} cases vs "
                         f"{len(first.shard['collected'])}; only here: {extra}; only there: {lacks}")
    if shard.report.failpoints != first.report.failpoints:
        raise ValueError(f"of another run: failpoints {shard.report.failpoints!r}, "
                         f"{first.name} has {first.report.failpoints!r}")


def _cases_by_nodeid(shards: list[ShardReport]) -> dict[str, list[tuple[ShardReport, Case]]]:
    holders: dict[str, list[tuple[ShardReport, Case]]] = {}
    for shard in shards:
        for case in shard.report.cases.values():
            holders.setdefault(case.nodeid, []).append((shard, case))
    return holders


def _one_case(nodeid: str, copies: list[tuple[ShardReport, Case]], collected: set[str]) -> Case:
    """The merged entry of a case some reports hold: itself when exactly one does."""
    case = next((c for _, c in copies if c.outcome == "failed"), copies[0][1])
    if case.failed_in == "collection" and nodeid not in collected:
        return case  # every shard collects, so every shard sees a file that would not import
    if nodeid not in collected:
        return _refile(case, f"not in the shards' collection, yet reported by {copies[0][0].name}")
    if len(copies) > 1:
        names = ", ".join(shard.name for shard, _ in copies)
        return _refile(case, f"duplicated: reported by {len(copies)} shard reports ({names}); "
                             "the split must place each case in exactly one shard")
    return case


def _refile(case: Case, why: str) -> Case:
    """The case as an error (could not vouch for it), unless it failed: a divergence stays one."""
    if case.outcome == "failed":
        case.message = f"{case.message}\n(merge: {why})"
        return case
    return Case(case.nodeid, area=case.area, outcome="error", message=f"merge: {why}", duration=case.duration,
                comparisons=case.comparisons, worker=case.worker)


def _missing(nodeid: str, shards: list[ShardReport]) -> Case:
    owner = next((s for s in shards if nodeid in s.shard["selected"]), None)
    where = (f"{owner.name} selected it but has no entry for it" if owner is not None
             else "its shard's report is absent or could not be read")
    return Case(nodeid, area=area_of_nodeid(nodeid), outcome="error",
                message=f"merge: missing: in the collection, but in no shard report ({where})")


def _problem(merged: GateReport, name: str, why: str) -> None:
    merged.add(Case(name, area="other", outcome="error", message=f"merge: {why}"))
