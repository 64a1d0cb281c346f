"""Tests for `screener query` (screener.commands.results): output formats, canned queries and their run
defaults, read-only enforcement, and the busy-database message of every read command while a screen
writes."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
from helpers import LAYERS, TRAITS, cli

from screener.results import open_db

ROOT = Path(__file__).resolve().parent.parent


def test_query_formats_parse_back(screens, tmp_path: Path, capsys) -> None:
    natural, _ = screens
    sql = "SELECT sample_id, trait, layer, delta_p_proxy FROM scored ORDER BY ALL LIMIT 7"
    assert cli("query", sql, "--db", natural.db, "--format", "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 7 and set(rows[0]) == {"sample_id", "trait", "layer", "delta_p_proxy"}
    assert cli("query", sql, "--db", natural.db, "--format", "json") == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["sample_id"] for r in records] == [r["sample_id"] for r in rows]
    assert isinstance(records[0]["delta_p_proxy"], float)
    out = tmp_path / "q.parquet"
    assert cli("query", sql, "--db", natural.db, "--format", "parquet", "--out", out) == 0
    assert pq.read_table(out).to_pylist() == records
    assert cli("query", "SELECT * FROM run_overview", "--db", natural.db) == 0
    table = capsys.readouterr().out
    assert "run_id" in table and natural.run_id in table
    assert cli("query", sql, "--db", natural.db, "--format", "parquet") == 1  # needs --out
    assert "--out" in capsys.readouterr().err


def test_csv_writes_nested_columns_as_json(screens, tmp_path: Path, capsys) -> None:
    natural, proxy = screens
    assert (
        cli("query", "SELECT * FROM run_overview ORDER BY started_at", "--db", natural.db, "--format", "csv")
        == 0
    )
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run_id"] for r in rows] == [natural.run_id, proxy.run_id]
    assert [json.loads(r["layers"]) for r in rows] == [list(LAYERS)] * 2
    assert [json.loads(r["traits"]) for r in rows] == [list(TRAITS)] * 2
    sql = "SELECT {'a': [1, 2]} AS s, '\\x00'::BLOB AS b, INTERVAL 1 DAY AS i, 1 AS x, 2 AS x"
    assert cli("query", sql, "--db", natural.db, "--format", "csv", "--out", tmp_path / "o.csv") == 0
    assert (tmp_path / "o.csv").read_text().splitlines() == ["s,b,i,x,x_1", '"{""a"":[1,2]}",\\x00,1 day,1,2']


def test_canned_queries_default_to_latest_run(screens, capsys) -> None:
    natural, proxy = screens
    assert cli("query", "summary", "--db", natural.db, "--format", "json") == 0
    assert {r["run_id"] for r in json.loads(capsys.readouterr().out)} == {proxy.run_id}
    args = ["-p", "trait=evil", "-p", "layer=20", "-p", "metric=delta_p", "-p", "k=4", "--format", "json"]
    assert cli("query", "top", "--db", natural.db, "--run", natural.run_id[:6], *args) == 0
    top = json.loads(capsys.readouterr().out)
    want = sorted(natural.values("delta_p", "evil", 20).items(), key=lambda kv: -kv[1])[:4]
    assert [r["sample_id"] for r in top] == [k for k, _ in want]
    # $layer and $metric default to the run's first layer and its ΔP metric (delta_p for a natural run)
    args = ["-p", "trait=evil", "-p", "k=4", "--format", "json"]
    assert cli("query", "top", "--db", natural.db, "--run", natural.run_id, *args) == 0
    want = sorted(natural.values("delta_p", "evil", LAYERS[0]).items(), key=lambda kv: -kv[1])[:4]
    assert [r["sample_id"] for r in json.loads(capsys.readouterr().out)] == [k for k, _ in want]
    assert cli("query", "top", "--db", natural.db) == 1
    assert "needs parameters ['k', 'trait']" in capsys.readouterr().err
    assert cli("query", "nosuch", "--db", natural.db) == 1
    assert "no canned query" in capsys.readouterr().err
    assert cli("query", "summary", "--db", natural.db, "--run", "zzz") == 1
    assert "no run 'zzz'" in capsys.readouterr().err


def test_query_is_read_only(screens, tmp_path: Path, capsys) -> None:
    natural, _ = screens
    for sql in ("DELETE FROM runs", "CREATE TABLE x (a INT)", "UPDATE scores SET delta_p = 0"):
        assert cli("query", sql, "--db", natural.db) == 1
        assert "read-only" in capsys.readouterr().err
    with open_db(natural.db) as store:
        assert store.con.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
        assert store.con.execute("SELECT count(*) FROM scores WHERE delta_p = 0").fetchone()[0] == 0
    # A read-only connection still writes files with COPY TO (even over the database itself); the query's
    # SQL gets no file access at all, and cannot turn it back on.
    db_bytes, target = natural.db.read_bytes(), tmp_path / "x.csv"
    for sql in (
        f"COPY (SELECT 42) TO '{target}' (FORMAT csv)",
        f"COPY (SELECT 42) TO '{natural.db}' (FORMAT csv)",
        f"SET enable_external_access = true; COPY (SELECT 42) TO '{target}'",
        "SET lock_configuration = false",
        f"SELECT * FROM read_csv('{natural.run.dataset_uri}')",
    ):
        assert cli("query", sql, "--db", natural.db) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: screener query is read-only: ") and err.count("\n") == 1, sql
    assert not target.exists() and natural.db.read_bytes() == db_bytes


def test_missing_db_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert cli("query", "SELECT 1", "--db", tmp_path / "nope.duckdb") == 1
    assert "no such database" in capsys.readouterr().err


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from screener.records import Sample, Scored
    from screener.runs import Run
    from screener.store import Store

    db, stop = sys.argv[1], Path(sys.argv[2])
    run = Run("m", "00" * 32, "d.jsonl", "proxy", (1,), ("evil",), {})
    with Store(db) as store:
        store.begin_run(run)
        batch = 0
        while True:
            samples = [Sample(f"s{batch}-{i}", batch * 10 + i, 0, [{"role": "user", "content": "q"}], "r")
                       for i in range(10)]
            scored = [Scored(s.sample_id, s.source_row, 0, 1, 1, False, np.ones((1, 1)), np.zeros((1, 1)))
                      for s in samples]
            store.write(run.run_id, (1,), ("evil",), scored, [], samples=samples)
            batch += 1
            if batch == 1:
                print("ready", flush=True)
            if stop.exists() and batch >= 3:
                break
            time.sleep(0.05)
        store.finish_run(run.run_id)
    print(batch * 10, flush=True)
    """
)


def test_reading_while_a_screen_writes(tmp_path: Path, capsys) -> None:
    db, stop = tmp_path / "busy.duckdb", tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), str(stop)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        for argv in (["query", "SELECT count(*) FROM samples"], ["hist"], ["top"], ["report"]):
            t0 = time.monotonic()
            assert cli(*argv, "--db", db) == 3
            assert time.monotonic() - t0 < 5
            err = capsys.readouterr().err
            assert "a screen is writing to" in err and str(db) in err
        stop.touch()
        n_written = int(writer.stdout.readline())
        assert writer.wait(timeout=30) == 0
    finally:
        writer.kill()
    # The writer was neither blocked nor corrupted: every batch it wrote is there, run finished.
    assert (
        cli(
            "query",
            "SELECT count(*) AS n, count(DISTINCT source_row) AS rows FROM samples",
            "--db",
            db,
            "--format",
            "json",
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == [{"n": n_written, "rows": n_written}]
    with open_db(db) as store:
        assert store.con.execute("SELECT n_scored, finished_at IS NOT NULL FROM runs").fetchone() == (
            n_written,
            True,
        )
        assert store.con.execute("SELECT count(*) FROM scores").fetchone()[0] == n_written


def test_read_only_refusal_is_by_statement_type(screens, tmp_path: Path, capsys) -> None:
    """Every statement that is not a plain read is refused before it runs, with our message, whatever
    DuckDB would answer (its wording changes between releases)."""
    natural, _ = screens
    db_bytes = natural.db.read_bytes()
    for sql in (
        f"ATTACH '{tmp_path / 'other.duckdb'}' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "PRAGMA enable_profiling",
        "FORCE CHECKPOINT",
        f"EXPORT DATABASE '{tmp_path / 'dump'}'",
        "SELECT 1; DROP TABLE runs",
    ):
        assert cli("query", sql, "--db", natural.db) == 1, sql
        err = capsys.readouterr().err
        assert err.startswith("error: screener query is read-only: ") and err.count("\n") == 1, sql
    assert natural.db.read_bytes() == db_bytes and not (tmp_path / "dump").exists()
    for sql in ("SELECT count(*) FROM runs", "DESCRIBE scores", "EXPLAIN SELECT * FROM scores"):
        assert cli("query", sql, "--db", natural.db) == 0, sql


# ---- parameters in literals, outputs (issue 17) ---------------------------------------------------------


def test_a_dollar_inside_a_string_is_not_a_parameter(screens, capsys) -> None:
    natural, _ = screens
    assert cli("query", "SELECT 'cost $x' AS s -- not $y either", "--db", natural.db, "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == [{"s": "cost $x"}]


def test_query_out_creates_its_folder_and_never_replaces_without_force(
    screens, tmp_path: Path, capsys
) -> None:
    natural, proxy = screens
    out = tmp_path / "new" / "folder" / "runs.csv"
    assert cli("query", "summary", "--db", natural.db, "--format", "csv", "--out", out) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"reading run {proxy.run_id} (finished ") and err.count("\n") == 1
    first = out.read_bytes()
    assert first.startswith(b"run_id,") and list(out.parent.iterdir()) == [out]  # no temp file left
    assert cli("query", "SELECT 1 AS x", "--db", natural.db, "--format", "csv", "--out", out) == 1
    assert capsys.readouterr().err == f"error: {out} exists; pass --force to replace it\n"
    assert out.read_bytes() == first
    assert cli("query", "SELECT 1 AS x", "--db", natural.db, "--format", "csv", "--out", out, "--force") == 0
    assert out.read_text() == "x\n1\n" and list(out.parent.iterdir()) == [out]


def test_query_out_never_writes_over_the_database_or_an_input(screens, tmp_path: Path, capsys) -> None:
    """`query runs --format parquet --out s.duckdb` destroyed the database, from a read-only command."""
    natural, _ = screens
    db_bytes, data = natural.db.read_bytes(), Path(natural.run.dataset_uri)
    data_bytes = data.read_bytes()
    link = tmp_path / "link.duckdb"
    link.symlink_to(natural.db)
    for out, what in (
        (natural.db, "the results database"),
        (f"{natural.db}.wal", "the results database's WAL"),
        (link, "the results database"),
        (data, f"the screened input {data}"),
    ):
        for force in ([], ["--force"]):
            argv = ["query", "runs", "--db", natural.db, "--format", "parquet", "--out", out, *force]
            assert cli(*argv) == 1
            assert capsys.readouterr().err == (
                f"error: {out} is {what}: refusing to write over it; choose another output path\n"
            )
    assert natural.db.read_bytes() == db_bytes and data.read_bytes() == data_bytes
    assert not Path(f"{natural.db}.wal").exists()
