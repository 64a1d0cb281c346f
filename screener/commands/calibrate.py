"""`screener calibrate`: each vector's metric distribution on ordinary chat, stored with the vector."""

from __future__ import annotations

import argparse

from screener.choices import CALIBRATE_LIMIT, CALIBRATE_START, DEFAULT_MAX_TOKENS, DEFAULT_MODEL, TURNS
from screener.commands.common import MAX_TOKENS, add_worker_arguments, at_least, int_list


def run_calibrate(args: argparse.Namespace) -> int:
    from screener.calibration import CalibrateConfig, calibrate
    from screener.scoring import GenerationSettings

    cfg = CalibrateConfig(
        vectors=args.vector,
        reference=args.reference,
        start=args.start,
        limit=args.limit,
        model=args.model,
        layers=args.layer,
        natural=args.natural or args.natural_limit is not None,
        natural_limit=args.natural_limit,
        turns=args.turns,
        max_tokens=args.max_tokens,
        batch_tokens=args.batch_tokens,
        dtype=args.dtype,
        device=args.device,
        actors=args.actors,
        address=args.address,
        db=args.db,
        generation=GenerationSettings(args.max_new_tokens),
        progress=args.progress,
    )
    for path, cal in calibrate(cfg).items():
        ref = cal["reference"]
        print(f"{path}: {ref['samples']} reference samples (rows {ref['rows'][0]}..{ref['rows'][1]})")
        for metric, per_layer in cal["distributions"].items():
            for layer, d in sorted(per_layer.items(), key=lambda kv: int(kv[0])):
                q = d["quantiles"]
                print(
                    f"  {metric} layer {layer}: n {d['n']}, mean {d['mean']:.3f}, p5 {q[5]:.3f}, "
                    f"p50 {q[50]:.3f}, p95 {q[95]:.3f}, p99 {q[99]:.3f}"
                )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="store each vector's score distribution on ordinary chat (for ref_percentile)"
    )
    p.add_argument("vector", nargs="+", help="vector .pt files, or built-in trait names of the model")
    p.add_argument(
        "--reference",
        metavar="DATA",
        help="ordinary chat turns, in any format the screen reads (default: the packaged ShareGPT file "
        f"from record {CALIBRATE_START:,} on; its first {CALIBRATE_START:,} are kept for independent checks)",
    )
    p.add_argument(
        "--start", type=at_least(0), help="skip the records before this row (default: 0 for --reference)"
    )
    p.add_argument(
        "--limit",
        type=at_least(1),
        default=CALIBRATE_LIMIT,
        help="reference samples to score (default %(default)s)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model the vectors screen (default: default)")
    p.add_argument(
        "--layer", type=int_list, default=[], help="layers, e.g. 12,20 (default: each vector's chosen layer)"
    )
    p.add_argument(
        "--natural", action="store_true", help="also the natural delta_p (the model answers each prompt)"
    )
    p.add_argument(
        "--natural-limit",
        type=at_least(1),
        metavar="N",
        help="the natural delta_p on the first N reference samples only (generation is slow); implies "
        "--natural",
    )
    p.add_argument("--turns", choices=TURNS, default="all", help="which assistant turns to score")
    p.add_argument("--max-tokens", type=MAX_TOKENS, default=DEFAULT_MAX_TOKENS)
    p.add_argument(
        "--max-new-tokens", type=at_least(1), default=128, help="--natural: length of the model's answer"
    )
    p.add_argument("--batch-tokens", type=at_least(1), default=None)
    p.add_argument("--db", help="keep the reference screen in this DuckDB file (default: a scratch file)")
    add_worker_arguments(p)
    p.add_argument("--no-progress", action="store_false", dest="progress")
    p.set_defaults(func=run_calibrate)
