"""How the built-in vectors' method was chosen: plain mean differences, orthogonalised ones and whitened ones
(`screener extract --whiten`) at several shrinkages and weights, on the trait files' held-out pairs and
the style controls' odd pairs only.

    python benchmarks/compare_whitening.py                       # reads every text once (~8 min on 2 CPUs)
    python benchmarks/compare_whitening.py --cache build/acts.pt # reuse the activations of a run before

Every trait's written `examples` and `eval_examples` and every control's pairs are read once with the
extraction's own reader (ActivationStage: response_avg at every layer). Per trait and setting the vector
is built from the trait's `examples` (whitened against the six other traits' `examples` and the controls'
even pairs, exactly as `vectors.whiten` does in the pipeline), its layer is chosen by the specificity rule
(layers.choose_specific_layer: the middle layer with the best own share where every other trait's
held-out pairs and every control's odd pairs stay within 0.25..0.75), and the table prints the own share
ranked / paired d there and the worst other trait or control. Only the trait and control files are read:
no screened data and none of ../shared/data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import header

from screener.extract.controls import load_controls
from screener.extract.examples import from_trait, from_written
from screener.extract.layers import NEAR_CHANCE, choose_specific_layer, cross_trait, layer_report
from screener.extract.pipeline import ActivationStage, ExtractSettings, Whitening
from screener.extract.traits import list_traits, load_trait
from screener.extract.vectors import example_reads, orthogonalize, whiten
from screener.models import resolve_model

SETTINGS = [
    None,
    "orthogonal",
    (0.01, 0.3),
    (0.03, 0.3),
    (0.03, 1.0),
    (0.1, 0.3),
    (0.1, 1.0),
    (0.3, 1.0),
    (1.0, 1.0),
]


def read_all(model: str, threads: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{"<trait>:examples" | "<trait>:eval_examples" | "control:<name>": (pos/a, neg/b)}` response_avg
    activations `[pairs, L+1, H]`."""
    torch.set_num_threads(threads)
    settings = ExtractSettings()
    ref = resolve_model(model)
    tok = ref.load_tokenizer()
    stage = ActivationStage(ref, settings)
    stage.setup()
    sets = {}
    for name, path in list_traits():
        trait = load_trait(str(path))
        for key in ("examples", "eval_examples"):
            sets[f"{name}:{key}"] = from_trait(trait, key)
    for name, control in load_controls().items():
        sets[f"control:{name}"] = from_written(control.pairs, name, {})
    out = {}
    for key, examples in sets.items():
        pos, neg, _, _ = example_reads(tok, examples, settings.max_tokens)
        out[key] = tuple(
            torch.cat(
                [
                    stage.read([p for p, _ in part], [r for _, r in part])[:, 0].float()
                    for part in chunks(reads)
                ]
            )
            for reads in (pos, neg)
        )
    return out


def chunks(reads: list, size: int = 32) -> list[list]:
    return [reads[i : i + size] for i in range(0, len(reads), size)]


def project(acts: torch.Tensor, vector: torch.Tensor) -> np.ndarray:
    unit = vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (acts * unit).sum(-1).double().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, help="activations file: read if it exists, else written")
    args = ap.parse_args()
    print(header(torch.device("cpu")), flush=True)
    started = time.perf_counter()
    if args.cache and args.cache.is_file():
        acts = torch.load(args.cache, weights_only=True)
    else:
        acts = read_all(args.model, args.threads)
        if args.cache:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(acts, args.cache)
    print(f"activations ready ({time.perf_counter() - started:.0f} s)", flush=True)
    traits = sorted(k.split(":")[0] for k in acts if k.endswith(":examples"))
    controls = sorted(k.split(":")[1] for k in acts if k.startswith("control:"))
    num_layers = acts[f"{traits[0]}:examples"][0].shape[1] - 1
    print("\n| trait | vector | layer | rule | own share / d | worst other trait or control (share) |")
    print("|---|---|---|---|---|---|")
    for t in traits:
        pos, neg = acts[f"{t}:examples"]
        for setting in SETTINGS:
            plain = (pos.double().mean(0) - neg.double().mean(0)).float()
            if setting is None:
                name, vector = "mean difference", plain
            elif setting == "orthogonal":  # --orthogonal-to others: less the other traits' mean differences
                name = "orthogonal to others"
                directions = [
                    acts[f"{o}:examples"][0].double().mean(0) - acts[f"{o}:examples"][1].double().mean(0)
                    for o in traits
                    if o != t
                ]
                vector = orthogonalize(plain, directions)
            else:
                name = f"whitened {setting[0]:g} / {setting[1]:g}"
                nuisance = [acts[f"{o}:examples"][0] - acts[f"{o}:examples"][1] for o in traits if o != t]
                nuisance += [acts[f"control:{c}"][0][0::2] - acts[f"control:{c}"][1][0::2] for c in controls]
                vector = whiten(pos, neg, True, nuisance, Whitening(*setting))
            e_pos, e_neg = acts[f"{t}:eval_examples"]
            report = layer_report(project(e_pos, vector), project(e_neg, vector), paired=True)
            others = cross_trait(
                {
                    o: (
                        project(acts[f"{o}:eval_examples"][0], vector),
                        project(acts[f"{o}:eval_examples"][1], vector),
                    )
                    for o in traits
                    if o != t
                }
            )
            checks = cross_trait(
                {
                    c: (
                        project(acts[f"control:{c}"][0][1::2], vector),
                        project(acts[f"control:{c}"][1][1::2], vector),
                    )
                    for c in controls
                }
            )
            layer, how = choose_specific_layer(report, others, num_layers, NEAR_CHANCE, controls=checks)
            row = report[layer]
            held = {**others, **{f"control {c}": m for c, m in checks.items()}}
            worst = max(held, key=lambda k: abs(held[k]["share_ranked"][layer] - 0.5))
            print(
                f"| {t} | {name} | {layer} | {how} | {row.share_ranked:.3f} / {row.paired_d:.2f} | "
                f"{worst} ({held[worst]['share_ranked'][layer]:.2f}) |",
                flush=True,
            )
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
