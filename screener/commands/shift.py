"""`screener shift`: how far fine-tuning moved a model along each persona vector, into DuckDB."""

from __future__ import annotations

import argparse
import json

from screener.commands.screen import _int_list, _str_list, add_worker_arguments
from screener.scoring import GenerationSettings
from screener.shift import ShiftConfig, ShiftResult, measure


def add_shift_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the model before fine-tuning: HF folder, .gguf file, hub id, or 'default'")
    p.add_argument(
        "finetuned",
        help="the fine-tuned model: HF folder, .gguf file, hub id, or a PEFT (LoRA) adapter folder for BASE",
    )
    p.add_argument("--db", default="screen.duckdb", help="DuckDB file for the results (default: %(default)s)")
    p.add_argument(
        "--traits", type=_str_list, default=[], help="built-in vectors of BASE, e.g. evil,sycophantic"
    )
    p.add_argument(
        "--vector", action="append", default=[], metavar="NAME=PATH", help="a vector file (repeatable)"
    )
    p.add_argument(
        "--layer",
        type=_int_list,
        default=[],
        help="hidden_states layers (default: each vector's chosen layer)",
    )
    p.add_argument(
        "--questions",
        metavar="DATA",
        help="evaluation prompts from any dataset the screen reads (prompts only are used); "
        "default: each trait's evaluation questions from its trait file",
    )
    p.add_argument("--split", default=None, help="split of a hub dataset for --questions")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument(
        "--traits-dir", help="folder of trait files (eval questions), searched before the built-ins"
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="also compare the projection averaged over each model's own answer (response_avg)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="--generate: length of the answers")
    p.add_argument("--temperature", type=float, default=0.0, help="--generate: 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=2048, help="longer prompts lose their head")
    p.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per forward batch")
    p.add_argument(
        "--batch-size", type=int, default=None, dest="max_batch_size", help="max prompts per batch"
    )
    add_worker_arguments(p, "; with two or more, both models run at once")


def config_from_args(args: argparse.Namespace) -> ShiftConfig:
    gen = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    keys = ShiftConfig.__dataclass_fields__.keys() - {"generation", "vectors", "layers"}
    return ShiftConfig(
        **{k: getattr(args, k) for k in keys}, vectors=args.vector, layers=args.layer, generation=gen
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
    result = measure(config_from_args(args))
    for line in report(result):
        print(line)
    ids = sorted({result.plan.shift_id(s.measure) for s in result.shifts})
    print(json.dumps({"shift_ids": ids, "db": args.db}))
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
