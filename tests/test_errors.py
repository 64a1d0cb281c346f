"""Every exit code the error classes carry is documented where the README's Development section says a
new one goes: its row in errors.py's table and in docs/exit-codes.md."""

from __future__ import annotations

import re
from pathlib import Path

from screener import errors

DOCS = Path(__file__).resolve().parent.parent / "docs" / "exit-codes.md"


def _classes() -> list[type]:
    found, todo = [], [errors.ScreenerError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return [c for c in found if c.__module__ == errors.__name__] + [errors.Terminated]


def test_every_exit_code_is_in_both_tables():
    table = DOCS.read_text(encoding="utf-8")
    codes = {c.__name__: c.exit_code for c in _classes()}
    assert codes["UserError"] == 2 and codes["Terminated"] == 143
    for name, code in codes.items():
        assert re.search(rf"^\|\s*{code}\s*\|", table, re.M), (
            f"docs/exit-codes.md has no row for {code} ({name})"
        )
        assert re.search(rf"^\s*{code}\s", errors.__doc__, re.M), f"errors.py's table has no row for {code}"
    for name, code in codes.items():
        if name not in ("ScreenerError", "Terminated"):
            assert re.search(rf"^\|\s*{code}\s*\|\s*`{name}`", table, re.M), f"{name} is not named by its row"
