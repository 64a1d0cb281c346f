"""The GPU path, checked on a machine with a GPU and nothing else: torch and transformers only.

    python3 benchmarks/gpu_check.py --json gpu_check.json      # on the GPU machine, about 3-5 minutes
    python3 benchmarks/gpu_check.py --device cpu --tiny         # here, in seconds (tests/test_gpu_check.py)

The GPU machine this project borrows has torch, transformers and pyarrow but no Ray, DuckDB, polars,
datasets or gguf, and no network, so this drives the project's own `Scorer` directly (no screen, no
store) on random-weight models built from configs:

1. Exactness: the tests' tiny models (tests/tiny.py, fp32) on the device against the same weights on the
   CPU and against the per-sample `output_hidden_states=True` reference: every layer, batch 1 against a
   padded batch on both padding sides, every turn of a conversation from one pass, and natural mode's
   projections against a teacher-forced pass over its own answer. Tolerance: the tests' (rtol 1e-4).
2. Throughput of real shapes (Qwen2.5-7B and Llama-3.1-8B, bf16, random weights made on the device): the
   proxy screen's tokens/s at several `batch_tokens`, in forward batches and over the whole `score` call
   (tokenising, padding, hooks and packing included), its MFU (2 FLOPs a parameter a token in the blocks
   that run, plus causal attention, as `Scorer` counts it) against the GPU's nominal bf16 peak and a
   measured matmul peak, natural mode's generation tokens/s, and peak memory.

`--tiny` swaps the real shapes for tiny ones of the same architectures (the throughput figures then mean
nothing; it proves the script runs). Exit code 1 if an exactness check fails. `--budget` (seconds) skips
what would run past it and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the working tree as copied to the GPU machine: the package is not installed there
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SCREENER_TUNING", "/tmp/screener-gpu-check-tuning.json")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import header  # noqa: E402
from tiny import CORPUS, make_tokenizer, random_model, reference, tiny_config  # noqa: E402

from screener.records import Sample, Scored  # noqa: E402
from screener.scoring import ONE_PASS, GenerationSettings, Scorer, ScoreSettings  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6  # tests/test_scoring.py's
# nominal dense bf16 peaks (FLOP/s) of GPUs this project may meet; others are measured only
NOMINAL_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
SHAPES = {
    "Qwen2.5-7B": dict(
        kind="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
    "Llama-3.1-8B": dict(
        kind="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)
BATCH_TOKENS = (8192, 16384, 32768, 65536)
GENERATE_ROWS = (32, 128)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- samples ------------------------------------------------------------------------------------------------


def check_samples() -> list[Sample]:
    """Single-turn samples of mixed lengths, some with a system message or an earlier exchange."""
    out = []
    for i in range(10):
        prompt = [{"role": "user", "content": CORPUS[i % 5]}]
        if i % 3 == 0:
            prompt = [{"role": "system", "content": "Be cruel."}, *prompt]
        if i % 4 == 1:
            prompt += [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "More?"}]
        out.append(Sample(f"s{i}", i, 0, prompt, " ".join(CORPUS[(i + k) % 5] for k in range(1 + i % 4))))
    return out


def conversation_samples() -> list[Sample]:
    """Every assistant turn of four conversations of 1-4 turns (what the reader makes under --turns all)."""
    out = []
    for c in range(4):
        messages: list[dict] = [{"role": "system", "content": "Be cruel."}] if c % 2 else []
        for turn in range(1 + c):
            messages.append({"role": "user", "content": CORPUS[(c + turn) % 5]})
            answer = CORPUS[(c + 2 * turn + 1) % 5] * (1 + turn)
            out.append(Sample(f"c{c}#{turn}", c, turn, list(messages), answer, "f.jsonl"))
            messages.append({"role": "assistant", "content": answer})
    return out


def load_samples(tok, n: int, mean_tokens: int, seed: int = 0) -> list[Sample]:
    """`n` single-turn samples of about `mean_tokens` tokens each (prompt about a third), lengths spread
    0.25x-2x like real chat data; the text is words of the test corpus."""
    rng = np.random.default_rng(seed)
    words = " ".join(CORPUS).split()
    per_word = len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) / len(words)
    out = []
    for i in range(n):
        total = mean_tokens * rng.uniform(0.25, 2.0) / per_word
        text = [words[j] for j in rng.integers(0, len(words), size=max(4, int(total)))]
        cut = max(2, len(text) // 3)
        prompt = [{"role": "user", "content": " ".join(text[:cut])}]
        out.append(Sample(f"l{i}", i, 0, prompt, " ".join(text[cut:])))
    return out


# -- 1. exactness -------------------------------------------------------------------------------------------


def worst(a: np.ndarray, b: np.ndarray) -> float:
    """How far `a` is from `b` in units of the tolerance (<= 1 passes, as assert_allclose would)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / (ATOL + RTOL * np.abs(b))))


def exactness(device: torch.device) -> dict:
    """The tiny models' checks on `device`, each as its worst error in tolerance units."""
    tok = make_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out: dict = {}
    for kind in ("llama", "qwen2"):
        cpu_model = random_model(tiny_config(kind, len(tok), eos)).eval()
        model = random_model(tiny_config(kind, len(tok), eos)).to(device).eval()
        n = model.config.num_hidden_layers
        g = torch.Generator().manual_seed(1)
        vectors = [torch.randn(n + 1, model.config.hidden_size, generator=g) for _ in range(3)]
        layers = tuple(range(n + 1))
        units = {L: torch.stack([v[L] / v[L].norm() for v in vectors], dim=1) for L in layers}

        def scorer(m, units=units, layers=layers, **kw) -> Scorer:
            return Scorer(m, tok, units, ScoreSettings(layers=layers, batch_tokens=16384, **kw))

        samples = check_samples()
        got = scorer(model).score(samples)
        on_cpu = scorer(cpu_model).score(samples)
        checks = {"reference": 0.0, "cpu": 0.0, "batch1": 0.0, "left": 0.0}
        for s, r, c in zip(samples, got, on_cpu, strict=True):
            resp, last = reference(cpu_model, tok, s, vectors, layers)
            checks["reference"] = max(
                checks["reference"], worst(r.proj_response, resp), worst(r.proj_prompt_last, last)
            )
            checks["cpu"] = max(
                checks["cpu"],
                worst(r.proj_response, c.proj_response),
                worst(r.proj_prompt_last, c.proj_prompt_last),
            )
        for key, kw in (("batch1", {"max_batch_size": 1}), ("left", {"padding_side": "left"})):
            for r, o in zip(got, scorer(model, **kw).score(samples), strict=True):
                checks[key] = max(
                    checks[key],
                    worst(o.proj_response, r.proj_response),
                    worst(o.proj_prompt_last, r.proj_prompt_last),
                )
        conv = conversation_samples()
        one_pass = scorer(model).score(conv)
        checks["all_turns_one_pass"] = max(
            max(worst(r.proj_response, resp), worst(r.proj_prompt_last, last))
            for s, r in zip(conv, one_pass, strict=True)
            for resp, last in [reference(cpu_model, tok, s, vectors, layers)]
        )
        shared = sum(r.extra.get("path") == ONE_PASS for r in one_pass)
        # natural mode's projections, read by the hooks while generating, against a teacher-forced pass
        natural = scorer(model, mode="natural", generation=GenerationSettings(max_new_tokens=12))
        prompts = [natural.tokenize(s).prompt for s in samples[:6]]
        proj, answers = natural.natural(prompts, [s.sample_id for s in samples[:6]])
        checked, checks["natural"] = 0, 0.0
        for prompt, p, answer in zip(prompts, proj, answers, strict=True):
            if answer:
                tf, _ = natural.project([prompt], [answer])
                checks["natural"] = max(checks["natural"], worst(p, tf[0]))
                checked += 1
        out[kind] = {
            **{k: round(v, 3) for k, v in checks.items()},
            "one_pass_turns": shared,
            "natural_checked": checked,
        }
        ok = all(v <= 1.0 for v in checks.values()) and checked >= 3 and shared == len(conv) - 1
        out[kind]["ok"] = ok
        log(f"exactness {kind} on {device}: {'ok' if ok else 'FAILED'} {out[kind]}")
    return out


# -- 2. throughput ------------------------------------------------------------------------------------------


def build(name: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """A random-weight model of `name`'s shape, made on the device (no weights on the host)."""
    from transformers import AutoConfig

    spec = dict(SHAPES[name])
    kind = spec.pop("kind")
    if tiny:
        spec.update(TINY)
    cfg = AutoConfig.for_model(kind, tie_word_embeddings=False, **spec)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def matmul_peak(device: torch.device, dtype: torch.dtype, tiny: bool) -> float:
    """The best FLOP/s of a square matmul on the device (8192^2; 512^2 with --tiny)."""
    n = 512 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3 if tiny else 10):
        sync(device)
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / 5)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> float:
    """GiB: the device's peak allocated memory, or on a CPU this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def throughput(
    name: str, args, device: torch.device, dtype: torch.dtype, peaks: dict, deadline: float
) -> dict:
    tok = make_tokenizer()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    model = build(name, args.tiny, device, dtype)
    built = time.perf_counter() - t
    n = model.config.num_hidden_layers
    layer = round(n * 2 / 3)  # the depth persona vectors are usually read at (20 of SmolLM2's 30)
    g = torch.Generator().manual_seed(2)
    units = {layer: torch.nn.functional.normalize(torch.randn(model.config.hidden_size, 3, generator=g), 0)}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out: dict = {
        "layer": layer,
        "num_layers": n,
        "build_s": round(built, 1),
        "weights_gib": round(weights / 2**30, 2),
        "proxy": [],
        "natural": [],
    }
    samples = load_samples(tok, args.samples, args.mean_tokens)
    for budget in args.batch_tokens:
        if time.monotonic() > deadline:
            out.setdefault("skipped", []).append(f"proxy batch_tokens {budget}")
            continue
        scorer = Scorer(
            model, tok, units, ScoreSettings(layers=(layer,), batch_tokens=budget, max_batch_size=512)
        )
        scorer.score(samples[:8])  # warm-up: kernels, allocator
        scorer.seconds.clear()
        sync(device)
        t, cpu = time.perf_counter(), time.process_time()
        results = scorer.score(samples)
        sync(device)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        scored = [r for r in results if isinstance(r, Scored)]
        lengths = [r.prompt_tokens + r.response_tokens for r in scored]
        tokens = sum(lengths)
        flops = sum(scorer.flops_per_token * x + scorer.attention_flops * x * x for x in lengths)
        forward = scorer.seconds["forward"]
        row = {
            "batch_tokens": budget,
            "samples": len(scored),
            "tokens": tokens,
            "forward_s": round(forward, 3),
            "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / forward),
            "tokens_per_s_wall": round(tokens / wall),
            # host CPU time of the whole call per token: templates, tokenising, padding, hooks, packing,
            # the forward's kernel launches, and any spinning while it waits for the GPU
            "cpu_us_per_token": round(cpu / tokens * 1e6, 2),
            # the call's time outside forward batches: the actor's CPU work on the critical path
            "outside_forward_us_per_token": round((wall - forward) / tokens * 1e6, 2),
            "mfu_measured": round(flops / forward / peaks["measured"], 3),
        }
        if peaks.get("nominal"):
            row["mfu_nominal"] = round(flops / forward / peaks["nominal"], 3)
        out["proxy"].append(row)
        log(f"{name} proxy {row}")
    prompts = [Scorer(model, tok, units, ScoreSettings(layers=(layer,))).tokenize(s).prompt for s in samples]
    for rows in args.generate_rows:
        if time.monotonic() > deadline:
            out.setdefault("skipped", []).append(f"natural rows {rows}")
            continue
        gen = GenerationSettings(max_new_tokens=args.new_tokens)
        settings = ScoreSettings(
            layers=(layer,), mode="natural", generate_batch_size=rows, max_batch_size=rows, generation=gen
        )
        scorer = Scorer(model, tok, units, settings)
        batch = [p[-256:] for p in prompts[: 2 * rows]]  # two batches of prompts of up to 256 tokens
        scorer.natural(batch[:rows], [str(i) for i in range(rows)])  # warm-up
        scorer.seconds.clear()
        _, answers = scorer.natural(batch, [str(i) for i in range(len(batch))])
        new = sum(map(len, answers)) + len(batch)  # the hooks' extra step a row
        row = {
            "rows": rows,
            "prompts": len(batch),
            "new_tokens": new,
            "generate_s": round(scorer.seconds["generate"], 3),
            "tokens_per_s": round(new / scorer.seconds["generate"]),
        }
        out["natural"].append(row)
        log(f"{name} natural {row}")
    out["peak_memory_gib"] = round(peak_memory(device), 2)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# -- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: it runs; the figures mean nothing")
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--samples", type=int, default=None, help="proxy samples (512; 24 tiny)")
    p.add_argument("--mean-tokens", type=int, default=700)
    p.add_argument("--batch-tokens", type=int, nargs="+", default=None)
    p.add_argument("--generate-rows", type=int, nargs="+", default=None)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later phases are skipped past it")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)  # tiny matrices: threads only add their synchronisation on a shared CPU
        args.samples = args.samples or 24
        args.mean_tokens = min(args.mean_tokens, 60)
        args.batch_tokens = args.batch_tokens or [256, 1024]
        args.generate_rows = args.generate_rows or [4]
        args.new_tokens = min(args.new_tokens, 8)
    args.samples = args.samples or 512
    args.batch_tokens = args.batch_tokens or list(BATCH_TOKENS)
    args.generate_rows = args.generate_rows or list(GENERATE_ROWS)
    started = time.monotonic()
    deadline = started + args.budget
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"no CUDA device here (torch {torch.__version__}); run with --device cpu --tiny", file=sys.stderr
        )
        return 2
    import transformers

    report: dict = {
        "machine": header(device),
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "args": vars(args) | {"json": str(args.json)},
    }
    print(report["machine"], flush=True)
    report["exactness"] = exactness(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peaks = {"measured": matmul_peak(device, dtype, args.tiny)}
    peaks["nominal"] = next((v for k, v in NOMINAL_BF16.items() if k in name), None)
    report["matmul_tflops"] = round(peaks["measured"] / 1e12, 1)
    report["nominal_tflops"] = peaks["nominal"] and round(peaks["nominal"] / 1e12, 1)
    report["models"] = {}
    for model_name in args.models:
        if time.monotonic() > deadline:
            report["models"][model_name] = {"skipped": "over --budget"}
            continue
        report["models"][model_name] = throughput(model_name, args, device, dtype, peaks, deadline)
    report["seconds"] = round(time.monotonic() - started, 1)
    ok = all(v["ok"] for v in report["exactness"].values())
    report["ok"] = ok
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu_check: exactness {'ok' if ok else 'FAILED'}, {report['seconds']} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
