"""The README and docs/ pages say what the command line does: every `screener` command in their shell
blocks exists, and every option they give it is one of its options (what `screener CMD --help` lists)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from screener.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)


def commands(page: Path) -> list[tuple[int, list[str]]]:
    """(line, argv after `screener`) of every screener command in the page's shell blocks."""
    text = page.read_text(encoding="utf-8")
    found = []
    for block in BLOCK.finditer(text):
        first_line = text[: block.start()].count("\n") + 2
        script = re.sub(r"\\\n", " ", block.group(1))  # continued lines
        for offset, line in enumerate(script.splitlines()):
            line = line.split(" #", 1)[0]
            for part in re.split(r"&&|\|\||;|\|", line):
                words = shlex.split(part.replace("<", "'<").replace(">", ">'"), posix=True)
                words = [w for w in words if "=" not in w or w.startswith("-")] if words else words
                for i, w in enumerate(words):
                    if w.endswith("screener") and not w.endswith("persona-screener"):
                        found.append((first_line + offset, words[i + 1 :]))
                        break
    return found


def subparser(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (sub)parser `argv` reaches, and the words after its command names."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or not argv or argv[0] not in subs[0].choices:
            return parser, argv
        parser, argv = subs[0].choices[argv[0]], argv[1:]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_and_option_in_the_pages_exists(page: Path) -> None:
    found = commands(page)
    problems = []
    for line, argv in found:
        if not argv or argv[0].startswith("-"):
            continue
        parser, rest = subparser(build_parser(argv), argv)
        if parser.prog == "screener":
            problems.append(f"{page.name}:{line}: no command {argv[0]!r}")
            continue
        options = {s for a in parser._actions for s in a.option_strings}
        for word in rest:
            option = word.split("=", 1)[0]
            if option.startswith("--") and option not in options:
                problems.append(f"{page.name}:{line}: `{parser.prog}` has no option {option}")
    assert not problems, "\n".join(problems)


def test_the_pages_name_commands() -> None:
    assert len(commands(ROOT / "README.md")) >= 5  # the newcomer's path is in shell blocks
