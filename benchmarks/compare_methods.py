"""Compare ways of building each trait's vector on the same held-out data: the table behind the shipped files.

    python benchmarks/compare_methods.py            # every built-in trait, default model (~1 h on 2 CPUs)
    python benchmarks/compare_methods.py --traits evil --out build/compare

For every trait, six response_avg vectors, each the pipeline's own computation (screener/extract/pipeline.py):

    examples                  the trait file's written `examples`, each answer read after its question
    generation                the model's answers under the trait's system prompts (the shipped settings of
                              before: no judge, 1 sample, 64 new tokens, temperature 0.7, seed 0), read after
                              that system prompt and the question
    generation_question_only  the same answers, read after the question alone

and each of these also orthogonalised against the other traits' example directions (`--orthogonal-to
others`). Every vector is scored on the trait's written `eval_examples` (share ranked right, paired effect
size) and on every other trait's (the specificity matrix), and its layer is chosen by the specificity rule,
exactly as `screener extract` does. The generated answers are generated once and read both ways; every
trait's examples and held-out examples are read once, so one run takes about the time of the generation.

Only the trait files are read: no screened data, and none of ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import header

from screener.extract.examples import from_trait
from screener.extract.layers import NEAR_CHANCE, choose_specific_layer
from screener.extract.pipeline import (
    NEG,
    POS,
    ActivationStage,
    ExtractSettings,
    GenerationStage,
    HeldOut,
    Read,
    batched,
    build_items,
    example_reads,
    generated_reads,
    held_out_reports,
    orthogonalize,
    pair_up,
)
from screener.extract.traits import list_traits, load_trait
from screener.models import pick_device, pick_dtype, resolve_model

VARIANTS = ("examples", "generation", "generation_question_only")


def response_acts(stage: ActivationStage, reads: list[Read]) -> torch.Tensor:
    """`[reads, L+1, H]` response_avg activations, in order (the stage's own reading)."""
    return stage.read([p for p, _ in reads], [r for _, r in reads])[:, 0].clone()


def mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    return (pos.double().mean(0) - neg.double().mean(0)).float()


def project(acts: torch.Tensor, vector: torch.Tensor) -> np.ndarray:
    """`[reads, 1, L+1]` projections on the unit vector of each layer (the shape held_out_reports reads)."""
    unit = vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (acts * unit).sum(-1)[:, None, :].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--traits", help="comma-separated (default: every built-in trait)")
    ap.add_argument("--out", default="build/compare", help="folder for the JSON results and cached answers")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = ExtractSettings(samples=1, max_new_tokens=64, temperature=0.7, dtype=args.dtype)
    device = pick_device("auto")
    dtype = pick_dtype(args.dtype, device)
    ref = resolve_model(args.model)
    model, tok = ref.load(device, dtype)
    reader = ActivationStage(ref, settings)
    reader.model = model  # the loaded model, not a second copy
    traits = {name: load_trait(str(path)) for name, path in list_traits()}
    wanted = args.traits.split(",") if args.traits else list(traits)
    started = time.perf_counter()

    # every trait's written examples and held-out examples, read once
    directions, evals = {}, {}
    for name, t in traits.items():
        pos, neg, _, _ = example_reads(tok, from_trait(t, "examples"), settings.max_tokens)
        directions[name] = mean_diff(response_acts(reader, pos), response_acts(reader, neg))
        pos, neg, _, _ = example_reads(tok, from_trait(t, "eval_examples"), settings.max_tokens)
        evals[name] = (response_acts(reader, pos), response_acts(reader, neg))
    print(f"read every trait's examples ({time.perf_counter() - started:.0f} s)", flush=True)

    rows = []
    for name in wanted:
        trait = traits[name]
        others = [o for o in traits if o != name]
        vectors = {"examples": directions[name]}
        cache = out / f"{name}_generated.pt"
        if cache.is_file():
            gen = torch.load(cache, weights_only=True)
        else:
            t0 = time.perf_counter()
            stage = GenerationStage(ref, settings)
            stage.model, stage.tokenizer = model, tok
            items = [
                it
                for chunk in batched(build_items(trait, settings.samples, ("extract",)), settings.batch_size)
                for it in stage.process(chunk)
            ]
            kept, _ = pair_up(items, judged=False, settings=settings)
            gen = {}
            for context in ("system", "question"):
                pos, neg = generated_reads(kept, context)
                gen[context] = mean_diff(response_acts(reader, pos), response_acts(reader, neg))
            torch.save(gen, cache)
            with (out / f"{name}_generated.jsonl").open("w") as f:
                for it in items:
                    f.write(
                        json.dumps({"polarity": it.polarity, "text": it.text, "response": it.response}) + "\n"
                    )
            print(
                f"{name}: generated and read {len(items)} answers ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        vectors["generation"], vectors["generation_question_only"] = gen["system"], gen["question"]

        held = HeldOut([], [], True, {}, others={o: ([], []) for o in others})
        results = {}
        for variant in VARIANTS:
            for orth in (False, True):
                v = vectors[variant]
                if orth:
                    v = orthogonalize(v, [directions[o] for o in others])
                proj = {POS: project(evals[name][0], v), NEG: project(evals[name][1], v)}
                for o in others:
                    proj[f"{o}/{POS}"], proj[f"{o}/{NEG}"] = project(evals[o][0], v), project(evals[o][1], v)
                reports, spec = held_out_reports(proj, held, ("response_avg",))
                report, matrix = reports["response_avg"], spec["response_avg"]
                layer, how = choose_specific_layer(report, matrix, ref.num_layers, NEAR_CHANCE)
                at = report[layer]
                worst = max(others, key=lambda o, layer=layer: abs(matrix[o]["share_ranked"][layer] - 0.5))
                key = variant + (" + orthogonal" if orth else "")
                results[key] = {"layer_report": [asdict(r) for r in report], "specificity": matrix}
                rows.append(
                    {
                        "trait": name,
                        "variant": key,
                        "layer": layer,
                        "how": how,
                        "share_ranked": at.share_ranked,
                        "paired_d": at.paired_d,
                        "worst_other": worst,
                        "worst_share": matrix[worst]["share_ranked"][layer],
                    }
                )
                r = rows[-1]
                print(
                    f"{name:<14} {key:<36} layer {layer:>2} ({how:<8}) ranked {r['share_ranked']:.3f} "
                    f"d {r['paired_d']:5.2f}  worst other {worst} {r['worst_share']:.2f}",
                    flush=True,
                )
        (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")

    info = {
        "machine": header(device),
        "dtype": str(dtype).removeprefix("torch."),
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) if device.type == "cpu" else None,
        "seconds": round(time.perf_counter() - started),
    }
    (out / "table.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    print("\n| trait | variant | layer | rule | share ranked | paired d | worst other trait (share) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['trait']} | {r['variant']} | {r['layer']} | {r['how']} | {r['share_ranked']:.3f} | "
            f"{r['paired_d']:.2f} | {r['worst_other']} ({r['worst_share']:.2f}) |"
        )
    print(f"\n{info}")


if __name__ == "__main__":
    main()
