"""A pytest plugin the selftest loads into each gate run it starts (`-p verifier.selftest_events`).

It appends one JSON line per failed test phase (and one per passed check, the call phase) to
the file named by `--selftest-events`, as soon as the controller hears of it (with xdist, reports
reach the controller as workers finish them), with the phase, the seconds since the session
started and hypothesis' falsifying example when the failure has one. The example is read where
the case ran, from the exception's notes (verifier/hypothesis_example.py), and travels to the
controller as the report attribute `EXAMPLE` (pytest's report serialisation, which xdist uses,
keeps a report's plain attributes). With `--selftest-no-shrink` hypothesis reports the first failing example it meets without
shrinking it: the selftest's census wants every failing case, not minimal inputs, and shrinking
a property that fails is most of its cost. The selftest reads the file while the run goes on and stops the run at the first line:
that is how "time to detect" is measured without waiting for the rest of the gate.
"""

from __future__ import annotations

import json
import time

import pytest

from verifier.hypothesis_example import example_of, function_name_of

EXAMPLE = "graphgate_example"  # the report attribute that carries the example to the controller


def pytest_addoption(parser):
    parser.addoption("--selftest-events", metavar="PATH", default=None,
                     help="append a JSON line per failed test to PATH (used by `python -m verifier selftest`)")
    parser.addoption("--selftest-no-shrink", action="store_true", default=False,
                     help="hypothesis: stop at the first failing example, unshrunk (the selftest's census)")


@pytest.hookimpl(trylast=True)  # after hypothesis' own plugin has loaded --hypothesis-profile
def pytest_configure(config):
    if config.getoption("--selftest-no-shrink"):
        load_no_shrink_profile()
    path = config.getoption("--selftest-events")
    if path and not hasattr(config, "workerinput"):  # the controller only: it sees every report
        config.pluginmanager.register(_EventWriter(path), "selftest-event-writer")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """On the process that ran the case: put hypothesis' example of a failure on its report."""
    report = yield
    if report.failed and call.excinfo is not None:
        example = example_of(call.excinfo.value, function_name_of(item))
        if example:
            setattr(report, EXAMPLE, example)
    return report


class _EventWriter:
    def __init__(self, path: str):
        self._path = path
        self._start = time.monotonic()

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self._write({"event": "failed", "nodeid": report.nodeid, "when": report.when,
                         "seconds": round(time.monotonic() - self._start, 2),
                         "example": getattr(report, EXAMPLE, "")})
        elif report.when == "call" and report.passed and not hasattr(report, "wasxfail"):
            # the clean run's passed checks: only their call-phase failures count as catches later
            self._write({"event": "passed", "nodeid": report.nodeid, "when": "call",
                         "seconds": round(time.monotonic() - self._start, 2)})

    def pytest_collectreport(self, report):
        if report.failed:
            self._write({"event": "collect_error", "nodeid": report.nodeid,
                         "seconds": round(time.monotonic() - self._start, 2), "example": ""})

    def pytest_sessionfinish(self, session, exitstatus):
        self._write({"event": "finished", "exitstatus": int(exitstatus),
                     "seconds": round(time.monotonic() - self._start, 2)})

    def _write(self, record: dict) -> None:
        with open(self._path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()


def load_no_shrink_profile() -> None:
    """Make the loaded hypothesis profile's settings, minus the shrink phase, the default: cases'
    own `@settings` inherit every setting they do not name from it when their module is imported."""
    from hypothesis import Phase, settings

    current = settings.default
    settings.register_profile("selftest-no-shrink", parent=current,
                              phases=[p for p in current.phases if p is not Phase.shrink])
    settings.load_profile("selftest-no-shrink")
