"""screener.progress, and the screen's progress as people see it: a total counted ahead of the model, an
ETA from the work left over the rate of the work done, phase lines, no JSON line, plain lines off a tty."""

from __future__ import annotations

import re

import pytest
from helpers import write_jsonl

from screener.cli import main
from screener.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_eta_is_the_work_left_over_the_rate_and_absent_before_it_is_known(capsys) -> None:
    """The demo's first line said '1 samples, 0.41 samples/s, 100% of input, ETA 00:00' while the screen
    had 70 s to go: the ETA came from the bytes read, and the reader runs ahead of the model."""
    clock = Clock()
    with Progress(enabled=True, every=0.0, fraction=lambda: 1.0, clock=clock, tty=False) as p:
        p.set_total(68)
        clock.now += 30  # the model loads
        p.update(4)  # the first batch: its time includes warming up, so no rate yet
        assert p.eta() is None
        clock.now += 10
        p.update(6)  # 6 samples in 10 s after the first report
        assert p.rate() == pytest.approx(0.6) and p.eta() == pytest.approx((68 - 10) / 0.6)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "4/68 samples"  # no ETA, and not 100% of anything, while work remains
    assert lines[1] == "10/68 samples, 0.60 samples/s, ETA 01:36"
    assert lines[2].startswith("10/68 samples, 0.60 samples/s, ETA 01:36, done in 00:40")
    assert "of input" not in "".join(lines)


def test_a_resume_counts_what_was_done_before_but_not_in_the_rate(capsys) -> None:
    clock = Clock()
    with Progress(every=0.0, clock=clock, tty=False) as p:
        p.set_total(100, initial=60)
        p.update(10)
        clock.now += 4
        p.update(10)
        assert p.rate() == pytest.approx(2.5) and p.eta() == pytest.approx(20 / 2.5)
    assert capsys.readouterr().err.splitlines()[1] == "80/100 samples, 2.50 samples/s, ETA 00:08"


def test_without_a_count_it_says_the_share_of_bytes_read() -> None:
    clock = Clock()
    p = Progress(every=0.0, fraction=lambda: 0.25, clock=clock, tty=False)
    p.update(3)
    clock.now += 1
    p.update(3)
    assert p.line() == "6 samples, 3.00 samples/s, 25% of the input's bytes read"


def test_plain_lines_come_every_so_often_and_phases_at_once(capsys) -> None:
    clock = Clock()
    with Progress(every=10.0, clock=clock, tty=False) as p:
        p.phase("loading the model")
        p.set_total(50)
        for _ in range(5):
            p.update(1)
            clock.now += 3
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "loading the model"
    assert [line.split(",")[0] for line in err[1:]] == ["1/50 samples", "5/50 samples", "5/50 samples"]


def test_the_screen_counts_its_input_ahead_and_prints_no_json_line(tmp_path, tiny_llama, vector_file, capsys):
    """The total is the input's samples (counted beside the model), the phases come first, the summary
    has no JSON line, and --json prints one object instead."""
    records = [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A {i}."}] * 2}
        for i in range(7)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", records)  # 7 records x 2 assistant turns
    argv = ["screen", str(data), "--model", str(tiny_llama), "--vector", f"v={vector_file}", "--layer", "2"]
    argv += ["--actors", "0", "--dtype", "float32", "--db", str(tmp_path / "p.duckdb"), "--chunk-size", "4"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert any(line.startswith("loading the model ") for line in err), err
    counted = [line for line in err if re.match(r"\d+/14 samples", line)]
    assert counted and counted[-1].startswith("14/14 samples"), err
    assert "{" not in captured.out and captured.out.startswith("run ")
    assert main([*argv, "--json"]) == 0  # a resume: nothing left to score
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed"] is True and summary["total_scored"] == 14 and summary["scored"] == 0
