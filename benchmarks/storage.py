"""How big a screen's database is against its input: ShareGPT, `--turns all`, the default traits.

Two slices of the packaged ShareGPT file, each written as jsonl (the input's bytes are that file's):
- *demo*: the demo's slice (`screener demo`: every 100th of the first 1,200 conversations);
- *2000*: 2,000 conversations after the first 5,000 (records 5,000-6,999).
Each is read as a screen reads it (`datasets.read_samples`, every assistant turn) and written through the
screen's own `Store.write`, one transaction per chunk of 64 samples, with the default traits at their
vectors' chosen layers; the model work is replaced by random scores and token counts of about a quarter of
the characters (the database's size does not depend on their values, and random doubles compress no better
than real ones). The run is then finished (checkpointed), so the .duckdb file alone holds it. Printed: the
input's bytes, the database's, their ratio, the rows, and the bytes of the samples' text as the `samples`
view gives it (what a per-turn copy of each prompt would store). The goal is a database of at most 1.5x
the input (issue 25).

    .venv/bin/python benchmarks/storage.py            # both slices
    .venv/bin/python benchmarks/storage.py --slices demo
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header

from screener.commands.demo import SLICE
from screener.datasets import iter_records, packaged_sharegpt, read_samples
from screener.records import Reject, Sample, Scored
from screener.runs import Run
from screener.store import Store
from screener.vectors import DEFAULT_TRAITS

VECTORS = Path(__file__).resolve().parent.parent / "screener" / "data" / "vectors" / "SmolLM2-135M-Instruct"
CHUNK = 64  # the screen's default on CPU


def default_layers() -> dict[str, int]:
    """Each default trait's chosen layer, from its vector's sidecar (as a default screen reads them)."""
    return {
        t: json.loads((VECTORS / f"{t}_response_avg_diff.json").read_text())["chosen_layer"]
        for t in DEFAULT_TRAITS
    }


def write_slice(name: str, out: Path) -> Path:
    if name == "demo":
        n, every = SLICE
        records = itertools.islice(iter_records(str(packaged_sharegpt())), 0, n * every, every)
    else:
        records = itertools.islice(iter_records(str(packaged_sharegpt())), 5000, 5000 + int(name))
    with out.open("w", encoding="utf-8") as f:
        for _, _, record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out


def fake_scores(samples: list[Sample], layers: list[int], traits: list[str], rng) -> list[Scored]:
    shape = (len(layers), len(traits))
    return [
        Scored(
            s.sample_id,
            s.source_row,
            s.turn,
            prompt_tokens=sum(len(m.get("content") or "") for m in s.prompt) // 4 + 1,
            response_tokens=len(s.response) // 4 + 1,
            truncated=False,
            proj_response=rng.standard_normal(shape),
            proj_prompt_last=rng.standard_normal(shape),
            source_file=s.source_file,
        )
        for s in samples
    ]


def measure(name: str, folder: Path) -> dict:
    data = write_slice(name, folder / f"{name}.jsonl")
    db = folder / f"{name}.duckdb"
    chosen = default_layers()
    traits, layers = list(chosen), sorted(set(chosen.values()))
    run = Run(
        "default", "0" * 64, str(data), "proxy", layers, traits, {"turns": "all", "benchmark": "storage"}
    )
    rng = np.random.default_rng(0)
    started, cpu = time.perf_counter(), time.process_time()
    n_samples = n_records = 0
    with Store(db) as store:
        store.begin_run(run)
        items = read_samples(str(data), turns="all")
        pending: list[Sample] = []
        rejects: list[Reject] = []
        for item in itertools.chain(items, [None]):
            if isinstance(item, Reject):
                rejects.append(item)
                continue
            # a record's turns in one chunk, as the screen keeps them
            boundary = item is None or (
                pending and len(pending) >= CHUNK and item.source_row != pending[-1].source_row
            )
            if boundary and (pending or rejects):
                todo, duplicates = store.pending(run.run_id, pending)
                store.write(
                    run.run_id,
                    layers,
                    traits,
                    fake_scores(todo, layers, traits, rng),
                    rejects + duplicates,
                    samples=todo,
                )
                n_samples += len(todo)
                pending, rejects = [], []
            if item is not None:
                pending.append(item)
        store.finish_run(run.run_id)
    # read as a user's query reads it: the writer's connection is held to the screen's small memory pool,
    # and rebuilding every turn's prompt (the per-turn copy this measures against) needs more
    with Store(db, read_only=True) as reader:
        text = reader.con.execute(
            "SELECT sum(strlen(prompt::VARCHAR) + strlen(response)), count(DISTINCT source_row) FROM samples"
        ).fetchone()
        n_records = text[1]
    wal = Path(f"{db}.wal")
    input_bytes, db_bytes = (
        data.stat().st_size,
        db.stat().st_size + (wal.stat().st_size if wal.exists() else 0),
    )
    return {
        "slice": name,
        "records": n_records,
        "samples": n_samples,
        "input_bytes": input_bytes,
        "db_bytes": db_bytes,
        "ratio": db_bytes / input_bytes,
        "samples_text_chars": int(text[0] or 0),
        "write_cpu_s": time.process_time() - cpu,
        "write_wall_s": time.perf_counter() - started,
        "layers": layers,
        "traits": traits,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", default="demo,2000", help="demo and/or a number of conversations")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    print(header())
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (a shared machine: CPU times given)")
    results = []
    with tempfile.TemporaryDirectory(prefix="storage-bench-") as tmp:
        for name in args.slices.split(","):
            r = measure(name.strip(), Path(tmp))
            results.append(r)
            print(
                f"{r['slice']:>5}: {r['records']:,} conversations, {r['samples']:,} samples (traits "
                f"{', '.join(r['traits'])} at layers {r['layers']}): input {r['input_bytes'] / 1e6:.2f} MB, "
                f"database {r['db_bytes'] / 1e6:.2f} MB = {r['ratio']:.2f}x the input; the samples' "
                f"prompts and responses as the samples view gives them "
                f"{r['samples_text_chars'] / 1e6:.2f}M characters; written in {r['write_cpu_s']:.1f} s CPU"
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
