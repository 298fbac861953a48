"""The gate's report on a console: rich tables and panels, plain text without a terminal.

`render(report, color)` returns the text; `write_html(report, path)` exports the same renderables
through rich's HTML export. Plain mode (no terminal, NO_COLOR, CI logs) uses ASCII boxes and no
escape codes, so a log viewer shows the same report as a terminal.

What a failed case shows: its test id, the head of its failure, the minimised input hypothesis
found, each failed comparison with the worst elements and their indices and the tolerance with
its source, the per-layer error picture when a tensor was compared at several layers, and one
command that reproduces it. Routing near-ties get their own table: never failures, never hidden.
A case judged against a float64 truth (verifier/truth.py) also shows, per float key, both sides'
error against the truth and the verdict in words, and every token or expert flip with the truth's
margin that decides it, the float32 bound, and which side is wrong.
"""

from __future__ import annotations

import io
from pathlib import Path

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from verifier.report import Case, GateReport

WIDTH = 110  # plain text and HTML: wide enough for a reproduce command on one line
BAR = 30  # characters of the longest per-layer error bar
MESSAGE_LINES = 8
MAX_NAME = 32  # a tensor name up to this long is never folded
VERDICT_STYLE = {"pass": "bold green", "divergence": "bold red", "could not run": "bold yellow"}


def render(report: GateReport, color: bool = False, width: int | None = None) -> str:
    """The whole report as text: ANSI-styled when `color`, else plain ASCII."""
    # markup off: test ids and tensor names hold brackets ("test_x[glm4_moe]", "keys[3]")
    console = Console(file=io.StringIO(), force_terminal=color, no_color=not color, width=width or WIDTH,
                      color_system="standard" if color else None, emoji=False, highlight=False, markup=False)
    for part in renderables(report, plain=not color):
        console.print(part, soft_wrap=isinstance(part, Text))  # a lone line (a command) is never wrapped
    return console.file.getvalue()


def write_html(report: GateReport, path: str | Path) -> Path:
    """Rich's HTML export of the report (colours kept, per-layer pictures included)."""
    console = Console(record=True, file=io.StringIO(), force_terminal=True, width=WIDTH, emoji=False,
                      highlight=False, markup=False)
    for part in renderables(report, plain=False):
        console.print(part, soft_wrap=isinstance(part, Text))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(console.export_html(inline_styles=True, theme=None))
    return path


def renderables(report: GateReport, plain: bool) -> list:
    """Header, per-area table, one panel per failed case, near-ties, in that order."""
    frame = box.ASCII if plain else box.ROUNDED
    parts: list = [_headline(report), _area_table(report, frame)]
    parts += [_model_table(section, frame) for section in report.models()]
    for case in report.failed():
        parts.append(_case_panel(case, frame, plain))
        if case.reproduce:  # under its panel, on one line whatever its length, to copy
            parts.append(Text.assemble(("reproduce: ", "bold"), (case.reproduce, "cyan")))
    ties = _near_tie_table(report, frame)
    if ties is not None:
        parts.append(ties)
    return parts


def _headline(report: GateReport) -> Text:
    totals, verdict = report.totals(), report.verdict()
    text = Text("graphgate: ", style="bold")
    text.append(verdict.upper(), style=VERDICT_STYLE[verdict])
    text.append(f"  ({totals['passed']} passed, {totals['failed']} failed, {totals['error']} errors, "
                f"{totals['skipped']} skipped")
    for kind in ("xfailed", "xpassed"):  # pytest's xfail marker: shown when a run has any
        if totals[kind]:
            text.append(f", {totals[kind]} {kind}")
    text.append(f"; failpoints: {report.failpoints})" if report.failpoints else ")")
    return text


def _area_table(report: GateReport, frame) -> Table:
    table = Table(title="Comparisons by area", box=frame, title_justify="left")
    for column in ("area", "cases", "comparisons", "failed", "failed cases", "near-tie rows"):
        table.add_column(column, justify="left" if column == "area" else "right")
    for row in report.areas():
        style = "red" if row["failed_cases"] else None
        table.add_row(row["area"], str(row["cases"]), str(row["comparisons"]), str(row["failed_comparisons"]),
                      str(row["failed_cases"]), str(row["near_ties"]), style=style)
    return table


def _model_table(section: dict, frame) -> Table:
    """One --model checkpoint's battery: per area the cases, comparisons, failures and skips, then
    each skip's reason under the table (an area that did not run says why)."""
    title = (f"Model {section['model']}: {section['cases']} cases, {section['comparisons']} comparisons, "
             f"{section['failed_cases']} failed, {section['skipped']} skipped")
    reasons = sorted({(s["area"], s["reason"]) for s in section["skips"]})
    caption = "\n".join(f"skipped ({area}): {reason}" for area, reason in reasons) or None
    table = Table(title=title, caption=caption, box=frame, title_justify="left", caption_justify="left",
                  min_width=min(WIDTH, len(title)))  # the title on one line where it fits
    for column in ("area", "cases", "comparisons", "failed", "failed cases", "skipped"):
        table.add_column(column, justify="left" if column == "area" else "right")
    for row in section["areas"]:
        style = "red" if row["failed_cases"] else "yellow" if row["skipped"] == row["cases"] else None
        table.add_row(row["area"], str(row["cases"]), str(row["comparisons"]), str(row["failed_comparisons"]),
                      str(row["failed_cases"]), str(row["skipped"]), style=style)
    return table


def _case_panel(case: Case, frame, plain: bool) -> Panel:
    parts: list = [_fields(case)]
    failures = case.comparisons["failures"]
    if failures:
        parts.append(_failure_table(failures, frame, minimised=case.example is not None))
    # the compare CLI keeps every key's truth verdict; a gate case, its failed keys' (the items)
    truth_rows = case.comparisons.get("truth") or [item["truth"] for item in failures if "truth" in item]
    if truth_rows:
        parts.append(_truth_table(truth_rows, frame))
    if any(entry["max_abs_err"] for entry in case.comparisons["layers"]):  # an all-zero picture says nothing
        parts.append(_layer_picture(case.comparisons["layers"], frame, plain))
    # the test id goes inside, where a long one can wrap; the title says which phase filed the case
    title = Text(case.outcome.upper() + (f" in {case.failed_in}" if case.failed_in not in (None, "call") else ""))
    return Panel(Group(*parts), title=title, title_align="left", box=frame,
                 border_style="red" if case.outcome == "failed" else "yellow")


def _fields(case: Case) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")  # never an ellipsis: plain text stays ASCII, and nothing is hidden
    grid.add_row("case", Text(case.nodeid, style="bold", overflow="fold"))
    grid.add_row("area", case.area)
    if case.message:
        grid.add_row("failure", _head(case.message))
    if case.teardown and case.teardown != case.message:  # a teardown error after a failed check: both shown
        grid.add_row("teardown error", _head(case.teardown))
    if case.example:
        grid.add_row("minimised input", case.example)
    ran = sum(c["ran"] for c in case.comparisons["counts"].values())
    failed = sum(c["failed"] for c in case.comparisons["counts"].values())
    grid.add_row("comparisons", f"{ran} ran, {failed} failed")
    return grid


def _head(message: str) -> str:
    lines = message.strip().splitlines()
    more = len(lines) - MESSAGE_LINES
    return "\n".join(lines[:MESSAGE_LINES] + ([f"... ({more} more lines)"] if more > 0 else []))


def _failure_table(failures: list[dict], frame, minimised: bool) -> Table:
    # Hypothesis ends on the minimised example, so its failures come first (unless it was flaky)
    title = "Failed comparisons" + (", newest first" if minimised else "")
    table = Table(title=title, box=frame, title_justify="left", show_lines=True, expand=True)
    table.add_column("tensor", overflow="fold", max_width=MAX_NAME)  # natural width: a key stays on one line
    for column, share in (("mismatched", 2), ("worst elements", 4), ("tolerance (source)", 3)):
        table.add_column(column, overflow="fold", ratio=share)
    for item in reversed(failures):
        table.add_row(item["name"], _mismatched(item), _worst(item),
                      f"{item['tolerance']}\n({item['tolerance_source']})")
    return table


def _mismatched(item: dict) -> str:
    if "total" not in item:
        return "-"
    share = item["mismatches"] / item["total"] if item["total"] else 0.0
    return f"{item['mismatches']} / {item['total']} ({share:.2%})\nshape {tuple(item['shape'])} {item['dtype']}"


def _worst(item: dict) -> str:
    """Worst absolute and relative errors with their indices, read as (token, channel) for 2-d."""
    if "truth" in item:  # judged against a float64 truth: the words; the lines under the table give the numbers
        return item["message"]
    if "max_abs_err" not in item:
        return item["message"]
    two_d = len(item.get("shape", ())) == 2
    lines = [f"abs {_num(item['max_abs_err'])} at {_index(item['max_abs_index'], two_d)}",
             f"rel {_num(item['max_rel_err'])} at {_index(item['max_rel_index'], two_d)}"]
    if item.get("first_mismatch_index") not in (None, item["max_abs_index"]):
        lines.append(f"first mismatch at {_index(item['first_mismatch_index'], two_d)}")
    lines.append(f"rel L2 {_num(item['rel_l2'])}")
    return "\n".join(lines)


def _index(index, two_d: bool) -> str:
    if index is None:
        return "-"
    if two_d:
        return f"token {index[0]}, channel {index[1]}"
    return str(tuple(index))


def _num(value) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


def _layer_picture(layers: list[dict], frame, plain: bool) -> Table:
    """One bar per (tensor, layer): where the error first appears and how it grows."""
    top = max((entry["max_abs_err"] for entry in layers), default=0.0) or 1.0
    table = Table(title="Error per layer", box=frame, title_justify="left")
    for column in ("tensor", "layer", "max abs err", "(bar: relative to the largest)"):
        table.add_column(column, justify="right" if column in ("layer", "max abs err") else "left")
    mark = "#" if plain else "\u2588"
    for entry in layers:
        width = round(BAR * entry["max_abs_err"] / top)
        bar = mark * width if width or not entry["max_abs_err"] else "."
        table.add_row(entry["tensor"], str(entry["layer"]), f"{entry['max_abs_err']:.3g}",
                      Text(bar, style="red" if entry["max_abs_err"] else "green"))
    return table


def render_truth(case: Case, color: bool = False, width: int | None = None) -> str:
    """The case's table against the float64 truth alone (the compare CLI prints it for a passing
    case, whose panel is not shown); empty when the case was not judged against a truth."""
    rows = case.comparisons.get("truth")
    if not rows:
        return ""
    console = Console(file=io.StringIO(), force_terminal=color, no_color=not color, width=width or WIDTH,
                      color_system="standard" if color else None, emoji=False, highlight=False, markup=False)
    console.print(_truth_table(rows, box.ASCII if not color else box.ROUNDED), soft_wrap=False)
    return console.file.getvalue()


def _truth_table(rows: list[dict], frame) -> Text:
    """One line per float key and per flip (`_truth_lines`). Lines, not table cells: a verdict
    wraps as a sentence and stays searchable in a log."""
    text = Text("Against the float64 truth (rel L2 of each whole key; flips judged on the truth's margins)",
                style="bold")
    for row in rows:
        style = None if row.get("passed", row.get("noise", True)) else "red"
        for line in _truth_lines(row):
            text.append("\n  " + line, style=style)
    return text


def _truth_lines(row: dict) -> list[str]:
    """A float key: A's and B's rel L2 to the truth and the verdict in words. A flip: the choices
    of A, B and the truth, and the verdict (the truth's margin, the float32 bound, the wrong side).
    A key's flips ({kind "flips"}): one line each, and how many rows were left unjudged."""
    if row["kind"] == "float":
        return [f"{row['key']}: A {_num(row['actual_error'])}, B {_num(row['reference_error'])} "
                f"against the truth: {row['verdict']}"]
    if row["kind"] == "flips":
        lines = [line for flip in row["flips"] for line in _truth_lines(flip)] or ["no flips"]
        return lines + ([f"{row['unjudged']} later rows not judged (the tokens parted)"] if row["unjudged"] else [])
    where = "row" if "topk" in row["key"] else "step"
    truth = "-" if row["truth"] is None else row["truth"]
    return [f"{row['key']} {where} {row['position']}: A chose {row['actual']}, B {row['reference']}, "
            f"the truth {truth}: {row['verdict']}"]


def _near_tie_table(report: GateReport, frame) -> Table | None:
    rows = [(case.nodeid, tie["key"], tie["rows"]) for case in report.sorted_cases()
            for tie in case.comparisons["near_ties"]]
    if not rows:
        return None
    table = Table(title="Routing near-ties (decision margin under the near-tie bound: reported, not failed)",
                  box=frame, title_justify="left")
    for column in ("case", "routing key", "rows"):
        table.add_column(column, overflow="fold")
    for nodeid, key, tie_rows in rows:
        table.add_row(nodeid, key, ", ".join(map(str, tie_rows[:20])) + (" ..." if len(tie_rows) > 20 else ""))
    return table
