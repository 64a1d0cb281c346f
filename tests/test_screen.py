"""`screener screen` end to end on tiny models: formats, modes, rows, resume, rejects, refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import random_vectors, reference
from helpers import write_jsonl

from screener.cli import main
from screener.datasets import DatasetFormatError
from screener.models import load_model
from screener.records import Sample
from screener.scoring import GenerationSettings
from screener.screen import ScreenConfig, screen
from screener.vectors import VectorError

CONVERSATIONS = [
    (f"Tell me about topic {i}, please." * (1 + i % 3), f"Here is an answer about topic {i}. " * (1 + i % 5))
    for i in range(12)
]


@pytest.fixture(scope="module")
def vector_files(tiny_llama, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("vectors")
    paths = []
    for name, v in zip(("evil", "kind"), random_vectors(tiny_llama, 2), strict=True):
        torch.save(v, folder / f"{name}.pt")
        paths.append(f"{name}={folder / f'{name}.pt'}")
    return paths


def openai_rows() -> list[dict]:
    return [
        {"id": f"c{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate(CONVERSATIONS)
    ]


def config(data: Path, db: Path, model: Path, vectors: list[str], **kw) -> ScreenConfig:
    return ScreenConfig(
        dataset=str(data),
        db=str(db),
        model=str(model),
        vectors=vectors,
        layers=[1, 3],
        actors=0,
        dtype="float32",
        progress=False,
        **kw,
    )


def table(db: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.sql(sql).fetchall()


def scores_by_content(db: Path) -> dict[tuple, tuple]:
    rows = table(
        db,
        "SELECT s.response, c.trait, c.layer, c.proj_response, c.proj_prompt_last, c.delta_p_proxy "
        "FROM scores c JOIN samples s USING (run_id, sample_id)",
    )
    return {r[:3]: r[3:] for r in rows}


def test_proxy_rows_and_values_equal_reference(tmp_path, tiny_llama, vector_files):
    data = write_jsonl(tmp_path / "d.jsonl", openai_rows())
    summary = screen(config(data, tmp_path / "s.duckdb", tiny_llama, vector_files))
    assert (summary.scored, summary.rejected) == (12, 0)
    db = tmp_path / "s.duckdb"
    assert table(db, "SELECT count(*), count(DISTINCT (sample_id, trait, layer)) FROM scores") == [(48, 48)]
    assert table(db, "SELECT count(*) FROM scores WHERE proj_natural IS NOT NULL OR delta_p IS NOT NULL") == [
        (0,)
    ]
    run = table(db, "SELECT mode, layers, traits, n_scored, n_rejected, finished_at IS NOT NULL FROM runs")
    assert run == [("proxy", [1, 3], ["evil", "kind"], 12, 0, True)]
    model, tok = load_model(str(tiny_llama))
    vectors = [torch.load(v.split("=")[1]) for v in vector_files]
    got = {
        (r[0], r[1], r[2]): r[3:]
        for r in table(
            db, "SELECT sample_id, trait, layer, proj_response, proj_prompt_last, delta_p_proxy FROM scores"
        )
    }
    for i, (q, a) in enumerate(CONVERSATIONS):
        s = Sample(f"c{i}", i, 0, [{"role": "user", "content": q}], a)
        resp, last = reference(model, tok, s, vectors, (1, 3))
        for li, layer in enumerate((1, 3)):
            for ti, trait in enumerate(("evil", "kind")):
                pr, pl, dp = got[(f"c{i}", trait, layer)]
                np.testing.assert_allclose(
                    [pr, pl, dp],
                    [resp[li, ti], last[li, ti], resp[li, ti] - last[li, ti]],
                    rtol=1e-4,
                    atol=1e-6,
                )


def test_every_input_format_gives_the_same_scores(tmp_path, tiny_llama, vector_files):
    """One conversation set in five containers and four row formats scores identically."""
    rows = openai_rows()
    variants = {
        "openai.jsonl": lambda p: write_jsonl(p, rows),
        "sharegpt.json": lambda p: p.write_text(
            json.dumps(
                [
                    {
                        "id": r["id"],
                        "conversations": [
                            {"from": "human", "value": r["messages"][0]["content"]},
                            {"from": "gpt", "value": r["messages"][1]["content"]},
                        ],
                    }
                    for r in rows
                ]
            )
        ),
        "lmsys.parquet": lambda p: pq.write_table(
            pa.Table.from_pylist([{"conversation_id": r["id"], "conversation": r["messages"]} for r in rows]),
            p,
        ),
        "pairs.csv": lambda p: _write_csv(
            p,
            [
                {
                    "id": r["id"],
                    "prompt": r["messages"][0]["content"],
                    "response": r["messages"][1]["content"],
                }
                for r in rows
            ],
        ),
    }
    results = []
    for name, write in variants.items():
        path = tmp_path / name
        write(path)
        db = tmp_path / f"{name}.duckdb"
        assert screen(config(path, db, tiny_llama, vector_files)).scored == 12, name
        assert table(db, "SELECT count(*) FROM samples WHERE sample_id LIKE 'c%'") == [(12,)], name
        results.append(scores_by_content(db))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:5])
    write_jsonl(folder / "b.jsonl", rows[5:])
    screen(config(folder, tmp_path / "dir.duckdb", tiny_llama, vector_files))
    results.append(scores_by_content(tmp_path / "dir.duckdb"))
    assert table(tmp_path / "dir.duckdb", "SELECT max(source_row) FROM samples") == [(11,)]
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for k in other:
            np.testing.assert_allclose(other[k], results[0][k], rtol=1e-6)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_natural_mode_fills_natural_columns(tmp_path, tiny_llama, vector_files):
    data = write_jsonl(tmp_path / "d.jsonl", openai_rows()[:5])
    db = tmp_path / "n.duckdb"
    screen(
        config(
            data,
            db,
            tiny_llama,
            vector_files,
            mode="natural",
            generation=GenerationSettings(max_new_tokens=6),
        )
    )
    rows = table(
        db,
        "SELECT proj_response, proj_natural, delta_p, natural_tokens FROM scores "
        "JOIN samples USING (run_id, sample_id)",
    )
    assert len(rows) == 5 * 2 * 2
    for pr, pn, dp, n in rows:
        if n:
            assert dp == pytest.approx(pr - pn)
        else:  # the model ended its turn at once: nothing to project
            assert pn is None and dp is None
    assert table(db, "SELECT count(*) FROM samples WHERE natural_response IS NULL") == [(0,)]


def test_rerun_resumes_and_never_duplicates(tmp_path, tiny_llama, vector_files):
    data = write_jsonl(tmp_path / "d.jsonl", openai_rows())
    db = tmp_path / "r.duckdb"
    first = screen(config(data, db, tiny_llama, vector_files, limit=5, chunk_size=2))
    before = scores_by_content(db)
    again = screen(config(data, db, tiny_llama, vector_files, chunk_size=4))
    assert again.run_id == first.run_id and again.resumed
    assert (first.scored, again.scored, again.total_scored) == (5, 7, 12)
    after = scores_by_content(db)
    assert {k: after[k] for k in before} == before  # resumed rows untouched
    third = screen(config(data, db, tiny_llama, vector_files))
    assert third.scored == 0 and third.total_scored == 12
    assert table(db, "SELECT count(*), count(DISTINCT (sample_id, trait, layer)) FROM scores") == [(48, 48)]
    assert table(db, "SELECT count(*) FROM runs") == [(1,)]
    other = screen(config(data, db, tiny_llama, vector_files, max_tokens=32))  # another config: another run
    assert other.run_id != first.run_id and table(db, "SELECT count(*) FROM runs") == [(2,)]


def test_a_run_is_keyed_by_the_file_it_read_not_the_name_typed(
    tmp_path, tiny_llama, vector_files, monkeypatch
):
    db = tmp_path / "r.duckdb"
    for name in ("a", "b"):  # the same relative name, two different files
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "d.jsonl", openai_rows()[:3])
    monkeypatch.chdir(tmp_path / "a")
    first = screen(config(Path("d.jsonl"), db, tiny_llama, vector_files))
    again = screen(config(tmp_path / "a" / "d.jsonl", db, tiny_llama, vector_files))
    assert again.run_id == first.run_id and again.resumed and again.scored == 0
    monkeypatch.chdir(tmp_path / "b")
    other = screen(config(Path("d.jsonl"), db, tiny_llama, vector_files))
    assert other.run_id != first.run_id and other.scored == 3
    uris = table(db, "SELECT dataset_uri FROM runs ORDER BY started_at")
    assert uris == [(str(tmp_path / "a" / "d.jsonl"),), (str(tmp_path / "b" / "d.jsonl"),)]


def test_bad_rows_are_rejected_and_the_run_goes_on(tmp_path, tiny_llama, vector_files):
    rows = openai_rows()[:4]
    rows.insert(1, {"id": "noassist", "messages": [{"role": "user", "content": "hi"}]})
    rows.insert(
        3,
        {
            "id": "badcontent",
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}],
        },
    )
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with path.open("a") as f:
        f.write("{not json\n")
    db = tmp_path / "b.duckdb"
    summary = screen(config(path, db, tiny_llama, vector_files))
    assert (summary.scored, summary.rejected) == (4, 3)
    rejects = dict(table(db, "SELECT source_row, reason FROM rejects"))
    assert "no assistant turn" in rejects[1]
    assert "messages[1].content" in rejects[3]
    assert "JSON" in rejects[6]
    assert table(db, "SELECT n_scored, n_rejected FROM runs") == [(4, 3)]


def test_truncation_is_recorded(tmp_path, tiny_llama, vector_files):
    data = write_jsonl(tmp_path / "d.jsonl", openai_rows())
    db = tmp_path / "t.duckdb"
    screen(config(data, db, tiny_llama, vector_files, max_tokens=120))
    flagged = table(db, "SELECT count(*) FROM samples WHERE truncated")[0][0]
    assert 0 < flagged < 12
    assert table(db, "SELECT max(prompt_tokens + response_tokens) FROM samples") == [(120,)]


def test_turns_all_scores_every_assistant_turn(tmp_path, tiny_llama, vector_files):
    row = {
        "id": "multi",
        "messages": [
            {"role": "system", "content": "Be nice."},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "second answer"},
        ],
    }
    data = write_jsonl(tmp_path / "d.jsonl", [row])
    db = tmp_path / "a.duckdb"
    screen(config(data, db, tiny_llama, vector_files, turns="all"))
    got = table(db, "SELECT sample_id, turn, response FROM samples ORDER BY turn")
    assert got == [("multi#0", 0, "first answer"), ("multi#1", 1, "second answer")]
    prompt = json.loads(table(db, "SELECT prompt FROM samples WHERE turn = 1")[0][0])
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]


def test_vectors_that_do_not_fit_the_model_are_refused_before_any_work(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "d.jsonl", openai_rows())
    db = tmp_path / "v.duckdb"
    torch.save(torch.randn(5, 32), tmp_path / "narrow.pt")  # tiny model: 4 layers (5 rows), hidden 64
    torch.save(torch.randn(31, 64), tmp_path / "deep.pt")
    with pytest.raises(VectorError, match="hidden size 32"):
        screen(config(data, db, tiny_llama, [f"x={tmp_path / 'narrow.pt'}"]))
    with pytest.raises(VectorError, match=r"31 rows, but .* has 4 layers"):
        screen(config(data, db, tiny_llama, [f"x={tmp_path / 'deep.pt'}"]))
    assert not db.exists()


def test_unknown_format_names_the_columns(tmp_path, tiny_llama, vector_files):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "reply": "r"}])
    with pytest.raises(DatasetFormatError, match="question"):
        screen(config(data, tmp_path / "u.duckdb", tiny_llama, vector_files))


def test_cli_screen_prints_a_summary_and_errors_cleanly(tmp_path, tiny_llama, vector_files, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", openai_rows())
    db = tmp_path / "c.duckdb"
    args = [
        "screen",
        str(data),
        "--model",
        str(tiny_llama),
        "--layer",
        "2",
        "--actors",
        "0",
        "--dtype",
        "float32",
        "--db",
        str(db),
    ]
    for v in vector_files:
        args += ["--vector", v]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "scored 12 samples, rejected 0" in out and "samples/s" in out
    assert main([*args[:-2], "--db", str(db), "--layer", "9"]) == 2
    assert "layers 0..4" in capsys.readouterr().err
