"""Installs that reproduce: the lock (constraints.txt) against pyproject.toml and the installed
dependency graph, the drift check's verdicts, and the gate's set-up errors.

Expected values come from pyproject.toml, the installed packages' own metadata (walked here with
`packaging`, not with the code under test) and hand-written examples.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from verifier import cli_drift, cli_gate
from verifier.__main__ import build_parser, main
from verifier.cli_lock import start_pins
from verifier.lockfile import Move, moves, parse_pins, read_pins, render
from verifier.report import Case, GateReport

pytestmark = pytest.mark.gate_area("verifier")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCKED_EXTRAS = ("schema",)  # the README's second install command
OFF_THE_GATE = ("torch", "transformers", "matplotlib")  # the goldens and bench extras
# Modules that are not on the gate's path: the goldens generator and the benchmarks.
NOT_GATE_CODE = ("fixtures/build_fixtures.py",)


def lock() -> dict[str, str]:
    return read_pins(ROOT / "constraints.txt")


def requirements_of_the_install() -> list[Requirement]:
    """pyproject's dependencies plus the locked extras' (markers evaluated for those extras)."""
    wanted = [Requirement(text) for text in PYPROJECT["dependencies"]]
    for extra in LOCKED_EXTRAS:
        wanted += [Requirement(text) for text in PYPROJECT["optional-dependencies"][extra]]
    return wanted


def requirements_installed_here() -> list[Requirement]:
    """What this environment's install asked for: pyproject's dependencies, plus each locked extra
    whose packages are all installed. The README's main job installs `-e .` without the `schema`
    extra, and its gate must pass there too (a fresh venv showed it did not when the extra was
    assumed)."""
    wanted = [Requirement(text) for text in PYPROJECT["dependencies"]]
    for extra in LOCKED_EXTRAS:
        extra_requirements = [Requirement(text) for text in PYPROJECT["optional-dependencies"][extra]]
        if all(_installed(r.name) for r in extra_requirements):
            wanted += extra_requirements
    return wanted


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def installed_closure(roots: list[Requirement]) -> set[str]:
    """Every distribution the requirements pull in, transitively, as installed here: a breadth-first
    walk of each installed distribution's Requires-Dist, extras and environment markers applied."""
    seen: set[str] = set()
    pending = [(r, frozenset(r.extras)) for r in roots]
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{requirement.name} is required by the install but not installed here")
        for text in requires:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in (extras or {""})):
                pending.append((child, frozenset(child.extras)))
    return {name for name, _ in seen}


def test_the_lock_pins_every_package_the_install_pulls_in():
    """A package missing from the lock floats: a fresh install picks its newest version."""
    missing = sorted(installed_closure(requirements_installed_here()) - lock().keys())
    assert not missing, f"constraints.txt does not pin {missing}: regenerate it (python -m verifier lock)"


def test_each_locked_version_lies_in_pyprojects_range():
    """The lock is one point inside the ranges people who depend on graphgate get."""
    pins = lock()
    for requirement in requirements_of_the_install():
        version = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), \
            f"constraints.txt {requirement.name}=={version} is outside pyproject's {requirement}"


def test_the_lock_holds_the_versions_known_good_on_this_gate():
    """The lock moves on purpose only (python -m verifier lock --upgrade NAME, then the gate): these are
    the versions this gate was verified with. hypothesis 6.170 (newest allowed) passes the verifier's
    own cases since the selftest reads examples from the exceptions' notes (python -m verifier drift)."""
    pins = lock()
    assert (pins["hypothesis"], pins["paddlepaddle"], pins["numpy"], pins["pytest"]) == \
        ("6.155.2", "3.3.1", "2.4.6", "9.0.3")


def test_torch_and_transformers_stay_off_the_gates_path():
    """The goldens/bench extras are never locked and no gate module imports them (at any depth)."""
    assert not set(OFF_THE_GATE) & lock().keys()
    files = [p for folder in ("engine", "verifier", "cases", "fixtures") for p in (ROOT / folder).rglob("*.py")]
    offenders = []
    for path in files + [ROOT / "conftest.py"]:
        if path.relative_to(ROOT).as_posix() in NOT_GATE_CODE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in OFF_THE_GATE]
    assert not offenders, offenders


@pytest.mark.parametrize("script", [".ci/run", ".github/workflows/gate.yml"])
def test_ci_installs_with_the_lock(script):
    installs = [line for line in (ROOT / script).read_text().splitlines() if re.search(r"pip install", line)]
    assert installs and all("-c constraints.txt" in line for line in installs), installs


def test_the_drift_job_is_scheduled_and_runs_the_drift_verb():
    text = (ROOT / ".github/workflows/drift.yml").read_text()
    assert re.search(r"^\s+schedule:\s*\n\s+- cron: \"[^\"]+\"", text, re.M), "no cron schedule"
    assert re.search(r"^\s+run: python -m verifier drift\b", text, re.M)


def test_drift_installs_without_the_lock_and_reports_the_move(monkeypatch, capsys, tmp_path):
    """The drift venv gets pip's newest allowed versions: no constraints reach its install."""
    calls = []
    monkeypatch.setattr(cli_drift.venv, "create", lambda folder, python: cli_drift.venv.Venv(folder))
    monkeypatch.setattr(cli_drift.venv, "install", lambda env, extras, constraints=None: calls.append(constraints))
    monkeypatch.setattr(cli_drift.venv, "freeze", lambda env: {"hypothesis": "6.170.27"})
    monkeypatch.setattr(cli_drift, "run_cases", lambda env, path, workers: _report(a="failed"))
    (tmp_path / "lock.txt").write_text("hypothesis==6.155.2\n")
    assert main(["drift", "--lock", str(tmp_path / "lock.txt")]) == 1
    assert calls == [None]
    assert "drift: moved hypothesis 6.155.2 -> 6.170.27" in capsys.readouterr().out


def test_lock_lines_must_be_exact_pins():
    assert parse_pins("# header\n\nTyping_Extensions==4.16.0\nopt.einsum==3.3.0\n", "x") == \
        {"typing-extensions": "4.16.0", "opt-einsum": "3.3.0"}
    with pytest.raises(ValueError, match=r"lock.txt:2: 'numpy>=2' is not an exact"):
        parse_pins("rich==15.0.0\nnumpy>=2\n", "lock.txt")


def test_a_written_lock_reads_back_as_the_same_pins():
    pins = {"rich": "15.0.0", "paddlepaddle": "3.3.1", "typing-extensions": "4.16.0"}
    text = render(pins, ["made by hand", ""])
    assert parse_pins(text, "x") == pins
    assert text.splitlines()[:2] == ["# made by hand", "#"] and text.splitlines()[2] == "paddlepaddle==3.3.1"


def test_moves_name_each_changed_package_once():
    locked = {"hypothesis": "6.155.2", "numpy": "2.4.6", "gone": "1.0"}
    now = {"hypothesis": "6.170.27", "numpy": "2.4.6", "fresh": "0.1"}
    assert [str(m) for m in moves(locked, now)] == [
        "fresh (not locked) -> 0.1", "gone 1.0 -> (not installed)", "hypothesis 6.155.2 -> 6.170.27"]


def test_lock_upgrade_drops_a_pin_and_pin_replaces_one(tmp_path):
    start = tmp_path / "start.txt"
    start.write_text("hypothesis==6.155.2\nnumpy==2.4.6\nrich==15.0.0\n")
    args = build_parser().parse_args(["lock", "--start", str(start), "--upgrade", "Hypothesis", "--pin", "rich==14.0.0"])
    assert start_pins(args) == {"numpy": "2.4.6", "rich": "14.0.0"}


def test_drift_runs_the_verifiers_own_case_files():
    names = [p.name for p in cli_drift.drift_cases()]
    assert {"test_verifier_cli.py", "test_selftest.py", "test_report.py"} <= set(names)
    assert "test_reproduce.py" in names
    assert all(n.startswith(("test_verifier_", "test_selftest", "test_report", "test_reproduce")) for n in names), names
    assert len(names) == len(set(names))


def _report(**outcomes: str) -> GateReport:
    report = GateReport()
    for nodeid, outcome in outcomes.items():
        report.add(Case(nodeid, outcome=outcome, message="AssertionError: no example found" if outcome != "passed" else ""))
    return report


def test_drift_verdict_names_failed_cases_beside_what_moved(capsys):
    moved = [Move("hypothesis", "6.155.2", "6.170.27")]
    assert cli_drift.verdict(moved, _report(a="passed", b="failed")) == 1
    out = capsys.readouterr().out
    assert "drift: FAILED b: AssertionError: no example found" in out
    assert "hypothesis 6.155.2 -> 6.170.27" in out and "BROKEN" in out
    assert cli_drift.verdict(moved, _report(a="passed", b="passed")) == 0
    assert cli_drift.verdict(moved, _report(a="error")) == 1  # a case that could not start is drift too
    assert cli_drift.verdict(moved, None) == 2  # pytest stopped: could not run


def test_gate_without_a_cases_folder_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """An install that is not a checkout (no cases/ beside verifier/) must say so, not crash."""
    monkeypatch.setattr(cli_gate, "ROOT", tmp_path)
    monkeypatch.setattr(cli_gate.subprocess, "call", lambda *a, **k: pytest.fail("the gate started pytest"))
    assert main(["gate", "-n", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(tmp_path / "cases") in err[0], err
