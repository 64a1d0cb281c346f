"""How long `screener` takes to answer before any model work: CPU seconds (user + system, of the child
process) of `screener --help`, `screener screen --help` and `screener query` on a small database, each the
median of several runs. CPU time, not wall time: these machines are shared, and wall time there says more
about the neighbours than about the command.

    python benchmarks/startup.py [--runs 5] [--json out.json]

The goal (issue 24): `--help` under 0.5 s of CPU. Prints the machine line and the load first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GOAL_HELP_S = 0.5


def cpu_seconds(argv: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of `argv` as a child process (its output discarded)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def small_database(folder: Path) -> Path:
    """A finished run of 3 samples, 1 trait, 1 layer, written straight to the store (no model)."""
    import numpy as np

    from screener.records import Sample, Scored
    from screener.runs import Run
    from screener.store import Store

    db = folder / "small.duckdb"
    run = Run("m", "ab" * 32, str(folder / "d.jsonl"), "proxy", (2,), ("evil",), {"max_tokens": 64})
    prompt = [{"role": "user", "content": "Hi"}]
    samples = [Sample(f"s{i}", i, 0, prompt, "Hello.", "d.jsonl") for i in range(3)]
    scored = [
        Scored(
            s.sample_id, i, 0, 3, 2, False, np.full((1, 1), 0.1 * i, np.float32), np.zeros((1, 1), np.float32)
        )
        for i, s in enumerate(samples)
    ]
    with Store(db) as store:
        store.begin_run(run)
        store.write(run.run_id, run.layers, run.traits, scored, [], samples=samples)
        store.finish_run(run.run_id)
    return db


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per command; the median is reported")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    from machine import header

    print(header())
    print("load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} cores)")
    screener = [sys.executable, "-m", "screener.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        db = small_database(Path(tmp))
        commands = {
            "screener --help": [*screener, "--help"],
            "screener screen --help": [*screener, "screen", "--help"],
            "screener query (small db)": [*screener, "query", "SELECT count(*) FROM scored", "--db", str(db)],
        }
        figures = {}
        print(f"\n| Command | CPU s (median of {args.runs}) | wall s (median) |\n|---|---|---|")
        for name, argv in commands.items():
            runs = [cpu_seconds(argv) for _ in range(args.runs)]
            cpu, wall = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            figures[name] = {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3)}
            print(f"| `{name}` | {cpu:.2f} | {wall:.2f} |")
    met = figures["screener --help"]["cpu_s"] < GOAL_HELP_S
    print(f"\n`--help` under {GOAL_HELP_S} s of CPU: {'met' if met else '**missed**'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": header(), **figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
