"""A throwaway virtual environment with this checkout installed, for the lock and the drift check.

pip does every resolution; this module only creates the environment, runs pip in it and reads
back what pip installed. Callers own the folder (a temporary directory), so nothing outlives them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from verifier.lockfile import PROJECT, ROOT, parse_pins

INSTALL_TIMEOUT_S = 1800  # paddlepaddle alone is a large wheel on a cold pip cache


class VenvError(RuntimeError):
    """A step of the environment's set-up failed; the message names the command and pip's tail."""


@dataclass(frozen=True)
class Venv:
    folder: Path

    @property
    def python(self) -> Path:
        return self.folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")

    def env(self) -> dict[str, str]:
        """The environment a child runs with: this checkout first on the path, nothing inherited
        from an activated environment."""
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
        env["PYTHONPATH"] = str(ROOT)
        return env


def create(folder: Path, base_python: str = sys.executable) -> Venv:
    """A fresh venv in `folder` (which must not hold one already)."""
    _run([base_python, "-m", "venv", str(folder)], "create the virtual environment")
    return Venv(folder)


def install(venv: Venv, extras: str = "schema", constraints: Path | None = None) -> None:
    """`pip install [-c constraints] -e ROOT[extras]` in `venv`: exactly the README's install."""
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    command = [str(venv.python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    command += ["-c", str(constraints)] if constraints else []
    _run(command + ["-e", target], "install graphgate", env=venv.env())


def freeze(venv: Venv) -> dict[str, str]:
    """{canonical name: version} of what is installed, graphgate itself (editable) and pip's own
    tools left out (pip freeze's defaults)."""
    out = _run([str(venv.python), "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
               "list the installed packages", env=venv.env())
    pins = parse_pins(out, "pip freeze")
    # the checkout's own graphgate.egg-info (on PYTHONPATH) is listed as if installed, not editable
    pins.pop(PROJECT, None)
    return pins


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT_S)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise VenvError(f"could not {what}: `{' '.join(command)}` exited {done.returncode}\n{tail}")
    return done.stdout
