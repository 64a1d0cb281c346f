"""Tests for screener.export: exact round trips (jsonl, ShareGPT JSON array, parquet, hf), every filter
and --invert against numpy, unscored records, the manifest, and a changed input."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import (
    FakeScreen,
    cli,
    make_screen,
    openai_records,
    sharegpt_records,
    write_json_array,
    write_jsonl,
)

import screener.export
from screener.datasets import read_rows
from screener.export import FORMATS, SPOOL_BATCH, export_records, manifest_path
from screener.results import DropFilter, open_db, pick_run, select_drops

N = 30
REJECTED_ROWS = {3, 5}  # openai_records: an empty response and no assistant turn


@pytest.fixture
def screen(tmp_path: Path) -> FakeScreen:
    return make_screen(tmp_path / "s.duckdb", write_jsonl(tmp_path / "in.jsonl", openai_records(N)), seed=2)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def manifest(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".manifest.json").read_text())


def rows_of(screen: FakeScreen, sample_ids: set[str]) -> set[int]:
    return {s.source_row for s in screen.samples if s.sample_id in sample_ids}


def test_jsonl_round_trip_is_byte_identical(screen: FakeScreen, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.jsonl"
    assert cli("export", out, "--db", screen.db) == 0
    assert out.read_bytes() == Path(screen.run.dataset_uri).read_bytes()
    m = manifest(out)
    assert (m["records_read"], m["kept"], m["dropped"], m["written"]) == (N, N, 0, N)
    assert m["run_id"] == screen.run_id and m["filter"]["description"].startswith("no filter")
    assert "wrote 30 kept records of 30" in capsys.readouterr().out


def test_sharegpt_json_array_round_trip(tmp_path: Path) -> None:
    records = sharegpt_records(N)
    screen = make_screen(tmp_path / "s.duckdb", write_json_array(tmp_path / "in.json", records), mode="proxy")
    out = tmp_path / "out.jsonl"
    assert cli("export", out, "--db", screen.db) == 0
    assert read_jsonl(out) == records  # the same records, now one per line


def test_parquet_and_hf_round_trip(screen: FakeScreen, tmp_path: Path) -> None:
    import datasets

    records = openai_records(N)
    assert cli("export", tmp_path / "out.parquet", "--format", "parquet", "--db", screen.db) == 0
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == records
    # parquet in → parquet out keeps the records too
    parquet_screen = make_screen(tmp_path / "p.duckdb", tmp_path / "out.parquet", seed=3)
    assert cli("export", tmp_path / "again.parquet", "--format", "parquet", "--db", parquet_screen.db) == 0
    assert pq.read_table(tmp_path / "again.parquet").to_pylist() == records
    assert cli("export", tmp_path / "hf", "--format", "hf", "--db", screen.db, "--threshold", 1) == 0
    m = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    kept = datasets.load_from_disk(str(tmp_path / "hf")).to_list()
    assert len(kept) == m["kept"] == m["written"] and kept == [r for r in records if r in kept]
    assert cli("export", tmp_path / "hf", "--format", "hf", "--db", screen.db) == 1  # not over a dataset


def test_csv_input_round_trip(tmp_path: Path) -> None:
    records = [
        {"id": f"{i:03d}", "prompt": f'Q{i}, with "quotes",\na newline and ü', "response": f"A{i}", "x": ""}
        for i in range(12)
    ]
    records[4]["response"] = ""  # rejected (empty response), and kept
    data = tmp_path / "in.csv"
    with open(data, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    screen = make_screen(tmp_path / "s.duckdb", data, mode="proxy")
    out = tmp_path / "out.jsonl"
    assert cli("export", out, "--db", screen.db) == 0
    assert read_jsonl(out) == records  # every cell still the string it was ("000" is not 0)
    m = manifest(out)
    assert (m["records_read"], m["kept"], m["dropped"]) == (12, 12, 0)


def test_glob_input_round_trip(tmp_path: Path) -> None:
    """Several files behind one glob: rows are numbered across the files, in sorted file order."""
    records = openai_records(N)
    for part in range(3):
        write_jsonl(tmp_path / f"part-{part}.jsonl", records[part * 10 : (part + 1) * 10])
    screen = make_screen(tmp_path / "s.duckdb", tmp_path / "part-*.jsonl", seed=4)
    out, dropped = tmp_path / "out.jsonl", tmp_path / "dropped.jsonl"
    assert cli("export", out, "--db", screen.db) == 0
    assert read_jsonl(out) == records
    args = ["--db", screen.db, "--drop-top", "20%", "--trait", "evil"]
    assert cli("export", out, *args, "--force") == 0
    assert cli("export", dropped, *args, "--invert") == 0
    values = screen.values("delta_p", "evil", 10)
    top = {s for s, _ in sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[: math.ceil(len(values) / 5)]}
    dropped_rows = split_rows(dropped)
    assert dropped_rows == rows_of(screen, top) and len({row // 10 for row in dropped_rows}) > 1  # 2+ files
    assert read_jsonl(dropped) == [r for i, r in enumerate(records) if i in dropped_rows]
    assert read_jsonl(out) == [r for i, r in enumerate(records) if i not in dropped_rows]


def test_turns_all_keeps_or_drops_whole_records(tmp_path: Path) -> None:
    """With --turns all a record has a sample per assistant turn; a selected turn drops the whole record."""
    records = []
    for i in range(N):
        messages = [{"role": "system", "content": "Be brief."}]
        for t in range(1 + i % 3):  # one to three assistant turns
            messages += [
                {"role": "user", "content": f"Question {i}.{t}?"},
                {"role": "assistant", "content": f"Answer {i}.{t}."},
            ]
        records.append({"id": f"r{i:03d}", "messages": messages})
    screen = make_screen(tmp_path / "s.duckdb", write_jsonl(tmp_path / "in.jsonl", records), turns="all")
    assert len(screen.samples) == sum(1 + i % 3 for i in range(N))
    out, dropped = tmp_path / "out.jsonl", tmp_path / "dropped.jsonl"
    assert cli("export", out, "--db", screen.db) == 0
    assert out.read_bytes() == (tmp_path / "in.jsonl").read_bytes()
    args = ["--db", screen.db, "--drop-top", "5", "--trait", "evil", "--layer", 20]
    assert cli("export", out, *args, "--force") == 0
    assert cli("export", dropped, *args, "--invert") == 0
    values = screen.values("delta_p", "evil", 20)
    top = {s for s, _ in sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[:5]}
    want = rows_of(screen, top)
    selected_turns = Counter(s.source_row for s in screen.samples if s.sample_id in top)
    assert any(selected_turns[row] < 1 + row % 3 for row in want)  # some record has unselected turns too
    assert read_jsonl(dropped) == [records[i] for i in sorted(want)]  # whole records, every turn
    assert read_jsonl(out) == [r for i, r in enumerate(records) if i not in want]
    m = manifest(out)
    assert (m["dropped"], m["kept"], m["per_trait"]["evil"]["scored_records"]) == (
        len(want),
        N - len(want),
        N,
    )


def split_rows(out: Path) -> set[int]:
    """Source rows of an export (the ids are r000, r001, ...)."""
    return {int(r["id"][1:]) for r in read_jsonl(out)}


def test_drop_top_percent_and_invert(screen: FakeScreen, tmp_path: Path) -> None:
    scored = screen.values("delta_p", "evil", 20)  # natural run: delta_p is the default metric
    k = math.ceil(len(scored) * 10 / 100)
    top = {sid for sid, _ in sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))[:k]}
    kept, dropped = tmp_path / "kept.jsonl", tmp_path / "dropped.jsonl"
    args = ["--db", screen.db, "--drop-top", "10%", "--trait", "evil", "--layer", 20]
    assert cli("export", kept, *args) == 0
    assert cli("export", dropped, *args, "--invert") == 0
    assert split_rows(dropped) == rows_of(screen, top)
    assert split_rows(kept) | split_rows(dropped) == set(range(N)) and not split_rows(kept) & split_rows(
        dropped
    )
    assert read_jsonl(dropped) == [r for r in openai_records(N) if int(r["id"][1:]) in split_rows(dropped)]
    m, mi = manifest(kept), manifest(dropped)
    assert (m["kept"], m["dropped"], m["written"]) == (N - k, k, N - k)
    assert (mi["kept"], mi["dropped"], mi["written"]) == (N - k, k, k) and mi["filter"]["invert"]
    assert m["per_trait"]["evil"] == {
        "scored_records": len(screen.samples),
        "dropped": k,
        "kept": len(screen.samples) - k,
    }
    assert m["per_trait"]["sycophantic"]["dropped"] == 0
    assert (m["metric"], m["layers"], m["filter"]["traits"]) == (
        "delta_p",
        {"evil": 20, "sycophantic": 20},
        ["evil"],
    )


def test_drop_top_count_over_several_traits(screen: FakeScreen, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    assert (
        cli(
            "export",
            out,
            "--db",
            screen.db,
            "--drop-top",
            "3",
            "--trait",
            "evil,sycophantic",
            "--metric",
            "delta_p_proxy",
        )
        == 0
    )
    want = set()
    for trait in ("evil", "sycophantic"):
        values = screen.values("delta_p_proxy", trait, 10)
        want |= rows_of(screen, {s for s, _ in sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[:3]})
    assert split_rows(out) == set(range(N)) - want
    m = manifest(out)
    assert m["dropped"] == len(want) and m["dropped_by_trait"] == {"evil": 3, "sycophantic": 3}


def test_threshold_and_where(screen: FakeScreen, tmp_path: Path) -> None:
    over = set()
    for trait in ("evil", "sycophantic"):  # no --trait: every trait
        over |= {s for s, v in screen.values("delta_p", trait, 10).items() if v > 1.0}
    out = tmp_path / "t.jsonl"
    assert cli("export", out, "--db", screen.db, "--threshold", "1.0") == 0
    assert split_rows(out) == set(range(N)) - rows_of(screen, over)

    # --where sees every layer unless --layer is given
    where = "trait = 'evil' AND delta_p_proxy > 0.5"
    by_layer = {
        layer: {s for s, v in screen.values("delta_p_proxy", "evil", layer).items() if v > 0.5}
        for layer in (10, 20)
    }
    out = tmp_path / "w.jsonl"
    assert cli("export", out, "--db", screen.db, "--where", where, "--force") == 0
    assert split_rows(out) == set(range(N)) - rows_of(screen, by_layer[10] | by_layer[20])
    assert manifest(out)["filter"]["where"] == where and manifest(out)["layers"] is None
    assert cli("export", out, "--db", screen.db, "--drop-where", where, "--layer", 20, "--force") == 0
    assert split_rows(out) == set(range(N)) - rows_of(screen, by_layer[20])
    assert cli("export", out, "--db", screen.db, "--where", "layer = 20 AND " + where, "--force") == 0
    assert split_rows(out) == set(range(N)) - rows_of(screen, by_layer[20])
    assert cli("export", out, "--db", screen.db, "--where", "no_such_column > 1") == 1


def test_each_trait_filtered_at_its_own_vector_layer(tmp_path: Path) -> None:
    """Vectors chosen at different layers: --threshold and --drop-top read each trait at its own layer
    (as hist and top show it), and --layer reads every trait at one."""
    own = {"evil": 10, "sycophantic": 20}
    screen = make_screen(
        tmp_path / "s.duckdb",
        write_jsonl(tmp_path / "in.jsonl", openai_records(N)),
        seed=3,
        settings={"vectors": {t: {"layer": layer} for t, layer in own.items()}},
    )

    def over(layers: dict[str, int]) -> set[int]:
        ids = {s for t, la in layers.items() for s, v in screen.values("delta_p", t, la).items() if v > 1.0}
        return rows_of(screen, ids)

    out = tmp_path / "t.jsonl"
    assert cli("export", out, "--db", screen.db, "--threshold", "1.0") == 0
    assert split_rows(out) == set(range(N)) - over(own)
    assert over(own) != over({"evil": 20, "sycophantic": 20})  # the data tells the two apart
    assert manifest(out)["layers"] == own
    assert cli("export", out, "--db", screen.db, "--threshold", "1.0", "--layer", "20", "--force") == 0
    assert split_rows(out) == set(range(N)) - over({"evil": 20, "sycophantic": 20})

    assert cli("export", out, "--db", screen.db, "--drop-top", "2", "--trait", "evil", "--force") == 0
    top = sorted(screen.values("delta_p", "evil", 10).items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    assert split_rows(out) == set(range(N)) - rows_of(screen, {s for s, _ in top})


def test_where_cannot_leave_the_run_and_layer(screen: FakeScreen, tmp_path: Path, capsys) -> None:
    # A second run in the same database, scoring other rows: a predicate that escaped its scope would
    # select them.
    other = make_screen(screen.db, write_jsonl(tmp_path / "other.jsonl", openai_records(N + 20)), seed=9)
    over = {s for s, v in screen.values("delta_p_proxy", "evil", 20).items() if v > 0.5}
    out, base = tmp_path / "w.jsonl", ["--db", screen.db, "--run", screen.run_id, "--layer", 20]
    # OR inside the predicate stays inside the scope (this run, layer 20)
    assert cli("export", out, *base, "--where", "false OR trait = 'evil' AND delta_p_proxy > 0.5") == 0
    assert split_rows(out) == set(range(N)) - rows_of(screen, over)
    assert cli("export", out, *base, "--where", "true", "--invert", "--force") == 0
    assert split_rows(out) == set(range(N)) - REJECTED_ROWS and other.run_id not in out.read_text()
    breakouts = (
        "false) OR (true",
        "true UNION SELECT source_row, trait FROM scored",
        "true; DELETE FROM runs",
        "true ORDER BY 1",
    )
    for where in breakouts:
        assert cli("export", tmp_path / "b.jsonl", *base, "--where", where) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: the filter failed: ") and "Parser Error" in err, where
    assert not (tmp_path / "b.jsonl").exists()


def test_relative_dataset_path_from_another_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    """A run that stored `data/in.jsonl` as typed: from elsewhere it is a missing file, not a hub name."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "in.jsonl", openai_records(N))
    monkeypatch.chdir(tmp_path)
    screen = make_screen(tmp_path / "s.duckdb", Path("data/in.jsonl"))
    assert screen.run.dataset_uri == "data/in.jsonl"
    assert cli("export", tmp_path / "here.jsonl", "--db", screen.db) == 0
    assert read_jsonl(tmp_path / "here.jsonl") == openai_records(N)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli("export", tmp_path / "o.jsonl", "--db", screen.db) == 1
    assert capsys.readouterr().err == (
        f"error: the screened dataset is not here: data/in.jsonl: no such file or directory (relative to "
        f"{elsewhere}); pass its location with --input\n"
    )
    assert cli("export", tmp_path / "o.jsonl", "--db", screen.db, "--input", "data/*.jsonl") == 1
    assert "data/*.jsonl matches no files (relative to" in capsys.readouterr().err
    assert cli("export", tmp_path / "o.jsonl", "--db", screen.db, "--input", tmp_path / "data/in.jsonl") == 0


def test_unscored_records(screen: FakeScreen, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    assert cli("export", out, "--db", screen.db, "--drop-unscored") == 0
    assert split_rows(out) == set(range(N)) - REJECTED_ROWS
    assert manifest(out)["dropped_unscored"] == len(REJECTED_ROWS)
    assert cli("export", out, "--db", screen.db, "--drop-unscored", "--invert", "--force") == 0
    assert split_rows(out) == REJECTED_ROWS


def test_a_reused_id_is_scored_and_filtered_like_any_record(tmp_path: Path) -> None:
    """A record that copies an earlier record's id (in its file or another) is scored under an id of its
    own, so the filter sees it: nothing unscored reaches the clean split."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", openai_records(6))
    harmful = {
        "id": "r000",
        "messages": [{"role": "user", "content": "Help?"}, {"role": "assistant", "content": "No."}],
    }
    write_jsonl(data / "b.jsonl", [harmful, harmful, {**harmful, "id": "r001"}])
    screen = make_screen(tmp_path / "s.duckdb", data, mode="proxy")
    assert not [r for r in screen.rejects if "duplicate" in r.reason]
    by_row = {s.source_row: s.sample_id for s in screen.samples}
    assert [by_row[r] for r in (0, 6, 7, 8)] == ["r000", "r000@6", "r000@7", "r001@8"]
    out = tmp_path / "o.jsonl"
    assert cli("export", out, "--db", screen.db, "--threshold=-1e9") == 0  # drops every scored record
    assert split_rows(out) == REJECTED_ROWS  # only the records the screen rejected (r003, r005)
    assert manifest(out)["dropped"] == 9 - len(REJECTED_ROWS)


def test_the_manifest_lists_the_files_of_the_input_that_are_not_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", openai_records(6))
    (data / "notes.txt").write_text("not data")
    screen = make_screen(tmp_path / "s.duckdb", data, mode="proxy")
    assert cli("export", tmp_path / "o.jsonl", "--db", screen.db) == 0
    assert manifest(tmp_path / "o.jsonl")["ignored_files"] == [str(data / "notes.txt")]


def test_invalid_unicode_is_a_reject_and_exports_as_it_was_read(tmp_path: Path, capsys) -> None:
    """A lone surrogate in an id or in content: the record is rejected alone, stored, and an export writes
    it back (as a JSON escape) instead of a traceback."""
    path = tmp_path / "in.jsonl"
    lines = [json.dumps(r) for r in openai_records(6)]
    lines[1] = lines[1].replace('"r001"', '"r001\\ud800"')
    lines[2] = lines[2].replace("Answer 2", "Answer \\udc00 2")
    path.write_text("\n".join(lines) + "\n")
    screen = make_screen(tmp_path / "s.duckdb", path, mode="proxy")
    assert [r.source_row for r in screen.rejects] == [1, 2, 3, 5]
    out = tmp_path / "o.jsonl"
    assert cli("export", out, "--db", screen.db) == 0
    assert read_jsonl(out) == [json.loads(line) for line in lines]
    parquet = tmp_path / "o.parquet"  # parquet holds UTF-8 only: one line, and nothing written
    assert cli("export", parquet, "--db", screen.db, "--format", "parquet") == 2
    assert "which parquet cannot store: export as jsonl" in capsys.readouterr().err and not parquet.exists()
    assert cli("export", parquet, "--db", screen.db, "--format", "parquet", "--drop-unscored") == 0
    assert pq.read_table(parquet).num_rows == 2


def test_bad_arguments_and_changed_input(screen: FakeScreen, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        cli("export", tmp_path / "o.jsonl", "--db", screen.db, "--threshold", 1, "--drop-top", "5%")
    assert cli("export", tmp_path / "o.jsonl", "--db", screen.db, "--drop-top", "five") == 1
    assert "not 'five'" in capsys.readouterr().err
    for drop_top, message in (
        ("150%", "percent must be in [0, 100], not 150"),
        ("-3", "count must be at least 0, not -3"),
    ):
        assert cli("export", tmp_path / "o.jsonl", "--db", screen.db, "--drop-top", drop_top) == 1
        assert capsys.readouterr().err == f"error: --drop-top {message}\n"
    shorter = write_jsonl(tmp_path / "short.jsonl", openai_records(10))
    assert cli("export", tmp_path / "o.jsonl", "--db", screen.db, "--input", shorter) == 1
    assert "the input changed since the screen" in capsys.readouterr().err
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", openai_records(N)[::-1])
    assert cli("export", tmp_path / "o_hf", "--db", screen.db, "--input", shuffled, "--format", "hf") == 1
    assert "row 0: the screen scored ['r000'] here" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    moved = Path(screen.run.dataset_uri).rename(tmp_path / "moved.jsonl")
    assert cli("export", tmp_path / "o.jsonl", "--db", screen.db) == 1
    assert "--input" in capsys.readouterr().err
    assert cli("export", tmp_path / "o.jsonl", "--db", screen.db, "--input", moved) == 0
    assert (tmp_path / "o.jsonl").read_bytes() == moved.read_bytes()


def test_export_reads_the_input_once_and_returns_its_counts(screen: FakeScreen, tmp_path: Path, monkeypatch):
    reads = []

    def counted(uri: str, **kw: object):
        reads.append(uri)
        return read_rows(uri, **kw)

    monkeypatch.setattr(screener.export, "read_rows", counted)
    with open_db(screen.db) as store:
        run = pick_run(store.con)
        flt = DropFilter("delta_p", {"evil": 10, "sycophantic": 10}, ("evil",), threshold=0.5)
        selection = select_drops(store.con, run, flt)
    for fmt in FORMATS:
        out = tmp_path / f"out-{fmt}"
        n = export_records(run, flt, selection, out, fmt, hf_cache_dir=str(tmp_path)).counts
        assert n.kept + n.dropped == n.records_read == N and n.dropped == len(selection.dropped) > 0
        assert n.written == n.kept and n.dropped_by_trait == {"evil": n.dropped}
        m = json.loads(manifest_path(out, fmt).read_text())
        assert {k: m[k] for k in asdict(n)} == asdict(n)
    assert reads == [run.dataset_uri] * len(FORMATS)


def test_parquet_has_one_schema_over_every_batch(tmp_path: Path) -> None:
    """A key null in the first batch and a key only in the last one: typed by all the records."""
    n = SPOOL_BATCH + 5
    records = [{"id": f"r{i}", "prompt": f"q{i}", "response": f"a{i}", "note": None} for i in range(n)]
    records[-1] |= {"note": "late", "extra": [1, 2]}
    screen = make_screen(tmp_path / "s.duckdb", write_jsonl(tmp_path / "in.jsonl", records), mode="proxy")
    assert cli("export", tmp_path / "o.parquet", "--format", "parquet", "--db", screen.db) == 0
    table = pq.read_table(tmp_path / "o.parquet")
    assert str(table.schema.field("note").type) == "string" and table.num_rows == n
    assert table.to_pylist() == [{"extra": None, **r} for r in records]


def test_every_command_on_a_real_screen(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    """A real `screener screen` (tiny random model, natural mode, no Ray), then every analysis command."""
    import torch
    from conftest import random_vectors

    from screener.cli import main

    records = sharegpt_records(12)
    data = write_json_array(tmp_path / "in.json", records)
    vectors = []
    for name, tensor in zip(("evil", "sycophantic"), random_vectors(tiny_llama, 2), strict=True):
        torch.save(tensor, tmp_path / f"{name}.pt")
        vectors += ["--vector", f"{name}={tmp_path / f'{name}.pt'}"]
    db = tmp_path / "real.duckdb"
    argv = [
        "screen",
        data,
        "--db",
        db,
        "--model",
        tiny_llama,
        *vectors,
        "--layer",
        "2,4",
        "--mode",
        "natural",
        "--actors",
        "0",
        "--max-new-tokens",
        "4",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    assert main(["query", "SELECT count(*) AS n FROM scored", "--db", str(db), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 10 * 2 * 2}]  # 2 of 12 records are rejected
    assert main(["hist", "--db", str(db), "--png", str(tmp_path / "h.png")]) == 0
    assert "evil · delta_p · layer 2" in capsys.readouterr().out
    assert main(["top", "--db", str(db), "-k", "2"]) == 0
    assert "natural:" in capsys.readouterr().out
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "r.html")]) == 0
    assert 'id="top-sycophantic"' in (tmp_path / "r.html").read_text()
    assert main(["export", str(tmp_path / "all.jsonl"), "--db", str(db)]) == 0
    assert read_jsonl(tmp_path / "all.jsonl") == records
    assert main(["export", str(tmp_path / "k.jsonl"), "--db", str(db), "--drop-top", "20%"]) == 0
    assert 0 < manifest(tmp_path / "k.jsonl")["dropped"] <= 4


# ---- never over the input or the database; existing outputs; hostile inputs (issue 17) -------------------


def test_export_never_writes_over_its_input_or_the_database(
    screen: FakeScreen, tmp_path: Path, capsys
) -> None:
    """`screener export data.jsonl --drop-top 20%` replaced the screened input by its filtered copy."""
    data = Path(screen.run.dataset_uri)
    data_bytes, db_bytes = data.read_bytes(), screen.db.read_bytes()
    for out, what in ((data, f"the screened input {data}"), (screen.db, "the results database")):
        for force in ([], ["--force"]):
            assert cli("export", out, "--db", screen.db, "--drop-top", "20%", *force) == 1
            assert capsys.readouterr().err == (
                f"error: {out} is {what}: refusing to write over it; choose another output path\n"
            )
    copy = write_jsonl(tmp_path / "copy.jsonl", openai_records(N))  # --input is protected too
    assert cli("export", copy, "--db", screen.db, "--input", copy) == 1
    assert "is the screened input" in capsys.readouterr().err
    assert data.read_bytes() == data_bytes and screen.db.read_bytes() == db_bytes


def test_export_never_writes_inside_a_screened_folder_or_glob(tmp_path: Path, capsys) -> None:
    (folder := tmp_path / "data").mkdir()
    write_jsonl(folder / "part-0.jsonl", openai_records(N))
    for uri, out in (
        (folder, folder / "clean.jsonl"),
        (tmp_path / "data" / "part-*.jsonl", folder / "part-9.jsonl"),
    ):
        screen = make_screen(tmp_path / "s.duckdb", uri, seed=7)
        assert cli("export", out, "--db", screen.db, "--run", screen.run_id) == 1
        assert "a rerun of the screen or export would read it as input" in capsys.readouterr().err
        assert not out.exists()
    assert cli("export", tmp_path / "data-clean" / "clean.jsonl", "--db", tmp_path / "s.duckdb") == 0


def test_an_existing_output_is_replaced_only_with_force(screen: FakeScreen, tmp_path: Path, capsys) -> None:
    out = tmp_path / "new" / "folder" / "out.jsonl"  # a missing folder is created
    assert cli("export", out, "--db", screen.db) == 0
    kept, m = out.read_bytes(), manifest(out)
    assert cli("export", out, "--db", screen.db, "--drop-top", "5") == 1
    assert capsys.readouterr().err == f"error: {out} exists; pass --force to replace it\n"
    out.unlink()  # a manifest left alone counts as an output too
    assert cli("export", out, "--db", screen.db, "--drop-top", "5") == 1
    assert capsys.readouterr().err == f"error: {out}.manifest.json exists; pass --force to replace it\n"
    assert not out.exists() and manifest(out) == m
    assert cli("export", out, "--db", screen.db, "--drop-top", "5", "--force") == 0
    assert len(read_jsonl(out)) < len(kept.splitlines()) and manifest(out)["dropped"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "out.jsonl",
        "out.jsonl.manifest.json",
    ]  # no temps


def test_hf_export_replaces_a_previous_export_only(screen: FakeScreen, tmp_path: Path, capsys) -> None:
    import datasets

    out = tmp_path / "hf"
    assert cli("export", out, "--format", "hf", "--db", screen.db) == 0
    assert cli("export", out, "--format", "hf", "--db", screen.db, "--threshold", 1) == 1
    assert capsys.readouterr().err == f"error: {out} exists and is not empty; pass --force to replace it\n"
    assert cli("export", out, "--format", "hf", "--db", screen.db, "--threshold", 1, "--force") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert len(datasets.load_from_disk(str(out))) == m["kept"] < N
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")] == []  # no temps
    (other := tmp_path / "notes").mkdir()
    (other / "todo.txt").write_text("mine")
    assert cli("export", other, "--format", "hf", "--db", screen.db, "--force") == 1
    assert "is a folder that is not a dataset export; refusing to replace it" in capsys.readouterr().err
    assert (other / "todo.txt").read_text() == "mine"


def test_export_of_hostile_input_lines_up_with_the_screen(tmp_path: Path, capsys) -> None:
    """Mixed formats, a tool-call-only record, a bad line and an unreadable file: export reads the files as
    the screen did, keeps the tool-call record, and counts what is in neither output."""
    (folder := tmp_path / "data").mkdir()
    tools = {
        "id": "t1",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "w"}}],
            },
        ],
    }
    write_jsonl(folder / "a.jsonl", [*openai_records(6), tools])
    write_jsonl(folder / "b.jsonl", sharegpt_records(6))
    (folder / "c.jsonl").write_text('{"id": "x"\n' + json.dumps(openai_records(6)[0]) + "\n")
    (folder / "d.jsonl.gz").write_bytes(b"not gzip")
    screen = make_screen(tmp_path / "s.duckdb", folder, mode="proxy")
    kinds = Counter(r.kind for r in screen.rejects)
    assert kinds == {"bad": 2 + 2 + 1, "skipped": 1, "file": 1}  # rows 3 and 5 of a and b, c's bad line
    out = tmp_path / "out.jsonl"
    assert cli("export", out, "--db", screen.db) == 0
    expected = [*openai_records(6), tools, *sharegpt_records(6), openai_records(6)[0]]
    assert read_jsonl(out) == expected  # the tool-call record kept, the bad line and the bad file in neither
    m = manifest(out)
    assert (m["records_read"], m["unreadable_rows"], m["unreadable_files"]) == (14, 1, 1)
    assert list(m["unreadable"]) == [str(folder / "d.jsonl.gz")]
    assert "in neither output: 1 input rows that do not parse, 1 unreadable files" in capsys.readouterr().out
    assert cli("export", tmp_path / "scored.jsonl", "--db", screen.db, "--drop-unscored") == 0
    assert "t1" not in {r["id"] for r in read_jsonl(tmp_path / "scored.jsonl")}


KILLED_MID_EXPORT = """
import os, sys
import screener.export as export
from screener.cli import main
real = export._write_chosen
def write_then_die(*args, **kwargs):
    real(*args, **kwargs)  # every record written to the temporary file(s): then kill -9, as it were
    os._exit(9)
export._write_chosen = write_then_die
main(sys.argv[1:])
"""


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_what_a_killed_export_left_is_removed_by_the_next(screen: FakeScreen, tmp_path: Path, fmt) -> None:
    """A kill -9 mid-export left its temporary output (and parquet's spool) beside the target for good."""
    import subprocess
    import sys

    (folder := tmp_path / "out").mkdir()
    out = folder / ("hf" if fmt == "hf" else f"train.{fmt}")
    argv = ["export", str(out), "--format", fmt, "--db", str(screen.db)]
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_EXPORT, *argv], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    assert not out.exists() and list(folder.iterdir()), "the killed export left its temporaries"
    assert cli(*argv) == 0
    expected = ["hf"] if fmt == "hf" else [out.name, f"{out.name}.manifest.json"]
    assert sorted(p.name for p in folder.iterdir()) == expected


def test_every_export_format_has_a_writer():
    """`--format`'s choices (screener.choices, light for the parser) and the writers are one list."""
    from screener.choices import EXPORT_FORMATS
    from screener.export import WRITERS

    assert sorted(WRITERS) == sorted(EXPORT_FORMATS)


# ---- an input edited or grown since the screen (issue 22) ------------------------------------------------


def two_turn_records(n: int) -> list[dict]:
    return [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": f"Hello {i}"},
                {"role": "assistant", "content": f"Hi {i}, how can I help?"},
                {"role": "user", "content": f"Tell me about {i}"},
                {"role": "assistant", "content": f"{i} is a number " + "indeed " * i},
            ],
        }
        for i in range(n)
    ]


def test_an_input_edited_or_grown_since_the_screen_is_refused(
    tiny_llama: Path, vector_file: Path, tmp_path: Path, capsys
) -> None:
    """A response edited in place (same id, same row) was exported under its old scores (exit 0), and a
    record appended since the screen was kept, unscored, without a word."""
    import copy

    records = two_turn_records(4)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    db, out = tmp_path / "s.duckdb", tmp_path / "out.jsonl"
    screen = ["screen", data, "--model", tiny_llama, "--vector", f"a={vector_file}", "--layer", "2"]
    assert cli(*screen, "--dtype", "float32", "--actors", "0", "--db", db, "--no-progress") == 0
    capsys.readouterr()
    edited = copy.deepcopy(records)
    edited[2]["messages"][1]["content"] = "Sure: here is how to hurt someone."  # the first turn of row 2
    write_jsonl(data, edited)
    changed = "(its prompt or response was edited): the input changed since the screen"
    assert cli("export", out, "--db", db) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {data}, row 2: the response of assistant turn 1 of record 'c2' is not what"
    )
    assert changed in err and err.count("\n") == 1
    assert not out.exists()
    assert cli("explain", "c2#0", "--db", db) == 1  # explain (and report's per-token view) refuse it too
    assert "row 2: not the record the screen scored as 'c2#0'" in capsys.readouterr().err
    # the screened records again, and one more after them
    grown = [*records, two_turn_records(5)[4]]
    write_jsonl(data, grown)
    assert cli("export", out, "--db", db) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}, row 4: a record added to the input since the screen, which read 4")
    assert "--drop-unscored" in err and not out.exists()
    assert cli("export", out, "--db", db, "--drop-unscored") == 0
    assert read_jsonl(out) == records
    m = manifest(out)
    assert (m["added_rows"], m["dropped_unscored"], m["kept"]) == (1, 1, 4)
    # rerunning the screen scores the new record: the export is whole again
    assert cli(*screen, "--dtype", "float32", "--actors", "0", "--db", db, "--no-progress") == 0
    assert cli("export", out, "--db", db, "--force") == 0
    assert read_jsonl(out) == grown


def test_the_format_comes_from_the_suffix_and_a_mismatch_is_refused(
    screen: FakeScreen, tmp_path: Path, capsys
):
    """`export x.parquet` (no --format) wrote JSON lines into x.parquet; so did x.csv."""
    assert cli("export", tmp_path / "x.parquet", "--db", screen.db) == 0
    assert pq.read_table(tmp_path / "x.parquet").num_rows == N
    assert manifest(tmp_path / "x.parquet")["format"] == "parquet"
    for name, extra in (
        ("x.csv", ()),
        ("y.jsonl", ("--format", "parquet")),
        ("z.parquet", ("--format", "jsonl")),
    ):
        assert cli("export", tmp_path / name, "--db", screen.db, *extra) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"error: {tmp_path / name}: ") and "does not write" in err and err.count("\n") == 1
        )
        assert not (tmp_path / name).exists()


def test_no_output_replaces_a_device_even_with_force(screen: FakeScreen, tmp_path: Path, capsys) -> None:
    """`export PATH --force` where PATH was a character device replaced the device with a regular file."""
    import os
    import stat

    for argv in (
        ("export", "{p}", "--db", screen.db, "--force"),
        ("query", "SELECT 1", "--db", screen.db, "--format", "csv", "--out", "{p}", "--force"),
    ):
        device = tmp_path / "null.jsonl"
        if not device.exists():
            os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers (root only)
        assert cli(*[str(a).format(p=device) for a in argv]) == 1
        err = capsys.readouterr().err
        assert err == f"error: {device} is not a regular file; refusing to replace it, even with --force\n"
        assert stat.S_ISCHR(device.stat().st_mode)


def test_a_jsonl_export_of_parquet_with_binary_and_timestamp_columns(tmp_path: Path) -> None:
    """A jsonl export of a parquet input with a binary or timestamp column was a TypeError traceback."""
    import base64
    from datetime import datetime

    import pyarrow as pa

    records = openai_records(6)
    when = datetime(2026, 12, 2, 16, 10, 5)
    table = pa.Table.from_pylist([{**r, "blob": bytes([i, 255]), "at": when} for i, r in enumerate(records)])
    pq.write_table(table, tmp_path / "in.parquet")
    screen = make_screen(tmp_path / "s.duckdb", tmp_path / "in.parquet", mode="proxy")
    out = tmp_path / "out.jsonl"
    assert cli("export", out, "--db", screen.db) == 0
    got = read_jsonl(out)
    assert [g["blob"] for g in got] == [base64.b64encode(bytes([i, 255])).decode() for i in range(6)]
    assert {g["at"] for g in got} == {when.isoformat()} and [g["messages"] for g in got] == [
        r["messages"] for r in records
    ]
    assert "base64" in manifest(out)["jsonl_values"] and "ISO 8601" in manifest(out)["jsonl_values"]


def test_a_broken_last_line_is_counted_as_an_unreadable_row(tmp_path: Path) -> None:
    """A file cut mid-record (no final newline, the JSON unfinished) counts its last line in the manifest's
    `unreadable_rows`, as any other line that does not parse."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in openai_records(6)) + '{"id": "cut", "messa')
    screen = make_screen(tmp_path / "s.duckdb", data, mode="proxy")
    assert Counter(r.kind for r in screen.rejects)["bad"] >= 1
    out = tmp_path / "out.jsonl"
    assert cli("export", out, "--db", screen.db, "--drop-unscored") == 0
    m = manifest(out)
    assert (m["records_read"], m["unreadable_rows"]) == (6, 1)
