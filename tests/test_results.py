"""Tests for screener.results and sql/views.sql: the views on empty and filled databases against numpy,
opening a database safely, loading runs, running SQL, the data the commands and the report show, and
the rows an export filter selects."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import duckdb
import numpy as np
import pytest
from helpers import LAYERS, TRAITS, FakeScreen, make_screen, openai_records, write_jsonl

from screener.errors import QueryError
from screener.records import content_sha256
from screener.results import (
    READ_ONLY,
    DropFilter,
    check_read_only,
    histogram,
    load_run,
    open_db,
    percentiles,
    pick_run,
    query_params,
    report_data,
    run_params,
    run_sql,
    select_drops,
    summary,
    top_samples,
    unfinished_since,
)
from screener.runs import Run
from screener.store import SQL_DIR, Store

VIEWS = ("scored", "scored_records", "top_delta_p", "trait_percentiles", "dataset_summary", "run_overview")
PCTS = {"p01": 1, "p05": 5, "p25": 25, "p50": 50, "p75": 75, "p95": 95, "p99": 99}


def test_views_on_empty_databases(tmp_path: Path) -> None:
    # Created by the Store (views stored) and by schema.sql alone (views added as TEMP on open).
    Store(tmp_path / "store.duckdb").close()
    con = duckdb.connect(str(tmp_path / "bare.duckdb"))
    con.execute((SQL_DIR / "schema.sql").read_text())
    con.close()
    for name in ("store.duckdb", "bare.duckdb"):
        with open_db(tmp_path / name) as store:
            for view in VIEWS:
                assert store.con.sql(f"SELECT * FROM {view}").fetchall() == []
        with pytest.raises(QueryError, match="no runs"), open_db(tmp_path / name) as store:
            pick_run(store.con)


def test_scored_and_top_views(screens: tuple[FakeScreen, FakeScreen]) -> None:
    natural, proxy = screens
    with open_db(natural.db) as store:
        con = store.con
        n = len(natural.samples)
        assert con.execute("SELECT count(*) FROM scored").fetchone()[0] == 2 * n * len(LAYERS) * len(TRAITS)
        # `metric` is delta_p in natural mode (NULL for the empty natural response), the proxy otherwise
        rows = con.execute(
            "SELECT sample_id, metric FROM top_delta_p WHERE run_id = ? AND trait = 'evil' AND layer = 10 "
            "ORDER BY rank",
            [natural.run_id],
        ).fetchall()
        want = sorted(natural.values("delta_p", "evil", 10).items(), key=lambda kv: (-kv[1], kv[0]))
        assert [r[0] for r in rows[: len(want)]] == [k for k, _ in want]
        assert np.allclose([r[1] for r in rows[: len(want)]], [v for _, v in want])
        assert rows[-1][1] is None  # NULLS LAST
        got = con.execute(
            "SELECT sample_id, metric FROM scored WHERE run_id = ? AND trait = 'sycophantic' AND layer = 20",
            [proxy.run_id],
        ).fetchall()
        want_proxy = proxy.values("delta_p_proxy", "sycophantic", 20)
        assert {k: pytest.approx(v) for k, v in want_proxy.items()} == dict(got)


def test_percentiles_and_summary_match_numpy(screens: tuple[FakeScreen, FakeScreen]) -> None:
    natural, proxy = screens
    with open_db(natural.db) as store:
        pct = store.con.sql("SELECT * FROM trait_percentiles").pl()
        summary = store.con.sql("SELECT * FROM dataset_summary").pl()
    # proxy runs have no delta_p / proj_natural rows; natural runs have all five metrics
    assert set(pct.filter(run_id=proxy.run_id)["metric"]) == {
        "delta_p_proxy",
        "proj_response",
        "proj_prompt_last",
    }
    assert len(pct.filter(run_id=natural.run_id)) == len(LAYERS) * len(TRAITS) * 5
    for screen in screens:
        for trait in TRAITS:
            for layer in LAYERS:
                for metric in set(pct.filter(run_id=screen.run_id)["metric"]):
                    x = np.array(list(screen.values(metric, trait, layer).values()))
                    row = pct.filter(run_id=screen.run_id, trait=trait, layer=layer, metric=metric).row(
                        0, named=True
                    )
                    assert row["n"] == len(x)
                    assert row["mean"] == pytest.approx(x.mean())
                    assert row["std"] == pytest.approx(x.std(ddof=1))
                    assert (row["min"], row["max"]) == pytest.approx((x.min(), x.max()))
                    for col, q in PCTS.items():
                        assert row[col] == pytest.approx(np.percentile(x, q)), (metric, col)
                s = summary.filter(run_id=screen.run_id, trait=trait, layer=layer).row(0, named=True)
                assert s["n_samples"] == len(screen.samples)
                assert s["mean_delta_p_proxy"] == pytest.approx(
                    np.mean(list(screen.values("delta_p_proxy", trait, layer).values()))
                )
                assert s["mean_proj_response"] == pytest.approx(
                    np.mean(list(screen.values("proj_response", trait, layer).values()))
                )
                if screen.proj_natural is None:
                    assert s["mean_delta_p"] is None and s["mode"] == "proxy"
                else:  # NULL delta_p (empty natural response) is left out of the mean
                    assert s["mean_delta_p"] == pytest.approx(
                        np.mean(list(screen.values("delta_p", trait, layer).values()))
                    )


def test_pick_run_loads_the_run_with_its_live_counts(screens, tmp_path) -> None:
    natural, proxy = screens
    with open_db(natural.db) as store:
        latest, chosen = pick_run(store.con), pick_run(store.con, natural.run_id[:5])
        with pytest.raises(QueryError, match="no run 'zzz'"):
            pick_run(store.con, "zzz")
    assert latest == proxy.run and latest.run_id == proxy.run_id  # the same identity, read back
    assert chosen == natural.run and chosen.settings == natural.run.settings
    assert (chosen.n_scored, chosen.n_rejected) == (len(natural.samples), len(natural.rejects)) == (28, 2)
    assert chosen.status == "finished" and chosen.started_at < chosen.finished_at < latest.started_at
    assert (chosen.metric, latest.metric) == ("delta_p", "delta_p_proxy")
    assert run_params(chosen) == {"run_id": natural.run_id, "layer": LAYERS[0], "metric": "delta_p"}
    # a screen still writing: not finished, and the counts are what it stored so far
    data = write_jsonl(tmp_path / "in.jsonl", openai_records(8))
    running = make_screen(tmp_path / "r.duckdb", data, finish=False)
    with open_db(running.db) as store:
        run = load_run(store.con, running.run_id)
    assert (run.status, run.finished_at, run.n_scored, run.n_rejected) == ("running", None, 6, 2)


def test_a_run_whose_stored_configuration_is_not_its_id_is_refused(tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", openai_records(8))
    screen = make_screen(tmp_path / "s.duckdb", data)
    with duckdb.connect(str(screen.db)) as con:
        con.execute('UPDATE runs SET settings = \'{"turns": "all"}\'')
    with open_db(screen.db) as store, pytest.raises(QueryError, match="hashes to"):
        pick_run(store.con)


def test_run_sql_takes_named_params_and_fails_as_a_query_error(screens) -> None:
    natural, _ = screens
    with open_db(natural.db) as store:
        con = store.con
        sql = "SELECT count(*) FROM samples WHERE run_id = $run_id -- $not_a_param"
        assert run_sql(con, sql, {"run_id": natural.run_id, "extra": 1}).fetchall() == [(28,)]
        with pytest.raises(QueryError, match=r"needs parameters \['run_id'\]"):
            run_sql(con, sql)
        with pytest.raises(QueryError, match="no_such_column"):
            run_sql(con, "SELECT no_such_column FROM runs")
        with pytest.raises(QueryError) as err:  # no file access on an open_db connection
            run_sql(con, f"SELECT * FROM read_csv('{natural.run.dataset_uri}')")
        assert str(err.value).startswith(READ_ONLY)
        assert run_sql(con, "SELECT 1").fetchall() == [(1,)]  # the connection is still usable


def test_check_read_only_goes_by_statement_type(screens) -> None:
    natural, _ = screens
    with open_db(natural.db) as store:
        for sql in ("SELECT 1", "EXPLAIN SELECT 1", "DESCRIBE scores", "SELECT 1; SELECT 2"):
            check_read_only(store.con, sql)
        for sql, kind in (("SELECT 1; DELETE FROM runs", "DELETE"), ("SET threads = 1", "SET")):
            with pytest.raises(QueryError, match=f"a {kind} statement was given"):
                check_read_only(store.con, sql)
        with pytest.raises(QueryError, match="syntax error"):
            check_read_only(store.con, "SELEC 1")


def test_histogram_top_summary_and_percentiles_agree_with_numpy(screens) -> None:
    natural, _ = screens
    x = np.array(list(natural.values("delta_p", "evil", 20).values()))
    with open_db(natural.db) as store:
        run = pick_run(store.con, natural.run_id)
        h = histogram(store.con, run, "evil", 20, "delta_p", bins=6)
        top = top_samples(store.con, run, "evil", 20, "delta_p", k=3)
        rows = summary(store.con, run)
        stats = percentiles(store.con, run)[("evil", 20, "delta_p")]
        data = report_data(store.con, run, 20, "delta_p", bins=6, k=3)
        empty = histogram(store.con, pick_run(store.con), "evil", 20, "delta_p", bins=6)  # a proxy run
    assert h.counts == np.histogram(x, bins=6)[0].tolist() and h.n == len(x) == 27  # one NULL delta_p
    assert (h.lower[0], h.upper[-1]) == pytest.approx((x.min(), x.max()))
    assert empty.counts == [] and empty.n == 0
    want = sorted(natural.values("delta_p", "evil", 20).items(), key=lambda kv: -kv[1])[:3]
    assert [(r["rank"], r["sample_id"]) for r in top] == [(i + 1, k) for i, (k, _) in enumerate(want)]
    assert [r["value"] for r in top] == pytest.approx([v for _, v in want])
    assert isinstance(top[0]["prompt"], list) and top[0]["prompt"][-1]["role"] == "user"
    assert [(r["trait"], r["layer"]) for r in rows] == [(t, la) for t in TRAITS for la in LAYERS]
    assert (stats["n"], stats["p50"]) == (len(x), pytest.approx(np.median(x)))
    assert (data.run, data.layer, data.metric, data.summary) == (run, 20, "delta_p", rows)
    assert list(data.traits) == list(TRAITS)
    assert (data.traits["evil"].histogram, data.traits["evil"].top, data.traits["evil"].stats) == (
        h,
        top,
        stats,
    )
    with pytest.raises(ValueError, match="bins"):
        histogram(None, run, "evil", 20, "delta_p", bins=0)


def test_select_drops(screens) -> None:
    natural, _ = screens
    values = natural.values("delta_p", "evil", 20)
    top = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[: math.ceil(len(values) / 10)]
    row_of = {s.sample_id: s.source_row for s in natural.samples}
    with open_db(natural.db) as store:
        run = pick_run(store.con, natural.run_id)
        at20 = dict.fromkeys(TRAITS, 20)
        every = select_drops(store.con, run, DropFilter("delta_p", at20))
        top10 = select_drops(store.con, run, DropFilter("delta_p", at20, ("evil",), drop_top_percent=10))
        over = select_drops(store.con, run, DropFilter("delta_p_proxy", None, where="delta_p_proxy > 1"))
        with pytest.raises(QueryError, match=r"^the filter failed: "):
            select_drops(store.con, run, DropFilter("delta_p", None, where="no_such_column > 1"))
    assert every.dropped == {}  # no filter: nothing dropped
    # each scored sample with the hash of the prompt and response it was scored on
    assert every.scored == {
        s.source_row: {s.sample_id: content_sha256(s.prompt, s.response)} for s in natural.samples
    }
    assert every.by_trait == {t: set(every.scored) for t in TRAITS}
    assert top10.dropped == {row_of[sid]: {"evil"} for sid, _ in top}
    want: dict[int, set[str]] = {}
    for trait in TRAITS:
        for layer in LAYERS:
            for sid, v in natural.values("delta_p_proxy", trait, layer).items():
                if v > 1:
                    want.setdefault(row_of[sid], set()).add(trait)
    assert over.dropped == want


def test_drop_filter_refuses_what_the_command_line_cannot_mean() -> None:
    for kw, message in (
        ({"metric": "nope"}, "metric must be one of"),
        ({"threshold": 1.0, "where": "true"}, "choose one of"),
        ({"drop_top_percent": 101}, r"percent must be in \[0, 100\], not 101"),
        ({"drop_top_count": -1}, "count must be at least 0, not -1"),
    ):
        with pytest.raises(QueryError, match=message):
            DropFilter(**{"metric": "delta_p", "layers": {"evil": 10}, **kw})
    flt = DropFilter("delta_p", None, ("evil",), where="x > 1", invert=True)
    assert (
        flt.describe()
        == "drop samples of the scored view (any layer) where: x > 1; write the dropped records"
    )
    assert dataclasses.asdict(flt)["traits"] == ("evil",)


def test_record_level_view_and_top_show_the_turns(tmp_path: Path) -> None:
    """Under --turns all a record has a sample per assistant turn: `scored_records` gathers them (turns
    scored, the worst turn, the response-token-weighted mean) and `top` says which turn a sample is."""
    records = openai_records(6)
    for r in records[:3]:  # three records with two more exchanges each
        r["messages"] = [*r["messages"], {"role": "user", "content": "more?"},
                         {"role": "assistant", "content": "yes " * 3}] * 1  # fmt: skip
        r["messages"] += [{"role": "user", "content": "again?"}, {"role": "assistant", "content": "no"}]
    screen = make_screen(tmp_path / "s.duckdb", write_jsonl(tmp_path / "d.jsonl", records), turns="all")
    with open_db(screen.db) as store:
        rows = store.con.execute(
            "SELECT source_row, turns_scored, turns, max_metric, max_turn, mean_metric FROM scored_records "
            "WHERE run_id = ? AND trait = 'evil' AND layer = 10 ORDER BY source_row",
            [screen.run_id],
        ).fetchall()
        run = pick_run(store.con)
        top = top_samples(store.con, run, "evil", 10, "delta_p", 30)
    values = screen.values("delta_p", "evil", 10)
    by_row: dict[int, list] = {}
    for i, s in enumerate(screen.samples):  # (turn, metric or None for an empty natural answer, tokens)
        by_row.setdefault(s.source_row, []).append((s.turn, values.get(s.sample_id), 20 + i))
    assert [r[0] for r in rows] == sorted(by_row)
    for row, n, turns, worst, worst_turn, mean in rows:
        assert n == len(by_row[row]) and turns == [t for t, _, _ in by_row[row]]
        items = [x for x in by_row[row] if x[1] is not None]
        assert worst == pytest.approx(max(v for _, v, _ in items))
        assert worst_turn == max(items, key=lambda x: x[1])[0]
        assert mean == pytest.approx(sum(v * w for _, v, w in items) / sum(w for _, _, w in items))
    assert any(r[1] == 3 for r in rows)  # the multi-turn records really have three turns
    multi = [t for t in top if t["record_turns"] > 1]
    assert multi and all("#" in t["sample_id"] for t in multi)
    assert all(t["record_turns"] == 1 for t in top if "#" not in t["sample_id"])


# ---- which run a reader reads: the latest finished one (issue 17) -------------------------------------


def test_readers_default_to_the_latest_finished_run(tmp_path: Path) -> None:
    """After a screen that failed, `top` read the failed run ("top 0") and export used it."""
    data = write_jsonl(tmp_path / "in.jsonl", openai_records(8))
    done = make_screen(tmp_path / "s.duckdb", data, mode="natural")
    failed = make_screen(tmp_path / "s.duckdb", data, mode="proxy", finish=False)
    with Store(tmp_path / "s.duckdb") as store:
        store.fail_run(failed.run_id, "the model worker died")
    with open_db(tmp_path / "s.duckdb") as store:
        run = pick_run(store.con)
        assert run.run_id == done.run_id and run.status == "finished"
        assert unfinished_since(store.con, run) == [failed.run_id]
        chosen = pick_run(store.con, failed.run_id[:6])  # any status when asked for by id
        assert (chosen.status, chosen.error, chosen.n_scored) == ("failed", "the model worker died", 6)
    assert chosen.describe() == f"run {failed.run_id} (FAILED: the model worker died; 6 scored, 2 rejected)"
    assert (
        run.describe().startswith(f"run {done.run_id} (finished 20")
        and "6 scored, 2 rejected)" in run.describe()
    )


def test_a_database_with_no_finished_run_says_which_run_did_not_finish(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", openai_records(8))
    failed = make_screen(tmp_path / "s.duckdb", data, finish=False)
    with Store(tmp_path / "s.duckdb") as store:
        store.fail_run(failed.run_id, "a persona vector is zero at layer 2")
    with open_db(tmp_path / "s.duckdb") as store, pytest.raises(QueryError) as e:
        pick_run(store.con)
    assert str(e.value) == (
        f"no finished run in this database; the latest is run {failed.run_id} (FAILED: a persona vector is "
        f"zero at layer 2; 6 scored, 2 rejected): pass --run {failed.run_id} to read what it stored"
    )


def test_a_database_of_an_earlier_version_is_read_as_it_is(tmp_path: Path) -> None:
    """Read-only readers do not bring a database up to date: its status comes from finished_at."""
    from helpers import earlier_database

    run = Run("tiny", "00" * 32, "in.jsonl", "natural", LAYERS, TRAITS, {"split": None})
    finished, unfinished = earlier_database(tmp_path / "old.duckdb", run)
    before = (tmp_path / "old.duckdb").read_bytes()
    with open_db(tmp_path / "old.duckdb") as store:
        latest = pick_run(store.con)
        assert (latest.run_id, latest.status, latest.n_rejected, latest.n_skipped) == (
            finished.run_id,
            "finished",
            1,
            0,
        )
        assert unfinished_since(store.con, latest) == [unfinished.run_id]
        assert pick_run(store.con, unfinished.run_id).status == "running"
    assert (tmp_path / "old.duckdb").read_bytes() == before


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        ("SELECT 'cost $x'", set()),
        ("SELECT $$dollar $x$$, E'esc $y'", set()),
        ('SELECT "$col" FROM t', set()),
        ("SELECT $a -- and $b\n, /* $c */ $d", {"a", "d"}),
        ("SELECT * FROM scored WHERE run_id = $run_id AND trait = '$trait' AND k < $k", {"run_id", "k"}),
    ],
)
def test_query_params_are_outside_strings_names_and_comments(sql: str, params: set[str]) -> None:
    assert query_params(sql) == params


def test_a_database_file_without_the_results_is_one_line(tmp_path: Path) -> None:
    """A .duckdb copied without its .wal (results not checkpointed) has no tables: it was a traceback."""
    duckdb.connect(str(tmp_path / "copy.duckdb")).close()
    with pytest.raises(QueryError) as e:
        open_db(tmp_path / "copy.duckdb")
    assert str(e.value) == (
        f"{tmp_path / 'copy.duckdb'}: not a screen's results database (no table runs, records, turns, "
        "scores, rejects); if it was copied from where a screen ran, copy copy.duckdb.wal from beside it "
        "too, or rerun that screen to finish it"
    )
