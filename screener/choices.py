"""The values a user chooses from, and the checks on each option value, with no heavy import.

The command line is built from these (so `screener --help` starts without torch, DuckDB or Ray), the
Python API checks its arguments with the same functions, and the library modules take their names from
here. A check returns the value normalised or raises `UserError` with what the option accepts; the caller
names the option (`--max-tokens` on the command line, `max_tokens=` in Python).
"""

from __future__ import annotations

import re

from screener.errors import UserError

DEFAULT_MODEL = "default"  # SmolLM2-135M-Instruct, converted once into the cache (models.loading)
DEFAULT_DB = "screen.duckdb"  # the file a screen writes and the read commands read, unless given --db
MODES = ("proxy", "natural")  # ΔP against the last prompt token, or against the model's own answer
TURNS = ("last", "all")  # which assistant turns of a record are scored
METRICS = ("delta_p", "delta_p_proxy", "proj_response")  # the scores a read command ranks or filters by
EXPORT_FORMATS = ("jsonl", "parquet", "hf")
OUTPUT_FORMATS = ("table", "csv", "json", "parquet")  # `screener query --format`
EXTRACT_METHODS = ("response_avg", "prompt_avg", "prompt_last")
# what generated answers are read after in extraction: their system prompt and question, or the question
READ_CONTEXTS = ("system", "question")
JUDGES = ("auto", "openai", "local", "none")
# `screener calibrate`'s reference: the packaged ShareGPT file from this record on (the records before it
# are for independent checks only, never for calibrating), this many samples
CALIBRATE_START, CALIBRATE_LIMIT = 5000, 2000
# the dtype names accepted, by torch name
DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "int8": "int8",  # CPU only: fp32 activations, dynamic int8 linear layers (models.int8)
}
# a sample's prompt and response must fit in at least this many tokens: truncation keeps a quarter of the
# budget for the response, so every sample keeps a few response tokens and its prompt's last token
MIN_MAX_TOKENS = 16
DEFAULT_MAX_TOKENS = 2048  # prompt + response tokens per sample; longer samples are cut and flagged
# whitened vectors (`extract --whiten`), chosen on the trait files' held-out pairs and the controls' odd pairs
WHITEN_SHRINKAGE = 0.03  # ridge, a share of the covariance's mean eigenvalue
WHITEN_WEIGHT = 1.0  # the nuisance pairs' second moment against the trait's own covariance


def check_dtype(value: str) -> str:
    """'auto' or a dtype name of `DTYPES` (normalised to torch's name)."""
    if value == "auto":
        return value
    if value in DTYPES:
        return DTYPES[value]
    raise UserError(f"takes auto, {', '.join(DTYPES)}; not {value!r}")


def check_device(value: str) -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N'. Whether CUDA is there is checked where the model will run
    (`models.pick_device`): a CPU head may drive GPU workers."""
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise UserError(f"takes auto, cpu, cuda or cuda:N; not {value!r}")


def check_int(value: int | str, least: int, what: str = "") -> int:
    """A whole number of at least `least` (`what` says what it counts)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, float) or number < least:
        extra = f" ({what})" if what else ""
        raise UserError(f"takes a whole number of at least {least}{extra}; not {value!r}")
    return number


def check_max_tokens(value: int | str) -> int:
    return check_int(value, MIN_MAX_TOKENS, "prompt and response tokens per sample")


def check_limit(value: int | str) -> int:
    return check_int(value, 1, "how many to read")


def check_float(value: float | str, least: float, most: float | None = None) -> float:
    """A number in [least, most]."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (number >= least and (most is None or number <= most)):
        span = f"from {least:g} to {most:g}" if most is not None else f"of at least {least:g}"
        raise UserError(f"takes a number {span}; not {value!r}")
    return number


def check_choice(value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UserError(f"takes one of {', '.join(choices)}; not {value!r}")
    return value


def checked(name: str, check, value):
    """`check(value)` with the option's name in front of a refusal: the Python API's form."""
    try:
        return check(value)
    except UserError as e:
        raise UserError(f"{name} {e}") from None
