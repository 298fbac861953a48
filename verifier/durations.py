"""The durations file: each case's recorded seconds, which the split (verifier/shards.py) balances by.

JSON, committed at cases/durations.json, refreshed by `python -m verifier durations --from R.json ...`
from gate reports (an unsharded run's, every shard's, or merge-reports' output):

  schema, version   "graphgate.durations", 1
  durations         {nodeid: seconds (every phase, as the report records it)}, sorted by nodeid

Only cases whose check ran to a verdict or were skipped are recorded: an error's duration is how
long something took to fail (a rank that never came up), not what the case costs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from verifier.report import read_json

SCHEMA_NAME = "graphgate.durations"
VERSION = 1
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "cases" / "durations.json"
RECORDED = ("passed", "failed", "skipped", "xfailed", "xpassed")


def read(path: str | Path) -> dict[str, float]:
    """nodeid -> seconds; ValueError naming the file and the field on anything else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable durations file ({error})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_NAME or data.get("version") != VERSION:
        raise ValueError(f"{path}: not a {SCHEMA_NAME} v{VERSION} file")
    durations = data.get("durations")
    if not isinstance(durations, dict):
        raise ValueError(f"{path}: field 'durations' must be an object of nodeid -> seconds")
    for nodeid, seconds in durations.items():
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds < 0:
            raise ValueError(f"{path}: durations[{nodeid!r}] = {seconds!r}: want finite seconds >= 0")
    return {nodeid: float(seconds) for nodeid, seconds in durations.items()}


def read_default_or_empty(path: str | Path | None) -> dict[str, float]:
    """An explicit path must be readable; without one, the committed file if present, else {}."""
    if path is not None:
        return read(path)
    return read(DEFAULT_PATH) if DEFAULT_PATH.is_file() else {}


def from_reports(paths: list[str | Path]) -> dict[str, float]:
    """nodeid -> seconds over gate reports (a case in several: the last report's)."""
    durations: dict[str, float] = {}
    for path in paths:
        for case in read_json(path).cases.values():
            if case.outcome in RECORDED:
                durations[case.nodeid] = round(case.duration, 3)
    return durations


def write(path: str | Path, durations: dict[str, float]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"schema": SCHEMA_NAME, "version": VERSION, "durations": dict(sorted(durations.items()))}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
