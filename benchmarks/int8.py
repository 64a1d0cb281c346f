"""`--dtype int8` against fp32 on a CPU: fidelity of the scores and speed, forward and whole process.

    python benchmarks/int8.py fidelity      # both slices, in-process, any load (no seconds reported)
    python benchmarks/int8.py speed         # under the bench lock: forward and `screener screen`, both dtypes

Fidelity: `delta_p_proxy` of the built-in evil, sycophantic and hallucinating vectors at layer 20, by the
default model in fp32 and in int8, on the bench slice (bench.py's: the first 128 single-turn records whose
prompt is at most 512 tokens) and on ShareGPT records 6,000..6,399 (the last assistant turn of each; the
first 5,000 records are kept for independent checks). Per trait: the Spearman rank correlation and how
many of fp32's top 20 are int8's top 20 (targets 0.995 and 18).

Speed, on the bench slice: the scorer's seconds in forward batches (warm, fixed `--batch-tokens`), and
`screener screen` as a whole process (start to exit, wall and CPU seconds), both at the same fixed
`--batch-tokens` (so that neither pays for tuning). Run it twice: natively, and under the AVX2 emulation
of benchmarks/README.md (where `--dtype auto` is fp32, which is where int8 could become the default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench import LAYER, TRAITS, log, timed_process, vectors, write_slice
from machine import header, native_bf16

from screener.datasets import iter_records, packaged_sharegpt, read_samples
from screener.models import INT8, resolve_model
from screener.records import Sample, Scored
from screener.scoring import Scorer, ScoreSettings
from screener.vectors import unit_vectors

SHAREGPT_FROM, SHAREGPT_RECORDS = 6000, 400  # records before 5,000 are for independent checks only
TARGETS = {"spearman": 0.995, "top20": 18, "speedup": 1.3}


def sharegpt_slice(path: Path, start: int = SHAREGPT_FROM, n: int = SHAREGPT_RECORDS) -> list[Sample]:
    """The last assistant turn of records start..start+n-1 of the packaged ShareGPT file."""
    assert start >= 5000, "the first 5,000 records are for independent checks only"
    with path.open("w", encoding="utf-8") as f:
        for row, _, record in iter_records(str(packaged_sharegpt())):
            if row >= start + n:
                break
            if row >= start:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return [s for s in read_samples(str(path), turns="last") if isinstance(s, Sample)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable") for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def scores(scorer: Scorer, samples: list[Sample]) -> tuple[list[str], np.ndarray]:
    """(sample ids, `[n, traits]` delta_p_proxy) of the samples that scored."""
    results = [r for r in scorer.score(samples) if isinstance(r, Scored)]
    return [r.sample_id for r in results], np.stack(
        [r.proj_response[0] - r.proj_prompt_last[0] for r in results]
    )


def fidelity(args: argparse.Namespace, tmp: str) -> None:
    ref = resolve_model("default")
    fp32, tok = ref.load("cpu", torch.float32)
    int8, _ = ref.load("cpu", INT8)
    units = unit_vectors([v.tensor for v in vectors()], (LAYER,))
    settings = ScoreSettings(layers=(LAYER,), batch_tokens=args.batch_tokens)
    sharegpt = f"ShareGPT records {SHAREGPT_FROM:,}..{SHAREGPT_FROM + args.records - 1:,} (last turns)"
    slices = {
        f"bench slice ({args.samples} samples)": write_slice(tok, args.samples, Path(tmp) / "bench.jsonl"),
        sharegpt: sharegpt_slice(Path(tmp) / "sharegpt.jsonl", n=args.records),
    }
    print("\n| Slice | Samples | Trait | Spearman | Top-20 shared | max abs diff | fp32 std | |")
    print("|---|---|---|---|---|---|---|---|")
    for name, samples in slices.items():
        log(f"{name}: fp32")
        ids32, a = scores(Scorer(fp32, tok, units, settings), samples)
        log(f"{name}: int8")
        ids8, b = scores(Scorer(int8, tok, units, settings), samples)
        assert ids32 == ids8
        for k, trait in enumerate(TRAITS):
            rho = spearman(a[:, k], b[:, k])
            top = len(set(np.argsort(-a[:, k])[:20]) & set(np.argsort(-b[:, k])[:20]))
            ok = "" if rho >= TARGETS["spearman"] and top >= TARGETS["top20"] else "**missed**"
            print(
                f"| {name} | {len(ids32)} | {trait} | {rho:.4f} | {top}/20 "
                f"| {np.abs(a[:, k] - b[:, k]).max():.3f} | {a[:, k].std():.3f} | {ok} |"
            )


def forward_seconds(model, tok, samples: list[Sample], batch_tokens: int) -> float:
    units = unit_vectors([v.tensor for v in vectors()], (LAYER,))
    scorer = Scorer(model, tok, units, ScoreSettings(layers=(LAYER,), batch_tokens=batch_tokens))
    scorer.score(samples[:8])  # warm
    scorer.seconds.clear()
    scorer.score(samples)
    return scorer.seconds["forward"]


def speed(args: argparse.Namespace, tmp: str) -> None:
    ref = resolve_model("default")
    tok = ref.load_tokenizer()
    data = Path(tmp) / "bench.jsonl"
    samples = write_slice(tok, args.samples, data)
    # where bf16 is native it is `--dtype auto`'s choice, and what int8 has to beat
    dtypes = {"float32": torch.float32, "int8": INT8} | (
        {"bfloat16": torch.bfloat16} if native_bf16() else {}
    )
    forward, whole = {}, {}
    for name, dtype in dtypes.items():
        log(f"forward: {name}")
        forward[name] = forward_seconds(ref.load("cpu", dtype)[0], tok, samples, args.batch_tokens)
    for name in dtypes:
        db = Path(tmp) / f"{name}.duckdb"
        argv = [sys.executable, "-m", "screener.cli", "screen", str(data), "--traits", ",".join(TRAITS),
                "--layer", str(LAYER), "--no-progress", "--json", "--dtype", name,
                "--batch-tokens", str(args.batch_tokens), "--db", str(db)]  # fmt: skip
        log(f"screen --dtype {name} (whole process)")
        wall, _, cpu = timed_process(argv, cpu=True)
        whole[name] = (wall, cpu)
    print(f"\nbench slice: {len(samples)} samples, every dtype at `--batch-tokens {args.batch_tokens}`")
    others = [d for d in dtypes if d != "int8"]
    print(f"\n| Measure | {' | '.join(dtypes)} | int8 speed-up vs {', '.join(others)} |")
    print("|---|" + "---|" * (len(dtypes) + 1))
    table = {
        "forward batches, warm (s)": forward,
        "`screener screen`, whole process (s)": {d: w for d, (w, _) in whole.items()},
        "`screener screen`, whole process (CPU s)": {d: c for d, (_, c) in whole.items()},
    }
    for what, row in table.items():
        ups = ", ".join(f"{row[d] / row['int8']:.2f}x" for d in others)
        print(f"| {what} | {' | '.join(f'{row[d]:.1f}' for d in dtypes)} | {ups} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("fidelity", "speed"))
    ap.add_argument("--samples", type=int, default=128, help="bench slice size (default: %(default)s)")
    ap.add_argument("--records", type=int, default=SHAREGPT_RECORDS, help="ShareGPT records from 6,000")
    ap.add_argument(
        "--batch-tokens", type=int, default=2048, help="fixed forward batch (default %(default)s)"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    print(header(torch.device("cpu")))
    print(f"load: {os.getloadavg()[0]:.2f} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"python benchmarks/int8.py {' '.join(sys.argv[1:])}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        (fidelity if args.part == "fidelity" else speed)(args, tmp)
    print(f"load at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
