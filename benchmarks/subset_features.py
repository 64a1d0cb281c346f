"""Which property of a fine-tuned subset tracks the shift it produced? For every subset that
`subset_validation.py` fine-tuned on (random draws, tops and bottoms, from one or more of its `--json`
files), the mean over its samples of each per-sample value the screen stored (each trait's projections and
ΔPs at its vector's layer, and the token counts) and its training loss, then, per trait, the Pearson and
Spearman correlation of those set values with the measured shifts.

    python benchmarks/subset_features.py WORK_DIR/subsets.duckdb run1.json [run2.json ...]
    python benchmarks/subset_features.py WORK_DIR/subsets.duckdb run.json --pool WORK_DIR/sets/pool.jsonl

`--pool` (the work dir's pool file) adds what the answers' text holds, as shares of a set: answers with a
code block, with a list, apologies or AI disclaimers ("I'm sorry", "As an AI"), their length in characters
and their share of non-ASCII characters.

The DuckDB is a kept `--work-dir`'s; a natural-mode run in it gives every column (the proxy's too). The
JSON files must rank the same pool (same `--pool`, `--start`, `--max-tokens`): the sample ids are the pool's.
A set's shift for a trait comes from the file's `shifts` (every trait, every subset) where it has them, else
from its `results` (each trait's own ranking's sets and the random draws only).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import duckdb
import numpy as np

COLUMNS = ("proj_response", "proj_prompt_last", "delta_p_proxy", "delta_p", "proj_natural")
SHORT = {"proj_response": "resp", "proj_prompt_last": "last", "delta_p_proxy": "proxy", "delta_p": "dP",
         "proj_natural": "nat"}  # fmt: skip
TOKENS = ("prompt_tokens", "response_tokens", "natural_tokens")


def sample_values(db: str, layers: dict[str, int]) -> dict[str, dict[str, float]]:
    """`{sample_id: {feature: value}}` from the database's natural-mode run (else its latest run)."""
    with duckdb.connect(db, read_only=True) as con:
        run = con.execute(
            "SELECT run_id FROM runs ORDER BY mode = 'natural' DESC, started_at DESC LIMIT 1"
        ).fetchone()
        if run is None:
            sys.exit(f"{db}: no runs")
        values: dict[str, dict[str, float]] = {}
        for trait, layer in layers.items():
            rows = con.execute(
                f"SELECT sample_id, {', '.join(COLUMNS)}, {', '.join(TOKENS)} FROM scores "
                "JOIN turns USING (run_id, sample_id) WHERE run_id = ? AND trait = ? AND layer = ?",
                [run[0], trait, layer],
            ).fetchall()
            for sid, *got in rows:
                row = values.setdefault(sid, {})
                scalars, tokens = got[: len(COLUMNS)], got[len(COLUMNS) :]
                row.update({f"{trait}:{SHORT[c]}": v for c, v in zip(COLUMNS, scalars, strict=True)})
                row.update(
                    {t.removesuffix("_tokens") + "_tok": v for t, v in zip(TOKENS, tokens, strict=True)}
                )
    return values


def set_shifts(files: list[Path]) -> tuple[dict, dict[str, dict[str, float]], dict[str, int], dict]:
    """Each subset's sample ids, its shift per trait, the traits' layers and each subset's training loss
    (first and last epoch, where the file has them), over all `files`."""
    ids: dict[str, list[str]] = {}
    shifts: dict[str, dict[str, float]] = {}
    layers: dict[str, int] = {}
    losses: dict[str, list[float]] = {}
    for f in files:
        d = json.loads(f.read_text())
        layers |= d["layers"]
        ids |= d["subsets"]
        losses |= d.get("losses", {})
        for name, by_trait in d.get("shifts", {}).items():
            shifts.setdefault(name, {}).update({t: v[0] for t, v in by_trait.items()})
        for key, r in d["results"].items():
            trait, metric = key.split("/")[:2]
            # files from before the matched design name no sets: their only draws are "random", "random-2"...
            sets = r.get("sets") or {
                "top": f"{trait}_{metric}_top",
                "bottom": f"{trait}_{metric}_bottom",
                "random": [n for n in d["subsets"] if n.startswith("random")],
            }
            for end in ("top", "bottom"):
                shifts.setdefault(sets[end], {}).setdefault(trait, r[end][0])
            for name, (shift, _) in zip(sets["random"], r["random_draws"], strict=True):
                shifts.setdefault(name, {}).setdefault(trait, shift)
    return ids, shifts, layers, losses


LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s", re.MULTILINE)
DISCLAIMER = re.compile(r"\b(?:I'm sorry|I am sorry|I apologi[sz]e|as an AI|language model)\b", re.IGNORECASE)


def text_values(pool: Path) -> dict[str, dict[str, float]]:
    """`{sample_id: {feature: value}}` from the answers of a pool file (`write_set`'s single-turn records:
    the screen's sample id is the record's id, the answer its last message)."""
    values: dict[str, dict[str, float]] = {}
    with pool.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            answer = rec["messages"][-1]["content"]
            values[rec["id"]] = {
                "text:code": float("```" in answer),
                "text:list": float(len(LIST_LINE.findall(answer)) >= 2),
                "text:disclaimer": float(bool(DISCLAIMER.search(answer))),
                "text:chars": float(len(answer)),
                "text:non_ascii": sum(ord(c) > 127 for c in answer) / max(len(answer), 1),
            }
    return values


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("db", help="a kept --work-dir's subsets.duckdb")
    p.add_argument("json", nargs="+", type=Path, help="subset_validation.py --json files of that pool")
    p.add_argument("--pool", type=Path, help="the work dir's sets/pool.jsonl: text features of the answers")
    args = p.parse_args(argv)
    ids, shifts, layers, losses = set_shifts(args.json)
    values = sample_values(args.db, layers)
    if args.pool:
        text = text_values(args.pool)
        if missing := [s for s in values if s not in text]:
            sys.exit(f"{args.pool}: {len(missing)} screened samples are not in it (first: {missing[0]})")
        for sid, row in values.items():
            row.update(text[sid])
    features = sorted({k for v in values.values() for k in v}, key=lambda k: (":" not in k, k))
    means: dict[str, dict[str, float]] = {}
    for name, members in ids.items():
        rows = [values[i] for i in members if i in values]
        means[name] = {
            k: float(np.mean(got)) if (got := [r[k] for r in rows if r.get(k) is not None]) else float("nan")
            for k in features
        }
        first, last = losses.get(name, (float("nan"), float("nan")))
        means[name] |= {"loss:first epoch": first, "loss:last epoch": last}
    features += ["loss:first epoch", "loss:last epoch"]
    traits = sorted(layers)
    print(
        f"{'subset':30s} "
        + " ".join(f"{t[:6]:>7s}" for t in traits)
        + " | "
        + " ".join(f"{k.replace('hallucinating', 'hal')[:11]:>11s}" for k in features)
    )
    for name in ids:
        got = " ".join(f"{shifts.get(name, {}).get(t, float('nan')):+7.3f}" for t in traits)
        print(f"{name:30s} {got} | " + " ".join(f"{means[name][k]:11.2f}" for k in features))
    for trait in traits:
        names = [n for n in ids if trait in shifts.get(n, {})]
        y = np.array([shifts[n][trait] for n in names])
        print(f"\n{trait}'s shift against the set means, {len(names)} subsets: Pearson / Spearman")
        for k in features:
            x = np.array([means[n][k] for n in names])
            ok = ~np.isnan(x)
            if ok.sum() < 3:
                continue
            pearson = np.corrcoef(x[ok], y[ok])[0, 1]
            spearman = np.corrcoef(ranks(x[ok]), ranks(y[ok]))[0, 1]
            print(
                f"  {k:30s} {pearson:+.2f} / {spearman:+.2f}"
                + (f"  ({ok.sum()} sets)" if not ok.all() else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
