"""`screener query | hist | top | report | export`: what users run after a screen.

Each is a thin layer over `screener.api` (`open_run`, `Run.hist`, `Run.top`, `Run.report`, `Run.export`,
`query`), which opens the database read-only and closes it before any slow work (an open reader keeps a
new screen from starting on the file); while a screen writes the file they stop at once (exit code 3). By
default they read the latest finished run, and say on stderr which run they read. What they write goes
through `screener.outputs` (never over the screened input or the database, never over an existing file
without --force, renamed into place when complete). Failures are raised as ScreenerErrors, which
`cli.run` prints as one line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from screener.choices import EXPORT_FORMATS, METRICS, OUTPUT_FORMATS
from screener.commands.common import add_read_arguments, at_least, str_list
from screener.errors import QueryError

if TYPE_CHECKING:
    from screener.api import Run
    from screener.export import ExportResult

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_query(sub)
    _add_hist(sub)
    _add_top(sub)
    _add_report(sub)
    _add_export(sub)


# ---- what the commands share ----------------------------------------------------------------------------


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} if it exists")


def _tell(notes: list[str]) -> None:
    for note in notes:
        print(note, file=sys.stderr)


def _add_selection_args(p: argparse.ArgumentParser, trait_help: str) -> None:
    add_read_arguments(p)
    p.add_argument("--trait", action="append", type=str_list, metavar="TRAIT", help=trait_help)
    _add_metric_and_layer_args(p)


def _add_metric_and_layer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metric",
        choices=METRICS,
        help="score to use (default: delta_p for a natural-mode run, else delta_p_proxy)",
    )
    p.add_argument(
        "--layer",
        type=at_least(0),
        help="layer (default: each trait's own vector layer, else the run's first)",
    )


def _open(args: argparse.Namespace) -> Run:
    """The run the command reads (--run, default the latest finished one); the notes about it on stderr."""
    from screener.api import open_run

    run = open_run(args.db, args.run)
    _tell(run.notes())
    return run


def _traits(run: Run, given: list[list[str]] | None) -> list[str]:
    """--trait values (repeatable, comma-separated), checked against the run; default every trait."""
    return [run.info.check_trait(t) for item in given or [] for t in item] or list(run.traits)


# ---- screener query -------------------------------------------------------------------------------------


def cmd_query(args: argparse.Namespace) -> int:
    from screener.api import protected_by, query
    from screener.outputs import output_file
    from screener.render import write_relation
    from screener.results import sql_errors

    _check_output(args.format, args.out)
    sql = _sql_text(args.sql)
    protected = protected_by(args.db)
    if args.out:
        protected.check(args.out, force=args.force)
    with query(args.db, sql, dict(args.param or []), args.run) as (rel, notes):
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
    from screener.results import canned

    if re.fullmatch(r"[A-Za-z_]\w*", given):
        return canned(given)
    if given.endswith(".sql") and Path(given).is_file():
        return Path(given).read_text()
    return given


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
            "hist, summary, percentiles, runs) or a .sql file; $run_id defaults to --run, else the latest "
            "finished run; "
            "$layer and $metric to that run's first layer and its ΔP metric. --format csv writes nested "
            "values (lists, structs) as JSON text."
        ),
    )
    p.add_argument("sql", help="SQL text, a canned query name, or a .sql file")
    add_read_arguments(p)
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
    p.add_argument(
        "--max-rows", type=at_least(1), default=40, help="rows shown by --format table (default 40)"
    )
    p.set_defaults(func=cmd_query)


# ---- screener hist --------------------------------------------------------------------------------------


def cmd_hist(args: argparse.Namespace) -> int:
    from screener.outputs import output_file
    from screener.render import format_histogram, save_histogram_png, terminal_width

    run = _open(args)
    hists = {
        t: run.hist(t, args.bins, layer=args.layer, metric=args.metric) for t in _traits(run, args.trait)
    }
    protected = run.protected()
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
    p.add_argument("--bins", type=at_least(1), default=20, help="number of equal-width bins (default 20)")
    p.add_argument("--png", help="also save a PNG here (with several traits: one file per trait)")
    _add_force(p, "the PNG")
    p.set_defaults(func=cmd_hist)


# ---- screener top ---------------------------------------------------------------------------------------


def cmd_top(args: argparse.Namespace) -> int:
    from screener.render import format_top, terminal_width

    run = _open(args)
    metric = args.metric or run.info.metric
    layers = run.layers(_traits(run, args.trait), args.layer)
    tops = {t: run.top(t, args.k, layer=layers[t], metric=metric) for t in layers}
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
    p.add_argument("-k", type=at_least(1), default=20, help="samples per trait (default 20)")
    p.set_defaults(func=cmd_top)


# ---- screener report ------------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    run = _open(args)
    data = run.report(
        args.out,
        layer=args.layer,
        metric=args.metric,
        bins=args.bins,
        k=args.k,
        explain_k=0 if args.no_explain else args.explain_k,
        input=args.input,
        force=args.force,
    )
    print(f"wrote {args.out} (run {run.run_id}, {len(run.traits)} traits, {data.layer_text}, {data.metric})")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="a self-contained HTML report: histograms, summary, top samples")
    add_read_arguments(p)
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    _add_force(p, "--out")
    _add_metric_and_layer_args(p)
    p.add_argument("--bins", type=at_least(1), default=30, help="histogram bins (default 30)")
    p.add_argument("-k", type=at_least(1), default=10, help="top samples per trait (default 10)")
    p.add_argument(
        "--explain-k",
        type=at_least(0),
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
    from screener.api import open_run

    run = open_run(args.db, args.run)
    result = run.export(
        args.out,
        drop_top=args.drop_top,
        threshold=args.threshold,
        where=args.where,
        trait=_traits(run, args.trait) if args.trait else None,
        layer=args.layer,
        metric=args.metric,
        format=args.format,
        drop_unscored=args.drop_unscored,
        invert=args.invert,
        input=args.input,
        force=args.force,
    )
    # the run it read is the summary's first line (stdout, with what was written); notes go to stderr
    notes = run.notes()
    print("\n".join([notes[0].removeprefix("reading "), _export_summary(result)]))
    _tell(notes[1:])
    return 0


def _export_summary(result: ExportResult) -> str:
    from screener.export import manifest_path

    n, flt = result.counts, result.filter
    lines = [
        f"{result.output}: wrote {n.written:,} {'dropped' if flt['invert'] else 'kept'} records of "
        f"{n.records_read:,} (kept {n.kept:,}, dropped {n.dropped:,}); filter: {flt['description']}"
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
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default=None,
        help="output format (default: from OUT's suffix, .jsonl or .parquet; else jsonl)",
    )
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
