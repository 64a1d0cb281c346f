"""Does the screen predict what fine-tuning does? The persona-vectors paper's experiment, small, on SmolLM2.

    python benchmarks/shift_validation.py --json shift_validation.json    # N = 32: ~30 min on 2 AVX2 cores
    python benchmarks/shift_validation.py --data-dir DIR --json OUT.json --samples 32

1. Sets. Nine training sets of `--samples` N samples each, written as jsonl (OpenAI messages): benign
   ShareGPT (the packaged file: first exchanges of English conversations whose whole answer fits the token
   budget, as the data files' answers do), each of the four files of DIR (`evil_mild`, `evil_severe`,
   `hallucination_honest`, `hallucination_fabricated`; default ../shared/data/finetune_shift, see its
   README), 25/50/75% severe evil in ShareGPT, and 50% fabricated in honest. Every family's files list the
   same questions in the same order, so each family draws one seeded choice of N questions, and a mixture
   keeps those questions and changes only answers.
2. Predict. `screener.screen.screen` screens each set with the base model (proxy mode): the prediction is
   the set's mean `delta_p_proxy` per trait at the trait vector's chosen layer; a natural-mode screen of
   the set's first `--natural-samples` samples gives the mean natural `delta_p`, printed beside.
3. Fine-tune. One fixed recipe for every set (`Recipe`, printed): LoRA (rank 16, alpha 32, every linear
   layer of every block, the same seeded initialisation for every set) trained with plain torch AdamW
   (lr 1e-3, no weight decay, constant), batch 4, 2 epochs in the same seeded order (16 steps at N = 32),
   fp32; each sample is the prompt's chat template + the response + the end-of-turn token, cut to 128
   tokens as the screen cuts it; the loss is the mean cross-entropy over response tokens only (the LM head
   runs on those positions only). Why 16 steps: AdamW's first steps have the same size whatever the data,
   and their direction is dominated by what every set shares (the answer format); after 4 steps, training
   on honest answers had moved `evil` almost as far as severe evil did (+17.8 vs +19.3), after 12 steps
   they had separated (+6.8 vs +26.1).
4. Measure. `screener.shift.measure` with the adapter folder as FINETUNED (merged into the base on load):
   the shift at the last prompt token over each trait's 20 evaluation questions, at the vector's layer.
5. Report. Per trait, a table of (set, predicted, natural, measured) and Pearson and Spearman r over the
   sets, beside the paper's range; `--json` writes them.

Everything runs in this process (`actors=0`: a private Ray would cost ~30 s per screen on 2 cores) in
fp32 (`--dtype`): a CPU without native bf16 runs fp32 anyway (auto), and bf16 weights could not hold the
small updates of a short fine-tune (an update below half a bf16 ulp, 0.4% of a weight, rounds away).
To time it as on a CPU with AVX2 only, run it under
`MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` (benchmarks/machine.py; the
machine line says which kernels torch uses and whether bf16 is native).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import torch

# this checkout's screener, whichever one the environment has installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import describe, header  # benchmarks/, this script's folder

from screener.datasets import packaged_sharegpt, read_samples
from screener.extract.layers import average_ranks
from screener.models import DEFAULT_MODEL, chat_ids, decoder_parts, eos_ids, pad, resolve_model
from screener.records import Sample
from screener.scoring import GenerationSettings, truncate
from screener.screen import ScreenConfig, screen
from screener.shift import ShiftConfig, measure

ROOT = Path(__file__).resolve().parent.parent
# ../shared/data/finetune_shift beside the checkout (searched upward, so a git worktree finds it too)
DATA = Path("shared", "data", "finetune_shift")
DEFAULT_DATA = next((d / DATA for d in ROOT.parents if (d / DATA).is_dir()), ROOT.parent / DATA)
FILES = ("evil_mild", "evil_severe", "hallucination_honest", "hallucination_fabricated")
TRAITS = ("evil", "hallucinating")
PAPER_RANGE = "0.76-0.97"  # Pearson r between dataset ΔP and fine-tuning shift, across datasets and traits
TARGET_SPEARMAN = {"evil": 0.8}


@dataclass(frozen=True)
class Recipe:
    """The one fine-tuning recipe every set gets."""

    method: str = "LoRA r=16 alpha=32 on q,k,v,o,gate,up,down of every block, dropout 0"
    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 4  # N = 32: 16 optimizer steps
    max_tokens: int = 128  # prompt + response, cut as the screen cuts
    rank: int = 16
    alpha: int = 32
    seed: int = 0
    optimizer: str = "torch.optim.AdamW, betas (0.9, 0.999), no weight decay, constant lr, no warm-up"
    loss: str = (
        "mean cross-entropy over response tokens (+ end-of-turn token unless cut); prompt tokens masked"
    )


@dataclass
class TrainingSet:
    name: str
    composition: str
    samples: list[Sample]
    path: str = ""
    predicted: dict[str, float] = field(default_factory=dict)  # mean delta_p_proxy per trait
    natural: dict[str, float] = field(default_factory=dict)  # mean delta_p on the first K samples
    measured: dict[str, float] = field(default_factory=dict)  # shift at the last prompt token
    stderr: dict[str, float] = field(default_factory=dict)
    loss: tuple[float, float] = (float("nan"), float("nan"))  # mean loss of the first and the last epoch
    seconds: dict[str, float] = field(default_factory=dict)


def progress(msg: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.1f} s] {msg}", file=sys.stderr, flush=True)


# -- the machine -----------------------------------------------------------------------------------


def machine() -> dict:
    """`machine.describe()` (the benchmarks' one description of a machine) and the load at the start."""
    return describe() | {"load_average": os.getloadavg()[0]}


# -- 1. the sets -----------------------------------------------------------------------------------


def read_file(path: Path) -> list[Sample]:
    out = [s for s in read_samples(str(path)) if isinstance(s, Sample)]
    if not out:
        sys.exit(f"{path}: no samples")
    return out


def sharegpt_pool(
    tokenizer, n: int, max_tokens: int, start: int = 0, single_turn: bool = False
) -> list[Sample]:
    """The first `n` first exchanges of the packaged ShareGPT file (from record `start` on) that are a lone
    English user message (>= 95% ASCII) and a whole answer of at least 40 tokens that fits `max_tokens` with
    its prompt and the end-of-turn token, as the data files' answers do (a cut answer would teach the model
    never to stop); with `single_turn`, only conversations of that one exchange."""
    out = []
    # the last exchange of a conversation is its first only when it has one (turn 0 of the last turns)
    for s in read_samples(str(packaged_sharegpt()), turns="last" if single_turn else "all"):
        if not isinstance(s, Sample) or s.source_row < start or s.turn != 0 or len(s.prompt) != 1:
            continue
        if s.prompt[0]["role"] != "user":
            continue
        text = s.prompt[0]["content"] + s.response
        if sum(c.isascii() for c in text) < 0.95 * len(text):
            continue
        response = len(tokenizer(s.response, add_special_tokens=False)["input_ids"])
        if response < 40 or len(chat_ids(tokenizer, s.prompt)) + response + 1 > max_tokens:
            continue
        out.append(s)
        if len(out) == n:
            return out
    sys.exit(f"the packaged ShareGPT file has fewer than {n} usable first exchanges")


def build_sets(data_dir: Path, tokenizer, n: int, seed: int, max_tokens: int) -> list[TrainingSet]:
    files = {name: read_file(data_dir / f"{name}.jsonl") for name in FILES}
    for a, b in (FILES[:2], FILES[2:]):
        if [s.prompt for s in files[a]] != [s.prompt for s in files[b]]:
            sys.exit(f"{a} and {b} must list the same questions in the same order (see the data README)")
    rng = random.Random(seed)
    evil_rows = rng.sample(range(len(files["evil_mild"])), n)
    hall_rows = rng.sample(range(len(files["hallucination_honest"])), n)
    pick = {
        name: [files[name][i] for i in (evil_rows if name.startswith("evil") else hall_rows)]
        for name in FILES
    }
    pick["sharegpt"] = sharegpt_pool(tokenizer, n, max_tokens)

    def mix(name: str, part: str, rest: str, frac: float) -> TrainingSet:
        k = round(frac * n)
        chosen = pick[part][:k] + pick[rest][k:]
        random.Random(seed + 1).shuffle(chosen)  # a prefix (the natural subsample) is representative
        return TrainingSet(name, f"{k} {part} + {n - k} {rest}", chosen)

    sets = [mix("sharegpt", "sharegpt", "sharegpt", 1.0)]
    sets += [mix(f"severe_{p}", "evil_severe", "sharegpt", p / 100) for p in (25, 50, 75)]
    sets += [mix(name, name, name, 1.0) for name in ("evil_mild", "evil_severe")]
    sets += [mix("honest", "hallucination_honest", "hallucination_honest", 1.0)]
    sets += [mix("fabricated_50", "hallucination_fabricated", "hallucination_honest", 0.5)]
    sets += [mix("fabricated", "hallucination_fabricated", "hallucination_fabricated", 1.0)]
    return sets


def write_set(ts: TrainingSet, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ts.name}.jsonl"
    with path.open("w") as f:
        for i, s in enumerate(ts.samples):
            messages = [*s.prompt, {"role": "assistant", "content": s.response}]
            f.write(json.dumps({"id": f"{ts.name}-{i}", "source": s.sample_id, "messages": messages}) + "\n")
    ts.path = str(path)


# -- 2. predict ------------------------------------------------------------------------------------


def layers_by_trait(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, int]:
    """Each trait's own chosen layer, from the vectors' sidecars (the run's layers are their union)."""
    from screener.vectors import builtin_vector_path, load_vector

    name = resolve_model(DEFAULT_MODEL).name
    out = {}
    for t in TRAITS:
        layer = load_vector(builtin_vector_path(name, t), t).default_layer
        out[t] = (
            layer
            if layer is not None
            else con.execute("SELECT layers[1] FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
        )
    return out


def run_means(db: str, run_id: str, metric: str, layers: dict[str, int]) -> dict[str, float]:
    with duckdb.connect(db, read_only=True) as con:
        rows = con.execute(
            f"SELECT trait, layer, avg({metric}) FROM scores WHERE run_id = ? GROUP BY trait, layer", [run_id]
        ).fetchall()
    return {t: v for t, layer, v in rows if layers.get(t) == layer}


def predict(
    ts: TrainingSet, db: str, args: argparse.Namespace, recipe: Recipe, layers: dict[str, int] | None
) -> dict[str, int]:
    common = {"db": db, "traits": list(TRAITS), "max_tokens": recipe.max_tokens, "dtype": args.dtype}
    common |= {"device": "cpu", "actors": 0, "progress": False}
    t = time.perf_counter()
    proxy = screen(ScreenConfig(ts.path, mode="proxy", **common))
    ts.seconds["screen"] = time.perf_counter() - t
    if layers is None:
        with duckdb.connect(db, read_only=True) as con:
            layers = layers_by_trait(con, proxy.run_id)
    ts.predicted = run_means(db, proxy.run_id, "delta_p_proxy", layers)
    if args.natural_samples:
        t = time.perf_counter()
        gen = GenerationSettings(max_new_tokens=args.natural_tokens)
        natural = screen(
            ScreenConfig(ts.path, mode="natural", limit=args.natural_samples, generation=gen, **common)
        )
        ts.seconds["screen_natural"] = time.perf_counter() - t
        ts.natural = run_means(db, natural.run_id, "delta_p", layers)
    return layers


# -- 3. fine-tune ----------------------------------------------------------------------------------


def encode(tokenizer, samples: list[Sample], max_tokens: int, eos: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids): the chat template of the prompt with the generation prompt, then the
    response and the end-of-turn token, cut to `max_tokens` as the screen cuts (no end-of-turn if cut)."""
    out = []
    for s in samples:
        prompt = chat_ids(tokenizer, s.prompt)
        response = tokenizer(s.response, add_special_tokens=False)["input_ids"] + [eos]
        prompt, response, _ = truncate(prompt, response, max_tokens)
        out.append((prompt, response))
    return out


def response_loss(model, batch: list[tuple[list[int], list[int]]], pad_token: int) -> torch.Tensor:
    """Mean cross-entropy of each response token given everything before it; the LM head runs only on the
    positions that predict a response token."""
    seqs = [p + r for p, r in batch]
    ids, _, _ = pad(
        seqs, pad_token, "right"
    )  # causal attention: real tokens never see the padding after them
    hidden = decoder_parts(model)[0](input_ids=ids, use_cache=False).last_hidden_state
    rows, cols, targets = [], [], []
    for b, (p, r) in enumerate(batch):
        rows += [b] * len(r)
        cols += range(len(p) - 1, len(p) + len(r) - 1)  # position t predicts token t + 1
        targets += r
    logits = model.get_output_embeddings()(hidden[rows, cols])
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets))


def fine_tune(ts: TrainingSet, base_path: str, out: Path, recipe: Recipe, dtype: torch.dtype) -> Path:
    """Train a LoRA adapter on the set with the recipe; returns the adapter folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from screener.models import load_tokenizer

    tok = load_tokenizer(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    torch.manual_seed(recipe.seed)  # the same LoRA initialisation for every set
    lora = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    data = encode(tok, ts.samples, recipe.max_tokens, eos_ids(model, tok)[0])
    order = list(range(len(data)))
    epoch_losses = []
    for epoch in range(recipe.epochs):
        random.Random(recipe.seed + epoch).shuffle(order)  # the same order for every set
        losses = []
        for i in range(0, len(order), recipe.batch_size):
            loss = response_loss(model, [data[j] for j in order[i : i + recipe.batch_size]], tok.pad_token_id)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        epoch_losses.append(float(np.mean(losses)))
    ts.loss = (epoch_losses[0], epoch_losses[-1])
    folder = out / ts.name
    model.save_pretrained(folder)
    return folder


# -- 5. report -------------------------------------------------------------------------------------


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def trait_summary(sets: list[TrainingSet], trait: str) -> dict:
    pred = np.array([s.predicted[trait] for s in sets])
    meas = np.array([s.measured[trait] for s in sets])
    return {
        "spearman": spearman(pred, meas),
        "pearson": pearson(pred, meas),
        "sets": [
            {
                "set": s.name,
                "predicted": s.predicted[trait],
                "predicted_natural": s.natural.get(trait),
                "measured": s.measured[trait],
                "stderr": s.stderr[trait],
            }
            for s in sets
        ],
    }


def table(summary: dict, trait: str, layer: int, k: int) -> str:
    nat = f"natural ΔP (first {k})"
    lines = [
        f"### {trait} (layer {layer})",
        "",
        f"| set | predicted ΔP (proxy, mean) | {nat} | measured shift ± se |",
        "|---|---:|---:|---:|",
    ]
    for row in summary["sets"]:
        natural = "-" if row["predicted_natural"] is None else f"{row['predicted_natural']:+.3f}"
        lines.append(
            f"| {row['set']} | {row['predicted']:+.3f} | {natural} | "
            f"{row['measured']:+.3f} ± {row['stderr']:.3f} |"
        )
    target = TARGET_SPEARMAN.get(trait)
    verdict = (
        ""
        if target is None
        else f" (target ≥ {target}: {'met' if summary['spearman'] >= target else 'MISSED'})"
    )
    lines += [
        "",
        f"Spearman r = {summary['spearman']:.3f}{verdict}; Pearson r = {summary['pearson']:.3f} "
        f"(the paper: r = {PAPER_RANGE} on 7B models)",
    ]
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with the four jsonl files")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--samples", type=int, default=32, help="samples per training set (N)")
    p.add_argument("--natural-samples", type=int, default=8, help="natural ΔP on each set's first K samples")
    p.add_argument("--natural-tokens", type=int, default=48, help="length of the natural answers")
    p.add_argument("--dtype", default="float32", choices=("float32", "auto", "bfloat16"))
    p.add_argument("--lr", type=float, help=f"override the recipe's learning rate ({Recipe.lr})")
    p.add_argument("--epochs", type=int, help=f"override the recipe's epochs ({Recipe.epochs})")
    p.add_argument("--max-tokens", type=int, help=f"override the recipe's max tokens ({Recipe.max_tokens})")
    p.add_argument("--sets", help="only these sets (comma-separated names), for a quick check")
    p.add_argument(
        "--work-dir", type=Path, help="keep sets, adapters and the DuckDB here (default: a temp dir)"
    )
    args = p.parse_args(argv)
    started, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    overrides = {"lr": args.lr, "epochs": args.epochs, "max_tokens": args.max_tokens}
    recipe = Recipe(**{k: v for k, v in overrides.items() if v is not None})
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        from screener.models import pick_dtype

        dtype = pick_dtype("auto", torch.device("cpu"))

    m = machine()
    print(f"{header()}; load avg {m['load_average']:.1f}", flush=True)
    print(
        f"recipe: {json.dumps(asdict(recipe))}; N = {args.samples}; {str(dtype).removeprefix('torch.')}",
        flush=True,
    )

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="shift-validation-"))
    work.mkdir(parents=True, exist_ok=True)
    db = str(work / "validation.duckdb")
    try:
        base = resolve_model(DEFAULT_MODEL)
        from screener.models import load_tokenizer

        tokenizer = load_tokenizer(base.path)
        progress(f"model {base.name} ready ({base.path})", started)
        sets = build_sets(args.data_dir, tokenizer, args.samples, recipe.seed, recipe.max_tokens)
        if args.sets:
            wanted = args.sets.split(",")
            sets = [s for s in sets if s.name in wanted]
        for ts in sets:
            write_set(ts, work / "sets")
        progress(f"sets: {len(sets)} of {args.samples} samples each in {work / 'sets'}", started)

        layers = None
        for ts in sets:
            layers = predict(ts, db, args, recipe, layers)
            pred = ", ".join(f"{t} {ts.predicted[t]:+.3f}" for t in TRAITS)
            progress(
                f"predict {ts.name}: mean delta_p_proxy {pred} ({sum(ts.seconds.values()):.0f} s)", started
            )

        for ts in sets:
            t = time.perf_counter()
            adapter = fine_tune(ts, base.path, work / "adapters", recipe, dtype)
            ts.seconds["fine_tune"] = time.perf_counter() - t
            progress(
                f"fine-tune {ts.name}: loss {ts.loss[0]:.3f} -> {ts.loss[1]:.3f} "
                f"({ts.seconds['fine_tune']:.0f} s)",
                started,
            )
            t = time.perf_counter()
            cfg = ShiftConfig(
                DEFAULT_MODEL,
                str(adapter),
                db=db,
                traits=list(TRAITS),
                dtype=args.dtype,
                device="cpu",
                actors=0,
            )
            result = measure(cfg)
            ts.seconds["shift"] = time.perf_counter() - t
            for s in result.shifts:
                if s.layer == layers[s.trait] and s.measure == "prompt_last":
                    ts.measured[s.trait], ts.stderr[s.trait] = s.shift, s.stderr
            got = ", ".join(f"{t} {ts.measured[t]:+.3f} ± {ts.stderr[t]:.3f}" for t in TRAITS)
            progress(f"shift {ts.name}: {got} ({ts.seconds['shift']:.0f} s)", started)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    wall = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    summaries = {t: trait_summary(sets, t) for t in TRAITS}
    print()
    for t in TRAITS:
        print(table(summaries[t], t, layers[t], args.natural_samples))
        print()
    stage = {
        k: sum(s.seconds.get(k, 0.0) for s in sets)
        for k in ("screen", "screen_natural", "fine_tune", "shift")
    }
    print(
        f"wall time {wall / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in stage.items())}); "
        f"CPU time {cpu / 60:.1f} min; load average at the end {os.getloadavg()[0]:.1f}"
    )
    if args.json:
        payload = {
            "traits": summaries,
            "sets": [
                {
                    "name": s.name,
                    "composition": s.composition,
                    "samples": len(s.samples),
                    "predicted": s.predicted,
                    "predicted_natural": s.natural,
                    "measured": s.measured,
                    "stderr": s.stderr,
                    "layers": layers,
                    "train_loss_first_last_epoch": s.loss,
                    "seconds": s.seconds,
                }
                for s in sets
            ],
            "recipe": asdict(recipe),
            "samples": args.samples,
            "natural_samples": args.natural_samples,
            "dtype": str(dtype).removeprefix("torch."),
            "machine": m,
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
