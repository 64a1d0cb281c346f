"""A screen, end to end: dataset URI → samples → model work on workers → one DuckDB transaction per chunk.

`prepare` resolves everything once on the driver into a `ScreenPlan` (model, device, dtype, layers, unit
vectors, score settings, the run's identity), which the workers receive as is. Resume is by key: a run is
identified by everything that determines its values (runs.Run), each chunk of samples is committed with
its scores in one transaction, and a rerun skips what is stored.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from screener.datasets import ReadStats, canonical_uri, read_samples
from screener.distributed import model_workers, run_stage
from screener.errors import UserError
from screener.models import DEFAULT_MODEL, ModelRef, pick_device, pick_dtype, resolve_model
from screener.progress import Progress
from screener.records import MODES, TURNS, Reject, Sample, Scored
from screener.runs import Run
from screener.scoring import GenerationSettings, Scorer, ScoreSettings
from screener.store import Store
from screener.vectors import Vector, builtin_traits, check_vector, resolve_vectors, unit_vectors

DEFAULT_TRAITS = ("evil", "sycophantic", "hallucinating")


@dataclass
class ScreenConfig:
    """A screen as the user asked for it (the command line's options)."""

    dataset: str
    db: str = "screen.duckdb"
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
    chunk_size: int | None = None  # samples per worker call and per commit; None: 64 on CPU, 512 on GPU
    dtype: str = "auto"
    device: str = "auto"
    actors: int | None = None  # None: one per GPU, or one per 2 cores; 0: no Ray
    compile: bool = False  # torch.compile the blocks: ~1.9x on bf16 CPU, after a 10-80 s compile per actor
    address: str | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    progress: bool = True


@dataclass(frozen=True)
class ScreenPlan:
    """Everything a screen's model work needs, resolved once on the driver and sent to workers as is."""

    model: ModelRef
    device: torch.device
    dtype: torch.dtype
    vectors: tuple[Vector, ...]
    units: dict[int, torch.Tensor]  # {layer: [hidden, traits]} unit vectors, traits in `run.traits` order
    settings: ScoreSettings
    run: Run
    chunk_size: int  # samples per worker call and per commit

    @property
    def layers(self) -> tuple[int, ...]:
        return self.settings.layers


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
    """Samples to score together and commit in one transaction, with the rejects found before scoring."""

    samples: list[Sample]
    rejects: list[Reject]  # found by the reader or the duplicate check; committed with the chunk


class ScreenStage:
    """The model work of a screen, run once per worker (`setup`) and per chunk (`process`)."""

    def __init__(self, plan: ScreenPlan):
        self.plan = plan
        self.scorer: Scorer | None = None

    def setup(self) -> None:
        model, tok = self.plan.model.load(self.plan.device, self.plan.dtype)
        self.scorer = Scorer(model, tok, self.plan.units, self.plan.settings)

    def process(self, chunk: Chunk) -> list[Scored | Reject]:
        assert self.scorer is not None, "setup() first"
        return self.scorer.score(chunk.samples)


# -- planning ---------------------------------------------------------------------------------------


def default_layers(vectors: list[Vector], num_layers: int) -> list[int]:
    """Each vector's chosen layer (from its sidecar); else two thirds of the way up, as in the paper."""
    chosen = {v.default_layer for v in vectors if v.default_layer is not None}
    return sorted(chosen) or [round(num_layers * 2 / 3)]


def _vectors(cfg: ScreenConfig, model: ModelRef) -> list[Vector]:
    traits = cfg.traits or (
        [] if cfg.vectors else [t for t in DEFAULT_TRAITS if t in builtin_traits(model.name)]
    )
    vectors = resolve_vectors(traits, cfg.vectors, model.name)
    for v in vectors:
        check_vector(v, model.num_layers, model.hidden_size, model.name)
    return vectors


def _layers(cfg: ScreenConfig, vectors: list[Vector], model: ModelRef) -> tuple[int, ...]:
    layers = sorted(set(cfg.layers)) or default_layers(vectors, model.num_layers)
    if bad := [layer for layer in layers if not 0 <= layer <= model.num_layers]:
        raise UserError(f"--layer {bad}: {model.name} has hidden_states layers 0..{model.num_layers}")
    return tuple(layers)


def _run(cfg: ScreenConfig, model: ModelRef, vectors: list[Vector], layers, dtype: torch.dtype) -> Run:
    settings = {
        "dtype": str(dtype).removeprefix("torch."),
        "max_tokens": cfg.max_tokens,
        "turns": cfg.turns,
        "split": cfg.split,
        "vectors": {v.name: {"path": v.path, "sha256": v.sha256} for v in vectors},
    }
    if cfg.mode == "natural":
        settings["generation"] = asdict(cfg.generation)
    return Run(
        model=cfg.model,
        model_sha256=model.sha256,
        dataset_uri=canonical_uri(cfg.dataset),
        mode=cfg.mode,
        layers=layers,
        traits=tuple(v.name for v in vectors),
        settings=settings,
    )


def prepare(cfg: ScreenConfig) -> ScreenPlan:
    """Resolve the model, vectors, layers, device and dtype, and check them, before any model work."""
    if cfg.mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not {cfg.mode!r}")
    if cfg.turns not in TURNS:
        raise UserError(f"--turns must be one of {', '.join(TURNS)}, not {cfg.turns!r}")
    model = resolve_model(cfg.model)
    vectors = _vectors(cfg, model)
    layers = _layers(cfg, vectors, model)
    units = unit_vectors([v.tensor for v in vectors], layers, [v.path for v in vectors])
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    gpu = device.type == "cuda"
    settings = ScoreSettings.for_device(
        gpu,
        layers=layers,
        mode=cfg.mode,
        max_tokens=cfg.max_tokens,
        batch_tokens=cfg.batch_tokens,
        max_batch_size=cfg.max_batch_size,
        compile=cfg.compile,
        generation=cfg.generation,
    )
    run = _run(cfg, model, vectors, layers, dtype)
    chunk_size = cfg.chunk_size or (512 if gpu else 64)
    return ScreenPlan(model, device, dtype, tuple(vectors), units, settings, run, chunk_size)


# -- the pipeline -----------------------------------------------------------------------------------


def pending_chunks(items: Iterator[Sample | Reject], store: Store, run_id: str, size: int) -> Iterator[Chunk]:
    """Group the stream into chunks of samples still to score (stored ones are skipped: a resume), each
    with the rejects read before it and those for duplicate sample ids."""
    pending: list[Sample] = []
    rejects: list[Reject] = []

    def flush() -> Chunk:
        todo, duplicates = store.pending(run_id, pending)
        return Chunk(todo, rejects + duplicates)

    for item in items:
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        pending.append(item)
        if len(pending) >= size:
            yield flush()
            pending, rejects = [], []
    if pending or rejects:
        yield flush()


def screen(cfg: ScreenConfig) -> Summary:
    """Screen `cfg.dataset` into `cfg.db`; resumes the run when it exists."""
    started = time.perf_counter()
    plan = prepare(cfg)
    run = plan.run
    stats = ReadStats()
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
            items = read_samples(cfg.dataset, turns=cfg.turns, split=cfg.split, limit=cfg.limit, stats=stats)
            for chunk in pending_chunks(items, store, run.run_id, plan.chunk_size):
                if chunk.samples:
                    yield chunk
                else:  # nothing left to score (a resume): commit its rejects, send nothing to a worker
                    commit(chunk, [])

        workers = model_workers(str(plan.device), cfg.actors, address=cfg.address)
        with workers as resources, Progress(total=cfg.limit, enabled=cfg.progress) as progress:
            for chunk, results in run_stage(ScreenStage(plan), work(), resources):
                commit(chunk, results)
                progress.update(len(chunk.samples))
        total_scored, total_rejected = store.finish_run(run.run_id)
    return Summary(
        run.run_id,
        resumed,
        counts["scored"],
        counts["rejected"],
        total_scored,
        total_rejected,
        time.perf_counter() - started,
        stats,
    )
