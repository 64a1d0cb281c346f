"""The `screener` command: argument parsing only; each feature module registers its own subcommands."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

# Each module has `add_commands(subparsers)`, which adds parsers with `set_defaults(func=...)`;
# `func(args)` returns the exit code. The command modules import only `screener.choices` and
# `commands.common` at the top (torch, transformers, Ray and DuckDB when a command runs), so the whole
# parser builds in milliseconds; only the invoked command's module is imported anyway.
COMMANDS = {
    "screen": "screener.commands.screen",
    "demo": "screener.commands.demo",
    "query": "screener.commands.results",
    "hist": "screener.commands.results",
    "top": "screener.commands.results",
    "export": "screener.commands.results",
    "report": "screener.commands.results",
    "explain": "screener.commands.explain",
    "extract": "screener.commands.extract",
    "traits": "screener.commands.extract",
    "vectors": "screener.commands.extract",
    "steer": "screener.commands.extract",
    "shift": "screener.commands.shift",
    "calibrate": "screener.commands.calibrate",
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose refusal is one line naming the option and what it accepts, exit code 2
    (argparse's default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = Parser(
        prog="screener", description="Screen LLM fine-tuning data for persona shifts with persona vectors."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    words = [a for a in (argv or []) if not a.startswith("-")]
    wanted = [COMMANDS[words[0]]] if words and words[0] in COMMANDS else COMMANDS.values()
    for name in dict.fromkeys(wanted):
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # a warning is one line for the user, not a source excerpt
    warnings.formatwarning = lambda message, category, *_a, **_k: f"warning: {message}\n"
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:
        quiet_third_parties()
    # SIGTERM (timeout, `ray job stop`, Kubernetes, systemd) stops a command as Ctrl-C does
    from screener.errors import forget_signals, raise_interrupted, raise_terminated

    forget_signals()
    signal.signal(signal.SIGTERM, raise_terminated)
    signal.signal(signal.SIGINT, raise_interrupted)
    return run(args.func, args)


# the libraries' own progress bars (loading weights, converting GGUF tensors, writing shards, downloads)
# and their advisory logs: between the screen's phase lines and bar they are noise; --verbose shows them
QUIET = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
THIRD_PARTY = r"(torch|transformers|accelerate|datasets|huggingface_hub|ray|gguf|peft|pyarrow|polars)(\.|$)"


def quiet_third_parties() -> None:
    """No third-party progress bars or warnings (set before those libraries are imported; Ray's local
    workers inherit the environment). The user's own settings of these variables win."""
    for name, value in QUIET.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", module=THIRD_PARTY)


def run(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command function; every expected failure becomes one line on stderr and its exit code
    (the table in screener/errors.py and docs/exit-codes.md)."""
    from screener.errors import ScreenerError, signalled

    try:
        return int(func(args) or 0)
    except ScreenerError as e:  # one line, whatever the message (DuckDB's span several)
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `screener top | head`: the reader left; not an error
        # later writes (and the interpreter's final flush) must not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:
        return _stopped(e)
    except Exception:  # an error a signal caused (DuckDB's or another library's, mid-write)
        if (signal_error := signalled()) is None:
            raise
        return _stopped(signal_error)


def _stopped(e: KeyboardInterrupt) -> int:
    from screener.errors import Terminated

    what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
    print(f"{what}; rerun the same command to resume", file=sys.stderr)
    return Terminated.exit_code if isinstance(e, Terminated) else 130


def entry() -> NoReturn:
    """The `screener` command (its console script, and `python -m screener.cli`): `main`, then an exit that
    skips the interpreter's teardown once the work is done and every exit handler has run. That teardown
    (torch's operator registrations undone one by one, modules cleared) took 0.8-0.9 s after each screen
    on 2 cores, 5% of a 128-sample screen (benchmarks/RESULTS.md, "The shared system prompt run once")."""
    done: list[int] = []

    def skip_teardown() -> None:
        # registered before torch, Ray and DuckDB import (handlers run last-in first-out), so theirs (Ray's
        # local cluster shut down, say) have run; threads were joined before any handler
        if done:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(done[0])

    atexit.register(skip_teardown)
    code = main()
    done.append(code)  # not reached on an uncaught exception: that exit keeps the whole teardown
    sys.exit(code)


if __name__ == "__main__":
    entry()
