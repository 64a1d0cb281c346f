"""The screen's driver alone at LMSYS-Chat-1M scale: reading, chunking, the resume lookup and the DuckDB
writes, with the model work replaced by a stage that returns fixed scalars at once.

    python benchmarks/driver.py --records 1000000             # the full figure (tens of minutes)
    python benchmarks/driver.py --records 50000 --profile     # a profile of the driver's time

The data: `--records` synthetic rows in the LMSYS-Chat-1M format (`conversation_id`, `model`,
`conversation` of `{role, content}`, `turn`, `language`, `openai_moderation`, `redacted`), 1-6 turns
(mean about 1.9, as in LMSYS-Chat-1M), user messages of about 70 tokens and answers of about 215 (the
paper's means; lognormal lengths), written once as jsonl under `--work` and reused.

Four screens, each its own process (`screener.screen.screen` as `screener screen` runs it, in-process
worker, `--turns all`, 512-sample chunks as on a GPU):
- full: from scratch. Samples/s overall and sustained (from the first chunk to the end), the driver's
  peak RSS (and its RSS every 10% of the way), CPU time, the database's size against the input's;
- killed: from scratch again, `kill -9` of itself once half the samples have been through the stage;
- resumed: the same command on the killed run's database: its time, and how long it took to reach the
  first sample still to score (skipping the stored half);
- rerun: the same command on the full run's finished database: the time to skip every sample.

The stage (`FixedStage`) lives here only: it is put in place of `screener.screen.ScreenStage` in the
benchmark's own processes, so no product command can reach it. `--profile` runs the full screen under
cProfile and prints where its time went.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402

TURN_SHARES = (0.60, 0.17, 0.09, 0.06, 0.04, 0.04)  # 1..6 turns
USER_CHARS, ASSISTANT_CHARS = 280, 860  # ~70 and ~215 tokens at 4 characters a token
MODELS = ("vicuna-13b", "koala-13b", "alpaca-13b", "chatglm-6b", "llama-13b", "gpt-3.5-turbo")
LANGUAGES = ("English", "Portuguese", "Russian", "Chinese", "Spanish", "German")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the data ---------------------------------------------------------------------------------------


def write_lmsys(path: Path, n: int, seed: int = 0) -> None:
    """`n` LMSYS-Chat-1M-shaped records as jsonl (atomically: a half-written file is never reused)."""
    rng = np.random.default_rng(seed)
    words = ["".join(chr(c) for c in rng.integers(97, 123, size=k)) for k in rng.integers(1, 11, size=20_000)]
    pool = " ".join(rng.choice(words, size=2_000_000))  # ~11 MB to cut messages from
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for start in range(0, n, 10_000):
            size = min(10_000, n - start)
            turns = rng.choice(len(TURN_SHARES), size=size, p=TURN_SHARES) + 1
            total = int(turns.sum())
            user = np.clip(rng.lognormal(np.log(USER_CHARS) - 0.5, 1.0, total), 2, 20_000).astype(int)
            answer = np.clip(rng.lognormal(np.log(ASSISTANT_CHARS) - 0.5, 1.0, total), 2, 40_000).astype(int)
            offsets = rng.integers(0, len(pool) - 41_000, size=(total, 2))
            k = 0
            for i in range(size):
                conversation = []
                for _ in range(turns[i]):
                    (a, b), u, r = offsets[k], user[k], answer[k]
                    conversation.append({"role": "user", "content": pool[a : a + u].strip() or "hi"})
                    conversation.append({"role": "assistant", "content": pool[b : b + r].strip() or "ok"})
                    k += 1
                row = start + i
                record = {
                    "conversation_id": f"{row:08x}{seed:04x}",
                    "model": MODELS[row % len(MODELS)],
                    "conversation": conversation,
                    "turn": int(turns[i]),
                    "language": LANGUAGES[row % len(LANGUAGES)],
                    "openai_moderation": [{"categories": {"harassment": False}, "flagged": False}] * turns[i],
                    "redacted": False,
                }
                f.write(json.dumps(record) + "\n")
    tmp.rename(path)


def model_and_vector(work: Path) -> tuple[Path, Path]:
    """The tests' tiny model and a random vector: `prepare` resolves them; the stage never loads them."""
    import torch
    from tiny import make_tokenizer, random_model, tiny_config

    folder, vector = work / "tiny-llama", work / "vector.pt"
    if not (folder / "config.json").is_file():
        tok = make_tokenizer(folder)
        cfg = tiny_config("llama", len(tok), tok.convert_tokens_to_ids("<|im_end|>"))
        random_model(cfg).save_pretrained(folder)
    if not vector.is_file():
        torch.save(torch.randn(5, 64, generator=torch.Generator().manual_seed(1)), vector)
    return folder, vector


# -- the benchmark-only stage, in the child process ---------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class FixedStage:
    """Stands in for `ScreenStage`: returns fixed scalars for every sample at once. `KILL_AT` samples in,
    it SIGKILLs its own process (the chunk in hand is never committed), as a `kill -9` mid-run."""

    KILL_AT: int | None = None
    EXPECTED = 0  # samples the run will score, for the RSS samples every 10%
    seen = 0
    first: float | None = None
    rss: list = []  # noqa: RUF012 (one process, one screen)

    def __init__(self, plan):
        self.shape = (len(plan.run.layers), len(plan.run.traits))

    def setup(self) -> None:
        pass

    def process(self, chunk, report=None):
        from screener.records import Scored

        cls = FixedStage
        if cls.first is None:
            cls.first = time.perf_counter()
        if cls.KILL_AT is not None and cls.seen + len(chunk.samples) > cls.KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        step = max(1, cls.EXPECTED // 10)
        if (cls.seen + len(chunk.samples)) // step > cls.seen // step:  # (samples, RSS, peak RSS so far)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            cls.rss.append((cls.seen + len(chunk.samples), round(rss_mb()), round(peak)))
        cls.seen += len(chunk.samples)
        proj = np.full(self.shape, 0.5)
        results = [
            Scored(s.sample_id, s.source_row, s.turn, 100, 200, False, proj, proj, source_file=s.source_file)
            for s in chunk.samples
        ]
        if report is not None:
            report(len(results))
        return results, {"model_seconds": {}}


def child(args) -> None:
    """One screen with `FixedStage`; prints its figures as JSON on the last line of stdout."""
    import importlib

    screen_module = importlib.import_module(
        "screener.screen"
    )  # the module: `screener.screen` is also a function

    FixedStage.KILL_AT, FixedStage.EXPECTED = args.kill_at, args.expected
    screen_module.ScreenStage = FixedStage  # this process only
    if args.duckdb:  # the writer's DuckDB settings, in place of the product's
        import screener.store

        settings = screener.store.WRITER_CONFIG | dict(kv.split("=", 1) for kv in args.duckdb)
        screener.store.WRITER_CONFIG = {k: v for k, v in settings.items() if v != "default"}
    cfg = screen_module.ScreenConfig(
        dataset=str(args.data), db=str(args.db), model=str(args.model), vectors=[f"a={args.vector}"],
        layers=[2], dtype="float32", device="cpu", actors=0, turns="all", chunk_size=args.chunk_size,
        progress=False,
    )  # fmt: skip
    t, cpu = time.perf_counter(), time.process_time()
    # CPU time, not wall time: on a shared machine the wall clock mostly measures the others
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    if profiler:
        profiler.enable()
    summary = screen_module.screen(cfg)
    if profiler:
        profiler.disable()
        profiler.dump_stats(str(args.profile))
    end = time.perf_counter()
    out = {
        "seconds": end - t,
        "cpu_seconds": time.process_time() - cpu,
        "scored": summary.scored,
        "total_scored": summary.total_scored,
        "resumed": summary.resumed,
        # from the first chunk through the stage to the end: the driver's sustained rate
        "to_first_chunk_s": None if FixedStage.first is None else FixedStage.first - t,
        "sustained_s": None if FixedStage.first is None else end - FixedStage.first,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_mb_along": FixedStage.rss,
        "summary": summary.lines()[:3],
    }
    print(json.dumps(out))


# -- the parent: four screens ---------------------------------------------------------------------------


def run_child(args, db: Path, expected: int, kill_at: int | None = None, profile: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--data", str(args.data), "--db", str(db),
           "--model", str(args.model), "--vector", str(args.vector), "--chunk-size", str(args.chunk_size),
           "--expected", str(expected)]  # fmt: skip
    if kill_at is not None:
        cmd += ["--kill-at", str(kill_at)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    if args.duckdb:
        cmd += ["--duckdb", *args.duckdb]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if kill_at is not None:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        return {"seconds": wall, "killed": True}
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"wall_s": wall}


def db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}.wal")) if p.exists())


def stored_samples(db: Path) -> int:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT count(*) FROM samples").fetchone()[0]


def count_samples(data: Path) -> int:
    """Assistant turns in the file: what the full screen will score."""
    n = 0
    with data.open() as f:
        for line in f:
            n += json.loads(line)["turn"]
    return n


def top_of_profile(path: Path, n: int = 25) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(n)
    stats.sort_stats("cumulative").print_stats(n)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/driver-bench"))
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--phases", nargs="+", default=["full", "killed", "resumed", "rerun"])
    p.add_argument("--profile", nargs="?", const=True, default=None, help="cProfile the full screen")
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--duckdb",
        nargs="+",
        metavar="NAME=VALUE",
        help="the screen's DuckDB settings in place of the product's (screener.store.WRITER_CONFIG), "
        "e.g. memory_limit=512MB checkpoint_threshold=default ('default': DuckDB's own)",
    )
    # the child's own arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--data", "--db", "--model", "--vector"):
        p.add_argument(name, type=Path, help=argparse.SUPPRESS)
    p.add_argument("--kill-at", type=int, help=argparse.SUPPRESS)
    p.add_argument("--expected", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    from machine import header

    print(header(), flush=True)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    args.work.mkdir(parents=True, exist_ok=True)
    args.data = args.work / f"lmsys-{args.records}.jsonl"
    if not args.data.is_file():
        log(f"writing {args.records:,} records to {args.data}")
        write_lmsys(args.data, args.records)
    args.model, args.vector = model_and_vector(args.work)
    expected = count_samples(args.data)
    input_bytes = args.data.stat().st_size
    print(f"input: {args.records:,} records, {expected:,} assistant turns, {input_bytes / 2**20:,.1f} MiB")
    report: dict = {"records": args.records, "samples": expected, "input_bytes": input_bytes, "load": load}
    full_db, killed_db = args.work / "full.duckdb", args.work / "killed.duckdb"
    profile = args.work / "driver.prof" if args.profile else None
    if "full" in args.phases:
        for f in (full_db, Path(f"{full_db}.wal")):
            f.unlink(missing_ok=True)
        log("full screen")
        r = run_child(args, full_db, expected, profile=profile)
        r["db_bytes"] = db_bytes(full_db)
        report["full"] = r
        overall, sustained = r["scored"] / r["seconds"], r["scored"] / r["sustained_s"]
        size = r["db_bytes"]
        print(
            f"full: {r['scored']:,} samples in {r['seconds']:.1f} s ({overall:,.0f}/s overall, "
            f"{sustained:,.0f}/s sustained after {r['to_first_chunk_s']:.1f} s to the first chunk), "
            f"CPU {r['cpu_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:,.0f} MB "
            f"((samples done, RSS, peak so far): {r['rss_mb_along']}), database {size / 2**20:,.1f} MiB = "
            f"{size / input_bytes:.2f}x the input"
        )
        if profile:
            print(top_of_profile(profile))
    if "killed" in args.phases:
        for f in (killed_db, Path(f"{killed_db}.wal")):
            f.unlink(missing_ok=True)
        log("screen killed at 50%")
        r = run_child(args, killed_db, expected, kill_at=expected // 2)
        r["committed"] = stored_samples(killed_db)
        report["killed"] = r
        print(f"killed: kill -9 after {r['seconds']:.1f} s with {r['committed']:,} samples committed")
    if "resumed" in args.phases:
        log("resumed screen")
        r = run_child(args, killed_db, expected)
        r["db_bytes"] = db_bytes(killed_db)
        report["resumed"] = r
        print(
            f"resumed: {r['scored']:,} more samples in {r['seconds']:.1f} s, {r['to_first_chunk_s']:.1f} s "
            f"to the first sample still to score, peak RSS {r['peak_rss_mb']:,.0f} MB, "
            f"run total {r['total_scored']:,}"
        )
    if "rerun" in args.phases:
        log("rerun of the finished screen")
        r = run_child(args, full_db, expected)
        report["rerun"] = r
        print(
            f"rerun of the finished run: {r['scored']} scored, every sample skipped in {r['seconds']:.1f} s "
            f"(CPU {r['cpu_seconds']:.1f} s), peak RSS {r['peak_rss_mb']:,.0f} MB"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
