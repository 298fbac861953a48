"""pytest plugin: record each case's comparisons, merge them on the controller, report once.

Registered from the root conftest.py. On every process (the xdist workers included) a case's call
runs inside `verifier.recording.recording()`; its record (area, comparison counts, the latest
failures, near-ties, hypothesis's minimised input, the failure head) is attached to the test
report as `user_properties`, which xdist ships to the controller and pytest's JUnit writer turns
into `<property>` elements. Only the controller (no `workerinput`) builds the `GateReport`,
prints the summary at the end of the terminal output and writes `--report-json` /
`--report-html`. Cases are keyed by nodeid, so a report merged from N workers holds each case once.
Each phase report (set-up, call, teardown) is turned into a `Phase` (`phase_of`) and filed into its
case by `verifier.report.fold`, whose docstring table says what outcome each combination gets; a
collection error is a case of its own, filed "error".
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from verifier import progress
from verifier.hypothesis_example import example_of, function_name_of
from verifier.recording import Recorder, recording
from verifier.render import render, write_html
from verifier.report import Case, GateReport, Phase, area_of_nodeid, bare_nodeid, fold

RECORD = "graphgate.record"  # user_properties name of the JSON record (also a JUnit property)
MODEL = "graphgate.model"  # user_properties name of a --model case's {"dir", "area"} (every phase)
_RECORDER = pytest.StashKey[Recorder]()
MESSAGE_CHARS = 4000


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("graphgate", "graphgate report")
    group.addoption("--report-json", metavar="PATH", help="write the gate report as JSON (schema: verifier/report.py)")
    group.addoption("--report-html", metavar="PATH", help="write the gate report as HTML (rich's export)")
    group.addoption("--model", action="append", default=[], metavar="DIR",
                    help="also gate this Hugging Face checkpoint folder (repeatable); "
                         "cases/test_user_model.py runs the battery of every area on it")
    progress.add_options(group)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gate_area(name): the report area of a case (default: from its file)")
    config.addinivalue_line("markers", "gate_model(dir, area=NAME): a case of the battery on a --model checkpoint "
                                       "(the report's per-model section; dir and area may come from two marks)")
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(Controller(config), "graphgate-controller")
        style = config.getoption("--gate-progress")
        if style != "off":
            shown = progress.GateProgress(config, style, config.getoption("--gate-progress-every"))
            config.pluginmanager.register(shown, "graphgate-progress")


@pytest.fixture(scope="session")
def user_models(pytestconfig) -> list[Path]:
    """The `--model DIR` folders, each checked to exist (a missing one is a usage error)."""
    folders = [Path(p) for p in pytestconfig.getoption("--model")]
    missing = [str(p) for p in folders if not (p / "config.json").is_file()]
    if missing:
        raise pytest.UsageError(f"--model: no config.json in {', '.join(missing)}")
    return folders


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with recording() as recorder:
        item.stash[_RECORDER] = recorder
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # Before the report exists: what is put on item.user_properties is copied into it.
    if call.when == "setup" and item.get_closest_marker("gate_model"):
        item.user_properties.append((MODEL, json.dumps(_model_of(item))))
    if call.when == "call" and _RECORDER in item.stash:
        record = {"area": _area(item), "comparisons": item.stash[_RECORDER].to_dict(),
                  "example": example_of(call.excinfo and call.excinfo.value, function_name_of(item)),
                  "message": _message(call.excinfo)}
        counts = record["comparisons"]["counts"].values()
        item.user_properties += [
            ("graphgate.area", record["area"]),
            ("graphgate.comparisons", f"{sum(c['ran'] for c in counts)} ran, {sum(c['failed'] for c in counts)} failed"),
            (RECORD, json.dumps(record)),
        ]
    return (yield)


class Controller:
    """The controller's side (the only process without `workerinput`): merge, print, write."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.report = GateReport(command=list(config.invocation_params.args),
                                 failpoints=_option(config, "--failpoints") or "")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        _merge(self.report, report, self.config)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:  # a file that could not be imported: its cases never reached a check
            case = Case(report.nodeid, area=area_of_nodeid(report.nodeid), outcome="error",
                        failed_in="collection", message=_crash(report))
            case.reproduce = _reproduce(report.nodeid, self.config)
            self.report.add(case)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.report.cases:
            terminalreporter.write_sep("=", "graphgate report")
            terminalreporter.write(render(self.report, color=terminalreporter.hasmarkup))

    def pytest_sessionfinish(self) -> None:
        if _option(self.config, "--report-json"):
            self.report.write_json(_option(self.config, "--report-json"))
        if _option(self.config, "--report-html"):
            write_html(self.report, _option(self.config, "--report-html"))


def _merge(report: GateReport, test_report: pytest.TestReport, config: pytest.Config) -> None:
    """Fold one phase's report into the case of its nodeid (setup / call / teardown)."""
    nodeid = bare_nodeid(test_report.nodeid)
    case = report.cases.get(nodeid) or Case(nodeid, area=area_of_nodeid(nodeid))
    fold(case, phase_of(test_report))
    model = dict(test_report.user_properties).get(MODEL)
    if model is not None:  # a battery case: its model and area, and why it was skipped if it was
        case.model = {**json.loads(model), **(case.model or {})}
        if test_report.skipped and not case.model.get("skip_reason"):
            case.model["skip_reason"] = _skip_reason(test_report)
    if case.outcome in ("failed", "error"):
        case.reproduce = _reproduce(nodeid, config)
    report.add(case)


def phase_of(test_report: pytest.TestReport) -> Phase:
    """The facts of one phase report that filing needs (as the controller gets it from xdist)."""
    record = dict(test_report.user_properties).get(RECORD) if test_report.when == "call" else None
    xfail = hasattr(test_report, "wasxfail")
    # an error that pytest's xfail marker turned into an expected failure still has its message
    swallowed = xfail and test_report.skipped and test_report.when != "call"
    return Phase(when=test_report.when, outcome=test_report.outcome,
                 message=_crash(test_report) if test_report.failed or swallowed else "",
                 xfail=xfail, duration=test_report.duration,
                 worker=_worker(test_report), record=json.loads(record) if record is not None else None)


def _model_of(item: pytest.Item) -> dict:
    """{"dir", "area"} of a battery case, from its gate_model marks (the folder from its parameter's
    mark, the battery area from its function's)."""
    marks = list(item.iter_markers("gate_model"))
    folder = next((m.args[0] for m in marks if m.args), "?")
    return {"dir": folder, "area": next((m.kwargs["area"] for m in marks if "area" in m.kwargs), _area(item))}


def _skip_reason(test_report: pytest.TestReport) -> str:
    longrepr = test_report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "")
    return reason.removeprefix("Skipped: ")


def _area(item: pytest.Item) -> str:
    mark = item.get_closest_marker("gate_area")
    return mark.args[0] if mark else area_of_nodeid(item.nodeid)


def _message(excinfo) -> str:
    if excinfo is None:
        return ""
    # str() of the exception leaves out its notes: the minimised example is reported on its own
    return f"{excinfo.type.__name__}: {excinfo.value}"[:MESSAGE_CHARS]


def _crash(test_report) -> str:
    crash = getattr(test_report.longrepr, "reprcrash", None)
    return crash.message if crash is not None else str(test_report.longrepr)[-MESSAGE_CHARS:]


def _worker(test_report: pytest.TestReport) -> str | None:
    gateway = getattr(getattr(test_report, "node", None), "gateway", None)
    return getattr(gateway, "id", None)


def _reproduce(nodeid: str, config: pytest.Config) -> str:
    """One command that reruns just this case with the run's faults, profile and models."""
    words = ["python", "-m", "pytest", nodeid]
    if _option(config, "--failpoints"):
        words += ["--failpoints", _option(config, "--failpoints")]
    profile = _option(config, "--hypothesis-profile")
    if profile:
        words += ["--hypothesis-profile", profile]
    for model in _option(config, "--model") or ():
        words += ["--model", model]
    return shlex.join(words)


def _option(config: pytest.Config, name: str):
    try:
        return config.getoption(name)
    except ValueError:  # an option some other plugin or conftest would have declared
        return None
