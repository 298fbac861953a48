"""Reading a prompts file: `{"prompts": [{"input_ids": [...], "name": "..."}, ...]}` or a bare list
of id lists. Errors name the file and the offending entry."""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import UserError
from engine.llm import Prompt


class PromptsFileError(UserError, ValueError):
    """A prompts file that cannot be read; the message names the file and entry."""


def read_prompts(path: str | Path) -> list[Prompt]:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise PromptsFileError(f"{path}: no such prompts file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PromptsFileError(f"{path}: not valid JSON ({err})") from None
    entries = raw.get("prompts") if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise PromptsFileError(f"{path}: expected {{\"prompts\": [...]}} or a list of token-id lists")
    return [_prompt(path, i, entry) for i, entry in enumerate(entries)]


def _prompt(path: Path, index: int, entry) -> Prompt:
    ids, name = (entry.get("input_ids"), entry.get("name", f"p{index}")) if isinstance(entry, dict) \
        else (entry, f"p{index}")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise PromptsFileError(f"{path}: prompt {index}: 'input_ids' must be a list of integers")
    return Prompt(tuple(ids), str(name))
