"""`screener demo`: the main job on the embedded defaults — a few hundred real ShareGPT conversations,
the default model and traits, then a histogram and the top samples per trait."""

from __future__ import annotations

import argparse

from screener.datasets import packaged_sharegpt


def run_demo(args: argparse.Namespace) -> int:
    from screener.cli import main
    from screener.screen import DEFAULT_TRAITS

    screen_args = ["screen", str(packaged_sharegpt()), "--db", args.db, "--limit", str(args.limit)]
    if args.mode:
        screen_args += ["--mode", args.mode]
    code = main(screen_args)
    for trait in DEFAULT_TRAITS:
        if code == 0:
            print(f"\n== {trait}: distribution ==")
            code = main(["hist", "--db", args.db, "--trait", trait, "--bins", "15"])
        if code == 0:
            print(f"\n== {trait}: top samples ==")
            code = main(["top", "--db", args.db, "--trait", trait, "-k", str(args.top)])
    if code == 0:
        print(
            f'\nresults are in {args.db}; try: screener query "SELECT * FROM dataset_summary" --db {args.db}'
        )
    return code


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="screen a few hundred packaged ShareGPT samples with the defaults")
    p.add_argument("--limit", type=int, default=300, help="samples to screen (default: %(default)s)")
    p.add_argument("--db", default="demo.duckdb")
    p.add_argument("--mode", choices=["proxy", "natural"], default=None)
    p.add_argument("--top", type=int, default=5, help="top samples shown per trait")
    p.set_defaults(func=run_demo)
