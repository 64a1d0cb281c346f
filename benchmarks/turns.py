"""Every assistant turn for the price of the last: tokens and time for three ways of scoring multi-turn chats.

    python benchmarks/turns.py                 # both slices, whole process and scorer
    python benchmarks/turns.py --fit 20 --long 5 --skip-cli   # a quick check

On packaged ShareGPT conversations with several assistant turns:
- last turn: `--turns last` (one sample a conversation);
- all turns, one pass: `--turns all` (the default): turns that are a token prefix of a later turn share its
  teacher-forced pass;
- all turns, re-read: a pass per turn (`ScoreSettings(share_passes=False)`), what `--turns all` cost before.
Two slices: conversations that fit the token budget whole (the first N with 2-4 exchanges and at most 5,000
characters), and long ones (the first N with 2 or more exchanges and more than 12,000 characters, past the
2,048-token budget, so later turns are cut and keep their own windows). Whole-process times run the
`screener screen` command as a user would; the scorer rows time `Scorer.score` alone, count the tokens
each way runs through the model, and give the largest difference between the two all-turn ways, relative
to the spread (standard deviation) of the values.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import header

from screener.datasets import ROLES, iter_records, packaged_sharegpt, read_samples
from screener.models import pick_device, pick_dtype, resolve_model
from screener.records import Sample, Scored
from screener.scoring import Scorer, ScoreSettings, Tokens, plan_passes
from screener.vectors import builtin_vector_path, load_vector, unit_vectors

TRAITS = ("evil", "sycophantic", "hallucinating")
TARGET = 1.3  # all turns in one pass: whole-process time at most this many times the last turn's


def exchanges(record: dict) -> int:
    conv = record.get("conversations") or []
    return sum(
        1 for m in conv if isinstance(m, dict) and ROLES.get(str(m.get("from", "")).lower()) == "assistant"
    )


def chars(record: dict) -> int:
    return sum(len(str(m.get("value", ""))) for m in record.get("conversations") or [] if isinstance(m, dict))


def pick(uri: str, n: int, keep) -> list[dict]:
    """The first `n` records for which `keep(record)` holds, as read."""
    return list(itertools.islice((r for _, _, r in iter_records(uri) if keep(r)), n))


def write(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def cli_seconds(data: Path, turns: str, db: Path) -> float:
    """Wall time of `screener screen` over `data`, start to exit."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "screener.cli", "screen", str(data), "--turns", turns, "--db", str(db)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def scorer_row(scorer: Scorer, samples: list[Sample], share: bool) -> tuple[int, float, list[Scored]]:
    """(tokens through the model, seconds, results) of one way of scoring `samples`."""
    scorer.settings = dataclasses.replace(scorer.settings, share_passes=share)
    toks = [t for i, s in enumerate(samples) if isinstance(t := scorer.tokenize(s, i), Tokens)]
    tokens = sum(len(p.ids) for p in plan_passes(toks, share).passes)
    started = time.perf_counter()
    results = scorer.score(samples)
    return tokens, time.perf_counter() - started, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", type=int, default=60, help="conversations that fit the budget (default 60)")
    ap.add_argument("--long", type=int, default=20, help="long conversations (default 20)")
    ap.add_argument("--skip-cli", action="store_true", help="only the scorer rows")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    device = pick_device("auto")
    dtype = pick_dtype(args.dtype, device)
    print(header(device))
    print(f"model: default (SmolLM2-135M-Instruct), dtype {str(dtype).removeprefix('torch.')}, traits "
          f"{', '.join(TRAITS)}, max tokens 2048")  # fmt: skip
    uri = str(packaged_sharegpt())
    fit = pick(uri, args.fit, lambda r: 2 <= exchanges(r) <= 4 and chars(r) <= 5000)
    long = pick(uri, args.long, lambda r: exchanges(r) >= 2 and chars(r) > 12000)
    slices = {"fit (2-4 exchanges, <= 5,000 chars)": fit, "long (>= 2 exchanges, > 12,000 chars)": long}
    ref = resolve_model("default")
    model, tok = ref.load(device, dtype)
    vectors = [load_vector(builtin_vector_path(ref.name, t)) for t in TRAITS]
    layers = tuple(sorted({v.default_layer for v in vectors}))
    # the batch size the screen would use on this machine: tuned (and cached) on the first 48 records'
    # last turns, then fixed, so the three ways run at the same size
    settings = ScoreSettings.for_device(device.type == "cuda", layers=layers)
    scorer = Scorer(model, tok, unit_vectors([v.tensor for v in vectors], layers), settings)
    scorer.score([s for s in read_samples(uri, turns="last", limit=48) if isinstance(s, Sample)])
    size = scorer.batch_tuner.size()
    scorer = Scorer(model, tok, scorer.units, dataclasses.replace(settings, batch_tokens=size))
    print(f"batch tokens: {size} (tuned on the first 48 records' last turns)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, records in slices.items():
            data = write(records, Path(tmp) / f"{len(rows)}.jsonl")
            last = [s for s in read_samples(str(data), turns="last") if isinstance(s, Sample)]
            every = [s for s in read_samples(str(data), turns="all") if isinstance(s, Sample)]
            print(f"\n{name}: {len(records)} conversations, {len(every)} assistant turns", flush=True)
            t_last, s_last, _ = scorer_row(scorer, last, True)
            t_one, s_one, one = scorer_row(scorer, every, True)
            t_re, s_re, re = scorer_row(scorer, every, False)
            got = np.array([r.proj_response for r in one] + [r.proj_prompt_last for r in one])
            want = np.array([r.proj_response for r in re] + [r.proj_prompt_last for r in re])
            rel = float(np.abs(got - want).max() / want.std())
            cli = {}
            if not args.skip_cli:
                for turns in ("last", "all"):
                    cli[turns] = cli_seconds(data, turns, Path(tmp) / f"{len(rows)}-{turns}.duckdb")
            rows.append(
                {"name": name, "n": len(records), "turns": len(every), "t_last": t_last, "s_last": s_last,
                 "t_one": t_one, "s_one": s_one, "t_re": t_re, "s_re": s_re, "rel": rel, "cli": cli}
            )  # fmt: skip

    print("\n| slice | conversations / turns | way | tokens through the model | scorer s | whole process s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cli_last, cli_all = r["cli"].get("last", float("nan")), r["cli"].get("all", float("nan"))
        head = f"| {r['name']} | {r['n']} / {r['turns']} |"
        print(f"{head} last turn | {r['t_last']:,} | {r['s_last']:.1f} | {cli_last:.1f} |")
        tokens, seconds = r["t_one"] / r["t_last"], r["s_one"] / r["s_last"]
        print(
            f"| | | all turns, one pass | {r['t_one']:,} ({tokens:.2f}x) | {r['s_one']:.1f} ({seconds:.2f}x) "
            f"| {cli_all:.1f} ({cli_all / cli_last:.2f}x; target <= {TARGET}x) |"
        )
        print(
            f"| | | all turns, re-read per turn | {r['t_re']:,} ({r['t_re'] / r['t_last']:.2f}x) | "
            f"{r['s_re']:.1f} ({r['s_re'] / r['s_last']:.2f}x) | |"
        )
        print(f"| | | max difference, one pass vs re-read | {r['rel']:.2e} of the values' spread | | |")


if __name__ == "__main__":
    main()
