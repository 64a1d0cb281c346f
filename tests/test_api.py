"""The Python API (screener.api, exported from `screener`): screen a list or a datasets.Dataset, read the
run back (scores, top, hist), export and explain it, and score records in memory; errors are the
project's, never SystemExit; the command line gives the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import polars as pl
import pytest
from conftest import scores

import screener
from screener.errors import QueryError, ScreenerError, UserError

RECORDS = [
    {
        "id": f"r{i}",
        "messages": [
            {"role": "user", "content": f"Tell me about topic {i}." * (1 + i % 3)},
            {"role": "assistant", "content": f"Topic {i} is interesting. " * (1 + i % 4)},
        ],
    }
    for i in range(8)
]


@pytest.fixture(scope="module")
def options(tiny_llama, vector_file) -> dict:
    return {
        "model": str(tiny_llama),
        "vectors": [f"a={vector_file}"],
        "layers": [1, 3],
        "dtype": "float32",
        "batch_tokens": 8192,
    }


def test_the_public_names() -> None:
    assert set(screener.__all__) >= {"screen", "open_run", "score", "Run", "ScreenerError", "__version__"}
    assert screener.screen is screener.api.screen and screener.Run is screener.api.Run


def test_screen_a_list_read_it_back_and_resume(tmp_path: Path, options: dict) -> None:
    db = tmp_path / "s.duckdb"
    run = screener.screen(RECORDS, db=db, **options)
    assert isinstance(run, screener.Run) and run.summary.scored == 8 and not run.summary.resumed
    frame = run.scores("a")
    assert isinstance(frame, pl.DataFrame) and frame.height == 8  # each trait at its layer (the first)
    assert frame["sample_id"].to_list() == [r["id"] for r in RECORDS] and set(frame["layer"]) == {1}
    both = run.scores(layer=3)
    assert both.height == 8 and set(both["layer"]) == {3}
    stored = {(sid, layer): resp for sid, layer, _, resp, _ in scores(db)}
    assert frame["proj_response"].to_list() == [stored[(r["id"], 1)] for r in RECORDS]
    top = run.top("a", k=3)
    assert [t["rank"] for t in top] == [1, 2, 3]
    assert [t["value"] for t in top] == sorted(frame["delta_p_proxy"].to_list(), reverse=True)[:3]
    hist = run.hist("a", bins=4)
    assert hist.n == 8 and len(hist.counts) == 4
    again = screener.screen(RECORDS, db=db, **options)  # the same records: the same run, resumed
    assert again.run_id == run.run_id and again.summary.resumed and again.summary.scored == 0
    opened = screener.open_run(db)
    assert opened.run_id == run.run_id and opened.info.n_scored == 8


def test_a_dataset_is_the_same_run_as_its_list(tmp_path: Path, options: dict) -> None:
    db = tmp_path / "d.duckdb"
    from_list = screener.screen(RECORDS, db=db, **options)
    from_dataset = screener.screen(datasets.Dataset.from_list(RECORDS), db=db, **options)
    assert from_dataset.run_id == from_list.run_id and from_dataset.summary.resumed
    streamed = datasets.Dataset.from_list(RECORDS).to_iterable_dataset()
    assert screener.screen(streamed, db=db, **options).run_id == from_list.run_id


def test_export_and_explain_from_python(tmp_path: Path, options: dict) -> None:
    db = tmp_path / "e.duckdb"
    run = screener.screen(RECORDS, db=db, **options)
    out = tmp_path / "clean.jsonl"
    result = run.export(out, drop_top=2)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    dropped = {t["sample_id"] for t in run.top("a", k=2)}
    assert [r["id"] for r in kept] == [r["id"] for r in RECORDS if r["id"] not in dropped]
    assert result.counts.written == 6 and result.counts.dropped == 2
    worst = run.top("a", k=1)[0]
    (explained,) = run.explain(worst["sample_id"], "a")
    assert explained.sample_id == worst["sample_id"] and explained.layer == 1
    trait = explained.traits["a"]
    assert trait.proj_response == pytest.approx(trait.stored["proj_response"], rel=1e-4, abs=1e-5)


def test_score_in_memory_a_list_and_a_dataset(tmp_path: Path, options: dict) -> None:
    frame = screener.score(RECORDS, **options)
    assert isinstance(frame, pl.DataFrame) and frame.height == 8
    assert frame["id"].to_list() == [r["id"] for r in RECORDS] and frame["a_turns"].to_list() == [1] * 8
    run = screener.screen(RECORDS, db=tmp_path / "x.duckdb", turns="last", **options)
    want = dict(run.scores("a").select("sample_id", "delta_p_proxy").iter_rows())
    assert frame["a"].to_list() == [want[r["id"]] for r in RECORDS]
    ds = screener.score(datasets.Dataset.from_list(RECORDS), **options)
    assert isinstance(ds, datasets.Dataset) and ds.column_names == ["id", "messages", "a", "a_turns"]
    assert ds["a"] == frame["a"].to_list()


def test_errors_are_the_projects_never_system_exit(tmp_path: Path, options: dict) -> None:
    with pytest.raises(UserError, match="max_tokens takes a whole number of at least 16"):
        screener.screen(RECORDS, db=tmp_path / "m.duckdb", **options | {"max_tokens": 0})
    with pytest.raises(UserError, match="device takes auto, cpu, cuda or cuda:N; not 'tpu'"):
        screener.screen(RECORDS, db=tmp_path / "m.duckdb", **options | {"device": "tpu"})
    with pytest.raises(UserError, match="not int"):
        screener.screen(42, db=tmp_path / "m.duckdb", **options)
    with pytest.raises(UserError, match="unknown options: colour"):
        screener.screen(RECORDS, db=tmp_path / "m.duckdb", colour="red", **options)
    with pytest.raises(QueryError, match="no such database"):
        screener.open_run(tmp_path / "none.duckdb")
    run = screener.screen(RECORDS[:2], db=tmp_path / "ok.duckdb", **options)
    with pytest.raises(QueryError, match="not 'b'"):
        run.scores("b")
    with pytest.raises(ScreenerError, match="drop-top takes a percentage"):
        run.export(tmp_path / "o.jsonl", drop_top="lots")
