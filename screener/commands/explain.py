"""`screener explain SAMPLE_ID`: why a sample scored as it did, token by token (text, JSON or HTML)."""

from __future__ import annotations

import argparse
import json
import sys

from screener.errors import QueryError
from screener.outputs import Protected, output_file
from screener.results import open_db, pick_run
from screener.store import DEFAULT_DB

__all__ = ["add_commands"]

FORMATS = ("text", "json", "html")


def cmd_explain(args: argparse.Namespace) -> int:
    from screener.explain import explain_samples, stored_samples
    from screener.render import format_explanation, terminal_width, use_color
    from screener.report import explanation_page

    if args.format == "html" and not args.out:
        raise QueryError("--format html needs --out FILE")
    with open_db(args.db) as store:
        run = pick_run(store.con, args.run)
        protected = Protected.of_database(args.db, store.con)
        if args.out:
            protected.check(args.out, force=args.force)
        traits = [t.strip() for item in args.trait or [] for t in item.split(",") if t.strip()]
        traits = [run.check_trait(t) for t in traits] or list(run.traits)
        groups: dict[int, list[str]] = {}  # each trait at --layer, else at its own vector's layer
        for t in traits:
            groups.setdefault(run.layer(args.layer, t), []).append(t)
        stored = {
            layer: stored_samples(store.con, run, [args.sample_id], layer, ts) for layer, ts in groups.items()
        }
    # The database is closed: loading the model and reading the dataset take a while.
    by_layer = explain_samples(
        run, stored, groups, input_uri=args.input, model=args.model, device=args.device
    )
    explained = [found[0] for found in by_layer.values()]
    if args.format == "json":
        text = "".join(
            json.dumps(e.to_json(t), ensure_ascii=False) + "\n" for e in explained for t in e.traits
        )
    elif args.format == "html":
        text = explanation_page(*explained)
    else:
        color = args.color == "always" if args.out else use_color(args.color)
        text = "\n\n".join(
            format_explanation(e, t, color=color, width=terminal_width()) for e in explained for t in e.traits
        )
        text += "\n"
    layer = ", ".join(map(str, groups))
    if args.out:
        with output_file(args.out, protected, force=args.force) as tmp:
            tmp.write_text(text, encoding="utf-8")
        print(f"wrote {args.out} (sample {args.sample_id}, run {run.run_id}, layer {layer})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="why a sample scored high: its per-token projections (text, JSON or HTML)",
        description=(
            "Re-read one scored sample from the run's dataset, re-score it with the run's own model, "
            "vectors, dtype and max tokens, and show h_L · v̂ at every token: the response shaded from "
            "blue (below the value the run's metric subtracts: the last prompt token, or the natural "
            "answer in natural mode) through white to red (above it), the stored and recomputed scores "
            "with their differences, and the sentences with the highest mean projection. Refuses when "
            "the model's weights or the vector files changed since the screen (sha256)."
        ),
    )
    p.add_argument("sample_id", help="a sample id as `screener top` shows it (id, or id#turn)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"the screen's DuckDB file (default {DEFAULT_DB})")
    p.add_argument("--run", metavar="RUN_ID", help="run id or unique prefix (default: the latest run)")
    p.add_argument(
        "--trait",
        action="append",
        metavar="TRAIT",
        help="trait to explain (repeatable or comma-separated; default: every trait of the run)",
    )
    p.add_argument(
        "--layer", type=int, help="one of the run's layers (default: each trait's own vector layer)"
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        help="text (shaded on a terminal), json (one object per trait, a line each), or html (--out)",
    )
    p.add_argument("--out", metavar="FILE", help="write to this file instead of stdout (required for html)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="text: colour the tokens (auto: on a terminal, unless NO_COLOR); without it, {+…+} and "
        "[-…-] mark tokens well above and below",
    )
    p.add_argument("--input", metavar="URI", help="where the screened data is now (default: the run's)")
    p.add_argument(
        "--model",
        metavar="SPEC",
        help="where the run's model is now (default: as the run recorded it); its weights must be the same",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.set_defaults(func=cmd_explain)
