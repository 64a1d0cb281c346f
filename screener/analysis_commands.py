"""`screener query | hist | top | export | report`: what users run after a screen.

All five open the database read-only and close it before any slow work (an open reader keeps a new
screen from starting on the file). While a screen writes the file they fail at once with exit code 3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from screener import export as export_mod
from screener import report
from screener.query import (
    METRICS,
    QueryError,
    RunChoice,
    add_db_args,
    add_query_command,
    command,
    default_metric,
    open_db,
    pick_run,
    terminal_width,
)

__all__ = ["add_commands"]


def _traits(run: RunChoice, given: list[str] | None) -> list[str]:
    """--trait values (repeatable, comma-separated), checked against the run; default every trait."""
    traits = [t.strip() for item in given or [] for t in item.split(",") if t.strip()]
    return [run.check_trait(t) for t in traits] or list(run.traits)


OWN_LAYER_HELP = (
    "layer (default: each trait's own vector layer when the run recorded it, else the run's first)"
)
FIRST_LAYER_HELP = "layer (default: the run's first layer)"


def _add_selection_args(
    p: argparse.ArgumentParser, trait_help: str, layer_help: str = OWN_LAYER_HELP
) -> None:
    add_db_args(p)
    p.add_argument("--trait", action="append", metavar="TRAIT", help=trait_help)
    p.add_argument(
        "--metric",
        choices=METRICS,
        help="score to use (default: delta_p for a natural-mode run, else delta_p_proxy)",
    )
    p.add_argument("--layer", type=int, help=layer_help)


def _check_bins(bins: int) -> None:
    if bins < 1:
        raise QueryError("--bins must be at least 1")


@command
def cmd_hist(args: argparse.Namespace) -> int:
    _check_bins(args.bins)
    with open_db(args.db) as store:
        run = pick_run(store.con, args.run)
        metric = args.metric or default_metric(run)
        hists = [
            report.histogram(store.con, run, t, run.layer(args.layer, t), metric, args.bins)
            for t in _traits(run, args.trait)
        ]
    for i, h in enumerate(hists):
        print(("\n" if i else "") + report.format_histogram(h, terminal_width()))
        if args.png:
            png = Path(args.png)
            if len(hists) > 1:  # one file per trait: out-evil.png, out-sycophantic.png
                png = png.with_name(f"{png.stem}-{h.trait}{png.suffix or '.png'}")
            report.save_histogram_png(h, png)
            print(f"wrote {png}", file=sys.stderr)
    return 0


@command
def cmd_top(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise QueryError("-k must be at least 1")
    with open_db(args.db) as store:
        run = pick_run(store.con, args.run)
        metric = args.metric or default_metric(run)
        layers = {t: run.layer(args.layer, t) for t in _traits(run, args.trait)}
        tops = {
            t: report.top_samples(store.con, run, t, layer, metric, args.k) for t, layer in layers.items()
        }
    width = terminal_width()
    for i, (trait, rows) in enumerate(tops.items()):
        print(
            ("\n" if i else "")
            + f"== {trait}: top {len(rows)} by {metric} · layer {layers[trait]} · run {run.run_id}"
        )
        print(report.format_top(rows, metric, width))
    return 0


@command
def cmd_report(args: argparse.Namespace) -> int:
    _check_bins(args.bins)
    with open_db(args.db) as store:
        run = pick_run(store.con, args.run)
        layer, metric = run.layer(args.layer), args.metric or default_metric(run)
        page = report.html_report(store.con, run, layer, metric, bins=args.bins, k=args.k)
    Path(args.out).write_text(page, encoding="utf-8")
    print(f"wrote {args.out} (run {run.run_id}, {len(run.traits)} traits, layer {layer}, {metric})")
    return 0


@command
def cmd_export(args: argparse.Namespace) -> int:
    top_percent = top_count = None
    if args.drop_top is not None:
        try:
            top_percent, top_count = export_mod.parse_drop_top(args.drop_top)
        except ValueError as e:
            raise QueryError(str(e)) from None
    with open_db(args.db) as store:
        run = pick_run(store.con, args.run)
        traits = _traits(run, args.trait) if args.trait else []
        try:
            flt = export_mod.ExportFilter(
                metric=args.metric or default_metric(run),
                # --where sees every layer unless --layer is given; the other filters use one layer.
                layer=None if args.where and args.layer is None else run.layer(args.layer),
                traits=tuple(traits),
                drop_top_percent=top_percent,
                drop_top_count=top_count,
                threshold=args.threshold,
                where=args.where,
                drop_unscored=args.drop_unscored,
                invert=args.invert,
            )
        except ValueError as e:  # an out-of-range --drop-top: the user's mistake, said in one line
            raise QueryError(str(e)) from None
        selection = export_mod.selected_rows(store.con, run, flt)
    # The database is closed: reading and writing the records may take minutes.
    result = export_mod.export_from_selection(
        run, args.out, args.format, flt, selection, input_uri=args.input
    )
    side = "dropped" if args.invert else "kept"
    print(
        f"{args.out}: wrote {result.written:,} {side} records of {result.records_read:,} "
        f"(kept {result.kept:,}, dropped {result.dropped:,}); filter: {flt.describe()}"
    )
    for trait, counts in result.per_trait.items():
        print(f"  {trait}: dropped {counts['dropped']:,} of {counts['scored_records']:,} scored records")
    print(f"manifest: {export_mod.manifest_path(args.out, args.format)}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    add_query_command(sub)

    p = sub.add_parser("hist", help="histogram of a score per trait, in the terminal and optionally a PNG")
    _add_selection_args(p, "trait to plot (repeatable or comma-separated; default: every trait)")
    p.add_argument("--bins", type=int, default=20, help="number of equal-width bins (default 20)")
    p.add_argument("--png", help="also save a PNG here (with several traits: one file per trait)")
    p.set_defaults(func=cmd_hist)

    p = sub.add_parser("top", help="the highest-scoring samples with prompt and response excerpts")
    _add_selection_args(p, "trait to rank by (repeatable or comma-separated; default: every trait)")
    p.add_argument("-k", type=int, default=20, help="samples per trait (default 20)")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("report", help="a self-contained HTML report: histograms, summary, top samples")
    add_db_args(p)
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--metric", choices=METRICS, help="score to use (default: delta_p if natural, else proxy)")
    p.add_argument("--layer", type=int, help=FIRST_LAYER_HELP)
    p.add_argument("--bins", type=int, default=30, help="histogram bins (default 30)")
    p.add_argument("-k", type=int, default=10, help="top samples per trait (default 10)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "export",
        help="write a filtered training split in the input's own record format",
        description=(
            "Re-read the run's input records and write them unchanged, minus the flagged ones. Every "
            "filter selects SAMPLES TO DROP; a record is dropped when any of its scored samples is "
            "selected. Records the screen did not score (rejected, or past --limit) are kept unless "
            "--drop-unscored; unparseable input lines are in neither output. Without a filter, a jsonl "
            "export reproduces the input records exactly; parquet and hf are columnar, so where records "
            "have differing keys, each gains the keys it lacks, with null values. A manifest "
            "(OUT.manifest.json, or OUT/manifest.json for hf) records the run, the filter and the counts."
        ),
    )
    p.add_argument("out", help="output file (jsonl, parquet) or directory (hf)")
    _add_selection_args(
        p,
        "traits the filter looks at (repeatable or comma-separated; default: every trait)",
        FIRST_LAYER_HELP,
    )
    p.add_argument(
        "--format", choices=export_mod.FORMATS, default="jsonl", help="output format (default jsonl)"
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--drop-top",
        metavar="P%|N",
        help="drop the top P%% (e.g. 5%%) or top N samples by the metric, per trait",
    )
    what.add_argument("--threshold", type=float, metavar="X", help="drop samples whose metric is > X")
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
    p.set_defaults(func=cmd_export)
