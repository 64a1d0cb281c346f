"""Model work on Ray actors: one actor per GPU, or N CPU actors sharing the cores.

A *stage* is any picklable object with `setup()` (load the model, once per actor) and `process(batch)`
(return small results, never hidden states). `run_stage` streams batches through a pool of actors with
at most `2 × actors` batches in flight, so the driver's memory does not grow with the dataset, and
yields `(batch, result)` as batches complete.

Faults: an actor that dies mid-batch (killed, OOM, node lost) is restarted by Ray (`max_restarts`, its
`setup` runs again) and its batches are retried (`max_task_retries=-1`). When Ray's restarts run out,
the driver replaces the actor and resubmits its batches, but only if it had finished a batch: an actor
whose setup raises (a bad model path) or that keeps dying before finishing anything fails the run with
the actor's error instead of restarting forever. A batch is yielded once, when its result arrives, and
the caller commits each result in one transaction, so every sample is committed exactly once. A
`StageStats` given to `run_stage` hears which nodes the actors ran on and how many were lost mid-run
(seen as a batch's result coming from a new process of the same actor, or a replaced actor), so a
screen's summary can say that a node went away and its work was redone.

The Ray session the actors live in (attached to a cluster, or a private embedded one) is
ray_session.py's; `model_workers` opens it when the plan needs actors.

Why a hand-written loop and not Ray Data `map_batches`: the driver numbers every row once, in the order
it reads them, and looks up on the driver which are already stored (a resume against the one DuckDB
writer); a record's turns stay in one chunk, so they share a teacher-forced pass and commit together.
Ray Data's readers and block boundaries keep none of the three, so the reader stays ours and a bounded
`ray.wait` loop over restartable actors gives the streaming, backpressure and retries (datatrove
hand-rolls the same loop).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from screener.errors import WorkerError
from screener.ray_session import RaySession

log = logging.getLogger(__name__)


class Stage(Protocol):
    def setup(self) -> None: ...
    def process(self, batch: Any, report: Callable[[int], None] | None = None) -> Any: ...


class OverlappedStage(Stage, Protocol):
    """A stage whose CPU preparation of a batch can run beside the model work of the one before.
    `prepare(batch)` must be a pure function of the batch that leaves `process` the same result:
    `process(batch, report, prepare(batch))` == `process(batch, report)`. `overlap`: whether to (a GPU's
    model work leaves the CPU idle; on a CPU both would share the same cores)."""

    overlap: bool

    def prepare(self, batch: Any) -> Any: ...
    def process(
        self, batch: Any, report: Callable[[int], None] | None = None, prepared: Any = None
    ) -> Any: ...


def overlaps(stage: Stage) -> bool:
    return bool(getattr(stage, "overlap", False)) and callable(getattr(stage, "prepare", None))


Progress = Callable[[int], None]  # called with the units of work done since the last call


@dataclass
class StageStats:
    """What happened to the actors of a `run_stage` call (nothing for in-process work)."""

    actors: int = 0
    nodes: set[str] = field(default_factory=set)  # Ray node ids the actors ran on
    actors_lost: int = 0  # actor processes that died mid-run (restarted by Ray or replaced)


@dataclass(frozen=True)
class Resources:
    actors: int  # 0 = run in this process, without Ray
    num_cpus: float  # per actor
    num_gpus: float  # per actor
    threads: int  # torch threads per actor


def plan_resources(device: str, actors: int | None = None, cpus: int | None = None) -> Resources:
    """One actor per GPU on CUDA; on CPU, `actors` (default: one per 2 cores, at most 4) sharing the cores.

    CPU actors ask for fractional CPUs that leave half a CPU unclaimed, so the pool never takes every
    CPU slot: a job driver (`ray job submit` runs it as a task) or another task beside it can still be
    scheduled, where whole CPUs for every actor would leave it waiting for ever.
    """
    cpus = cpus or os.cpu_count() or 1
    if device.startswith("cuda"):
        n = actors if actors is not None else max(1, _gpu_count())
        return Resources(n, 1.0, 1.0 if n else 0.0, max(1, min(4, cpus // max(n, 1))))
    if actors == 0:
        return Resources(0, 0.0, 0.0, cpus)
    n = actors if actors is not None else max(1, min(4, cpus // 2))
    threads = max(1, cpus // n)
    # together the actors leave half a CPU free, however many are asked for
    per_actor = min(threads - 0.5, (cpus - 0.5) / n)
    return Resources(n, max(math.floor(per_actor * 1e4) / 1e4, 0.01), 0.0, threads)  # Ray's granularity


@contextlib.contextmanager
def model_workers(
    device: str, actors: int | None = None, cpus: int | None = None, address: str | None = None
) -> Iterator[Resources]:
    """The resources for `run_stage`, planned inside the Ray session they need (none for `actors=0`):
    on a cluster the GPUs to count are the cluster's, not the driver's node's.

    With no cluster asked for (`address`, `$RAY_ADDRESS`) and no `actors` given, a plan of one local
    worker (a 2-core machine, one GPU) runs in this process: Ray would only add its start-up and its
    processes to the same cores. Resume and kill -9 safety come from the store, not from Ray.
    """
    cluster = on_cluster(address)
    if actors == 0 or (actors is None and not cluster and _local_workers(device, cpus) == 1):
        yield plan_resources(device, 0, cpus)
        return
    with RaySession(address):
        yield plan_resources(device, actors, cpus)


def on_cluster(address: str | None) -> bool:
    """Whether model workers run on a Ray cluster (`address`, `$RAY_ADDRESS`) rather than this machine."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def _local_workers(device: str, cpus: int | None) -> int:
    """How many workers the default plan gives on this machine alone."""
    if device.startswith("cuda"):
        import torch

        return max(1, torch.cuda.device_count())
    return plan_resources(device, None, cpus).actors


def _gpu_count() -> int:
    import ray

    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.device_count()


class _StageActor:
    """One worker: sets its stage up once, then runs the model on one batch at a time. `progress` runs in
    a concurrency group of its own, so the driver can ask how far the current batch is while it runs. Two
    `process` calls run at once (the driver keeps two batches in flight): with an overlapped stage, the
    queued batch is prepared on the CPU (one at a time) while the model works on the other."""

    def __init__(self, stage: Stage, threads: int):
        import threading

        import torch

        torch.set_num_threads(threads)
        self.stage = stage
        self.done = 0
        self.restarted: bool | None = None
        self.prepare_lock, self.model_lock = threading.Lock(), threading.Lock()
        stage.setup()

    def pid(self) -> int:
        return os.getpid()

    def _report(self, n: int) -> None:
        self.done += n

    def process(self, batch: Any) -> tuple[Any, int, str, bool]:
        """The stage's result, with the process and node that computed it and whether this process is a
        restart of the actor (a restart changes the pid)."""
        import ray

        if self.restarted is None:  # asked of the GCS once per process
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        node = ray.get_runtime_context().get_node_id()
        if overlaps(self.stage):
            with self.prepare_lock:
                prepared = self.stage.prepare(batch)  # type: ignore[attr-defined]
            with self.model_lock:
                result = self.stage.process(batch, self._report, prepared)  # type: ignore[call-arg]
        else:
            with self.model_lock:
                result = self.stage.process(batch, self._report)
        return result, os.getpid(), node, self.restarted

    def progress(self) -> int:
        """Units reported since the last call."""
        n, self.done = self.done, 0
        return n


class ActorFailedError(WorkerError):
    """A model actor could not be set up, or kept dying without finishing a batch."""


# Ray restarts an actor this many times before the driver sees it dead; the driver then replaces it only
# if it had finished a batch, and gives up on a batch that has killed this many actors.
ACTOR_RESTARTS = 3
BATCH_ATTEMPTS = 3
STALL_WARNING_S = 600.0
PROGRESS_POLL_S = 2.0  # how often the driver asks busy actors how far they are


def run_stage(
    stage: Stage,
    batches: Iterable[Any],
    resources: Resources,
    progress: Progress | None = None,
    stats: StageStats | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Yield `(batch, stage.process(batch))` for every batch, as results complete; `progress(n)` hears of
    the work as the stage reports it, inside a batch (in-process at once, from actors every few seconds);
    `stats` hears where the actors ran and how many were lost."""
    if resources.actors == 0:
        import torch

        torch.set_num_threads(resources.threads)
        stage.setup()
        if overlaps(stage):
            yield from _overlapped(stage, batches, progress)  # type: ignore[arg-type]
            return
        for batch in batches:
            yield batch, stage.process(batch, progress)
        return
    yield from _run_on_actors(stage, batches, resources, progress, stats or StageStats())


def _overlapped(
    stage: OverlappedStage, batches: Iterable[Any], progress: Progress | None
) -> Iterator[tuple[Any, Any]]:
    """In this process, each batch's `prepare` in a thread while the model works on the batch before:
    the results of `process` in turn (prepare is pure and runs on one thread), its CPU work hidden."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
        it = iter(batches)
        batch = next(it, None)
        ahead = None if batch is None else pool.submit(stage.prepare, batch)
        while batch is not None and ahead is not None:
            prepared = ahead.result()
            after = next(it, None)
            ahead = None if after is None else pool.submit(stage.prepare, after)
            yield batch, stage.process(batch, progress, prepared)
            batch = after


@dataclass
class _Slot:
    actor: Any
    productive: bool = False  # finished a batch since this actor was created
    in_flight: set = field(default_factory=set)  # of ObjectRefs
    pid: int | None = None  # of the process that returned its last result


class _ActorPool:
    """Restartable actors with the batches in flight on each: submit, wait for one result, replace the
    dead. Each batch is numbered, so a retried batch is the same batch."""

    def __init__(self, stage: Stage, res: Resources, stats: StageStats):
        import ray

        self.stage, self.threads, self.stats = stage, res.threads, stats
        stats.actors = res.actors
        actor = ray.remote(concurrency_groups={"progress": 1})(_StageActor)
        # SPREAD: CPU actors use several nodes' cores, not one node's; one per GPU either way
        self.actor_cls = actor.options(
            max_concurrency=2,  # `process` of the batch queued behind the running one (_StageActor)
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=-1,
            scheduling_strategy="SPREAD",
        )
        self.slots = [_Slot(self.actor_cls.remote(stage, res.threads)) for _ in range(res.actors)]
        self.in_flight: dict[Any, tuple[int, Any, _Slot]] = {}  # ref -> (batch number, batch, slot)
        self.attempts: dict[int, int] = {}  # batch number -> actors it was on when they died

    def room(self) -> bool:
        """Every actor two batches deep: one running, one queued behind it."""
        return len(self.in_flight) < 2 * len(self.slots)

    def submit(self, seq: int, batch: Any) -> None:
        slot = min(self.slots, key=lambda s: len(s.in_flight))
        ref = slot.actor.process.remote(batch)
        self.in_flight[ref] = (seq, batch, slot)
        slot.in_flight.add(ref)

    def next_result(self, timeout: float) -> tuple[Any, Any] | None:
        """`(batch, result)` of one finished batch, or None when none finished within `timeout` (or the one
        that did was on an actor that died: it is resubmitted elsewhere)."""
        import ray
        from ray.exceptions import RayActorError

        done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        if not done:
            return None
        ref = done[0]
        _, batch, slot = self.in_flight[ref]
        try:
            result, pid, node, restarted = ray.get(ref)
        except RayActorError as e:
            self.replace(slot, e)
            return None
        del self.in_flight[ref]
        slot.in_flight.discard(ref)
        slot.productive = True
        # Ray restarted it (its node or process died), seen as a new process, or as a restart's first result
        # when the one before died before returning any
        if pid != slot.pid and (slot.pid is not None or restarted):
            self.stats.actors_lost += 1
        slot.pid = pid
        self.stats.nodes.add(node)
        return batch, result

    def replace(self, slot: _Slot, error: BaseException) -> None:
        """Replace an actor that Ray gave up restarting, and resubmit its batches; fail the run instead
        when it never worked (its setup fails, or it died before finishing any batch) or a batch has
        killed `BATCH_ATTEMPTS` actors."""
        import ray

        if getattr(error, "actor_init_failed", False) or not slot.productive:
            what = (
                "setup failed"
                if getattr(error, "actor_init_failed", False)
                else f"died {ACTOR_RESTARTS + 1} times before finishing a batch"
            )
            raise ActorFailedError(f"model actor {what}: {_last_line(error)}") from error
        orphans = sorted((self.in_flight.pop(r)[:2] for r in slot.in_flight), key=lambda x: x[0])
        slot.in_flight.clear()
        for seq, _ in orphans:
            self.attempts[seq] = self.attempts.get(seq, 0) + 1
            if self.attempts[seq] >= BATCH_ATTEMPTS:
                raise ActorFailedError(
                    f"batch {seq} was on {self.attempts[seq]} actors that died: {_last_line(error)}"
                )
        log.warning("model actor died %d times; replacing it: %s", ACTOR_RESTARTS + 1, _last_line(error))
        ray.kill(slot.actor)
        self.stats.actors_lost += 1
        slot.actor, slot.productive, slot.pid = self.actor_cls.remote(self.stage, self.threads), False, None
        for seq, batch in orphans:
            self.submit(seq, batch)

    def poll_progress(self, progress: Progress) -> None:
        """Pass on what the actors reported since the last poll (a dead or busy-restarting one: later)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        refs = [s.actor.progress.remote() for s in self.slots]
        try:
            done = sum(ray.get(refs, timeout=2.0))
        except (GetTimeoutError, RayError):
            return
        if done:
            progress(done)

    def close(self) -> None:
        import ray

        for s in self.slots:
            ray.kill(s.actor)


def _run_on_actors(
    stage: Stage, batches: Iterable[Any], res: Resources, progress: Progress | None, stats: StageStats
) -> Iterator[tuple[Any, Any]]:
    pool = _ActorPool(stage, res, stats)
    numbered = enumerate(batches)
    exhausted, last_result = False, time.monotonic()
    try:
        while True:
            while not exhausted and pool.room():
                nxt = next(numbered, None)
                if nxt is None:
                    exhausted = True
                else:
                    pool.submit(*nxt)
            if not pool.in_flight:
                return
            finished = pool.next_result(timeout=PROGRESS_POLL_S if progress else 10.0)
            if progress is not None:
                pool.poll_progress(progress)
            if finished is not None:
                last_result = time.monotonic()
                yield finished
            elif time.monotonic() - last_result > STALL_WARNING_S:
                last_result = time.monotonic()
                log.warning(
                    "no batch finished for %.0f s (%d in flight on %d actors); if actors wait for "
                    "resources (GPUs on an autoscaling cluster), see `ray status`",
                    STALL_WARNING_S,
                    len(pool.in_flight),
                    len(pool.slots),
                )
    finally:
        pool.close()


def _last_line(error: BaseException) -> str:
    """The useful end of a Ray error (its message ends with the remote exception or the exit detail)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
