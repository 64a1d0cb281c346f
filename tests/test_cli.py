"""`screener` itself (screener.cli, commands.common, screener.choices): a parser that builds without the
heavy libraries, option values refused where they are parsed (one line, exit code 2), devices checked
before any model work, and a busy database refused before the model is prepared."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl

from screener import choices
from screener.cli import build_parser, main
from screener.errors import UserError

HEAVY = ("torch", "transformers", "ray", "duckdb", "polars", "datasets", "pyarrow", "numpy")
COMMANDS = ("screen", "demo", "query", "hist", "top", "export", "report", "explain", "extract", "traits")
COMMANDS += ("vectors", "steer", "shift", "calibrate")


def imported_by(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running `code`."""
    check = f"import sys\n{code}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_the_whole_parser_builds_without_heavy_imports() -> None:
    """Building the parser imported torch, transformers and Ray: `screener --help` took 4 s of CPU."""
    assert imported_by("from screener.cli import build_parser; build_parser([])") == []
    for command in ("screen", "shift", "extract", "query", "explain"):
        assert imported_by(f"from screener.cli import build_parser; build_parser([{command!r}])") == []
    assert imported_by("import screener") == []


@pytest.mark.parametrize("argv", [["--help"], ["screen", "--help"], ["extract", "--help"], ["steer", "-h"]])
def test_help_answers(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage: screener" in capsys.readouterr().out


def test_every_command_is_registered() -> None:
    sub = next(a for a in build_parser([])._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


REFUSED = [
    (["screen", "d.jsonl", "--max-tokens", "0"], "--max-tokens", "at least 16"),
    (["screen", "d.jsonl", "--max-tokens", "1"], "--max-tokens", "at least 16"),
    (["screen", "d.jsonl", "--max-tokens", "-5"], "--max-tokens", "at least 16"),
    (["screen", "d.jsonl", "--limit", "0"], "--limit", "at least 1"),
    (["screen", "d.jsonl", "--limit", "-1"], "--limit", "at least 1"),
    (["screen", "d.jsonl", "--limit", "ten"], "--limit", "at least 1"),
    (["screen", "d.jsonl", "--dtype", "fp8"], "--dtype", "auto, bfloat16, bf16, float32"),
    (["screen", "d.jsonl", "--device", "tpu"], "--device", "auto, cpu, cuda or cuda:N"),
    (["screen", "d.jsonl", "--batch-tokens", "0"], "--batch-tokens", "at least 1"),
    (["screen", "d.jsonl", "--chunk-size", "-2"], "--chunk-size", "at least 1"),
    (["screen", "d.jsonl", "--actors", "-1"], "--actors", "at least 0"),
    (["screen", "d.jsonl", "--layer", "3,x"], "--layer", "at least 0"),
    (["screen", "d.jsonl", "--top-p", "1.5"], "--top-p", "from 0 to 1"),
    (["screen", "d.jsonl", "--max-new-tokens", "0"], "--max-new-tokens", "at least 1"),
    (["extract", "evil", "--dtype", "fp8"], "--dtype", "auto, bfloat16"),
    (["extract", "evil", "--device", "tpu"], "--device", "auto, cpu, cuda or cuda:N"),
    (["extract", "evil", "--max-tokens", "0"], "--max-tokens", "at least 16"),
    (["extract", "evil", "--samples", "0"], "--samples", "at least 1"),
    (["steer", "evil", "--dtype", "fp8"], "--dtype", "auto, bfloat16"),
    (["steer", "evil", "--device", "tpu"], "--device", "auto, cpu, cuda"),
    (["shift", "a", "b", "--limit", "0"], "--limit", "at least 1"),
    (["shift", "a", "b", "--dtype", "fp8"], "--dtype", "auto, bfloat16"),
    (["shift", "a", "b", "--max-tokens", "1"], "--max-tokens", "at least 16"),
    (["explain", "x", "--device", "tpu"], "--device", "auto, cpu, cuda"),
    (["demo", "--limit", "0"], "--limit", "at least 1"),
    (["hist", "--bins", "0"], "--bins", "at least 1"),
    (["top", "-k", "0"], "-k", "at least 1"),
    (["report", "--explain-k", "-1"], "--explain-k", "at least 0"),
    (["query", "SELECT 1", "--max-rows", "0"], "--max-rows", "at least 1"),
]


@pytest.mark.parametrize(("argv", "option", "accepts"), REFUSED)
def test_option_values_are_refused_where_parsed(argv, option, accepts, capsys) -> None:
    """`--dtype fp8` was a KeyError traceback, `--device tpu` a RuntimeError, `--max-tokens 0` an
    IndexError, `--max-tokens 1` a run of NaN scores, `--limit 0` 'no records could be read'."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: screener {argv[0]}: argument {option}"), err
    assert accepts in err and "Traceback" not in err


def test_the_checks_name_what_they_accept() -> None:
    assert choices.check_dtype("bf16") == "bfloat16" and choices.check_dtype("auto") == "auto"
    assert choices.check_device("cuda:1") == "cuda:1"
    assert choices.check_max_tokens("16") == 16 and choices.check_limit(3) == 3
    with pytest.raises(UserError, match="max_tokens takes a whole number of at least 16"):
        choices.checked("max_tokens", choices.check_max_tokens, 8)
    for bad in ("cuda:", "gpu", "cuda:x"):
        with pytest.raises(UserError, match="auto, cpu, cuda or cuda:N"):
            choices.check_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine whose torch has no CUDA")
def test_cuda_without_cuda_is_one_line_before_the_model_loads(
    tmp_path, tiny_llama, vector_file, monkeypatch, capsys
):
    """`--device cuda` where torch has no CUDA ended in an AssertionError after the model had loaded."""
    from screener.models import ModelRef

    monkeypatch.setattr(ModelRef, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "response": "Hello there."}])
    db = tmp_path / "c.duckdb"
    argv = ["screen", data, "--model", tiny_llama, "--vector", f"v={vector_file}", "--layer", "2"]
    argv += ["--actors", "0", "--device", "cuda", "--db", db]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: torch on this machine") and err.count("\n") == 1, err
    assert not db.exists()


def test_a_busy_database_is_refused_before_the_model_is_prepared(tmp_path, tiny_llama, monkeypatch, capsys):
    """A second screen on a database another process writes spent ~30 s preparing the model before it
    exited 3."""
    screen_module = importlib.import_module("screener.screen")  # `screener.screen` is the API's

    monkeypatch.setattr(screen_module, "prepare", lambda cfg: pytest.fail("the model was prepared"))
    db = tmp_path / "busy.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); print(1, flush=True); "
         "time.sleep(120)"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "1"  # it holds the file now
        data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "response": "Hello there."}])
        started = time.monotonic()
        argv = ["screen", data, "--model", tiny_llama, "--actors", "0", "--db", db, "--no-progress"]
        assert main([str(a) for a in argv]) == 3
        assert time.monotonic() - started < 10
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "being written" in err and err.count("\n") == 1, err
    finally:
        holder.kill()
        holder.wait()


def test_parser_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["screen"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the following arguments are required: dataset" in err
    with pytest.raises(SystemExit):
        main(["nosuchcommand"])
    assert "invalid choice: 'nosuchcommand'" in capsys.readouterr().err


def test_a_screener_error_is_one_line_and_its_exit_code(tmp_path: Path, capsys) -> None:
    assert main(["top", "--db", str(tmp_path / "none.duckdb")]) == 1
    assert (
        capsys.readouterr().err == f"error: {tmp_path / 'none.duckdb'}: no such database (pass --db, default "
        f"{choices.DEFAULT_DB})\n"
    )


@pytest.mark.parametrize(
    ("handler", "code", "said"),
    [("raise_interrupted", 130, "interrupted"), ("raise_terminated", 143, "terminated (SIGTERM)")],
)
def test_an_error_a_signal_caused_ends_as_the_signal(handler, code, said, capsys, monkeypatch) -> None:
    """A signal can land inside a library's call (DuckDB's write, say), which then fails with an error of
    its own in place of the handler's KeyboardInterrupt: the command still ends as that signal (exit 130 or
    143, one line), never as a traceback; an error with no signal behind it stays an error."""
    import argparse

    from screener import errors
    from screener.cli import run

    def interrupted_mid_write(_args) -> int:
        try:
            getattr(errors, handler)(0, None)  # what the signal handler does when the signal comes
        except KeyboardInterrupt:
            raise RuntimeError("a library's own error, raised as the signal unwound it") from None
        return 0

    monkeypatch.setattr(errors, "_terminated", False)
    monkeypatch.setattr(errors, "_interrupted", False)
    with pytest.raises(RuntimeError):  # no signal yet: a bug stays a traceback
        run(lambda _a: (_ for _ in ()).throw(RuntimeError("a bug")), argparse.Namespace())
    assert run(interrupted_mid_write, argparse.Namespace()) == code
    assert capsys.readouterr().err == f"{said}; rerun the same command to resume\n"
    errors.forget_signals()
    assert errors.signalled() is None
