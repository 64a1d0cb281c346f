"""`screener query | hist | top | report | export`: what users run after a screen.

All five open the database read-only (`results.open_db`) and close it before any slow work (an open
reader keeps a new screen from starting on the file); while a screen writes the file they stop at once
(exit code 3). By default they read the latest finished run, and say on stderr which run they read.
What they write goes through `screener.outputs` (never over the screened input or the database, never
over an existing file without --force, renamed into place when complete). Failures are raised as
ScreenerErrors, which `cli.run` prints as one line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import duckdb

from screener.errors import QueryError
from screener.export import FORMATS, ExportResult, export_records, manifest_path
from screener.outputs import Protected, output_file
from screener.render import (
    OUTPUT_FORMATS,
    format_histogram,
    format_top,
    save_histogram_png,
    terminal_width,
    write_relation,
)
from screener.report import html_report
from screener.results import (
    METRICS,
    DropFilter,
    ReportData,
    canned,
    check_read_only,
    histogram,
    open_db,
    pick_run,
    query_params,
    report_data,
    run_params,
    run_sql,
    select_drops,
    sql_errors,
    top_samples,
    unfinished_since,
)
from screener.runs import Run
from screener.store import DEFAULT_DB

__all__ = ["add_commands"]

T = TypeVar("T")


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_query(sub)
    _add_hist(sub)
    _add_top(sub)
    _add_report(sub)
    _add_export(sub)


# ---- what the commands share ----------------------------------------------------------------------------


def _add_db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"the screen's DuckDB file (default {DEFAULT_DB})")
    p.add_argument(
        "--run",
        metavar="RUN_ID",
        help="run id or unique prefix, of any status (default: the latest finished run)",
    )


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} if it exists")


def _run_notes(con: duckdb.DuckDBPyConnection, run: Run, chosen: str | None) -> list[str]:
    """What the command tells on stderr about the run it read: which one, and (when it chose the latest
    finished run itself) later runs it passed over because they did not finish."""
    notes = [f"reading {run.describe()}"]
    if not chosen and (newer := unfinished_since(con, run)):
        notes.append(
            f"note: {len(newer)} later run{'s' * (len(newer) != 1)} did not finish "
            f"({', '.join(newer[:3])}{', ...' * (len(newer) > 3)}); read one with --run ID"
        )
    return notes


def _tell(notes: list[str]) -> None:
    for note in notes:
        print(note, file=sys.stderr)


def _add_selection_args(p: argparse.ArgumentParser, trait_help: str) -> None:
    _add_db_args(p)
    p.add_argument("--trait", action="append", metavar="TRAIT", help=trait_help)
    _add_metric_and_layer_args(p)


def _add_metric_and_layer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metric",
        choices=METRICS,
        help="score to use (default: delta_p for a natural-mode run, else delta_p_proxy)",
    )
    p.add_argument(
        "--layer", type=int, help="layer (default: each trait's own vector layer, else the run's first)"
    )


def _choose(con: duckdb.DuckDBPyConnection, args: argparse.Namespace) -> tuple[Run, int, str]:
    """The run (--run, default the latest finished one), its layer (--layer, default its first) and the
    metric (--metric, default the run's)."""
    run = pick_run(con, args.run)
    return run, run.layer(args.layer), args.metric or run.metric


def _read_per_trait(
    args: argparse.Namespace, read: Callable[[duckdb.DuckDBPyConnection, Run, str, int, str], T]
) -> tuple[Run, dict[str, int], str, dict[str, T], Protected]:
    """The chosen run, each --trait's layer (--layer, else its own vector's) and the metric, and
    `read(con, run, trait, layer, metric)` for each trait (the notes about the run told on stderr), and
    what no output may replace."""
    with open_db(args.db) as store:
        run, _, metric = _choose(store.con, args)
        layers = {t: run.layer(args.layer, t) for t in _traits(run, args.trait)}
        found = {t: read(store.con, run, t, layer, metric) for t, layer in layers.items()}
        _tell(_run_notes(store.con, run, args.run))
        protected = Protected.of_database(args.db, store.con)
    return run, layers, metric, found, protected


def _traits(run: Run, given: list[str] | None) -> list[str]:
    """--trait values (repeatable, comma-separated), checked against the run; default every trait."""
    traits = [t.strip() for item in given or [] for t in item.split(",") if t.strip()]
    return [run.check_trait(t) for t in traits] or list(run.traits)


def _check_bins(bins: int) -> None:
    if bins < 1:
        raise QueryError("--bins must be at least 1")


# ---- screener query -------------------------------------------------------------------------------------


def cmd_query(args: argparse.Namespace) -> int:
    _check_output(args.format, args.out)
    sql = _sql_text(args.sql)
    params = dict(args.param or [])
    with open_db(args.db) as store:
        defaults, notes = _run_defaults(store.con, args.run, query_params(sql) - params.keys())
        params |= defaults
        check_read_only(store.con, sql)
        protected = Protected.of_database(args.db, store.con)
        if args.out:
            protected.check(args.out, force=args.force)
        rel = run_sql(store.con, sql, params)
        if rel is not None:  # else a statement with no result
            with sql_errors():  # the query runs as its result is read
                if args.out:
                    with output_file(args.out, protected, force=args.force) as tmp:
                        write_relation(rel, args.format, tmp, args.max_rows)
                else:
                    write_relation(rel, args.format, None, args.max_rows)
    _tell(notes)
    return 0


def _check_output(fmt: str, out: str | None) -> None:
    if fmt == "table" and out:
        raise QueryError("--out needs --format csv, json or parquet")
    if fmt == "parquet" and not out:
        raise QueryError("--format parquet needs --out FILE")


def _sql_text(given: str) -> str:
    """A bare name is a canned query from sql/queries, a path to a .sql file its text, else SQL itself."""
    if re.fullmatch(r"[A-Za-z_]\w*", given):
        return canned(given)
    if given.endswith(".sql") and Path(given).is_file():
        return Path(given).read_text()
    return given


def _run_defaults(
    con: duckdb.DuckDBPyConnection, run_id: str | None, needed: set[str]
) -> tuple[dict, list[str]]:
    """Of $run_id, $layer and $metric, those the query needs and was not given, from --run (default
    the latest finished run): the defaults hist, top and export use too; and the notes on that run."""
    if not needed & {"run_id", "layer", "metric"}:
        return {}, []
    run = pick_run(con, run_id)
    return {k: v for k, v in run_params(run).items() if k in needed}, _run_notes(con, run, run_id)


def _parse_param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:  # numbers (and true/false/null) as such, anything else as a string
        parsed = json.loads(value)
        if isinstance(parsed, (list, dict)):
            parsed = value
    except ValueError:
        parsed = value
    return name, parsed


def _add_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query",
        help="run a read-only SQL query on a screen's database",
        description=(
            "Run SQL against the tables of sql/schema.sql and the views of sql/views.sql (scored, "
            "top_delta_p, trait_percentiles, dataset_summary, run_overview), read-only: it reads the "
            "database and no other file. SQL may also be a canned query's name from sql/queries (top, "
            "hist, summary, percentiles, runs) or a .sql file; $run_id defaults to --run, the latest run; "
            "$layer and $metric to that run's first layer and its ΔP metric. --format csv writes nested "
            "values (lists, structs) as JSON text."
        ),
    )
    p.add_argument("sql", help="SQL text, a canned query name, or a .sql file")
    _add_db_args(p)
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="table")
    p.add_argument("--out", help="write to this file instead of stdout (required for parquet)")
    _add_force(p, "--out")
    p.add_argument(
        "-p",
        "--param",
        action="append",
        type=_parse_param,
        metavar="NAME=VALUE",
        help="a $NAME parameter of the query; numbers are passed as numbers (repeatable)",
    )
    p.add_argument("--max-rows", type=int, default=40, help="rows shown by --format table (default 40)")
    p.set_defaults(func=cmd_query)


# ---- screener hist --------------------------------------------------------------------------------------


def cmd_hist(args: argparse.Namespace) -> int:
    _check_bins(args.bins)
    _, _, _, hists, protected = _read_per_trait(args, partial(histogram, bins=args.bins))
    pngs = {}
    if args.png:
        for trait in hists:
            png = Path(args.png)
            if len(hists) > 1:  # one file per trait: out-evil.png, out-sycophantic.png
                png = png.with_name(f"{png.stem}-{trait}{png.suffix or '.png'}")
            protected.check(png, force=args.force)  # all of them before writing any
            pngs[trait] = png
    width = terminal_width()
    for i, h in enumerate(hists.values()):
        print(("\n" if i else "") + format_histogram(h, width))
        if h.trait in pngs:
            with output_file(pngs[h.trait], protected, force=args.force) as tmp:
                save_histogram_png(h, tmp)
            print(f"wrote {pngs[h.trait]}", file=sys.stderr)
    return 0


def _add_hist(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hist", help="histogram of a score per trait, in the terminal and optionally a PNG")
    _add_selection_args(p, "trait to plot (repeatable or comma-separated; default: every trait)")
    p.add_argument("--bins", type=int, default=20, help="number of equal-width bins (default 20)")
    p.add_argument("--png", help="also save a PNG here (with several traits: one file per trait)")
    _add_force(p, "the PNG")
    p.set_defaults(func=cmd_hist)


# ---- screener top ---------------------------------------------------------------------------------------


def cmd_top(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise QueryError("-k must be at least 1")
    run, layers, metric, tops, _ = _read_per_trait(args, partial(top_samples, k=args.k))
    width = terminal_width()
    for i, (trait, rows) in enumerate(tops.items()):
        print(
            ("\n" if i else "")
            + f"== {trait}: top {len(rows)} by {metric} · layer {layers[trait]} · run {run.run_id}"
        )
        print(format_top(rows, metric, width))
    return 0


def _add_top(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="the highest-scoring samples with prompt and response excerpts")
    _add_selection_args(p, "trait to rank by (repeatable or comma-separated; default: every trait)")
    p.add_argument("-k", type=int, default=20, help="samples per trait (default 20)")
    p.set_defaults(func=cmd_top)


# ---- screener report ------------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    _check_bins(args.bins)
    if args.explain_k < 0:
        raise QueryError("--explain-k must be at least 0")
    explain = not args.no_explain and args.explain_k > 0
    with open_db(args.db) as store:
        run, layer, metric = _choose(store.con, args)
        protected = Protected.of_database(args.db, store.con)
        protected.check(args.out, force=args.force)
        data = report_data(store.con, run, layer, metric, bins=args.bins, k=args.k)
        _tell(_run_notes(store.con, run, args.run))
        if explain:
            top = _report_top(store.con, run, data, args.explain_k)
    explained = None
    if explain:  # the database is closed: the model loads and the dataset is read
        from screener.explain import explain_report

        explained = explain_report(run, data.layers, top, k=args.explain_k, input_uri=args.input)
    with output_file(args.out, protected, force=args.force) as tmp:
        tmp.write_text(html_report(data, explained), encoding="utf-8")
    print(f"wrote {args.out} (run {run.run_id}, {len(run.traits)} traits, {data.layer_text}, {metric})")
    return 0


def _report_top(con: duckdb.DuckDBPyConnection, run: Run, data: ReportData, k: int) -> dict:
    """{trait: the first k of its top samples at the trait's layer, as explain.StoredSample (with the
    stored scores of every trait read at that layer, since a sample explained once serves them all)."""
    from screener.explain import stored_samples

    at_layer: dict[int, list[str]] = {}
    for trait, layer in data.layers.items():
        at_layer.setdefault(layer, []).append(trait)
    return {
        trait: stored_samples(
            con,
            run,
            [r["sample_id"] for r in found.top[:k]],
            data.layers[trait],
            at_layer[data.layers[trait]],
        )
        for trait, found in data.traits.items()
    }


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="a self-contained HTML report: histograms, summary, top samples")
    _add_db_args(p)
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    _add_force(p, "--out")
    _add_metric_and_layer_args(p)
    p.add_argument("--bins", type=int, default=30, help="histogram bins (default 30)")
    p.add_argument("-k", type=int, default=10, help="top samples per trait (default 10)")
    p.add_argument(
        "--explain-k",
        type=int,
        default=3,
        metavar="K",
        help="show the shaded response (per-token projections, computed now with the run's model) of the "
        "top K samples per trait (default 3; 0 = none)",
    )
    p.add_argument(
        "--no-explain",
        action="store_true",
        help="leave the per-token view out (no model is loaded); when the run's model or vectors are gone "
        "or changed, the report says so in that section",
    )
    p.add_argument("--input", metavar="URI", help="where the screened data is now, for the per-token view")
    p.set_defaults(func=cmd_report)


# ---- screener export ------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    top_percent, top_count = _parse_drop_top(args.drop_top) if args.drop_top is not None else (None, None)
    threshold, percentile = _parse_threshold(args.threshold) if args.threshold is not None else (None, None)
    with open_db(args.db) as store:
        run = pick_run(store.con, args.run)
        notes = _run_notes(store.con, run, args.run)
        protected = Protected.of_database(args.db, store.con)
        flt = DropFilter(
            metric=args.metric or run.metric,
            # --where sees every layer unless --layer is given; the other filters read each trait at its
            # own vector's layer (or --layer)
            layers=None
            if args.where and args.layer is None
            else {t: run.layer(args.layer, t) for t in run.traits},
            traits=tuple(_traits(run, args.trait)) if args.trait else (),
            drop_top_percent=top_percent,
            drop_top_count=top_count,
            threshold=threshold,
            ref_percentile=percentile,
            where=args.where,
            drop_unscored=args.drop_unscored,
            invert=args.invert,
        )
        selection = select_drops(store.con, run, flt)
    # The database is closed: reading and writing the records may take minutes.
    result = export_records(
        run,
        flt,
        selection,
        args.out,
        args.format,
        input_uri=args.input,
        force=args.force,
        protected=protected,
    )
    # the run it read is the summary's first line (stdout, with what was written); notes go to stderr
    print("\n".join([notes[0].removeprefix("reading "), _export_summary(result, flt)]))
    _tell(notes[1:])
    return 0


def _parse_drop_top(text: str) -> tuple[float | None, int | None]:
    """'5%' → (5.0, None): a percentage; '20' → (None, 20): a count."""
    text = text.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]), None
        return None, int(text)
    except ValueError:
        raise QueryError(f"--drop-top takes a percentage like 5% or a count like 20, not {text!r}") from None


def _parse_threshold(text: str) -> tuple[float | None, float | None]:
    """'2.5' → (2.5, None): a value of the metric; 'p95' → (None, 95.0): a percentile of the reference."""
    text = text.strip()
    try:
        if text.lower().startswith("p"):
            return None, float(text[1:])
        return float(text), None
    except ValueError:
        raise QueryError(
            f"--threshold takes a value like 2.5 or a reference percentile like p95, not {text!r}"
        ) from None


def _export_summary(result: ExportResult, flt: DropFilter) -> str:
    n = result.counts
    lines = [
        f"{result.output}: wrote {n.written:,} {'dropped' if flt.invert else 'kept'} records of "
        f"{n.records_read:,} (kept {n.kept:,}, dropped {n.dropped:,}); filter: {flt.describe()}"
    ]
    for trait, counts in result.per_trait.items():
        lines.append(
            f"  {trait}: dropped {counts['dropped']:,} of {counts['scored_records']:,} scored records"
        )
    if n.unreadable_rows or n.unreadable_files:
        lines.append(
            f"in neither output: {n.unreadable_rows:,} input rows that do not parse, "
            f"{n.unreadable_files:,} unreadable files (listed in the manifest)"
        )
    lines.append(f"manifest: {manifest_path(result.output, result.format)}")
    return "\n".join(lines)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a filtered training split in the input's own record format",
        description=(
            "Re-read the run's input records and write them unchanged, minus the flagged ones. Every "
            "filter selects SAMPLES TO DROP; a record is dropped when any of its scored samples is "
            "selected. Records the screen did not score (rejected, past --limit, or tool calls only) are "
            "kept unless --drop-unscored; unparseable input lines and unreadable files are in neither "
            "output. Nothing is written over the screened input or the database, nor over an existing "
            "output without --force. Without a filter, a jsonl "
            "export reproduces the input records exactly; parquet and hf are columnar, so where records "
            "have differing keys, each gains the keys it lacks, with null values. A manifest "
            "(OUT.manifest.json, or OUT/manifest.json for hf) records the run, the filter and the counts."
        ),
    )
    p.add_argument("out", help="output file (jsonl, parquet) or directory (hf)")
    _add_selection_args(p, "traits the filter looks at (repeatable or comma-separated; default: every trait)")
    p.add_argument("--format", choices=FORMATS, default="jsonl", help="output format (default jsonl)")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--drop-top",
        metavar="P%|N",
        help="drop the top P%% (e.g. 5%%) or top N samples by the metric, per trait",
    )
    what.add_argument(
        "--threshold",
        metavar="X|pNN",
        help="drop samples whose metric is > X; pNN (p90, p95, p99, ...): above that percentile of the "
        "vector's reference distribution on ordinary chat (ref_percentile; needs screener calibrate)",
    )
    what.add_argument(
        "--where",
        "--drop-where",
        dest="where",
        metavar="SQL",
        help="SQL predicate over the `scored` view selecting the samples to DROP, e.g. "
        "\"trait = 'evil' AND delta_p > 2\" (restricted to the run, and to --layer when given)",
    )
    p.add_argument("--invert", action="store_true", help="write the dropped records instead of the kept ones")
    p.add_argument("--drop-unscored", action="store_true", help="also drop records the screen did not score")
    p.add_argument(
        "--input", metavar="URI", help="where the screened data is now (default: the run's dataset)"
    )
    _add_force(p, "the output (and its manifest)")
    p.set_defaults(func=cmd_export)
