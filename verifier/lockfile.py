"""The install lock, constraints.txt: the exact version of every package the gate imports.

One `name==version` line per package, transitive dependencies included (paddlepaddle's too), frozen
from a fresh virtual environment by `python -m verifier lock`. pip applies it as a constraints file
(`pip install -c constraints.txt -e ".[schema]"`): it fixes the version of whatever the install
needs and installs nothing by itself, so one file serves `-e .` and `-e ".[schema]"` alike, and an
extra that is not locked (goldens: torch, transformers; bench: matplotlib) stays off the gate's
path. pyproject.toml keeps compatible ranges for projects that depend on graphgate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
PROJECT = "graphgate"  # this package: installed from the checkout, never pinned
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def canonical(name: str) -> str:
    """PEP 503 name: `Pillow`, `typing_extensions` and `opt-einsum` compare as pip compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str, source: str) -> dict[str, str]:
    """{canonical name: version} from `name==version` lines; blank and `#` lines are skipped.
    Anything else (a range, a URL, an option) is an error naming `source` and the line."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"{source}:{number}: {raw.strip()!r} is not an exact `name==version` pin")
        pins[canonical(match[1])] = match[2]
    return pins


def read_pins(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"{path}: cannot read the lock ({error.strerror})") from None
    return parse_pins(text, str(path))


def render(pins: dict[str, str], header: list[str]) -> str:
    """The lock's text: `# ` header lines, then one pin per line sorted by name."""
    lines = [f"# {line}".rstrip() for line in header]
    return "\n".join(lines + [f"{name}=={pins[name]}" for name in sorted(pins)]) + "\n"


@dataclass(frozen=True)
class Move:
    """One package whose version differs between the lock and an environment (None: absent)."""

    name: str
    locked: str | None
    now: str | None

    def __str__(self) -> str:
        return f"{self.name} {self.locked or '(not locked)'} -> {self.now or '(not installed)'}"


def moves(locked: dict[str, str], now: dict[str, str]) -> list[Move]:
    """Every package whose version differs, sorted by name; equal versions are left out."""
    names = sorted(set(locked) | set(now))
    return [Move(n, locked.get(n), now.get(n)) for n in names if locked.get(n) != now.get(n)]
