"""`screener demo`: the main job on the embedded defaults: real ShareGPT conversations, the default model
and traits, every assistant turn, then a histogram and the top samples per trait.

By default it screens a slice that answers in about a minute on 2 CPU cores without native bf16: every
100th conversation of the packaged file's first 1,200, 12 of them (about 18k tokens; their assistant
turns, one pass per conversation where the token budget allows). A systematic sample rather than the
first records, so short and long, single- and multi-turn conversations come in the file's own
proportions. The slice is written beside the
database (`<db>.slice.jsonl`), so `export` and `explain` can read it again. `--full` takes the first 300
conversations of the file instead (several minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

from screener.choices import MODES
from screener.commands.common import at_least

SLICE = (12, 100)  # conversations, and every how many records of the file one is taken
FULL = (300, 1)


def write_slice(n: int, every: int, out: Path) -> Path:
    """Every `every`-th record of the packaged ShareGPT file, `n` of them, as jsonl at `out`."""
    from screener.datasets import iter_records, packaged_sharegpt

    records = itertools.islice(iter_records(str(packaged_sharegpt())), 0, n * every, every)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for _, _, r in records), encoding="utf-8")
    tmp.replace(out)
    return out


def _quietly(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """`main(argv)` without its note of which run it read (the demo just wrote it); errors still shown."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    if code != 0:
        sys.stderr.write(err.getvalue())
    return code


def run_demo(args: argparse.Namespace) -> int:
    from screener.cli import main
    from screener.vectors import DEFAULT_TRAITS

    n, every = FULL if args.full else SLICE
    data = write_slice(args.limit or n, every, Path(args.db + ".slice.jsonl"))
    which = "the first" if every == 1 else f"every {every}th of the first {(args.limit or n) * every}"
    print(f"screening {which} packaged ShareGPT conversations (copied to {data}), every assistant turn")
    code = main(["screen", str(data), "--db", args.db, *(["--mode", args.mode] if args.mode else [])])
    for trait in DEFAULT_TRAITS:
        if code == 0:
            print(f"\n== {trait}: distribution ==")
            code = _quietly(main, ["hist", "--db", args.db, "--trait", trait, "--bins", "15"])
        if code == 0:
            print(f"\n== {trait}: top samples ==")
            code = _quietly(main, ["top", "--db", args.db, "--trait", trait, "-k", str(args.top)])
    if code == 0:
        print(
            f'\nresults are in {args.db}; try: screener query "SELECT * FROM dataset_summary" --db {args.db}'
            f"\nand: screener explain SAMPLE_ID --db {args.db} (a sample id from the top lists above)"
        )
    return code


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="screen real ShareGPT conversations with the defaults, in about a minute")
    p.add_argument(
        "--limit",
        type=at_least(1),
        default=None,
        help="conversations to screen (default 12, or 300 with --full)",
    )
    p.add_argument("--full", action="store_true", help="the first 300 conversations of the packaged file")
    p.add_argument("--db", default="demo.duckdb")
    p.add_argument("--mode", choices=MODES, default=None)
    p.add_argument("--top", type=at_least(1), default=5, help="top samples shown per trait")
    p.set_defaults(func=run_demo)
