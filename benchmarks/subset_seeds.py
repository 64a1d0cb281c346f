"""How much of a subset's shift is its samples, and how much the training's own path? Fine-tunes named sets
of a kept `subset_validation.py` work dir again with other recipe seeds (the seed sets the LoRA
initialisation and the order the samples are drawn in; the samples, the rest of the recipe and the
measurement stay) and measures each, beside the run's seed-0 shift.

    python benchmarks/subset_seeds.py WORK_DIR run.json --sets random,evil_proxy_top --seeds 1,2,3

If the seeds' spread for one set is near the spread between random sets, a set's shift is mostly its
training path, and no per-sample score can rank sets much better than that spread allows. Where the named
sets hold a ranking's top, bottom and random draws (the run's results), the ordering is judged again on
each set's mean over the seeds (`seed_ordering`). Adapters are kept in `WORK_DIR/adapters-seed<S>/` (a
rerun measures what it has already trained).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

# this checkout's screener, whichever one the environment has installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import header  # benchmarks/, this script's folder
from shift_validation import Recipe, TrainingSet, progress, read_file
from subset_validation import adapter_shifts, order_figures, random_shift, trained

from screener.models import DEFAULT_MODEL, resolve_model


def seed_ordering(by_seed: dict[str, list[float]], top: str, bottom: str, draws: list[str]) -> dict:
    """The subset experiment's ordering on each set's mean shift over recipe seeds.

    A set's error is its seeds' sd / √seeds; the random level is the draws' mean, its spread the sd of the
    draws' means (composition and the remaining path noise together) and its error that spread / √draws.
    `z` is (top − bottom) in the ends' combined error, `z_draws` in √2 draw spreads (as
    subset_validation.py reports them); `z_top_random` and `z_random_bottom` size each step of the order.
    """
    if len(draws) < 2:
        raise ValueError("the random level needs at least two draws")
    if any(len(by_seed[n]) < 2 for n in (top, bottom, *draws)):
        raise ValueError("every set needs at least two seeds")

    def mean_se(name: str) -> tuple[float, float]:
        v = np.asarray(by_seed[name], dtype=float)
        return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))

    (t, t_se), (b, b_se) = mean_se(top), mean_se(bottom)
    draw_means = [mean_se(n)[0] for n in draws]
    r, spread = random_shift(draw_means, 0.0)  # two draws or more: their mean and sd
    r_se = spread / np.sqrt(len(draws))
    return {
        "top": [t, t_se],
        "random": [r, spread],
        "random_draws": draw_means,
        "bottom": [b, b_se],
        **order_figures((t, t_se), (r, spread), (b, b_se), len(draws)),
        "z_top_random": (t - r) / float(np.hypot(t_se, r_se)),
        "z_random_bottom": (r - b) / float(np.hypot(r_se, b_se)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work_dir", type=Path, help="a kept subset_validation.py --work-dir")
    p.add_argument("run", type=Path, help="that run's --json (its recipe, vectors, layers and seed-0 shifts)")
    p.add_argument("--sets", required=True, help="comma-separated subset names of the run")
    p.add_argument("--seeds", default="1,2,3", help="recipe seeds to train with besides the run's")
    p.add_argument("--json", type=Path, help="write every set's shifts by seed here")
    args = p.parse_args(argv)
    started = time.perf_counter()
    print(header(), flush=True)
    run = json.loads(args.run.read_text())
    layers: dict[str, int] = run["layers"]
    recipe0 = Recipe(**run["recipe"])
    dtype = torch.float32 if run["dtype"] == "float32" else torch.bfloat16
    seeds = [int(s) for s in args.seeds.split(",") if s]
    names = [n for n in args.sets.split(",") if n]
    if unknown := [n for n in names if n not in run["shifts"]]:
        sys.exit(f"--sets: {unknown} are not subsets of {args.run}")
    if recipe0.seed in seeds:
        sys.exit(f"--seeds: {recipe0.seed} is the run's own seed")
    base = resolve_model(DEFAULT_MODEL)
    db = str(args.work_dir / "subsets.duckdb")

    by_set: dict[str, dict[int, dict[str, float]]] = {}
    for name in names:
        samples = read_file(args.work_dir / "sets" / f"{name}.jsonl")
        by_set[name] = {recipe0.seed: {t: v[0] for t, v in run["shifts"][name].items()}}
        for seed in seeds:
            recipe = dataclasses.replace(recipe0, seed=seed)
            ts = TrainingSet(name, f"{len(samples)} samples, recipe seed {seed}", samples)
            t = time.perf_counter()
            adapter = trained(ts, base.path, args.work_dir / f"adapters-seed{seed}", recipe, dtype)
            shifts = adapter_shifts(adapter, db, run["vectors"], run["dtype"], layers)
            by_set[name][seed] = {trait: shift for trait, (shift, _) in shifts.items()}
            got = ", ".join(f"{tr} {v:+.3f}" for tr, v in by_set[name][seed].items())
            progress(f"{name}, seed {seed}: {got} ({time.perf_counter() - t:.0f} s)", started)

    all_seeds = [recipe0.seed, *seeds]
    print(f"\n| set | trait | {' | '.join(f'seed {s}' for s in all_seeds)} | mean | sd over seeds |")
    print("|---|---|" + "---:|" * (len(all_seeds) + 2))
    summary: dict = {}
    for name in names:
        for trait in layers:
            values = np.array([by_set[name][s][trait] for s in all_seeds])
            summary.setdefault(name, {})[trait] = {
                "by_seed": values.tolist(),
                "sd": float(np.std(values, ddof=1)),
            }
            cells = " | ".join(f"{v:+.2f}" for v in values)
            print(f"| {name} | {trait} | {cells} | {values.mean():+.2f} | {np.std(values, ddof=1):.2f} |")
    orderings: dict = {}
    for key, result in run.get("results", {}).items():
        trait, sets = key.split("/")[0], result["sets"]
        if not {sets["top"], sets["bottom"], *sets["random"]} <= set(names) or len(sets["random"]) < 2:
            continue
        by_seed = {n: summary[n][trait]["by_seed"] for n in names}
        orderings[key] = seed_ordering(by_seed, sets["top"], sets["bottom"], sets["random"])
    if orderings:
        n = len(all_seeds)
        print(
            f"\nEach set's mean over {n} seeds (± its seeds' sd / √{n}; random: the draws' mean ± their sd):"
        )
        print(
            "| trait/ranked by | top | random | bottom | top > random > bottom | (top − bottom) / se "
            "| (top − bottom) / (√2 · draws' sd) | (top − random) / se | (random − bottom) / se |"
        )
        print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
        for key, o in orderings.items():
            cells = " | ".join(f"{o[e][0]:+.2f} ± {o[e][1]:.2f}" for e in ("top", "random", "bottom"))
            print(
                f"| {key} | {cells} | {'yes' if o['ordered'] else 'no'} | {o['z']:.1f} | {o['z_draws']:.1f} "
                f"| {o['z_top_random']:.1f} | {o['z_random_bottom']:.1f} |"
            )
    print(f"\nwall time {(time.perf_counter() - started) / 60:.1f} min")
    if args.json:
        payload = {"machine": header(), "seeds": all_seeds, "layers": layers, "sets": summary}
        payload["orderings"] = orderings
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
