"""`screener explain SAMPLE_ID`: why a sample scored as it did, token by token (text, JSON or HTML)."""

from __future__ import annotations

import argparse
import json
import sys

from screener.commands.common import DEVICE, add_read_arguments, at_least, str_list
from screener.errors import QueryError

__all__ = ["add_commands"]

FORMATS = ("text", "json", "html")


def cmd_explain(args: argparse.Namespace) -> int:
    from screener.api import open_run
    from screener.outputs import output_file
    from screener.render import format_explanation, terminal_width, use_color
    from screener.report import explanation_page

    if args.format == "html" and not args.out:
        raise QueryError("--format html needs --out FILE")
    run = open_run(args.db, args.run)
    protected = run.protected()
    if args.out:
        protected.check(args.out, force=args.force)
    traits = [t for item in args.trait or [] for t in item]
    explained = run.explain(
        args.sample_id, traits, layer=args.layer, input=args.input, model=args.model, device=args.device
    )
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
    layer = ", ".join(str(e.layer) for e in explained)
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
    add_read_arguments(p)
    p.add_argument(
        "--trait",
        action="append",
        type=str_list,
        metavar="TRAIT",
        help="trait to explain (repeatable or comma-separated; default: every trait of the run)",
    )
    p.add_argument(
        "--layer", type=at_least(0), help="one of the run's layers (default: each trait's own vector layer)"
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
    p.add_argument("--device", type=DEVICE, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.set_defaults(func=cmd_explain)
