"""A screen, end to end: dataset URI → samples → model work on workers → one DuckDB transaction per chunk.

`prepare` resolves everything once on the driver into a `ScreenPlan` (model, device and dtype (`Work`),
layers, unit vectors, score settings, the run's identity), which the workers receive as is. Resume is by
key: a run is identified by everything that determines its values (runs.Run), each chunk of samples is
committed with its scores in one transaction, and a rerun skips what is stored.

Before any model work: the dataset is found and its first record read (a dataset with no records stops
here), and the vectors and their sidecars are checked. A run is recorded as running, then finished (after
a checkpoint: the .duckdb file alone holds it) or failed with its error (any exception, Ctrl-C included:
"interrupted", SIGTERM "terminated"); either way a rerun of the same command resumes it.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from screener.calibration import reference_rows
from screener.choices import DEFAULT_MAX_TOKENS
from screener.datasets import Done, ReadStats, canonical_uri, local_files, read_samples
from screener.distributed import StageStats, model_workers, on_cluster, run_stage
from screener.errors import ScreenerError, Terminated, UserError, signalled
from screener.models import DEFAULT_MODEL, ModelRef, resolve_model
from screener.progress import Progress
from screener.records import MODES, TURNS, Reject, Sample, Scored
from screener.runs import Run
from screener.scoring import GenerationSettings, Prepared, Scorer, ScoreSettings
from screener.store import DEFAULT_DB, FinishedRows, Store, check_not_busy, one_line
from screener.vectors import Vector, vectors_at
from screener.work import Work


@dataclass
class ScreenConfig:
    """A screen as the user asked for it (the command line's options)."""

    dataset: str
    db: str = DEFAULT_DB
    model: str = DEFAULT_MODEL
    traits: list[str] = field(default_factory=list)
    vectors: list[str] = field(default_factory=list)  # NAME=PATH
    layers: list[int] = field(default_factory=list)  # empty: each vector's chosen layer
    mode: str = "proxy"
    turns: str = "all"
    split: str | None = None
    limit: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    batch_tokens: int | None = None  # None: a device-dependent default
    max_batch_size: int | None = None
    chunk_size: int | None = None  # samples per worker call and per commit; None: 64 on CPU, 512 on GPU
    dtype: str = "auto"
    device: str = "auto"
    actors: int | None = None  # None: one per GPU, or one per 2 cores; 0: no Ray
    compile: bool = False  # torch.compile the blocks: a one-off compile per actor (scoring.ScoreSettings)
    address: str | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    progress: bool = True


@dataclass(frozen=True)
class ScreenPlan:
    """Everything a screen's model work needs, resolved once on the driver and sent to workers as is."""

    model: ModelRef
    work: Work  # device and dtype
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
    rejected: int  # this invocation (rejects of kind "bad")
    total_scored: int  # in the run, all invocations
    total_rejected: int
    seconds: float
    read: ReadStats
    # multi-turn conversations by how their turns were read (scoring.ONE_PASS, WINDOWS, PER_TURN)
    paths: dict[str, int] = field(default_factory=dict)
    skipped: int = 0  # this invocation: assistant turns with tool calls only
    total_skipped: int = 0
    total_unreadable_files: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # this invocation's reject reasons, with counts
    # when (epoch seconds) the first model batch and the last chunk were done: the fixed costs around them
    first_batch_done: float | None = None
    last_batch_done: float | None = None
    workers: StageStats = field(default_factory=StageStats)  # the model actors (none: in-process)

    def to_json(self) -> dict:
        """The summary for scripts (`screen --json`): counts, what was read, and when the model work began
        and ended (epoch seconds: the fixed costs around it)."""
        r = self.read
        return {
            "run_id": self.run_id,
            "resumed": self.resumed,
            "scored": self.scored,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "total_scored": self.total_scored,
            "total_rejected": self.total_rejected,
            "total_skipped": self.total_skipped,
            "total_unreadable_files": self.total_unreadable_files,
            "seconds": round(self.seconds, 3),
            "reasons": self.reasons,
            "paths": self.paths,
            "read": {
                "records": r.records,
                "files": r.per_file,
                "format": r.format,
                "unreadable": r.unreadable,
                "empty_files": r.empty_files,
                "truncated": [list(t) for t in r.truncated],
            },
            "first_batch_done": self.first_batch_done,
            "last_batch_done": self.last_batch_done,
        }

    def lines(self) -> list[str]:
        rate = self.scored / self.seconds if self.seconds else 0.0
        skipped = f", skipped {self.skipped} tool-call turns" if self.skipped else ""
        totals = f"run totals: {self.total_scored} scored, {self.total_rejected} rejected"
        if self.total_skipped:
            totals += f", {self.total_skipped} tool-call turns skipped"
        if self.total_unreadable_files:
            totals += f", {_plural(self.total_unreadable_files, 'unreadable file')}"
        out = [
            f"run {self.run_id}{' (resumed)' if self.resumed else ''}: scored {self.scored} samples, "
            f"rejected {self.rejected}{skipped} in {self.seconds:.1f} s ({rate:.2f} samples/s)",
            totals,
        ]
        r = self.read
        per_file = ", ".join(f"{Path(f).name} {r.per_file.get(f, 0):,}" for f in r.files[:10])
        if len(r.files) == 1:
            out.append(f"read {_plural(r.records, 'row')} from {r.files[0]} ({r.format or 'no records'})")
        elif r.files:
            more = ", ..." if len(r.files) > 10 else ""
            out.append(f"read {_plural(r.records, 'row')} from {len(r.files)} files ({per_file}{more})")
        if self.reasons:
            top = sorted(self.reasons.items(), key=lambda kv: -kv[1])[:3]
            out.append("rejected: " + "; ".join(f"{n} × {reason}" for reason, n in top) + " (table rejects)")
        if (w := self.workers).actors:
            line = f"model actors: {w.actors} on {_plural(len(w.nodes), 'node')}"
            if w.actors_lost:
                line += (
                    f"; {w.actors_lost} lost mid-run and restarted (a node or process died): their "
                    "batches were rerun, and every sample was committed once"
                )
            out.append(line)
        if self.paths:
            out.append(
                "multi-turn conversations: "
                + ", ".join(f"{n} {path}" for path, n in sorted(self.paths.items()))
                + " (see docs/inputs.md: Every assistant turn)"
            )
        for path, at_byte, recovered in r.truncated:
            out.append(
                f"warning: {path} is a truncated JSON array: recovered {recovered} "
                f"complete records, parsing stopped at byte {at_byte}"
            )
        for path, reason in r.unreadable.items():
            out.append(f"warning: {path}: {reason}")
        if empty := r.empty_files:
            out.append(f"warning: {_plural(len(empty), 'empty file')}: {', '.join(empty[:10])}")
        if r.ignored:
            more = ", ..." if len(r.ignored) > 10 else ""
            out.append(
                f"warning: {_plural(len(r.ignored), 'file')} not read, not data by their name: "
                f"{', '.join(r.ignored[:10])}{more}"
            )
        return out


def _plural(n: int, what: str) -> str:
    return f"{n:,} {what}{'s' * (n != 1)}"


@dataclass(slots=True)
class Chunk:
    """Samples to score together and commit in one transaction, with the rejects found before scoring."""

    samples: list[Sample]
    rejects: list[Reject]  # found by the reader or the duplicate check; committed with the chunk


class ScreenStage:
    """The model work of a screen, run once per worker (`setup`) and per chunk (`process`)."""

    def __init__(self, plan: ScreenPlan, overlap: bool | None = None):
        self.plan = plan
        self.scorer: Scorer | None = None
        # on a GPU the next chunk is tokenised while the model scores this one (distributed.OverlappedStage)
        self.overlap = plan.work.gpu if overlap is None else overlap

    def setup(self) -> None:
        self.scorer = self.plan.work.scorer(self.plan.model, self.plan.units, self.plan.settings)

    def prepare(self, chunk: Chunk) -> Prepared:
        """The chunk's CPU work before the model (`Scorer.prepare`)."""
        assert self.scorer is not None, "setup() first"
        return self.scorer.prepare(chunk.samples)

    def process(
        self, chunk: Chunk, report=None, prepared: Prepared | None = None
    ) -> tuple[list[Scored | Reject], dict]:
        """The chunk's results, in its order, and how the work was done (batch sizes, for the run's
        settings). `report(n)` hears of each model batch's samples as they are done; `prepared`: the
        chunk's `prepare`, done beforehand."""
        assert self.scorer is not None, "setup() first"
        before = self.scorer.seconds.copy()
        results = self.scorer.score(chunk.samples, report, prepared)
        spent = {k: v - before[k] for k, v in self.scorer.seconds.items()}
        return results, self.scorer.runtime() | {"model_seconds": spent}


# -- planning ---------------------------------------------------------------------------------------


def _run(cfg: ScreenConfig, model: ModelRef, vectors: list[Vector], layers, dtype: torch.dtype) -> Run:
    settings = {
        "dtype": str(dtype).removeprefix("torch."),
        "max_tokens": cfg.max_tokens,
        "turns": cfg.turns,
        "split": cfg.split,
        # each vector's own layer (its sidecar's chosen layer; none when --layer chose for all): what the
        # read commands show it at by default
        "vectors": {
            v.name: {"path": v.path, "sha256": v.sha256, "layer": None if cfg.layers else v.default_layer}
            for v in vectors
        },
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
    # before the model is looked at
    work = Work.resolve(cfg.device, cfg.dtype, here=not on_cluster(cfg.address))
    model = resolve_model(cfg.model)
    vectors, layers, units = vectors_at(model, cfg.traits, cfg.vectors, cfg.layers)
    settings = work.score_settings(
        layers=layers,
        mode=cfg.mode,
        max_tokens=cfg.max_tokens,
        batch_tokens=cfg.batch_tokens,
        max_batch_size=cfg.max_batch_size,
        compile=cfg.compile,
        generation=cfg.generation,
    )
    run = _run(cfg, model, vectors, layers, work.dtype)
    return ScreenPlan(model, work, tuple(vectors), units, settings, run, work.chunk_size(cfg.chunk_size))


# -- the pipeline -----------------------------------------------------------------------------------


def pending_chunks(
    items: Iterator[Sample | Reject | Done], store: Store, run_id: str, size: int
) -> Iterator[Chunk]:
    """Group the stream into chunks of samples still to score (stored ones are skipped: a resume), each
    with the rejects read before it and those for duplicate sample ids. A record's turns stay in one
    chunk, so they can share a teacher-forced pass and are committed together. A finished row (`Done`)
    counts its samples too, so every chunk holds the samples it holds in a read from the start: a resume
    scores each in the same batches, to the same values."""
    pending: list[Sample] = []
    rejects: list[Reject] = []
    n, last = 0, None  # samples read into the chunk, and the record of the last

    def flush() -> Chunk:
        todo, duplicates = store.pending(run_id, pending)
        return Chunk(todo, rejects + duplicates)

    for item in items:
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        key = (item.source_file, item.source_row)
        if n >= size and key != last:
            if pending or rejects:  # else every row of it finished before
                yield flush()
            pending, rejects, n = [], [], 0
        if isinstance(item, Done):
            n += len(item.ids)
        else:
            pending.append(item)
            n += 1
        last = key
    if pending or rejects:
        yield flush()


def screen(cfg: ScreenConfig) -> Summary:
    """Screen `cfg.dataset` into `cfg.db`; resumes the run when it exists."""
    started = time.perf_counter()
    stats = ReadStats()
    finished = _Finished()
    # The dataset first: a missing path fails here, before the model is looked at.
    items = read_samples(
        cfg.dataset, turns=cfg.turns, split=cfg.split, limit=cfg.limit, stats=stats, finished=finished
    )
    _check_db_is_not_input(cfg.db, cfg.dataset)
    check_not_busy(cfg.db)
    plan = prepare(cfg)
    run = plan.run
    items = _first_checked(items, stats, cfg)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    paths: Counter[str] = Counter()
    with Store(cfg.db) as store:
        resumed = store.begin_run(run)
        if resumed:  # the rows finished before are skipped unparsed (their ids given)
            finished.rows = store.finished(run.run_id)
        store.write_references(run.run_id, list(reference_rows(plan.vectors, plan.model.sha256, run.layers)))

        def commit(chunk: Chunk, results: list[Scored | Reject]) -> None:
            done = [r for r in results if isinstance(r, Scored)]
            bad = chunk.rejects + [r for r in results if isinstance(r, Reject)]
            # the read has stopped when the chunk holding the row a --limit cut is committed
            store.write(
                run.run_id, run.layers, run.traits, done, bad, samples=chunk.samples, cut_row=stats.cut_row
            )
            by_record = {(r.source_file, r.source_row): r.extra["path"] for r in done if "path" in r.extra}
            paths.update(by_record.values())
            counts["scored"] += len(done)
            counts.update(r.kind for r in bad)
            reasons.update(r.reason for r in bad if r.kind == "bad")

        def work() -> Iterator[Chunk]:
            for chunk in pending_chunks(items, store, run.run_id, plan.chunk_size):
                if chunk.samples:
                    yield chunk
                else:  # nothing left to score (a resume): commit its rejects, send nothing to a worker
                    commit(chunk, [])

        progress = Progress(enabled=cfg.progress, fraction=stats.fraction)
        counting = None
        if cfg.progress:
            done_before = store.counts(run.run_id)[0] if resumed else 0
            # a resume's count skips the finished rows unparsed too, on a connection of its own
            counting = _count_ahead(
                cfg, progress, done_before, store.finished(run.run_id, cursor=True) if resumed else None
            )
        runtime: dict = {}  # the last chunk's: by then the batch sizes are settled
        times: dict[str, float] = {}
        model_seconds: Counter[str] = Counter()  # summed over chunks (and workers)

        def report(n: int) -> None:
            times.setdefault("first", time.time())
            progress.update(n)

        try:
            workers = model_workers(str(plan.work.device), cfg.actors, address=cfg.address)
            actors = StageStats()
            with workers as resources, progress:
                where = "in this process" if not resources.actors else f"on {resources.actors} Ray workers"
                progress.phase(
                    f"loading the model {plan.model.name} ({plan.work.dtype_name} on {plan.work.device}) "
                    f"{where}; the first batches also tune the batch size"
                )
                stage = ScreenStage(plan)
                for chunk, (results, chunk_runtime) in run_stage(stage, work(), resources, report, actors):
                    commit(chunk, results)
                    model_seconds.update(chunk_runtime.pop("model_seconds"))
                    runtime, times["last"] = chunk_runtime, time.time()
            if stats.records == 0:  # every file was empty or could not be read
                raise UserError(f"{cfg.dataset}: no records could be read ({_no_records(stats)})")
            runtime |= {
                "workers": resources.actors or "in-process",
                "threads": resources.threads,
                "model_seconds": {k: round(v, 2) for k, v in model_seconds.items()},
            }
            if resources.actors:
                runtime |= {"nodes": len(actors.nodes), "actors_lost": actors.actors_lost}
            store.record_runtime(run.run_id, runtime)
            # the rows read, if to the input's end: export then knows rows added since as unscreened
            read_all = cfg.limit is None or stats.samples < cfg.limit
            total_scored, total_rejected = store.finish_run(run.run_id, stats.records if read_all else None)
        except BaseException as e:
            # an error a signal caused is recorded as the signal, as the command ends (cli.run)
            cause = e if isinstance(e, KeyboardInterrupt) else signalled() or e
            store.fail_run(run.run_id, _error_text(cause))
            raise
        finally:
            if counting is not None:  # its connection is the store's cursor: done before the store closes
                counting.stop()
        kinds = store.reject_counts(run.run_id)
    return Summary(
        run.run_id,
        resumed,
        counts["scored"],
        counts["bad"],
        total_scored,
        total_rejected,
        time.perf_counter() - started,
        stats,
        dict(paths),
        skipped=counts["skipped"],
        total_skipped=kinds["skipped"],
        total_unreadable_files=kinds["file"],
        reasons=dict(reasons),
        first_batch_done=times.get("first"),
        last_batch_done=times.get("last"),
        workers=actors,
    )


class _Finished:
    """The read's `Finished`: the store's finished rows of a resumed run, once the run is known (the read
    starts before, to check the input); until then, none."""

    def __init__(self) -> None:
        self.rows: FinishedRows | None = None

    def ids(self, row: int, file: str) -> list[str] | None:
        return None if self.rows is None else self.rows.ids(row, file)


class _Count:
    """The thread counting the input ahead (`_count_ahead`): `stop` ends it and waits for it."""

    def __init__(self, target) -> None:
        self.stopping = threading.Event()
        self.thread = threading.Thread(
            target=target, args=(self.stopping,), name="count-samples", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


def _count_ahead(
    cfg: ScreenConfig, progress: Progress, done_before: int, finished: FinishedRows | None = None
) -> _Count | None:
    """Count the input's samples in a thread beside the screen and give the progress its total, so its
    ETA is the work left over the rate (the share of bytes read runs ahead of the model: the reader reads
    a chunk ahead, and a small input is read whole before the first batch). Local files only: a hub
    dataset would be downloaded twice. `finished` (a resume): the run's finished rows, counted by their
    stored ids instead of parsed again (parsing them undid the resume's skip), on a connection the
    thread closes; the screen stops the thread (`_Count.stop`) before it closes the store."""
    try:
        local_files(cfg.dataset)
    except ScreenerError:
        if finished is not None:
            finished.close()
        return None

    def count(stopping: threading.Event) -> None:
        try:
            total = 0
            items = read_samples(
                cfg.dataset, turns=cfg.turns, split=cfg.split, limit=cfg.limit, finished=finished
            )
            for item in items:
                if stopping.is_set():
                    return
                total += len(item.ids) if isinstance(item, Done) else isinstance(item, Sample)
            progress.set_total(total, initial=done_before)
        except Exception:  # the screen's own read reports what is wrong with the input
            return
        finally:
            if finished is not None:
                finished.close()

    return _Count(count)


def _first_checked(items: Iterator[Sample | Reject], stats: ReadStats, cfg: ScreenConfig) -> Iterator:
    """The items, once the first has been read: a dataset with no records at all stops here, before the
    run is recorded (a file of no known row format too)."""
    first = next(items, None)
    if first is None and stats.records == 0 and cfg.limit != 0:
        raise UserError(f"{cfg.dataset}: no records to screen ({_no_records(stats)})")
    return itertools.chain([] if first is None else [first], items)


def _no_records(stats: ReadStats) -> str:
    if len(stats.files) == 1 and not stats.unreadable:
        return "the file is empty"
    parts = [
        f"{n} {what}"
        for n, what in ((len(stats.empty_files), "empty"), (len(stats.unreadable), "unreadable"))
        if n
    ]
    detail = "; ".join(f"{f}: {why}" for f, why in list(stats.unreadable.items())[:3])
    return f"{_plural(len(stats.files), 'file')}: {', '.join(parts)}" + (f"; {detail}" if detail else "")


def _check_db_is_not_input(db: str, dataset: str) -> None:
    """The results database must not be one of the files it screens."""
    try:
        inputs = local_files(dataset)
    except ScreenerError:  # a hub dataset
        return
    if any(os.path.realpath(db) == os.path.realpath(f) for f in inputs):
        raise UserError(
            f"--db {db} is a file of the dataset being screened; choose another path for the results"
        )


def _error_text(e: BaseException) -> str:
    """What a failed run records as its error: one line."""
    if isinstance(e, Terminated):
        return "terminated"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, ScreenerError):
        return one_line(e)
    return f"{type(e).__name__}: {one_line(e)}"
