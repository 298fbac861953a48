"""A gate report as JUnit XML, for a report no pytest run wrote (merge-reports' merged report).

The shape follows pytest's own `--junitxml` (one <testsuite name="pytest">, a <testcase> per case
with classname from the file and class, name from the test, time, and the graphgate.* properties
the plugin attaches), so CI dashboards read the merged report as they read an unsharded gate's.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from verifier.report import Case, GateReport

ELEMENT = {"failed": "failure", "error": "error", "skipped": "skipped", "xfailed": "skipped"}


def _names(nodeid: str) -> tuple[str, str]:
    """(classname, name) as pytest spells them: "cases/test_x.py::Class::test_y[1]" ->
    ("cases.test_x.Class", "test_y[1]")."""
    parts = nodeid.split("::")
    module = parts[0].removesuffix(".py").replace("/", ".")
    return ".".join([module, *parts[1:-1]]), parts[-1] if len(parts) > 1 else parts[0]


def _testcase(case: Case) -> ET.Element:
    classname, name = _names(case.nodeid)
    element = ET.Element("testcase", classname=classname, name=name, time=f"{case.duration:.3f}")
    properties = ET.SubElement(element, "properties")
    ran = sum(c["ran"] for c in case.comparisons["counts"].values())
    failed = sum(c["failed"] for c in case.comparisons["counts"].values())
    for key, value in (("graphgate.area", case.area), ("graphgate.comparisons", f"{ran} ran, {failed} failed"),
                       ("graphgate.record", json.dumps({"area": case.area, "comparisons": case.comparisons,
                                                        "example": case.example, "message": case.message}))):
        ET.SubElement(properties, "property", name=key, value=value)
    if case.outcome in ELEMENT:
        kind = ELEMENT[case.outcome]
        head = case.message.splitlines()[0] if case.message else case.outcome
        detail = ET.SubElement(element, kind, message=head)
        detail.text = case.message + (f"\nreproduce: {case.reproduce}" if case.reproduce else "")
    return element


def write_junit(report: GateReport, path: str | Path) -> Path:
    cases = report.sorted_cases()
    totals = report.totals()
    suite = ET.Element("testsuite", name="pytest", tests=str(len(cases)), failures=str(totals["failed"]),
                       errors=str(totals["error"]), skipped=str(totals["skipped"] + totals["xfailed"]),
                       time=f"{sum(c.duration for c in cases):.3f}")
    suite.extend(_testcase(case) for case in cases)
    root = ET.Element("testsuites")
    root.append(suite)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path
