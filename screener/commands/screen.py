"""`screener screen`: score a dataset's samples against persona vectors into DuckDB."""

from __future__ import annotations

import argparse
import json

from screener.models import DEFAULT_MODEL
from screener.records import MODES, TURNS
from screener.scoring import GenerationSettings
from screener.screen import ScreenConfig, screen


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_screen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dataset", help="a .jsonl/.json/.parquet/.csv file, a folder, a glob, or a hub dataset (org/name)"
    )
    p.add_argument("--db", default="screen.duckdb", help="DuckDB file for the results (default: %(default)s)")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="HF folder, .gguf file, hub id, or 'default' (SmolLM2-135M)"
    )
    p.add_argument("--traits", type=_str_list, default=[], help="built-in vectors, e.g. evil,sycophantic")
    p.add_argument(
        "--vector", action="append", default=[], metavar="NAME=PATH", help="a vector file (repeatable)"
    )
    p.add_argument(
        "--layer",
        type=_int_list,
        default=[],
        help="hidden_states layers, e.g. 20 or 12,20 (default: each vector's chosen layer)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="proxy",
        help="proxy: ΔP vs the last prompt token; natural: also generate the model's own answer",
    )
    p.add_argument(
        "--turns",
        choices=TURNS,
        default="all",
        help="score every assistant turn (default; one pass per conversation) or only the last",
    )
    p.add_argument("--split", default=None, help="split of a hub dataset (default: train)")
    p.add_argument("--limit", type=int, default=None, help="screen only the first N samples")
    p.add_argument("--max-tokens", type=int, default=2048, help="truncate longer samples (flagged)")
    p.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per forward batch")
    p.add_argument(
        "--batch-size", type=int, default=None, dest="max_batch_size", help="max samples per batch"
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="samples per actor call and per commit (default: 64 on CPU, 512 on GPU)",
    )
    add_worker_arguments(p)
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="natural mode: length of the model's answer"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="natural mode: 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoder blocks (faster on large "
        "screens; each actor compiles once, 10-80 s on a CPU)",
    )
    p.add_argument("--no-progress", action="store_false", dest="progress")


def config_from_args(args: argparse.Namespace) -> ScreenConfig:
    gen = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    keys = ScreenConfig.__dataclass_fields__.keys() - {"generation", "traits", "vectors", "layers"}
    cfg = ScreenConfig(**{k: getattr(args, k) for k in keys}, generation=gen)
    cfg.traits, cfg.vectors, cfg.layers = args.traits, args.vector, args.layer
    return cfg


def run_command(args: argparse.Namespace) -> int:
    summary = screen(config_from_args(args))
    for line in summary.lines():
        print(line)
    timeline = {"first_batch_done": summary.first_batch_done, "last_batch_done": summary.last_batch_done}
    print(json.dumps({"run_id": summary.run_id, "db": args.db, **timeline}))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("screen", help="score a dataset's samples against persona vectors into DuckDB")
    add_screen_arguments(p)
    p.set_defaults(func=run_command)


def add_worker_arguments(p: argparse.ArgumentParser, actors_note: str = "") -> None:
    """Where the model work runs: --dtype, --device, --actors, --address (screen and shift)."""
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--actors",
        type=int,
        default=None,
        help=f"model actors (default: one per GPU, or one per 2 CPU cores{actors_note}); 0 runs in this "
        "process without Ray",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
    )
