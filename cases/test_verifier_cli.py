"""`python -m verifier`: compare's exit codes and report on small synthetic dumps, gate's
one-line usage errors, and a planted graph fault that the gate's report names.

Dumps here are written with NumPy in the format of engine/dump.py; expected indices and keys are
the ones the case perturbs, never read back from the code under test.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nested import NO_HYPOTHESIS, nested_env

from verifier.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def dump(**changes) -> dict[str, np.ndarray]:
    """A two-prompt dump; `changes` replace or add keys."""
    rng = np.random.default_rng(3)
    arrays = {"names": np.asarray(["a", "b"])}
    for i, length in enumerate((5, 9)):
        arrays[f"input_ids_p{i}"] = rng.integers(0, 64, length).astype(np.int64)
        arrays[f"logits_p{i}"] = rng.standard_normal((length, 64)).astype(np.float32)
        arrays[f"greedy_p{i}"] = rng.integers(0, 64, 3).astype(np.int64)
        arrays[f"greedy_logits_p{i}"] = rng.standard_normal((3, 64)).astype(np.float32)
        arrays[f"topk_ids_p{i}_layer1"] = np.sort(rng.permutation(8)[:2].repeat(length).reshape(2, length).T, -1)
    return arrays | changes


def save(path: Path, arrays: dict) -> str:
    np.savez(path, **arrays)
    return str(path)


def run_compare(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["compare", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_identical_dumps_agree(tmp_path, capsys):
    a, b = save(tmp_path / "a.npz", dump()), save(tmp_path / "b.npz", dump())
    code, out, _ = run_compare(capsys, a, b)
    assert code == 0 and "PASS" in out


def test_a_perturbed_dump_names_the_key_and_the_worst_index(tmp_path, capsys):
    logits = dump()["logits_p1"].copy()
    logits[6, 41] += 1e-3  # far above float32's atol + rtol * |x|
    a, b = save(tmp_path / "a.npz", dump(logits_p1=logits)), save(tmp_path / "b.npz", dump())
    code, out, _ = run_compare(capsys, a, b)
    assert code == 1
    assert "logits_p1" in out and "token 6, channel 41" in out and "1 / 576" in out
    assert run_compare(capsys, a, b, "--tolerance", "1e-2,1e-2")[0] == 0  # a looser explicit pair passes


def test_a_routing_flip_fails_unless_the_reference_marks_it_a_near_tie(tmp_path, capsys):
    ids = dump()["topk_ids_p0_layer1"].copy()
    ids[2] = [6, 7] if list(ids[2]) != [6, 7] else [0, 1]
    a = save(tmp_path / "a.npz", dump(topk_ids_p0_layer1=ids))
    report = tmp_path / "report.json"
    code, out, _ = run_compare(capsys, a, save(tmp_path / "b.npz", dump()), "--json", str(report))
    [failure] = json.loads(report.read_text())["cases"][0]["comparisons"]["failures"]
    assert code == 1 and "topk_ids_p0_layer1" in out and failure["name"] == "topk_ids_p0_layer1"
    assert "rows [2] (1 of 5)" in failure["message"]
    # The reference's deciding values [tokens, experts]: its own choice clearly ahead on every row
    # but row 2, where all eight experts tie, so any two of them are a correct routing.
    scores = np.zeros((5, 8))
    np.put_along_axis(scores, dump()["topk_ids_p0_layer1"], 1.0, axis=1)
    scores[2] = 0.5
    b = save(tmp_path / "tie.npz", dump(topk_margin_p0_layer1=scores))
    code, out, _ = run_compare(capsys, a, b)
    assert code == 0 and "Routing near-ties" in out and "topk_ids_p0_layer1" in out


def test_a_truncated_dump_is_one_error_line_and_exit_2(tmp_path, capsys):
    whole = tmp_path / "whole.npz"
    save(whole, dump())
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    code, out, err = run_compare(capsys, str(cut), str(whole))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and str(cut) in err


def test_dumps_with_different_keys_are_exit_2_naming_the_key(tmp_path, capsys):
    fewer = dump()
    del fewer["greedy_p1"]
    code, _, err = run_compare(capsys, save(tmp_path / "a.npz", fewer), save(tmp_path / "b.npz", dump()))
    assert code == 2 and "greedy_p1" in err and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "named"), [
    (["gate", "--profile", "bogus"], "bogus"),
    (["gate", "-n", "-1"], "-1"),
    (["gate", "--model", "/no/such/folder"], "/no/such/folder"),
    (["gate", "--failpoints", "graph.no_such_fault"], "graph.no_such_fault"),
    (["gate", "stray"], "stray"),
    (["frobnicate"], "frobnicate"),
    (["compare", "only_one.npz"], "B.npz"),
    (["compare", "a.npz", "b.npz", "--tolerance", "1e-3"], "1e-3"),
])
def test_bad_arguments_are_one_error_line_and_exit_2(capsys, argv, named):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err


def test_the_module_entry_point_exits_2_on_bad_arguments():
    done = subprocess.run([sys.executable, "-m", "verifier", "gate", "--profile", "bogus"], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "bogus" in done.stderr


# A graph fault planted through the gate: padded input rows keep the previous step's values, which
# the replay check (two runs of the same batch must agree bitwise, padded rows included) sees.
# Its twin runs the same check on an engine built without the fault, in the same gate run (one
# subprocess, one Paddle import and one checkpoint read for both): it must pass, so the failure is
# the fault's, not the synthetic case's. The gate's exit 0 is test_shards_gate.py's.
PLANTED = '''
import pytest
from test_graph import FULLER, PADDED, check_replays, fresh_llm

@pytest.mark.gate_area("graph vs eager")
def test_replay_repeats(faults):
    check_replays(fresh_llm("glm4_moe", faults.active).runner, PADDED, FULLER)

@pytest.mark.gate_area("graph vs eager")
def test_replay_repeats_unplanted():
    check_replays(fresh_llm("glm4_moe").runner, PADDED, FULLER)
'''


# A case whose set-up fails (as when a rank of the 4-rank pool does not come up): nothing diverged,
# the gate could not run.
COULD_NOT_START = '''
import pytest

@pytest.fixture
def rank_pool():
    raise RuntimeError("rank 2 did not come up")

def test_needs_ranks(rank_pool):
    pass
'''


def case_file(folder: Path, text: str) -> Path:
    """A case file under the repository's conftest.py, with cases/ importable (as in the gate)."""
    (folder / "conftest.py").write_text((ROOT / "conftest.py").read_text()
                                        + f"\nimport sys\nsys.path.insert(0, {str(ROOT / 'cases')!r})\n")
    (folder / "test_synthetic.py").write_text(text)
    return folder / "test_synthetic.py"


def gate(case: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "verifier", "gate", "-n", "0", "--cases", str(case), *argv],
                          capture_output=True, text=True, cwd=case.parent, timeout=600,
                          env=nested_env(PYTHONPATH=str(ROOT), NO_COLOR="1"))


@pytest.fixture(scope="module")
def planted_gate(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict[str, dict], str]:
    """One gate run of PLANTED with graph.stale_padding: (the process, report cases by function
    name, the HTML report's text)."""
    case = case_file(tmp_path_factory.mktemp("planted"), PLANTED)
    report, html = case.parent / "report.json", case.parent / "report.html"
    done = gate(case, "--failpoints", "graph.stale_padding", "--json", str(report), "--html", str(html))
    cases = {c["nodeid"].rsplit("::", 1)[-1]: c for c in json.loads(report.read_text())["cases"]} \
        if report.exists() else {}
    return done, cases, html.read_text() if html.exists() else ""


def test_a_planted_graph_fault_fails_the_gate_and_the_report_names_it(planted_gate):
    done, cases, html = planted_gate
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    case = cases["test_replay_repeats"]
    names = [failure["name"] for failure in case["comparisons"]["failures"]]
    assert case["outcome"] == "failed" and case["area"] == "graph vs eager" and "hidden (all rows)" in names
    assert "--failpoints graph.stale_padding" in case["reproduce"]
    assert "failpoints: graph.stale_padding" in done.stdout and "hidden (all rows)" in done.stdout
    assert "test_synthetic.py::test_replay_repeats" in done.stdout and "\x1b[" not in done.stdout
    assert "hidden (all rows)" in html


def test_the_same_case_passes_the_gate_without_the_fault(planted_gate):
    done, cases, _ = planted_gate
    assert cases["test_replay_repeats_unplanted"]["outcome"] == "passed", done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 failed, 1 passed" in done.stdout, done.stdout[-3000:]  # pytest's own summary line


def test_a_case_that_cannot_start_makes_the_gate_exit_2(tmp_path):
    done = gate(case_file(tmp_path, COULD_NOT_START))
    assert done.returncode == 2, done.stdout[-3000:]
    assert "COULD NOT RUN" in done.stdout and "ERROR" in done.stdout and "test_synthetic.py::test_needs_ranks" in done.stdout
    assert "rank 2 did not come up" in done.stdout


# ---------------------------------------------------------------------------- the gate's progress
# Two tiny case files (no engine): three cases, the last one a failed comparison. Run under xdist
# so the progress comes from the controller, as in the gate.
TINY = {
    "test_one.py": "def test_a():\n    pass\n\n\ndef test_b():\n    pass\n",
    "test_two.py": ("import numpy as np\nfrom verifier.compare import compare\n\n\n"
                    "def test_c():\n    assert compare(np.ones(3), np.zeros(3), name='ones').passed\n"),
}
PROGRESS_LINE = r"gate: (\d+)/(\d+|\?) cases done, (\d+) failed, \d+:\d\d:\d\d elapsed, running: (\S.*)"


def tiny_run(folder: Path, *options: str) -> str:
    for name, text in TINY.items():
        (folder / name).write_text(text)
    done = subprocess.run([sys.executable, "-m", "pytest", *TINY, "-p", "verifier.plugin", "-p", "no:cacheprovider",
                           *NO_HYPOTHESIS, "-q", "--tb=no", "-n", "1", *options], capture_output=True, text=True, cwd=folder,
                          timeout=300, env=nested_env(PYTHONPATH=str(ROOT), NO_COLOR="1"))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def report_problems(stdout: str) -> list[str]:
    """The report after its separator, whole: headline, the failed case's ASCII panel (every line
    boxed, full width), its reproduce line, and no progress line inside it."""
    report = stdout.split("graphgate report", 1)[-1].splitlines()[1:]
    problems = [f"progress inside the report: {line!r}" for line in report if re.match(PROGRESS_LINE, line)]
    if not report or report[0] != "graphgate: DIVERGENCE  (2 passed, 1 failed, 0 errors, 0 skipped)":
        problems.append(f"headline {report[:1]}")
    start = next((i for i, line in enumerate(report) if line.startswith("+- FAILED")), None)
    end = next((i for i, line in enumerate(report) if line.startswith("reproduce: ")), None)
    if start is None or end is None:
        return problems + ["no FAILED panel or no reproduce line"]
    panel = report[start:end]
    problems += [f"panel line {line!r}" for line in panel if len(line) != len(panel[0]) or line[0] not in "|+"]
    reproduce = "reproduce: python -m pytest test_two.py::test_c"
    if "test_two.py::test_c" not in "\n".join(panel) or report[end] != reproduce:
        problems.append("the panel or its reproduce line does not name the failed case")
    return problems


def test_gate_progress_prints_plain_lines_and_leaves_the_report_whole(tmp_path):
    stdout = tiny_run(tmp_path, "--gate-progress", "auto", "--gate-progress-every", "0")  # NO_COLOR: plain
    lines = [re.fullmatch(PROGRESS_LINE, line) for line in stdout.splitlines()]
    seen = [(int(m[1]), m[2], int(m[3]), m[4]) for m in lines if m]
    assert [done for done, *_ in seen] == [1, 2, 3], stdout  # one line per finished case, nothing repeated
    assert {total for _, total, _, _ in seen} == {"3"} and seen[-1][2] == 1 and seen[-1][3] == "other", stdout
    assert not re.search(r"^[.F]+\s*(\[\s*\d+%\])?$", stdout, re.M), stdout  # pytest's marks are off
    assert report_problems(stdout) == [], stdout


def test_without_the_option_pytest_keeps_its_own_progress(tmp_path):
    stdout = tiny_run(tmp_path)
    assert re.search(r"^[.F]{3}\s+\[100%\]$", stdout, re.M) and not re.search(PROGRESS_LINE, stdout), stdout
    assert report_problems(stdout) == [], stdout
