"""Does a first-order account of fine-tuning predict the subset experiment's shifts where ΔP does not?

For each trait, with s(θ) = the shift measure (the mean over the trait's evaluation questions of the
last prompt token's `hidden_states[L]`·v̂, as `screener shift` reads it) and L_i(θ) the recipe's summed
cross-entropy over sample i's response tokens, one step of gradient descent on a set S moves the measure by

    Δs ≈ −η ∇s · ∇L_S,     ∇L_S = Σ_{i∈S} ∇L_i / Σ_{i∈S} n_i     (n_i: sample i's response tokens)

so each sample's alignment a_i = −∇s·∇L_i / ‖∇s‖ (a directional derivative, by central differences of the
loss along ∇s/‖∇s‖ over the matrices the recipe's LoRA adapts) predicts, summed over a set, the direction
the set moves the trait. The script computes a_i for every sample of a kept `subset_validation.py` work
dir's pool that the run fine-tuned on and, over those sets, correlates the sets' predicted move with the
measured shifts, beside the sets' mean `delta_p_proxy` (what the screen ranks by); over those samples it
correlates a_i (per response token) with each sample's `delta_p_proxy`.

    python benchmarks/subset_influence.py WORK_DIR run.json [--json out.json]

It is a diagnosis, not a ranking the product ships: two fp32 forward passes of every sample per trait
(0.37 s a pass for these samples of <= 512 tokens on 2 AMX cores: 19 min for 774 samples and two traits). It
answers whether the shift is a property of the training samples that a per-sample score could read at all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import torch

# this checkout's screener, whichever one the environment has installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import header  # benchmarks/, this script's folder
from shift_validation import encode, pearson, progress, read_file, spearman
from subset_validation import scores

from screener.models import DEFAULT_MODEL, decoder_parts, eos_ids, load_tokenizer, pad, resolve_model
from screener.shift import ShiftConfig, prepare

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the recipe's


def adapted(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weight matrices the recipe's LoRA adapts, in a fixed order."""
    return [p for n, p in model.named_parameters() if n.endswith(".weight") and n.split(".")[-2] in ADAPTED]


def measure_gradient(model, prompts: list[list[int]], layer: int, unit: torch.Tensor) -> list[torch.Tensor]:
    """∇ of the mean last-prompt-token projection at `layer` over `prompts`, per adapted matrix."""
    params = adapted(model)
    model.zero_grad(set_to_none=True)
    for ids in prompts:
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
        last = out.hidden_states[layer][0, -1]
        (last @ unit.to(last.dtype) / len(prompts)).backward()
    # the blocks above `layer` do not reach it: their gradient is zero
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    model.zero_grad(set_to_none=True)
    return grads


@torch.no_grad()
def summed_losses(model, data: list[tuple[list[int], list[int]]], pad_token: int, batch: int) -> np.ndarray:
    """Each sample's summed cross-entropy over its response tokens (the recipe's loss, unreduced)."""
    out = np.zeros(len(data))
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]) + len(data[i][1]))  # less padding
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        ids, _, _ = pad([data[i][0] + data[i][1] for i in rows], pad_token, "right")
        hidden = decoder_parts(model)[0](input_ids=ids, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        for b, i in enumerate(rows):
            p, r = data[i]
            logits = head(hidden[b, len(p) - 1 : len(p) + len(r) - 1])
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
            out[i] = torch.nn.functional.cross_entropy(logits, torch.tensor(r), reduction="sum").item()
    return out


def alignments(
    model,
    data: list[tuple[list[int], list[int]]],
    grad: list[torch.Tensor],
    move: float,
    pad_token: int,
    batch: int,
) -> np.ndarray:
    """Each sample's −∇L_i · ∇s/‖∇s‖ by central differences along ∇s/‖∇s‖ (`grad` = ∇s per adapted
    matrix), the step sized so that s moves by ±`move` to first order; the weights are restored exactly."""
    params = adapted(model)
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grad)))
    step = move / norm
    kept = [p.detach().clone() for p in params]
    losses = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for p, g, w in zip(params, grad, kept, strict=True):
                p.copy_(w + (sign * step / norm) * g)
            losses.append(summed_losses(model, data, pad_token, batch))
        for p, w in zip(params, kept, strict=True):
            p.copy_(w)
    return -(losses[0] - losses[1]) / (2 * step)


def proxy_run(db: str) -> str:
    """The work dir's latest proxy-mode run (the ranking `subset_validation.py` fine-tuned from)."""
    with duckdb.connect(db, read_only=True) as con:
        run = con.execute(
            "SELECT run_id FROM runs WHERE mode = 'proxy' ORDER BY started_at DESC LIMIT 1"
        ).fetchone()
    if run is None:
        sys.exit(f"{db}: no proxy-mode run")
    return run[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work_dir", type=Path, help="a kept subset_validation.py --work-dir")
    p.add_argument("run", type=Path, help="that run's --json")
    p.add_argument(
        "--move", type=float, default=0.5, help="the central differences' step, as the move of s it makes"
    )
    p.add_argument("--limit", type=int, help="the pool's first N samples only (a quick check)")
    p.add_argument("--batch", type=int, default=8, help="samples per forward pass")
    p.add_argument("--json", type=Path, help="write every sample's alignment and the correlations here")
    args = p.parse_args(argv)
    started = time.perf_counter()
    print(header(), flush=True)
    run = json.loads(args.run.read_text())
    layers: dict[str, int] = run["layers"]
    # the samples of the run's fine-tuned sets only: a forward pass of a sample is the cost
    members = {m for ids in run["subsets"].values() for m in ids}
    pool = [s for s in read_file(args.work_dir / "sets" / "pool.jsonl") if s.sample_id in members]
    pool = pool[: args.limit]
    base = resolve_model(DEFAULT_MODEL)
    tok = load_tokenizer(base.path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    data = encode(tok, pool, run["recipe"]["max_tokens"], eos_ids(model, tok)[0])
    tokens = np.array([len(r) for _, r in data], dtype=float)
    ids = [s.sample_id for s in pool]
    plan = prepare(ShiftConfig(DEFAULT_MODEL, DEFAULT_MODEL, vectors=run["vectors"], device="cpu", actors=0))
    db = str(args.work_dir / "subsets.duckdb")
    proxy = scores(db, proxy_run(db), "delta_p_proxy", layers)

    alignment: dict[str, np.ndarray] = {}
    report: dict = {"machine": header(), "move": args.move, "traits": {}}
    for trait, layer in layers.items():
        col = plan.traits.index(trait)
        unit = plan.units[layer][:, col].float()
        prompts = [list(plan.prompts[i].ids) for i in plan.prompt_sets[trait].indices]
        grad = measure_gradient(model, prompts, layer, unit)
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grad)))
        alignment[trait] = alignments(model, data, grad, args.move, tok.pad_token_id, args.batch)
        progress(f"{trait}: ‖∇s‖ {norm:.3g}; alignments over {len(ids)} samples", started)

        x = np.array([proxy[trait].get(i, np.nan) for i in ids])
        ok = ~np.isnan(x)
        per_token = alignment[trait] / tokens
        sets, predicted, by_proxy, measured = [], [], [], []
        index = {sid: n for n, sid in enumerate(ids)}
        for name, members in run["subsets"].items():
            if any(m not in index for m in members):
                continue
            shift = run["shifts"].get(name, {}).get(trait)
            if shift is None:
                continue
            rows = [index[m] for m in members]
            sets.append(name)
            predicted.append(alignment[trait][rows].sum() / tokens[rows].sum())
            by_proxy.append(float(np.nanmean(x[rows])))
            measured.append(shift[0])
        predicted_a, proxy_a, measured_a = (np.array(v) for v in (predicted, by_proxy, measured))
        nan = (float("nan"), float("nan"))
        enough = len(sets) >= 3
        got = {
            "sets": len(sets),
            "alignment vs shift": (
                (pearson(predicted_a, measured_a), spearman(predicted_a, measured_a)) if enough else nan
            ),
            "delta_p_proxy vs shift": (
                (pearson(proxy_a, measured_a), spearman(proxy_a, measured_a)) if enough else nan
            ),
            "per-sample alignment vs delta_p_proxy": (
                pearson(per_token[ok], x[ok]),
                spearman(per_token[ok], x[ok]),
            ),
            "by set": dict(zip(sets, zip(predicted, by_proxy, measured, strict=True), strict=True)),
        }
        report["traits"][trait] = got | {"gradient_norm": norm}
        print(f"\n{trait} (layer {layer}), {len(sets)} fine-tuned sets: Pearson / Spearman")
        for key in ("alignment vs shift", "delta_p_proxy vs shift", "per-sample alignment vs delta_p_proxy"):
            print(f"  {key:40s} {got[key][0]:+.2f} / {got[key][1]:+.2f}")
    print(f"\nwall time {(time.perf_counter() - started) / 60:.1f} min")
    if args.json:
        report["alignment"] = {t: dict(zip(ids, a.tolist(), strict=True)) for t, a in alignment.items()}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
