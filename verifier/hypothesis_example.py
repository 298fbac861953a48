"""Hypothesis' falsifying example of a failed case, read from the exception's notes (PEP 678).

Hypothesis attaches the example it found to the exception it re-raises, as a note in
`__notes__`: one note per distinct failure, and several failures come as an exception group whose
members carry their own notes. The words of that note changed between releases ("Falsifying
example: test_x(...)" in 6.155, "Failing test case: test_x(...)" in 6.170), so a note is
recognised by its shape: a one-line heading, a colon, then a call of the test function by name
(or a heading hypothesis is known to use, for examples that are not a call, such as a state
machine's steps). Formatted tracebacks and terminal text are never parsed.
"""

from __future__ import annotations

KNOWN_HEADINGS = ("Falsifying example", "Falsifying explicit example", "Failing test case",
                  "Failing explicit example")
MAX_CHARS = 500  # of one example: enough for a call with a dozen arguments


def notes_of(error: BaseException) -> list[str]:
    """Every note on `error` and on the members of any exception group inside it, in order, once each."""
    pending, found, seen = [error], [], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        found += [n for n in getattr(current, "__notes__", ()) if isinstance(n, str)]
        pending += list(getattr(current, "exceptions", ()))  # an ExceptionGroup's members
    return list(dict.fromkeys(found))


def is_example(note: str, test_name: str | None) -> bool:
    """Whether `note` is hypothesis' example: "<heading>: <test_name>(...", or a known heading."""
    heading, colon, rest = note.partition(":")
    if not colon or "\n" in heading:
        return False
    if heading.strip() in KNOWN_HEADINGS:
        return True
    return bool(test_name) and rest.lstrip().startswith(f"{test_name}(")


def one_line(note: str) -> str:
    """The example without its heading, on one line: 'test_x(n=3, m=4)'. Arguments that print only
    as an object's address (a fixture such as a model runner) say nothing and are left out, and so
    are hypothesis' comments ("# or any other generated value")."""
    body = note.partition(":")[2]
    lines = [line.split("  # ", 1)[0].strip() for line in body.splitlines()]  # hypothesis' comments out
    kept = [line for line in lines if line and not line.startswith("#") and " object at 0x" not in line]
    if len(kept) >= 2 and kept[0].endswith("(") and kept[-1] == ")":  # hypothesis' one-argument-a-line call
        text = kept[0] + ", ".join(line.rstrip(",") for line in kept[1:-1]) + ")"
    else:
        text = " ".join(kept)
    return text[:MAX_CHARS]


def example_of(error: BaseException | None, test_name: str | None) -> str | None:
    """The falsifying example(s) hypothesis noted on `error` (one line each), or None."""
    if error is None:
        return None
    examples = [one_line(note) for note in notes_of(error) if is_example(note, test_name)]
    return "\n".join(dict.fromkeys(examples)) or None


def function_name_of(item) -> str:
    """The function name hypothesis prints for a pytest item (parameters and class left out)."""
    return getattr(item, "originalname", None) or item.name.split("[", 1)[0]
