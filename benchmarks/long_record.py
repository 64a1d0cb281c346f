"""One very long record: the peak memory and CPU time of reading it and tokenising it for a screen.

A record far longer than `--max-tokens` is truncated (response tail first, then the prompt's head), so only
its first (response) or last (prompt) few thousand tokens are read by the model; tokenising all of it first
cost about 150 bytes of memory per input byte (a 30 MB record: 5.5 GB). The screen now cuts an over-long
message in characters (`scoring.tokenize`) before it tokenises it.

Each case runs in a fresh process: the tokenizer is loaded, the peak RSS so far is the baseline, then the
jsonl file with the one record is read (`read_samples`) and its sample tokenised (`scoring.tokenize`); the
case prints the peak RSS over the baseline and the CPU seconds of the read and the tokenisation.

    python benchmarks/long_record.py                  # a 30 MB response, then a 30 MB prompt message
    python benchmarks/long_record.py --mb 5 --max-tokens 512

Run it against another checkout (before/after) with PYTHONPATH pointing at it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
]


def make_record(path: Path, mb: float, where: str) -> None:
    """One OpenAI-format record whose response (or first user message) is `mb` MB of words."""
    rng = random.Random(0)
    text, size, parts = [], 0, int(mb * 1e6)
    while size < parts:
        word = rng.choice(WORDS) + ("." if rng.random() < 0.05 else "")
        text.append(word)
        size += len(word) + 1
    long = " ".join(text)
    user, answer = (long, "A short answer.") if where == "prompt" else ("Summarise the text below.", long)
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    path.write_text(json.dumps({"id": "long", "messages": messages}) + "\n", encoding="utf-8")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(path: str, max_tokens: int) -> None:
    from screener import scoring
    from screener.datasets import read_samples
    from screener.models import resolve_model
    from screener.records import Sample

    tokenizer = resolve_model("default").load_tokenizer()
    warm = Sample("warm", 0, 0, [{"role": "user", "content": "hi"}], "hello")
    scoring.tokenize(tokenizer, warm, max_tokens)  # the first call loads the chat template
    baseline = peak_mb()
    start = time.process_time()
    (sample,) = [s for s in read_samples(path) if isinstance(s, Sample)]
    read = time.process_time() - start
    tokens = scoring.tokenize(tokenizer, sample, max_tokens)
    tokenised = time.process_time() - start - read
    print(
        json.dumps(
            {
                "baseline_mb": round(baseline),
                "peak_over_baseline_mb": round(peak_mb() - baseline),
                "read_cpu_s": round(read, 2),
                "tokenize_cpu_s": round(tokenised, 2),
                "prompt_tokens": len(tokens.prompt),
                "response_tokens": len(tokens.response),
                "truncated": tokens.truncated,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=30.0, help="size of the long message (default: 30)")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.max_tokens)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import header

    print(header())
    print(f"load average: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        for where in ("response", "prompt"):
            path = Path(tmp) / f"{where}.jsonl"
            make_record(path, args.mb, where)
            out = (
                subprocess.run(
                    [sys.executable, __file__, "--child", str(path), "--max-tokens", str(args.max_tokens)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            size = path.stat().st_size / 1e6
            print(f"a {size:.1f} MB record, long {where}, --max-tokens {args.max_tokens}: {out}")


if __name__ == "__main__":
    main()
