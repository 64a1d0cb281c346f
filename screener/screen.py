"""A screen, end to end: dataset URI → samples → model work on actors → one DuckDB transaction per chunk.

Resume is by key: a run is identified by everything that determines its values (runs.Run), each
chunk of samples is committed with its scores in one transaction, and a rerun skips what is stored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from screener.datasets import ReadStats, canonical_uri, read_samples
from screener.distributed import model_workers, run_stage
from screener.errors import UserError
from screener.models import DEFAULT_MODEL, ModelRef, load_model, pick_device, pick_dtype, resolve_model
from screener.progress import Progress
from screener.records import Reject, Sample, Scored
from screener.runs import Run
from screener.scoring import GenerationSettings, Scorer, ScoreSettings
from screener.store import DEFAULT_DB, Store
from screener.vectors import Vector, builtin_traits, check_vector, resolve_vectors

DEFAULT_TRAITS = ("evil", "sycophantic", "hallucinating")


@dataclass
class ScreenConfig:
    dataset: str
    db: str = DEFAULT_DB
    model: str = DEFAULT_MODEL
    traits: list[str] = field(default_factory=list)
    vectors: list[str] = field(default_factory=list)  # NAME=PATH
    layers: list[int] = field(default_factory=list)  # empty: each vector's chosen layer
    mode: str = "proxy"
    turns: str = "last"
    split: str | None = None
    limit: int | None = None
    max_tokens: int = 2048
    batch_tokens: int | None = None  # None: a device-dependent default
    max_batch_size: int | None = None
    chunk_size: int | None = None  # samples per actor call and per commit; None: 64 on CPU, 512 on GPU
    dtype: str = "auto"
    device: str = "auto"
    actors: int | None = None  # None: one per GPU, or one per 2 cores; 0: no Ray
    compile: bool = False  # torch.compile the blocks: ~1.9x on bf16 CPU, after a 10-80 s compile per actor
    address: str | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    progress: bool = True


@dataclass
class Summary:
    run_id: str
    resumed: bool
    scored: int  # this invocation
    rejected: int  # this invocation
    total_scored: int  # in the run, all invocations
    total_rejected: int
    seconds: float
    read: ReadStats

    def lines(self) -> list[str]:
        rate = self.scored / self.seconds if self.seconds else 0.0
        out = [
            f"run {self.run_id}{' (resumed)' if self.resumed else ''}: scored {self.scored} samples, "
            f"rejected {self.rejected} in {self.seconds:.1f} s ({rate:.2f} samples/s)",
            f"run totals: {self.total_scored} scored, {self.total_rejected} rejected",
        ]
        r = self.read
        if r.truncated_file:
            out.append(
                f"warning: {r.truncated_file} is a truncated JSON array: recovered {r.recovered_records} "
                f"complete records, parsing stopped at byte {r.truncated_at_byte}"
            )
        return out


@dataclass(slots=True)
class Chunk:
    samples: list[Sample]
    rejects: list[Reject]  # found by the reader or the duplicate check; committed with the chunk


class ScreenStage:
    """The model work of a screen, run once per actor (`setup`) and per chunk (`process`)."""

    def __init__(
        self, model: ModelRef, device: str, dtype: str, vectors: list[Vector], settings: ScoreSettings
    ):
        self.model, self.device, self.dtype, self.settings = model, device, dtype, settings
        # only the rows of the layers scored travel to the actors (a 7B model's full vectors are MBs)
        self.rows = {layer: torch.stack([v.tensor[layer] for v in vectors]) for layer in settings.layers}
        self.shape = tuple(vectors[0].tensor.shape)
        self.scorer: Scorer | None = None

    def setup(self) -> None:
        # on a cluster the driver's cache path may not exist on this node: resolve the spec again here
        path = self.model.path if Path(self.model.path).exists() else resolve_model(self.model.spec).path
        device = pick_device(self.device)
        model, tok = load_model(path, device, pick_dtype(self.dtype, device))
        tensors = [torch.zeros(self.shape) for _ in range(len(next(iter(self.rows.values()))))]
        for layer, rows in self.rows.items():
            for t, row in zip(tensors, rows, strict=True):
                t[layer] = row
        self.scorer = Scorer(model, tok, tensors, self.settings)

    def process(self, chunk: Chunk) -> list[Scored | Reject]:
        assert self.scorer is not None, "setup() first"
        return self.scorer.score(chunk.samples)


def default_layers(vectors: list[Vector], num_layers: int) -> list[int]:
    """Each vector's chosen layer (from its sidecar); else two thirds of the way up, as in the paper."""
    chosen = {v.default_layer for v in vectors if v.default_layer is not None}
    return sorted(chosen) or [round(num_layers * 2 / 3)]


def prepare(cfg: ScreenConfig) -> tuple[ModelRef, list[Vector], Run, ScoreSettings]:
    """Resolve the model and vectors and check them against each other, before any model work."""
    model = resolve_model(cfg.model)
    traits = cfg.traits or (
        [] if cfg.vectors else [t for t in DEFAULT_TRAITS if t in builtin_traits(model.name)]
    )
    vectors = resolve_vectors(traits, cfg.vectors, model.name)
    for v in vectors:
        check_vector(v, model.num_layers, model.hidden_size, model.name)
    layers = sorted(set(cfg.layers)) or default_layers(vectors, model.num_layers)
    bad = [layer for layer in layers if not 0 <= layer <= model.num_layers]
    if bad:
        raise UserError(f"--layer {bad}: {model.name} has hidden_states layers 0..{model.num_layers}")
    if cfg.mode not in ("proxy", "natural"):
        raise UserError(f"--mode must be proxy or natural, not {cfg.mode!r}")
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    gpu = device.type == "cuda"
    settings = ScoreSettings.for_device(
        gpu,
        layers=tuple(layers),
        mode=cfg.mode,
        max_tokens=cfg.max_tokens,
        batch_tokens=cfg.batch_tokens,
        max_batch_size=cfg.max_batch_size,
        compile=cfg.compile,
        generation=cfg.generation,
    )
    run_settings = {
        "dtype": str(dtype).removeprefix("torch."),
        "max_tokens": cfg.max_tokens,
        "turns": cfg.turns,
        "split": cfg.split,
        "vectors": {v.name: {"path": v.path, "sha256": v.sha256} for v in vectors},
    }
    if cfg.mode == "natural":
        run_settings["generation"] = asdict(cfg.generation)
    run = Run(
        model=cfg.model,
        model_sha256=model.sha256,
        dataset_uri=canonical_uri(cfg.dataset),
        mode=cfg.mode,
        layers=tuple(layers),
        traits=tuple(v.name for v in vectors),
        settings=run_settings,
    )
    return model, vectors, run, settings


def _chunks(samples: Iterator[Sample | Reject], store: Store, run_id: str, size: int) -> Iterator[Chunk]:
    """Group the stream into chunks of samples still to score; already stored samples are skipped."""
    pending: list[Sample] = []
    rejects: list[Reject] = []

    def flush() -> Chunk:
        todo, dups = store.pending(run_id, pending)
        chunk = Chunk(todo, rejects + dups)
        pending.clear()
        return chunk

    for item in samples:
        if isinstance(item, Reject):
            rejects = [*rejects, item]
            continue
        pending.append(item)
        if len(pending) >= size:
            yield flush()
            rejects = []
    if pending or rejects:
        yield flush()


def screen(cfg: ScreenConfig) -> Summary:
    started = time.perf_counter()
    model, vectors, run, settings = prepare(cfg)
    stats = ReadStats()
    # the run's dtype, not "auto": an actor on another node must not pick a different one
    stage = ScreenStage(model, cfg.device, run.settings["dtype"], vectors, settings)
    counts = {"scored": 0, "rejected": 0}
    with Store(cfg.db) as store:
        resumed = store.begin_run(run)

        def commit(chunk: Chunk, results: list[Scored | Reject]) -> None:
            done = [r for r in results if isinstance(r, Scored)]
            bad = chunk.rejects + [r for r in results if isinstance(r, Reject)]
            store.write(run.run_id, run.layers, run.traits, done, bad, samples=chunk.samples)
            counts["scored"] += len(done)
            counts["rejected"] += len(bad)

        def work() -> Iterator[Chunk]:
            stream = read_samples(cfg.dataset, turns=cfg.turns, split=cfg.split, limit=cfg.limit, stats=stats)
            size = cfg.chunk_size or (512 if pick_device(cfg.device).type == "cuda" else 64)
            for chunk in _chunks(stream, store, run.run_id, size):
                if chunk.samples:
                    yield chunk
                else:  # nothing left to score (a resume): commit its rejects, send nothing to an actor
                    commit(chunk, [])

        workers = model_workers(str(pick_device(cfg.device)), cfg.actors, address=cfg.address)
        with workers as resources, Progress(total=cfg.limit, enabled=cfg.progress) as progress:
            for chunk, results in run_stage(stage, work(), resources):
                commit(chunk, results)
                progress.update(len(chunk.samples))
        total_scored, total_rejected = store.finish_run(run.run_id)
    scored, rejected = counts["scored"], counts["rejected"]
    return Summary(
        run.run_id,
        resumed,
        scored,
        rejected,
        total_scored,
        total_rejected,
        time.perf_counter() - started,
        stats,
    )


# -- command line -----------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_screen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dataset", help="a .jsonl/.json/.parquet/.csv file, a folder, a glob, or a hub dataset (org/name)"
    )
    p.add_argument("--db", default=DEFAULT_DB, help="DuckDB file for the results (default: %(default)s)")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="HF folder, .gguf file, hub id, or 'default' (SmolLM2-135M)"
    )
    p.add_argument("--traits", type=_str_list, default=[], help="built-in vectors, e.g. evil,sycophantic")
    p.add_argument(
        "--vector", action="append", default=[], metavar="NAME=PATH", help="a vector file (repeatable)"
    )
    p.add_argument(
        "--layer",
        type=_int_list,
        default=[],
        help="hidden_states layers, e.g. 20 or 12,20 (default: each vector's chosen layer)",
    )
    p.add_argument(
        "--mode",
        choices=["proxy", "natural"],
        default="proxy",
        help="proxy: ΔP vs the last prompt token; natural: also generate the model's own answer",
    )
    p.add_argument(
        "--turns", choices=["last", "all"], default="last", help="score the last or every assistant turn"
    )
    p.add_argument("--split", default=None, help="split of a hub dataset (default: train)")
    p.add_argument("--limit", type=int, default=None, help="screen only the first N samples")
    p.add_argument("--max-tokens", type=int, default=2048, help="truncate longer samples (flagged)")
    p.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per forward batch")
    p.add_argument(
        "--batch-size", type=int, default=None, dest="max_batch_size", help="max samples per batch"
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="samples per actor call and per commit (default: 64 on CPU, 512 on GPU)",
    )
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--actors",
        type=int,
        default=None,
        help="model actors (default: one per GPU, or one per "
        "2 CPU cores); 0 runs in this process without Ray",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="natural mode: length of the model's answer"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="natural mode: 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoder blocks (faster on large "
        "screens; each actor compiles once, 10-80 s on a CPU)",
    )
    p.add_argument("--no-progress", action="store_false", dest="progress")


def config_from_args(args: argparse.Namespace) -> ScreenConfig:
    gen = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    keys = ScreenConfig.__dataclass_fields__.keys() - {"generation", "traits", "vectors", "layers"}
    cfg = ScreenConfig(**{k: getattr(args, k) for k in keys}, generation=gen)
    cfg.traits, cfg.vectors, cfg.layers = args.traits, args.vector, args.layer
    return cfg


def run_command(args: argparse.Namespace) -> int:
    summary = screen(config_from_args(args))
    for line in summary.lines():
        print(line)
    print(json.dumps({"run_id": summary.run_id, "db": args.db}))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("screen", help="score a dataset's samples against persona vectors into DuckDB")
    add_screen_arguments(p)
    p.set_defaults(func=run_command)


if __name__ == "__main__":  # pragma: no cover
    from screener.cli import main

    sys.exit(main(["screen", *sys.argv[1:]]))
