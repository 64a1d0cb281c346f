"""What running the shared system prompt once saves (`ScoreSettings.share_prefix`): one forward of the
same rows with the prefix shared or not, by rows x length, then the scorer's forward batches on the bench
slice at fixed batch budgets, shared against plain, interleaved.

    python benchmarks/prefix.py                         # ~3 min on 2 cores
    python benchmarks/prefix.py --budgets 512,2048 --samples 32 --dtype float32

Prints the machine line first; each figure is the best of `--repeats` (the order alternates).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench import LAYER, scorer_rate, vectors, write_slice  # benchmarks/, this script's folder
from machine import header

from screener.models import chat_ids, pick_device, pick_dtype, resolve_model
from screener.scoring import Scorer, ScoreSettings
from screener.vectors import unit_vectors

SHAPES = ((1, 400), (2, 250), (4, 120), (8, 60))  # rows x tokens after the shared prefix


def one_forward(model, tok, units, repeats: int) -> None:
    prompt = chat_ids(tok, [{"role": "user", "content": "hello"}])
    prefix = prompt[:-3]  # the template's system prompt and the user turn's opening
    rng = random.Random(0)
    print(f"\none forward, the same rows, {len(prefix)} shared tokens (ms, best of {repeats} x 5 calls)")
    print("| rows x tokens after the prefix | shared | plain | plain / shared |\n|---|---:|---:|---:|")
    for rows, n in SHAPES:
        seqs = [prefix + [rng.randrange(1000, 40000) for _ in range(n)] for _ in range(rows)]
        best: dict[bool, float] = {}
        for rep in range(repeats):
            for share in (True, False) if rep % 2 == 0 else (False, True):
                scorer = Scorer(model, tok, units, ScoreSettings(layers=(LAYER,), share_prefix=share))
                scorer.project_tokens(seqs, len(prefix))  # warm, and the prefix cache filled
                started = time.perf_counter()
                for _ in range(5):
                    scorer.project_tokens(seqs, len(prefix))
                ms = (time.perf_counter() - started) / 5 * 1000
                best[share] = min(best.get(share, ms), ms)
        print(f"| {rows} x {n} | {best[True]:.0f} | {best[False]:.0f} | {best[False] / best[True]:.2f} |")


def slice_batches(model, tok, units, samples, budgets: list[int], repeats: int) -> None:
    print(f"\nthe scorer's forward batches on {len(samples)} bench-slice samples (s, best of {repeats})")
    print("| batch tokens | shared | plain | plain / shared |\n|---:|---:|---:|---:|")
    for budget in budgets:
        best: dict[bool, float] = {}
        for rep in range(repeats):
            for share in (True, False) if rep % 2 == 0 else (False, True):
                settings = ScoreSettings(layers=(LAYER,), batch_tokens=budget, share_prefix=share)
                scorer = Scorer(model, tok, units, settings)
                scorer.score(samples[:4])  # warm-up
                seconds, _, _ = scorer_rate(scorer, samples)
                best[share] = min(best.get(share, seconds), seconds)
        print(f"| {budget} | {best[True]:.2f} | {best[False]:.2f} | {best[False] / best[True]:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--budgets", default="512,2048,8192", help="batch tokens, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    device = pick_device("cpu")
    dtype = pick_dtype(args.dtype, device)
    print(header(device))
    print(f"dtype: {str(dtype).removeprefix('torch.')} (--dtype {args.dtype}); layer {LAYER}")
    model, tok = resolve_model("default").load(device, dtype)
    units = unit_vectors([v.tensor for v in vectors()], (LAYER,))
    with torch.inference_mode():
        one_forward(model, tok, units, args.repeats)
    with tempfile.TemporaryDirectory(prefix="screener-prefix-") as tmp:
        samples = write_slice(tok, args.samples, Path(tmp) / "slice.jsonl")
    slice_batches(model, tok, units, samples, [int(b) for b in args.budgets.split(",")], args.repeats)


if __name__ == "__main__":
    sys.exit(main())
