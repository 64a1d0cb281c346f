"""What several commands declare alike: the model-work, vector, generation and database options, and the
checks on option values (at parse time, one line naming the option and what it accepts: `cli.Parser`).

Light on purpose: the whole command line is built from this and `screener.choices` without importing
torch, transformers, Ray or DuckDB; each command imports those when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any

from screener import choices
from screener.errors import UserError

__all__ = [
    "add_batch_arguments",
    "add_generation_arguments",
    "add_read_arguments",
    "add_vector_arguments",
    "add_worker_arguments",
    "at_least",
    "given",
    "int_list",
    "number",
    "option_type",
    "str_list",
]


def option_type(check: Callable[[str], Any], name: str | None = None) -> Callable[[str], Any]:
    """An argparse `type=` from a `choices` check: its refusal becomes argparse's one-line error."""

    def convert(text: str) -> Any:
        try:
            return check(text)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name or check.__name__.removeprefix("check_")  # argparse names it in errors
    return convert


def at_least(least: int, what: str = "") -> Callable[[str], int]:
    return option_type(partial(choices.check_int, least=least, what=what), "whole number")


def number(least: float, most: float | None = None) -> Callable[[str], float]:
    return option_type(partial(choices.check_float, least=least, most=most), "number")


DTYPE = option_type(choices.check_dtype)
DEVICE = option_type(choices.check_device)
MAX_TOKENS = option_type(choices.check_max_tokens)
LIMIT = option_type(choices.check_limit)


def str_list(text: str) -> list[str]:
    """'evil, sycophantic' → ['evil', 'sycophantic']."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _int_list(text: str) -> list[int]:
    return [choices.check_int(x.strip(), 0, "a layer") for x in text.split(",") if x.strip()]


int_list = option_type(_int_list, "layer list")


def given(args: argparse.Namespace, names: tuple[str, ...] | set[str]) -> dict[str, Any]:
    """The options among `names` the user gave (declared with default None): the library's own defaults
    stand for the rest, so no default is written twice."""
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def add_worker_arguments(p: argparse.ArgumentParser, actors_note: str = "", cpus: bool = False) -> None:
    """Where the model work runs: --dtype, --device, --actors, --address (and --cpus)."""
    p.add_argument(
        "--dtype",
        type=DTYPE,
        default="auto",
        help="auto (bf16 on a GPU or a CPU with native bf16, else fp32), "
        + ", ".join(choices.DTYPES)
        + " (int8: CPUs only, fp32 activations through int8 linear layers)",
    )
    p.add_argument("--device", type=DEVICE, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--actors",
        type=at_least(0),
        default=None,
        help=f"model actors (default: one per GPU, or one per 2 CPU cores{actors_note}); 0 runs in this "
        "process without Ray",
    )
    if cpus:
        p.add_argument(
            "--cpus", type=at_least(1), help="CPU cores to use (default all); 1 is fastest on a busy machine"
        )
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
    )


def add_vector_arguments(p: argparse.ArgumentParser, of: str = "the model") -> None:
    """Which persona vectors, at which layers: --traits, --vector, --layer."""
    p.add_argument(
        "--traits", type=str_list, default=[], help=f"built-in vectors of {of}, e.g. evil,sycophantic"
    )
    p.add_argument(
        "--vector", action="append", default=[], metavar="NAME=PATH", help="a vector file (repeatable)"
    )
    p.add_argument(
        "--layer",
        type=int_list,
        default=[],
        help="hidden_states layers, e.g. 20 or 12,20 (default: each vector's chosen layer)",
    )


def add_batch_arguments(p: argparse.ArgumentParser, what: str, max_tokens_help: str) -> None:
    """How samples are cut and batched: --max-tokens, --batch-tokens, --batch-size."""
    p.add_argument(
        "--max-tokens",
        type=MAX_TOKENS,
        default=choices.DEFAULT_MAX_TOKENS,
        help=f"{max_tokens_help} (default %(default)s, at least {choices.MIN_MAX_TOKENS})",
    )
    p.add_argument("--batch-tokens", type=at_least(1), help="padded tokens per forward batch")
    p.add_argument("--batch-size", type=at_least(1), dest="max_batch_size", help=f"max {what} per batch")


def add_generation_arguments(p: argparse.ArgumentParser, when: str) -> None:
    """How the model answers when it generates (`when`: the mode or flag that makes it): --max-new-tokens,
    --temperature, --top-p, --seed, each defaulting to the library's (None here)."""
    p.add_argument("--max-new-tokens", type=at_least(1), help=f"{when}: length of the model's answer")
    p.add_argument("--temperature", type=number(0.0), help=f"{when}: sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=number(0.0, 1.0), help=f"{when}: nucleus sampling mass")
    p.add_argument("--seed", type=int, help=f"{when}: sampling seed")


GENERATION = ("max_new_tokens", "temperature", "top_p", "seed")


def generation_settings(args: argparse.Namespace):
    """GenerationSettings from the generation options given, the library's defaults for the rest."""
    from screener.scoring import GenerationSettings

    return GenerationSettings(**given(args, GENERATION))


def add_read_arguments(p: argparse.ArgumentParser) -> None:
    """The database a read command reads, and which run in it: --db, --run."""
    p.add_argument(
        "--db", default=choices.DEFAULT_DB, help=f"the screen's DuckDB file (default {choices.DEFAULT_DB})"
    )
    p.add_argument(
        "--run",
        metavar="RUN_ID",
        help="run id or unique prefix, of any status (default: the latest finished run)",
    )
