"""`screener screen` end to end on tiny models: formats, modes, rows, resume, rejects, refusals."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import threading
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
from screener.datasets import DatasetFormatError, ReadStats, read_samples
from screener.models import load_model
from screener.records import Sample
from screener.scoring import GenerationSettings
from screener.screen import ScreenConfig, Summary, screen
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


def parsed_rows(monkeypatch, rows: list[dict]) -> list[int]:
    """The list the reader appends each row's index to as it parses that row's line (rows as written)."""
    from screener.datasets import containers

    parsed: list[int] = []
    lines = [json.dumps(r).encode() for r in rows]
    parse_line = containers.parse_line

    def counting(line: bytes):
        parsed.append(next(i for i, text in enumerate(lines) if json.loads(line) == json.loads(text)))
        return parse_line(line)

    monkeypatch.setattr(containers, "parse_line", counting)
    return parsed


def chats(rows: list[tuple[str, int]]) -> list[dict]:
    """OpenAI-format records of (id, assistant turns)."""
    out = []
    for k, (rid, turns) in enumerate(rows):
        messages = []
        for t in range(turns):
            messages += [
                {"role": "user", "content": f"Question {t} of record {k}: why? " * (1 + (k + t) % 3)},
                {"role": "assistant", "content": f"Answer {t} of record {k}. " * (1 + (k * t) % 4)},
            ]
        out.append({"id": rid, "messages": messages})
    return out


def test_resume_skips_finished_rows_unparsed_with_the_ids_of_a_full_read(
    tmp_path, tiny_llama, vector_files, monkeypatch
):
    """A resumed screen reads a finished row (every item stored as a sample) without parsing it, yet gives
    each later row the ids a read in full gives (row 2 reuses row 1's id), rescans a row a --limit cut and
    a row with a reject, and ends with exactly the rows and scores of an uninterrupted screen."""
    rows = chats([("a", 2), ("b", 3), ("b", 2), ("t", 2), ("c", 1), ("d", 2), ("e", 2)])
    rows[3]["messages"][3] = {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]}  # skipped
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    whole = tmp_path / "whole.duckdb"
    screen(config(data, whole, tiny_llama, vector_files, turns="all", chunk_size=2))

    parsed = parsed_rows(monkeypatch, rows)  # the rows whose line was parsed
    db = tmp_path / "r.duckdb"
    first = screen(config(data, db, tiny_llama, vector_files, turns="all", chunk_size=2, limit=6))
    assert first.scored == 6  # a#0, a#1, b#0, b#1, b#2, b@2#0: row 2 is cut after its first turn
    complete = [(0, True), (1, True), (2, False)]
    assert table(db, "SELECT source_row, complete FROM records ORDER BY 1") == complete
    parsed.clear()
    again = screen(config(data, db, tiny_llama, vector_files, turns="all", chunk_size=2))
    assert again.resumed and parsed == [0, 2, 3, 4, 5, 6]  # row 0 for its format: the input's first
    assert again.scored == 13 - 6
    parsed.clear()
    third = screen(config(data, db, tiny_llama, vector_files, turns="all", chunk_size=2))
    assert third.scored == 0 and parsed == [0, 3]  # the first row, and the one with a reject
    query = (
        "SELECT sample_id, source_row, turn, prompt, response, trait, layer, proj_response "
        "FROM samples JOIN scores USING (run_id, sample_id) ORDER BY ALL"
    )
    got, want = table(db, query), table(whole, query)
    assert [r[:-1] for r in got] == [r[:-1] for r in want]
    # row 2's first turn was scored in the cut run alone, not in one pass with its second: float noise
    assert [r[-1] for r in got] == pytest.approx([r[-1] for r in want], rel=1e-5)
    assert table(db, "SELECT sample_id FROM turns WHERE source_row = 2 ORDER BY 1") == [
        ("b@2#0",),
        ("b@2#1",),
    ]
    rejects = "SELECT source_row, sample_id, kind FROM rejects"
    assert table(db, rejects) == table(whole, rejects) == [(3, "t#1", "skipped")]


def test_overlapped_preparation_gives_the_same_rows(tmp_path, tiny_llama, vector_files, monkeypatch):
    """The stage as on a GPU (the next chunk tokenised in a thread while the model scores this one), here
    on the CPU: exactly the rows and values of the stage in turn."""
    module = importlib.import_module("screener.screen")  # `screener.screen` is also the function
    threads: set[str] = set()

    class Overlapping(module.ScreenStage):
        def __init__(self, plan):
            super().__init__(plan, overlap=True)

        def prepare(self, chunk):
            threads.add(threading.current_thread().name)
            return super().prepare(chunk)

    rows = chats([("a", 2), ("b", 3), ("c", 1), ("d", 2), ("e", 4), ("f", 1), ("g", 2)]) + openai_rows()
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    plain, overlapped = tmp_path / "plain.duckdb", tmp_path / "overlapped.duckdb"
    screen(config(data, plain, tiny_llama, vector_files, turns="all", chunk_size=3))
    monkeypatch.setattr(module, "ScreenStage", Overlapping)
    screen(config(data, overlapped, tiny_llama, vector_files, turns="all", chunk_size=3))
    assert threads and all(name.startswith("prepare") for name in threads), threads
    for query in (
        "SELECT * EXCLUDE (run_id) FROM samples ORDER BY ALL",
        "SELECT * EXCLUDE (run_id) FROM scores ORDER BY ALL",
        "SELECT * EXCLUDE (run_id) FROM rejects ORDER BY ALL",
    ):
        assert table(overlapped, query) == table(plain, query)
    assert len(table(plain, "SELECT * FROM samples")) == 15 + len(openai_rows())


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


# ---- hostile input, failed runs, full disks, vectors and paths (issue 17) ------------------------------


def cli_args(data: Path, db: Path, model: Path, vectors: list[str], *extra: object) -> list[str]:
    args = [str(data), "--model", str(model), "--actors", "0", "--dtype", "float32", "--db", str(db)]
    for v in vectors:
        args += ["--vector", v]
    return ["screen", *args, "--no-progress", *(str(x) for x in extra)]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_records_and_unreadable_files_are_rejects_and_a_rerun_gets_past_them(
    tmp_path, tiny_llama, vector_files, capsys
):
    """A 10,000-deep JSON line, a CSV cell that is not UTF-8, a corrupt .gz and a garbage .parquet each
    stopped the screen with a traceback; with --chunk-size 2 every rerun died on the same line."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = openai_rows()
    lines = [json.dumps(r) for r in rows[:4]]
    lines.insert(2, '{"id": "deep", "messages": ' + "[" * 10_000 + "]" * 10_000 + "}")
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "b.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 corrupt gzip")
    (folder / "c.parquet").write_bytes(b"PAR1 not really parquet")
    (folder / "d.csv").write_bytes(b"id,prompt,response\nk1,hello,fine\nk2,caf\xe9,fine\nk3,bye,ok\n")
    db = tmp_path / "s.duckdb"
    argv = cli_args(folder, db, tiny_llama, vector_files, "--layer", 2, "--chunk-size", 2)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "scored 6 samples, rejected 2 in" in out
        and "run totals: 6 scored, 2 rejected, 2 unreadable files" in out
    )
    assert "read 8 rows from 4 files (a.jsonl 5, b.jsonl.gz 0, c.parquet 0, d.csv 3)" in out
    assert f"warning: {folder / 'b.jsonl.gz'}: unreadable file: corrupt compressed data: " in out
    assert f"warning: {folder / 'c.parquet'}: unreadable file: not a readable parquet file: " in out
    rejects = table(
        db, "SELECT source_row, sample_id, kind, reason FROM rejects ORDER BY source_row, sample_id"
    )
    assert [r[:3] for r in rejects] == [
        (-1, str(folder / "b.jsonl.gz"), "file"),
        (-1, str(folder / "c.parquet"), "file"),
        (2, rejects[2][1], "bad"),
        (6, rejects[3][1], "bad"),
    ]
    assert (
        rejects[2][3] == "invalid JSON: nested too deeply to parse" and rejects[3][3] == "prompt: not UTF-8"
    )
    assert table(db, "SELECT status, n_scored, n_rejected, n_unreadable_files FROM runs") == [
        ("finished", 6, 2, 2)
    ]
    assert main(argv) == 0  # the rerun resumes past every bad record and file
    out = capsys.readouterr().out
    assert "(resumed): scored 0 samples, rejected 2 in" in out  # read again, stored once
    assert table(db, "SELECT count(*) FROM rejects") == [(4,)] and table(
        db, "SELECT count(*) FROM samples"
    ) == [(6,)]


def test_a_csv_quote_never_closed_loses_no_rows(tmp_path, tiny_llama, vector_files, capsys):
    """An unclosed quote at row 3 of 20 gave "scored 2, rejected 1", and 17 rows vanished unsaid."""
    path = tmp_path / "d.csv"
    rows = [{"id": f"{i:02d}", "prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(20)]
    _write_csv(path, rows)
    path.write_text(path.read_text().replace("Question 2?", '"Question 2?'))
    assert main(cli_args(path, tmp_path / "s.duckdb", tiny_llama, vector_files, "--layer", 2)) == 0
    out = capsys.readouterr().out
    assert "scored 19 samples, rejected 1 in" in out and f"read 20 rows from {path} (prompt_response)" in out
    assert "rejected: 1 × csv line 4: a quote opened in this row is never closed" in out


def test_a_folder_of_mixed_formats(tmp_path, tiny_llama, vector_files):
    """A folder took the first file's row format for all: every ShareGPT and CSV row was rejected."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = openai_rows()
    write_jsonl(folder / "a.jsonl", rows[:4])
    write_jsonl(
        folder / "b.jsonl",
        [
            {
                "id": r["id"],
                "conversations": [{"from": "human", "value": m[0]}, {"from": "gpt", "value": m[1]}],
            }
            for r in rows[4:8]
            for m in [[x["content"] for x in r["messages"]]]
        ],
    )
    _write_csv(
        folder / "c.csv",
        [
            {"id": r["id"], "prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]}
            for r in rows[8:]
        ],
    )
    summary = screen(config(folder, tmp_path / "m.duckdb", tiny_llama, vector_files))
    assert (summary.scored, summary.rejected) == (12, 0)
    assert summary.read.format == "mixed (openai, sharegpt, prompt_response)"
    np.testing.assert_equal(
        scores_by_content(tmp_path / "m.duckdb").keys(),
        scores_by_content(_screen_jsonl(tmp_path, tiny_llama, vector_files)).keys(),
    )


def _screen_jsonl(tmp_path: Path, model: Path, vectors: list[str]) -> Path:
    db = tmp_path / "one.duckdb"
    screen(config(write_jsonl(tmp_path / "one.jsonl", openai_rows()), db, model, vectors))
    return db


TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
}


def test_function_calling_data_is_screened(tmp_path, tiny_llama, vector_files, capsys):
    """Content parts, tool messages and tool-call turns rejected every function-calling record whole."""
    record = {
        "id": "f1",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
            {"role": "assistant", "content": [{"type": "text", "text": "It rains."}]},
        ],
    }
    only_call = {"id": "f2", "messages": record["messages"][:2]}
    data = write_jsonl(tmp_path / "d.jsonl", [record, only_call])
    db = tmp_path / "f.duckdb"
    assert main(cli_args(data, db, tiny_llama, vector_files, "--layer", 2)) == 0
    out = capsys.readouterr().out
    assert "scored 1 samples, rejected 0, skipped 2 tool-call turns in" in out
    assert table(db, "SELECT sample_id, response FROM samples") == [("f1#1", "It rains.")]
    prompt = json.loads(table(db, "SELECT prompt FROM samples")[0][0])
    assert [m["role"] for m in prompt] == ["user", "assistant", "tool"] and prompt[1]["tool_calls"] == [
        TOOL_CALL
    ]
    skipped = table(db, "SELECT sample_id, kind, reason FROM rejects ORDER BY sample_id")
    assert skipped == [
        ("f1#0", "skipped", "messages[1]: tool calls only, no text to score"),
        ("f2", "skipped", "messages[1]: tool calls only, no text to score"),
    ]
    assert table(db, "SELECT n_scored, n_rejected, n_skipped FROM runs") == [(1, 0, 2)]


def test_tool_calls_reach_the_chat_template(tiny_llama):
    from transformers import AutoTokenizer

    from screener.models import chat_ids

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "rain", "tool_call_id": "call_1"},
    ]
    # the tiny ChatML template never renders tool_calls: they are added to the turn's text
    text = tok.decode(chat_ids(tok, messages))
    assert (
        '{"name": "weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}' in text
        and "<|im_start|>tool\nrain" in text
    )
    # a template that renders them gets them as they are
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}({{ c.function.arguments }}){% endfor %}"
        "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    assert 'CALL weather({"city": "Oslo"})' in tok.decode(chat_ids(tok, messages))


def test_empty_input_is_an_error_and_records_no_run(tmp_path, tiny_llama, vector_files, capsys):
    """Empty input files: exit 0, "scored 0", no warning."""
    (empty := tmp_path / "empty.jsonl").write_text("")
    db = tmp_path / "e.duckdb"
    assert main(cli_args(empty, db, tiny_llama, vector_files, "--layer", 2)) == 2
    assert one_error_line(capsys) == f"error: {empty}: no records to screen (the file is empty)"
    assert not db.exists()
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("")
    write_jsonl(folder / "b.jsonl", openai_rows()[:2])
    assert main(cli_args(folder, db, tiny_llama, vector_files, "--layer", 2)) == 0
    assert f"warning: 1 empty file: {folder / 'a.jsonl'}" in capsys.readouterr().out


def test_a_failed_screen_is_recorded_and_a_rerun_finishes_it(
    tmp_path, tiny_llama, vector_files, capsys, monkeypatch
):
    screen_module = importlib.import_module("screener.screen")  # `screener.screen` is the API's

    data = write_jsonl(tmp_path / "d.jsonl", openai_rows())
    db = tmp_path / "f.duckdb"
    real, calls = screen_module.ScreenStage.process, []

    def failing(self, chunk, report=None):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the worker's GPU fell off")
        return real(self, chunk, report)

    monkeypatch.setattr(screen_module.ScreenStage, "process", failing)
    with pytest.raises(RuntimeError):
        screen(config(data, db, tiny_llama, vector_files, chunk_size=4))
    assert table(db, "SELECT status, error, finished_at FROM runs") == [
        ("failed", "RuntimeError: the worker's GPU fell off", None)
    ]
    assert table(db, "SELECT count(*) FROM samples") == [(4,)]  # the first chunk is committed
    monkeypatch.setattr(screen_module.ScreenStage, "process", real)
    again = screen(config(data, db, tiny_llama, vector_files, chunk_size=4))
    assert again.resumed and (again.scored, again.total_scored) == (8, 12)
    assert table(db, "SELECT status, error FROM runs") == [("finished", None)]
    # Ctrl-C: recorded as interrupted; the command says to rerun it (exit code 130)
    monkeypatch.setattr(
        screen_module.ScreenStage,
        "process",
        lambda self, chunk, report=None: (_ for _ in ()).throw(KeyboardInterrupt),
    )
    with pytest.raises(KeyboardInterrupt):
        screen(config(data, db, tiny_llama, vector_files, chunk_size=4, max_tokens=64))
    assert table(db, "SELECT status, error FROM runs WHERE status <> 'finished'") == [
        ("failed", "interrupted")
    ]


def test_a_disk_full_at_the_final_checkpoint_fails_loudly(
    tmp_path, tiny_llama, vector_files, capsys, monkeypatch
):
    """With 100 KB free, a screen said "scored 200" (exit 0) while its results were only in the WAL."""
    from helpers import FullDisk

    import screener.store

    real_init = screener.store.Store.__init__

    def full_disk_store(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.con = FullDisk(self.con)

    monkeypatch.setattr(screener.store.Store, "__init__", full_disk_store)
    data = write_jsonl(tmp_path / "d.jsonl", openai_rows())
    db = tmp_path / "f.duckdb"
    argv = cli_args(data, db, tiny_llama, vector_files, "--layer", 2)
    assert main(argv) == 4
    line = one_error_line(capsys)
    assert line.startswith(f"error: {db}: could not write the results into the database file (")
    assert "No space left on device" in line and f"{db}.wal" in line
    monkeypatch.setattr(screener.store.Store, "__init__", real_init)
    # the 12 committed samples are counted as they commit, not only when the run finishes (issue 22)
    assert table(db, "SELECT status, n_scored FROM runs") == [("failed", 12)]
    assert main(argv) == 0 and "(resumed)" in capsys.readouterr().out
    assert table(db, "SELECT status, n_scored FROM runs") == [("finished", 12)]


def test_a_zero_vector_is_refused_before_the_run_and_the_model(tmp_path, tiny_llama, monkeypatch):
    """A zero vector failed with a traceback after the model had loaded, leaving an empty run behind."""
    from screener.models import ModelRef

    monkeypatch.setattr(ModelRef, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    zero = random_vectors(tiny_llama, 1)[0]
    zero[3] = 0
    torch.save(zero, tmp_path / "zero.pt")
    data = write_jsonl(tmp_path / "d.jsonl", openai_rows())
    db = tmp_path / "z.duckdb"
    with pytest.raises(
        VectorError, match=r"zero\.pt: a persona vector is zero at layer 3; it has no direction"
    ):
        screen(config(data, db, tiny_llama, [f"z={tmp_path / 'zero.pt'}"]))
    assert not db.exists()


def test_sidecar_problems_name_the_sidecar_and_layer_overrides_a_bad_one(tmp_path, tiny_llama, capsys):
    torch.save(random_vectors(tiny_llama, 1)[0], tmp_path / "v.pt")
    side = tmp_path / "v.json"
    data = write_jsonl(tmp_path / "d.jsonl", openai_rows()[:2])
    db = tmp_path / "v.duckdb"
    base = cli_args(data, db, tiny_llama, [f"v={tmp_path / 'v.pt'}"])
    for sidecar, message in (
        (
            {"chosen_layer": 99},
            f"error: {side}: chosen_layer 99 is out of range: {tiny_llama.name} has hidden_states layers "
            "0..4; fix the sidecar or pass --layer",
        ),
        (
            {"chosen_layer": "abc"},
            f"error: {side}: chosen_layer 'abc' is not a layer number; fix the sidecar or pass --layer",
        ),
    ):
        side.write_text(json.dumps(sidecar))
        assert main(base) == 2
        assert one_error_line(capsys) == message  # not blamed on a --layer the user never passed
        assert main([*base, "--layer", "2"]) == 0  # --layer overrides the sidecar's layer
        capsys.readouterr()
    side.write_text("{corrupt")
    assert main([*base, "--layer", "2"]) == 2
    assert one_error_line(capsys).startswith(f"error: {side}: the vector's sidecar is not valid JSON (")
    (tmp_path / "text.pt").write_text("evil = [0.1, 0.2]\n")
    assert main([*cli_args(data, db, tiny_llama, [f"t={tmp_path / 'text.pt'}"]), "--layer", "2"]) == 2
    assert one_error_line(capsys) == (
        f"error: {tmp_path / 'text.pt'}: not a torch.save file "
        "(it begins with the text 'evil = [0.1, 0.2]\\n')"
    )


def test_database_paths_and_a_missing_input(tmp_path, tiny_llama, vector_files, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", openai_rows()[:2])
    args = lambda db, src=data: cli_args(src, db, tiny_llama, vector_files, "--layer", 2)  # noqa: E731
    assert main(args(tmp_path / "new" / "folder" / "s.duckdb")) == 0  # a missing folder is created
    capsys.readouterr()
    (tmp_path / "a-file").write_text("x")
    assert main(args(tmp_path / "a-file" / "s.duckdb")) == 4
    assert one_error_line(capsys).startswith(
        f"error: {tmp_path / 'a-file' / 's.duckdb'}: cannot create its folder"
    )
    (random := tmp_path / "random.duckdb").write_bytes(os.urandom(10_000))
    assert main(args(random)) == 2
    assert one_error_line(capsys).startswith(f"error: {random}: not a DuckDB database, or a damaged one (")
    assert main(args(data)) == 2
    assert (
        one_error_line(capsys)
        == f"error: --db {data} is a file of the dataset being screened; choose another path for the results"
    )
    assert data.read_text().startswith("{")
    missing = tmp_path / "missing.jsonl"
    assert main(args(tmp_path / "s.duckdb", missing)) == 2
    assert one_error_line(capsys) == (
        f"error: {missing}: no such file or directory, and not a hub dataset name (org/name)"
    )


def test_the_summary_lists_the_files_of_a_folder_that_are_not_data(tmp_path) -> None:
    """Files that are not data by their name are listed, never dropped unseen."""
    write_jsonl(tmp_path / "a.jsonl", openai_rows()[:1])
    (tmp_path / "README.md").write_text("about the data")
    (tmp_path / "b.jsonl.7z").write_bytes(b"7z")
    stats = ReadStats()
    list(read_samples(str(tmp_path), stats=stats))
    lines = Summary("r", False, 1, 0, 1, 0, 1.0, stats).lines()
    assert f"warning: 2 files not read, not data by their name: {tmp_path / 'README.md'}, " in "\n".join(
        lines
    )


def test_a_resumed_screens_progress_count_skips_the_finished_rows_too(
    tmp_path, tiny_llama, vector_files, monkeypatch
):
    """The progress bar's count ahead (a thread beside the screen) parsed the whole input again on a
    resume; now it counts a finished row by its stored ids, unparsed, and its total is still every
    sample of the input."""
    from screener.progress import Progress

    rows = chats([("a", 2), ("b", 3), ("c", 1), ("d", 2), ("e", 2)])
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    db = tmp_path / "r.duckdb"
    screen(config(data, db, tiny_llama, vector_files, turns="all", chunk_size=2, limit=5))  # rows 0, 1
    parsed = parsed_rows(monkeypatch, rows)
    totals: list[tuple] = []
    monkeypatch.setattr(Progress, "set_total", lambda p, t, initial=None: totals.append((t, initial)))
    cfg = dataclasses.replace(
        config(data, db, tiny_llama, vector_files, turns="all", chunk_size=2), progress=True
    )
    again = screen(cfg)
    assert again.resumed and again.scored == 10 - 5
    assert totals == [(10, 5)]  # every sample of the input, 5 of them done before
    assert sorted(parsed) == [0, 0, 2, 2, 3, 3, 4, 4]  # the screen's read and the count's: rows 0, 2-4
