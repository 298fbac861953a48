"""The gate's progress while it runs, on the pytest controller: cases done of the total, failures
so far, time elapsed and the area of the case that started last.

Switched on by `--gate-progress` (`python -m verifier gate` passes `auto`); without it pytest's own
progress is left alone, so a plain `pytest -n 4 cases/` looks as it always did. When on, pytest's
one-mark-per-case output is blanked (the categories, and so pytest's counts, stay), and:

  - `rich`: a rich progress bar, redrawn on every case event. No refresh thread: in a run without
    xdist the cases run in this process, with stdout captured while they run, and a thread would
    draw into the capture. It writes through pytest's own terminal writer and is stopped when the
    test loop ends, before any summary, so the final report starts on a clean line.
  - `plain`: one line per `--gate-progress-every` seconds (0: one per finished case) and a last
    one at the end, `gate: 12/57 cases done, 1 failed, 0:00:42 elapsed, running: routing replay`;
    what CI logs get.
  - `auto`: rich on a terminal with colour (pytest's `hasmarkup`: a tty and no NO_COLOR), else plain.

xdist ships every worker's `pytest_runtest_logstart` / `pytest_runtest_logreport` to the
controller and says how many cases each worker collected; without xdist the same hooks run here.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from verifier.report import area_of_nodeid

STYLES = ("off", "auto", "rich", "plain")


def add_options(group) -> None:
    group.addoption("--gate-progress", choices=STYLES, default="off",
                    help="the gate's progress display instead of pytest's marks (default off; "
                         "`python -m verifier gate` uses auto: a rich bar on a terminal, plain lines otherwise)")
    group.addoption("--gate-progress-every", type=float, default=10.0, metavar="SECONDS",
                    help="plain progress: seconds between lines (0: a line per finished case)")


class GateProgress:
    """Counts cases as their reports arrive and shows the count; registered on the controller only."""

    def __init__(self, config: pytest.Config, style: str, every: float):
        self.config, self.style, self.every = config, style, every
        self.total: int | None = None
        self.done, self.failed, self.area = 0, set(), ""
        self.start = self.last_line = time.monotonic()
        self.bar: Progress | None = None
        self.closed = False
        self.written: tuple[int, int] | None = None  # (done, failed) of the last plain line

    # ---- what pytest and xdist report

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        self.total = max(self.total or 0, len(ids))  # every worker collects the whole run

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if session.items:  # without xdist; the xdist controller collects nothing itself
            self.total = len(session.items)

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.area = area_of_nodeid(nodeid)
        self._show(finished=False)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.failed.add(report.nodeid)
        if report.when == "teardown":  # every case ends with one, even when its setup failed
            self.done += 1
            self._show(finished=True)

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(self, report):
        category, letter, word = yield
        if self.closed:  # the summary after the run words its lines with it ("FAILED ...")
            return category, letter, word
        return category, "", ""  # pytest counts by category; the marks would break the display

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session):
        try:
            return (yield)
        finally:
            self.close()

    # ---- showing it

    def line(self) -> str:
        total = "?" if self.total is None else str(self.total)
        elapsed = timedelta(seconds=int(time.monotonic() - self.start))
        return (f"gate: {self.done}/{total} cases done, {len(self.failed)} failed, {elapsed} elapsed, "
                f"running: {self.area or '-'}")

    def close(self) -> None:
        """The last state, once: the bar stopped on its final state, or a last plain line."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self._update_bar()
            self.bar.stop()
        elif self._plain() and self.written != (self.done, len(self.failed)):
            self._write_line()

    def _show(self, finished: bool) -> None:
        if self.closed:
            return
        if not self._plain():
            self._update_bar()
        elif finished and time.monotonic() - self.last_line >= self.every:
            self._write_line()

    def _write_line(self) -> None:
        self.last_line, self.written = time.monotonic(), (self.done, len(self.failed))
        self._terminal().write_line(self.line())

    def _plain(self) -> bool:
        return self.style == "plain" or (self.style == "auto" and not self._terminal().hasmarkup)

    def _update_bar(self) -> None:
        if self.bar is None:
            self._terminal().ensure_newline()
            self.bar = _bar(self.config)
            self.bar.add_task("gate", total=self.total, failed=0, area="")
            self.bar.start()
        self.bar.update(0, total=self.total, completed=self.done, failed=len(self.failed), area=self.area)
        self.bar.refresh()

    def _terminal(self):
        return self.config.pluginmanager.get_plugin("terminalreporter")


class _TerminalFile:
    """A file for rich that writes through pytest's terminal writer, so pytest knows what is on the line."""

    def __init__(self, writer):
        self.writer = writer

    def write(self, text: str) -> int:
        self.writer.write(text)
        return len(text)

    def flush(self) -> None:
        self.writer.flush()

    def isatty(self) -> bool:
        return True


def _bar(config: pytest.Config) -> Progress:
    console = Console(file=_TerminalFile(config.get_terminal_writer()), force_terminal=True, highlight=False)
    columns = (TextColumn("[bold]gate"), BarColumn(), MofNCompleteColumn(),
               TextColumn("[red]{task.fields[failed]} failed"), TimeElapsedColumn(), TextColumn("{task.fields[area]}"))
    return Progress(*columns, console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
