"""`screener screen`: score a dataset's samples against persona vectors into DuckDB."""

from __future__ import annotations

import argparse
import json

from screener import choices
from screener.commands.common import (
    LIMIT,
    add_batch_arguments,
    add_generation_arguments,
    add_vector_arguments,
    add_worker_arguments,
    at_least,
    generation_settings,
)


def add_screen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dataset", help="a .jsonl/.json/.parquet/.csv file, a folder, a glob, or a hub dataset (org/name)"
    )
    p.add_argument(
        "--db", default=choices.DEFAULT_DB, help="DuckDB file for the results (default: %(default)s)"
    )
    p.add_argument(
        "--model",
        default=choices.DEFAULT_MODEL,
        help="HF folder, .gguf file, hub id, or 'default' (SmolLM2-135M)",
    )
    add_vector_arguments(p)
    p.add_argument(
        "--mode",
        choices=choices.MODES,
        default="proxy",
        help="proxy: ΔP vs the last prompt token; natural: also generate the model's own answer",
    )
    p.add_argument(
        "--turns",
        choices=choices.TURNS,
        default="all",
        help="score every assistant turn (default; one pass per conversation) or only the last",
    )
    p.add_argument("--split", default=None, help="split of a hub dataset (default: train)")
    p.add_argument("--limit", type=LIMIT, default=None, help="screen only the first N samples")
    add_batch_arguments(p, "samples", "truncate longer samples (flagged)")
    p.add_argument(
        "--chunk-size",
        type=at_least(1),
        default=None,
        help="samples per actor call and per commit (default: 64 on CPU, 512 on GPU)",
    )
    add_worker_arguments(p)
    add_generation_arguments(p, "natural mode")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoder blocks (can be faster on large screens; each actor compiles once, "
        "which takes a while on a CPU)",
    )
    p.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar or lines")
    p.add_argument(
        "--json",
        action="store_true",
        help="print a machine-readable summary (one JSON object) instead of the text summary",
    )


def config_from_args(args: argparse.Namespace):
    from screener.screen import ScreenConfig

    keys = ScreenConfig.__dataclass_fields__.keys() - {"generation", "traits", "vectors", "layers"}
    cfg = ScreenConfig(**{k: getattr(args, k) for k in keys}, generation=generation_settings(args))
    cfg.traits, cfg.vectors, cfg.layers = args.traits, args.vector, args.layer
    return cfg


def run_command(args: argparse.Namespace) -> int:
    from screener.screen import screen

    summary = screen(config_from_args(args))
    if args.json:
        print(json.dumps(summary.to_json() | {"db": args.db}))
    else:
        for line in summary.lines():
            print(line)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("screen", help="score a dataset's samples against persona vectors into DuckDB")
    add_screen_arguments(p)
    p.set_defaults(func=run_command)
