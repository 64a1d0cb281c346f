"""Tests for screener.render: text histograms and excerpts, the PNG, and query results in every format.
Built from hand-made data: rendering needs no database."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from screener.render import (
    excerpt,
    format_histogram,
    format_top,
    prompt_excerpt,
    save_histogram_png,
    write_relation,
)
from screener.results import Histogram

H = Histogram("abc123", "evil", 20, "delta_p", [-1.0, 0.0, 1.0], [0.0, 1.0, 2.0], [2, 8, 0])


def test_format_histogram() -> None:
    lines = format_histogram(H, width=60).splitlines()
    assert lines[0] == "evil · delta_p · layer 20 · run abc123 · n = 10"
    assert [line.rsplit(" ", 1)[1] for line in lines[1:]] == ["2", "8", "0"]
    assert lines[1].startswith("[       -1,         0)") and lines[3].startswith("[        1,         2]")
    # the longest bar fills the width left by the range, the count and the spaces
    assert lines[2].count("█") == 60 - len("[        0,         1)") - len("8") - 3
    assert all(len(line) <= 60 for line in lines)
    empty = Histogram("abc123", "evil", 20, "delta_p", [], [], [])
    assert format_histogram(empty).endswith("(no values: delta_p is NULL for every sample of this trait)")


def test_save_histogram_png(tmp_path: Path) -> None:
    save_histogram_png(H, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    save_histogram_png(REF, tmp_path / "r.png")  # with the reference drawn beside it
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


# the reference: uniform on [-2, 2], so a quarter of it falls in each unit bin, a quarter below -1
REF = Histogram(
    "abc123", "evil", 20, "delta_p", H.lower, H.upper, H.counts, list(np.linspace(-2, 2, 101)), 500
)


def test_format_histogram_with_the_reference() -> None:
    assert REF.reference_shares() == pytest.approx([0.25, 0.25, 0.25])
    assert REF.reference_shares_outside() == pytest.approx((0.25, 0.0))
    # p95 of the reference is 1.8: 0 of the 10 samples lie in [1, 2], so none above it
    assert REF.share_above_reference(95) == pytest.approx((1.8, 0.0))
    lines = format_histogram(REF, width=80).splitlines()
    assert lines[1].split() == ["data", "ref"]
    assert lines[2].endswith("20.0%  25.0%") and lines[3].endswith("80.0%  25.0%")
    assert "25.0% of it below this range and 0.0% above" in lines[-1] and "p95 1.8" in lines[-1]
    assert all(len(line) <= 80 for line in lines[:-1])


def test_excerpts() -> None:
    assert excerpt("  a\n\tb   c ", 10) == "a b c"
    assert excerpt("abcdef ghij", 8) == "abcdef…" and excerpt(None, 5) == ""
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second   question"},
    ]
    assert prompt_excerpt(prompt, 50) == "second question"
    assert prompt_excerpt(prompt[:1], 50) == "Be brief." and prompt_excerpt([], 50) == ""


def test_format_top() -> None:
    row = {
        "rank": 1,
        "value": 2.5,
        "sample_id": "r007",
        "source_row": 7,
        "delta_p": 2.5,
        "delta_p_proxy": 1.25,
        "proj_response": None,
        "prompt": [{"role": "user", "content": "why?"}],
        "response": "because " * 30,
        "natural_response": "",
    }
    lines = format_top([row], "delta_p", width=80).splitlines()
    assert lines[0] == "#1 delta_p=2.5 r007 (row 7) delta_p_proxy=1.25"  # NULL scores left out
    assert lines[1] == "    prompt:   why?"
    assert lines[2].startswith("    response: because because") and lines[2].endswith("…")
    assert lines[3] == "    natural:  (empty)" and all(len(line) <= 80 for line in lines)
    assert "natural:" not in format_top([{**row, "natural_response": None}], "delta_p")
    assert format_top([], "delta_p") == "(no samples with a delta_p score)"


def test_write_relation(tmp_path: Path, capsys) -> None:
    con = duckdb.connect()
    rel = con.sql("SELECT 1 AS a, [1, 2] AS l, 'x' AS s")
    write_relation(rel, "csv", None, 10)
    assert capsys.readouterr().out == 'a,l,s\n1,"[1,2]",x\n'  # nested values as JSON text
    write_relation(rel, "json", tmp_path / "o.json", 10)
    assert json.loads((tmp_path / "o.json").read_text()) == [{"a": 1, "l": [1, 2], "s": "x"}]
    write_relation(rel, "parquet", tmp_path / "o.parquet", 10)
    assert pq.read_table(tmp_path / "o.parquet").to_pylist() == [{"a": 1, "l": [1, 2], "s": "x"}]
    write_relation(rel, "table", None, 10)
    assert "│" in capsys.readouterr().out
    for fmt, out in (("table", tmp_path / "t"), ("parquet", None), ("xml", None)):
        with pytest.raises(ValueError):
            write_relation(rel, fmt, out, 10)
