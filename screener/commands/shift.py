"""`screener shift`: how far fine-tuning moved a model along each persona vector, into DuckDB."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from screener import choices
from screener.commands.common import (
    LIMIT,
    add_batch_arguments,
    add_generation_arguments,
    add_vector_arguments,
    add_worker_arguments,
    generation_settings,
)

if TYPE_CHECKING:
    from screener.shift import ShiftConfig, ShiftResult


def add_shift_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the model before fine-tuning: HF folder, .gguf file, hub id, or 'default'")
    p.add_argument(
        "finetuned",
        help="the fine-tuned model: HF folder, .gguf file, hub id, or a PEFT (LoRA) adapter folder for BASE",
    )
    p.add_argument(
        "--db", default=choices.DEFAULT_DB, help="DuckDB file for the results (default: %(default)s)"
    )
    add_vector_arguments(p, of="BASE")
    p.add_argument(
        "--questions",
        metavar="DATA",
        help="evaluation prompts from any dataset the screen reads (prompts only are used); "
        "default: each trait's evaluation questions from its trait file",
    )
    p.add_argument("--split", default=None, help="split of a hub dataset for --questions")
    p.add_argument("--limit", type=LIMIT, default=None, help="use only the first N prompts")
    p.add_argument(
        "--traits-dir", help="folder of trait files (eval questions), searched before the built-ins"
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="also compare the projection averaged over each model's own answer (response_avg)",
    )
    add_generation_arguments(p, "--generate")
    add_batch_arguments(p, "prompts", "longer prompts lose their head")
    add_worker_arguments(p, "; with two or more, both models run at once")
    p.add_argument(
        "--json", action="store_true", help="print a machine-readable summary (one JSON object) instead"
    )


def config_from_args(args: argparse.Namespace) -> ShiftConfig:
    from screener.shift import ShiftConfig

    keys = ShiftConfig.__dataclass_fields__.keys() - {"generation", "vectors", "layers"}
    return ShiftConfig(
        **{k: getattr(args, k) for k in keys},
        vectors=args.vector,
        layers=args.layer,
        generation=generation_settings(args),
    )


def _num(x: float | None, width: int, sign: bool = False) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>+{width}.4f}" if sign else f"{x:>{width}.4f}"


def report(result: ShiftResult) -> list[str]:
    """The measurement as printed: both models, the prompts, and one table row per trait, layer, measure."""
    plan = result.plan
    ft = plan.finetuned
    kind = f"{ft.peft_type} adapter on the base" if plan.finetuned_kind == "adapter" else "model"
    lines = [
        f"base        {plan.base.spec}  (sha256 {plan.base.sha256[:12]})",
        f"fine-tuned  {ft.spec}  ({kind}, sha256 {ft.sha256[:12]})",
        f"{plan.work.dtype_name} on {plan.work.device}; prompts: "
        + "; ".join(f"{t}: {s.source}" for t, s in plan.prompt_sets.items()),
        "",
        f"{'trait':<16} {'layer':>5}  {'measure':<12} {'prompts':>7}  {'shift':>9}  {'stderr':>8}  "
        f"{'base':>9}  {'fine-tuned':>10}",
    ]
    for s in result.shifts:
        lines.append(
            f"{s.trait:<16} {s.layer:>5}  {s.measure:<12} {s.n_prompts:>7}  {_num(s.shift, 9, True)}  "
            f"{_num(s.stderr, 8)}  {_num(s.base_mean, 9)}  {_num(s.finetuned_mean, 10)}"
        )
    lines += [
        "",
        "shift: mean over the prompts of (fine-tuned − base) projection on the unit vector, paired by prompt "
        "(prompt_last: at the last prompt token; response_avg: over each model's own answer); stderr: the "
        "standard error of those differences; base, fine-tuned: each model's mean projection",
        f"done in {result.seconds:.1f} s",
    ]
    return lines


def run_command(args: argparse.Namespace) -> int:
    from screener.shift import measure

    result = measure(config_from_args(args))
    ids = sorted({result.plan.shift_id(s.measure) for s in result.shifts})
    if args.json:
        rows = [
            {k: getattr(s, k) for k in ("trait", "layer", "measure", "n_prompts", "shift", "stderr")}
            for s in result.shifts
        ]
        print(
            json.dumps(
                {"shift_ids": ids, "db": args.db, "shifts": rows, "seconds": result.seconds}, default=float
            )
        )
    else:
        for line in report(result):
            print(line)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shift",
        help="measure how far fine-tuning moved a model along each persona vector",
        description=(
            "The fine-tuning shift: over evaluation prompts, the mean of (h_finetuned[L] - h_base[L]) at the "
            "last prompt token projected on each unit persona vector, per trait and layer, with the number "
            "of prompts and the standard error of the paired differences. Results go to the `shifts` table."
        ),
    )
    add_shift_arguments(p)
    p.set_defaults(func=run_command)
