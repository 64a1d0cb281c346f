"""Does the ranking pick the samples that shift a model? The persona-vectors paper's sample-level experiment
(its §6.3: the top, a random and the bottom 500 samples of LMSYS-Chat-1M by ΔP, each fine-tuned on, shift
the trait in that order), small, on SmolLM2 and real ShareGPT chat.

    python benchmarks/subset_validation.py --pool 400 --k 32 --json subset.json    # ~40 min on 2 cores
    python benchmarks/subset_validation.py --pool 40 --k 4 --metrics proxy          # a quick check

1. Pool. `--pool` N single-turn conversations of the packaged ShareGPT file from record `--start` (default
   5,000: the first 5,000 are kept for independent checks) on: one English user message and a whole answer
   of at least 40 tokens that fits the token budget (benchmarks/shift_validation.py's filter). The budget is
   `--max-tokens` (default 256; shift_validation's recipe otherwise): the file holds only 89 such
   conversations within 128 tokens after record 5,000, 435 within 256.
2. Rank. `screener.screen.screen` screens the pool with the vectors (proxy mode: `delta_p_proxy`, or
   `proj_response` alone with `--metrics response`; natural mode: the natural `delta_p`, the model
   answering each prompt itself, as the paper ranks), each trait read at its vector's chosen layer.
3. Subsets. Per trait and metric, the top k and the bottom k samples; `--random-draws` seeded random k for
   all (several: how far two sets of k differ with no ranking at all is the noise the ordering must beat;
   the standard error of one set's shift covers only its evaluation prompts).
4. Fine-tune and measure. shift_validation's one recipe (LoRA, plain AdamW, 2 epochs, fp32) on each
   distinct subset, then `screener.shift.measure`: the shift at the last prompt token over the trait's 20
   evaluation questions, at the vector's layer.
5. Report. Per trait and metric: top, random, bottom shifts ± standard error (random: the draws' mean ±
   their standard deviation), whether top > random > bottom, top − bottom in combined standard errors (the
   target: ≥ 2) and in the draws' spread (√2 · their sd). `--json` writes everything, every trait's shift
   and the training loss of every subset among it (`benchmarks/subset_features.py` reads them beside the
   kept DuckDB).

`--match response_tokens` (or `prompt_tokens`) adds a designed version of the experiment, sets that differ in
their ranking and not in that length: the pool sorted by it is cut into k strata of consecutive samples, and
the matched top takes each stratum's highest-ranked sample, the matched bottom its lowest, and each matched
random draw one seeded random sample of each stratum, so all three hold the same spread of lengths. It is
reported in rows of its own beside the unmatched ones.

A `--work-dir` keeps each adapter with the ids and recipe it was trained on: a rerun there (more draws, say)
fine-tunes only the sets it has not trained, and the screens resume from the kept DuckDB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import torch

# this checkout's screener, whichever one the environment has installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import header  # benchmarks/, this script's folder
from shift_validation import Recipe, TrainingSet, fine_tune, machine, progress, sharegpt_pool, write_set

from screener.models import DEFAULT_MODEL, load_tokenizer, resolve_model
from screener.scoring import GenerationSettings
from screener.screen import ScreenConfig, screen
from screener.shift import ShiftConfig, measure
from screener.vectors import builtin_vector_path, load_vector

TRAITS = ("evil", "hallucinating")
METRICS = {"proxy": "delta_p_proxy", "natural": "delta_p", "response": "proj_response"}
# the screen each metric comes from: "response" is the proxy's first term alone, without the prompt's
MODE = {"proxy": "proxy", "natural": "natural", "response": "proxy"}
MATCH = ("response_tokens", "prompt_tokens")


def vector_specs(folder: Path | None, model_name: str) -> tuple[list[str], dict[str, int]]:
    """`NAME=PATH` for each trait's vector (in `folder`, else the built-in one) and its chosen layer."""
    specs, layers = [], {}
    for t in TRAITS:
        path = folder / f"{t}_response_avg_diff.pt" if folder else builtin_vector_path(model_name, t)
        vec = load_vector(path, t)
        if vec.default_layer is None:
            sys.exit(f"{path}: no chosen layer in its sidecar")
        specs.append(f"{t}={path}")
        layers[t] = vec.default_layer
    return specs, layers


def scores(db: str, run_id: str, metric: str, layers: dict[str, int]) -> dict[str, dict[str, float]]:
    """`{trait: {sample_id: value}}` at each trait's layer; NULL values (an empty natural answer) left out."""
    with duckdb.connect(db, read_only=True) as con:
        rows = con.execute(
            f"SELECT trait, layer, sample_id, {metric} FROM scores WHERE run_id = ? AND {metric} IS NOT NULL",
            [run_id],
        ).fetchall()
    out: dict[str, dict[str, float]] = {t: {} for t in TRAITS}
    for trait, layer, sample_id, value in rows:
        if layers.get(trait) == layer:
            out[trait][sample_id] = value
    return out


def ends(values: dict[str, float], k: int) -> tuple[list[str], list[str]]:
    """The top k and bottom k sample ids, ties broken by id (deterministic)."""
    order = sorted(values, key=lambda s: (-values[s], s))
    return order[:k], order[-k:][::-1]


def random_names(draws: int, prefix: str = "random") -> list[str]:
    """The random subsets' names: "random" (the first, as before draws existed), then "random-2"..."""
    return [prefix] + [f"{prefix}-{i + 1}" for i in range(1, draws)]


def strata(column: dict[str, float], k: int) -> list[list[str]]:
    """The sample ids sorted by `column` (ties by id) and cut into k strata of consecutive samples, their
    sizes differing by at most one."""
    if len(column) < 2 * k:
        raise ValueError(f"matching needs a pool of at least 2k = {2 * k} samples, not {len(column)}")
    order = sorted(column, key=lambda s: (column[s], s))
    return [list(part) for part in np.array_split(np.array(order, dtype=object), k)]


def matched_ends(values: dict[str, float], groups: list[list[str]]) -> tuple[list[str], list[str]]:
    """Each stratum's highest-ranked and lowest-ranked sample (ties by id): a top and a bottom set of one
    sample a stratum, so both hold the strata's spread of the matched column."""
    ranked = [sorted((s for s in g if s in values), key=lambda s: (-values[s], s)) for g in groups]
    if any(len(r) < 2 for r in ranked):
        raise ValueError("a stratum holds fewer than two ranked samples")
    return [r[0] for r in ranked], [r[-1] for r in ranked]


def matched_random(groups: list[list[str]], seed: int) -> list[str]:
    """One seeded random sample of each stratum."""
    rng = random.Random(seed)
    return [rng.choice(sorted(g)) for g in groups]


def turn_column(db: str, run_id: str, column: str) -> dict[str, float]:
    """`{sample_id: value}` of a per-sample column of the run's turns (its token counts)."""
    with duckdb.connect(db, read_only=True) as con:
        rows = con.execute(f"SELECT sample_id, {column} FROM turns WHERE run_id = ?", [run_id]).fetchall()
    return {sid: float(v) for sid, v in rows}


def random_shift(shifts: list[float], stderr_of_one: float) -> tuple[float, float]:
    """The random draws' mean shift and the spread of one draw about it (their sd); one draw: its own se."""
    if len(shifts) == 1:
        return shifts[0], stderr_of_one
    return float(np.mean(shifts)), float(np.std(shifts, ddof=1))


def order_figures(
    top: tuple[float, float], rnd: tuple[float, float], bottom: tuple[float, float], draws: int
) -> dict:
    """Whether top > random > bottom, and (top − bottom) in the ends' combined error (`z`) and in √2
    spreads of the random draws (`z_draws`; none with one draw). Each argument is (shift, its error;
    random: the draws' spread)."""
    gap = top[0] - bottom[0]
    return {
        "ordered": bool(top[0] > rnd[0] > bottom[0]),
        "z": gap / float(np.hypot(top[1], bottom[1])),
        "z_draws": gap / (np.sqrt(2) * rnd[1]) if draws > 1 else None,
    }


def adapter_key(ts: TrainingSet, base_path: str, recipe: Recipe, dtype: torch.dtype) -> dict:
    """What an adapter was trained from: its samples in order, the recipe, the dtype and the base model."""
    samples = [f"{s.source_row}:{s.sample_id}" for s in ts.samples]
    return {"samples": samples, "recipe": asdict(recipe), "dtype": str(dtype), "base": base_path}


def trained(ts: TrainingSet, base_path: str, out: Path, recipe: Recipe, dtype: torch.dtype) -> Path:
    """`fine_tune`, or the adapter a kept work dir already holds for exactly these samples and recipe."""
    key = adapter_key(ts, base_path, recipe, dtype)
    manifest = out / ts.name / "subset.json"
    if manifest.exists():
        kept = json.loads(manifest.read_text())
        if kept["key"] == key:
            ts.loss = tuple(kept["loss"])
            return manifest.parent
    folder = fine_tune(ts, base_path, out, recipe, dtype)
    manifest.write_text(json.dumps({"key": key, "loss": list(ts.loss)}, indent=1) + "\n")
    return folder


def adapter_shifts(
    adapter: Path, db: str, specs: list[str], dtype: str, layers: dict[str, int]
) -> dict[str, tuple[float, float]]:
    """`screener.shift.measure` of an adapter against the default model: `{trait: (shift, stderr)}` at the
    last prompt token, each trait at its vector's layer."""
    cfg = ShiftConfig(DEFAULT_MODEL, str(adapter), db=db, vectors=specs, dtype=dtype, device="cpu", actors=0)
    return {
        s.trait: (s.shift, s.stderr)
        for s in measure(cfg).shifts
        if s.measure == "prompt_last" and s.layer == layers.get(s.trait)
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", type=int, default=200, help="conversations screened (N)")
    p.add_argument("--k", type=int, default=16, help="samples per subset")
    p.add_argument("--start", type=int, default=5000, help="first record of the packaged ShareGPT file")
    p.add_argument("--metrics", default="proxy,natural", help="rank by: proxy,natural,response")
    p.add_argument("--natural-tokens", type=int, default=64, help="length of the natural answers")
    p.add_argument("--vectors", type=Path, help="folder with <trait>_response_avg_diff.pt (default built-in)")
    p.add_argument("--max-tokens", type=int, default=256, help="prompt + response budget of the pool")
    p.add_argument("--dtype", default="float32", choices=("float32", "auto", "bfloat16"))
    p.add_argument(
        "--screen-dtype",
        choices=("float32", "auto", "bfloat16"),
        help="the pool's ranking screens only (default: --dtype); fine-tunes and shifts keep --dtype",
    )
    p.add_argument("--random-draws", type=int, default=4, help="random subsets (seeds recipe.seed + i)")
    p.add_argument(
        "--match",
        choices=MATCH,
        help="also fine-tune top, bottom and random sets matched on this column (one sample a stratum)",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--work-dir", type=Path, help="keep the pool, subsets, adapters and DuckDB here")
    args = p.parse_args(argv)
    screen_dtype = args.screen_dtype or args.dtype
    if args.random_draws < 1:
        sys.exit("--random-draws: at least 1")
    if args.start < 5000:
        sys.exit("--start: the packaged ShareGPT file's first 5,000 records are kept for independent checks")
    metrics = [m for m in args.metrics.split(",") if m]
    if unknown := set(metrics) - set(METRICS):
        sys.exit(f"--metrics: unknown {sorted(unknown)}; choose from {', '.join(METRICS)}")
    recipe = dataclasses.replace(Recipe(), max_tokens=args.max_tokens)
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    started, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    m = machine()
    print(f"{header()}; load avg {m['load_average']:.1f}", flush=True)
    print(
        f"recipe: {json.dumps(asdict(recipe))}; pool {args.pool}, k {args.k}, ranked by {metrics}; "
        f"dtype {args.dtype}, screens {screen_dtype}",
        flush=True,
    )

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="subset-validation-"))
    work.mkdir(parents=True, exist_ok=True)
    db = str(work / "subsets.duckdb")
    results: dict = {}
    try:
        base = resolve_model(DEFAULT_MODEL)
        specs, layers = vector_specs(args.vectors, base.name)
        tok = load_tokenizer(base.path)
        pool = sharegpt_pool(tok, args.pool, recipe.max_tokens, start=args.start, single_turn=True)
        pool_set = TrainingSet("pool", f"{len(pool)} single-turn ShareGPT conversations", pool)
        write_set(pool_set, work / "sets")
        by_id = {f"pool-{i}": s for i, s in enumerate(pool)}  # write_set's record ids
        progress(
            f"pool: {len(pool)} conversations from row {pool[0].source_row} to {pool[-1].source_row}", started
        )

        common = {"db": db, "vectors": specs, "max_tokens": recipe.max_tokens, "dtype": screen_dtype}
        common |= {"device": "cpu", "actors": 0, "progress": False, "turns": "last"}
        ranked: dict[str, dict[str, dict[str, float]]] = {}
        run_ids: dict[str, str] = {}
        for metric in metrics:
            t = time.perf_counter()
            gen = GenerationSettings(max_new_tokens=args.natural_tokens)
            summary = screen(ScreenConfig(pool_set.path, mode=MODE[metric], generation=gen, **common))
            ranked[metric] = scores(db, summary.run_id, METRICS[metric], layers)
            run_ids[metric] = summary.run_id
            progress(
                f"screen ({metric}): {summary.total_scored} samples in {time.perf_counter() - t:.0f} s",
                started,
            )

        subsets: dict[str, list[str]] = {}  # name -> sample ids
        draws = random_names(args.random_draws)
        for i, name in enumerate(draws):
            subsets[name] = sorted(random.Random(recipe.seed + i).sample(sorted(by_id), args.k))
        # each design: (its row label, its random draws' names, its top and bottom set names)
        designs = [("", draws, "{trait}_{metric}_{end}")]
        for metric in metrics:
            for trait in TRAITS:
                top, bottom = ends(ranked[metric][trait], args.k)
                subsets[f"{trait}_{metric}_top"], subsets[f"{trait}_{metric}_bottom"] = top, bottom
        if args.match:
            groups = strata(turn_column(db, run_ids[metrics[0]], args.match), args.k)
            matched_draws = random_names(args.random_draws, f"random_by_{args.match}")
            for i, name in enumerate(matched_draws):
                subsets[name] = sorted(matched_random(groups, recipe.seed + i))
            for metric in metrics:
                for trait in TRAITS:
                    top, bottom = matched_ends(ranked[metric][trait], groups)
                    subsets[f"{trait}_{metric}_top_by_{args.match}"] = top
                    subsets[f"{trait}_{metric}_bottom_by_{args.match}"] = bottom
            designs.append(
                (f", matched on {args.match}", matched_draws, "{trait}_{metric}_{end}_by_" + args.match)
            )
        distinct: dict[tuple[str, ...], str] = {}  # the same samples are fine-tuned on once
        for name, ids in subsets.items():
            distinct.setdefault(tuple(sorted(ids)), name)
        progress(f"{len(subsets)} subsets of {args.k}, {len(distinct)} distinct fine-tunes", started)

        measured: dict[str, dict[str, tuple[float, float]]] = {}
        losses: dict[str, tuple[float, float]] = {}  # training loss, first and last epoch
        for ids, name in distinct.items():
            ts = TrainingSet(name, f"{args.k} samples", [by_id[i] for i in ids])
            write_set(ts, work / "sets")
            t = time.perf_counter()
            adapter = trained(ts, base.path, work / "adapters", recipe, dtype)
            measured[name] = adapter_shifts(adapter, db, specs, args.dtype, layers)
            losses[name] = ts.loss
            got = ", ".join(f"{tr} {v[0]:+.3f} ± {v[1]:.3f}" for tr, v in measured[name].items())
            progress(
                f"{name}: loss {ts.loss[0]:.3f} -> {ts.loss[1]:.3f}; shift {got} "
                f"({time.perf_counter() - t:.0f} s)",
                started,
            )
        for name, ids in subsets.items():
            trained_as = distinct[tuple(sorted(ids))]
            measured[name], losses[name] = measured[trained_as], losses[trained_as]

        print()
        draw_label = f"random {args.k}" + (f" ({len(draws)} draws: mean ± sd)" if len(draws) > 1 else "")
        lines = [
            f"| trait (layer) | ranked by | top {args.k} | {draw_label} | bottom {args.k} "
            "| top > random > bottom | (top − bottom) / combined se | (top − bottom) / (√2 · draws' sd) |",
            "|---|---|---:|---:|---:|---|---:|---:|",
        ]
        for label, names, pattern in designs:
            for trait in TRAITS:
                rnd = random_shift([measured[n][trait][0] for n in names], measured[names[0]][trait][1])
                for metric in metrics:
                    set_names = {
                        end: pattern.format(trait=trait, metric=metric, end=end) for end in ("top", "bottom")
                    }
                    top, bot = (measured[set_names[end]][trait] for end in ("top", "bottom"))
                    fig = order_figures(top, rnd, bot, len(names))
                    ordered, z, z_draws = fig["ordered"], fig["z"], fig["z_draws"]
                    results[f"{trait}/{metric}" + (f"/{args.match}" if label else "")] = {
                        "top": top,
                        "random": rnd,
                        "random_draws": [measured[n][trait] for n in names],
                        "bottom": bot,
                        **fig,
                        "sets": {"top": set_names["top"], "bottom": set_names["bottom"], "random": names},
                    }
                    lines.append(
                        f"| {trait} ({layers[trait]}) | {METRICS[metric]}{label} | "
                        f"{top[0]:+.2f} ± {top[1]:.2f} | {rnd[0]:+.2f} ± {rnd[1]:.2f} | "
                        f"{bot[0]:+.2f} ± {bot[1]:.2f} | "
                        f"{'yes' if ordered else 'no'} | {z:.1f} | "
                        f"{'n/a' if z_draws is None else f'{z_draws:.1f}'} |"
                    )
        print("\n".join(lines))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    wall = time.perf_counter() - started
    print(
        f"\nwall time {wall / 60:.1f} min; CPU time {cpu / 60:.1f} min; "
        f"load average at the end {os.getloadavg()[0]:.1f}"
    )
    if args.json:
        payload = {
            "results": results,
            "subsets": subsets,
            # every trait's shift for every subset (results holds each trait's own ranking's sets only)
            "shifts": measured,
            "losses": losses,
            "layers": layers,
            "vectors": specs,
            "pool": args.pool,
            "k": args.k,
            "match": args.match,
            "start": args.start,
            "recipe": asdict(recipe),
            "dtype": args.dtype,
            "screen_dtype": screen_dtype,
            "machine": m,
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
