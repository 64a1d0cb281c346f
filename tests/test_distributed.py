"""Actor planning, the actor loop's faults (an actor killed mid-batch, a setup that fails, an actor that
keeps dying), N actors against one, and the driver's memory on 20k rows."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import scores, screen_args, write_chat_jsonl

from screener import distributed
from screener.distributed import ActorFailedError, Resources, plan_resources, run_stage
from screener.ray_session import RaySession

# -- planning -----------------------------------------------------------------------------------------


def test_gpu_plan_is_one_actor_per_gpu(monkeypatch):
    monkeypatch.setattr(distributed, "_gpu_count", lambda: 8)
    res = plan_resources("cuda", cpus=96)
    assert (res.actors, res.num_gpus, res.num_cpus, res.threads) == (8, 1.0, 1.0, 4)
    assert plan_resources("cuda:0", actors=2, cpus=16).actors == 2
    monkeypatch.setattr(distributed, "_gpu_count", lambda: 0)  # autoscaling cluster, no GPU node yet
    assert plan_resources("cuda", cpus=8).actors == 1


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("actors", [None, 1, 2, 3, 4, 8])
def test_cpu_plan_never_claims_every_cpu(cpus, actors):
    res = plan_resources("cpu", actors=actors, cpus=cpus)
    assert res.num_gpus == 0 and res.actors >= 1 and res.threads >= 1
    assert 0 < res.actors * res.num_cpus <= cpus - 0.5, "a task beside the pool must still get a CPU"
    assert res.actors * res.threads <= max(cpus, res.actors)


def test_zero_actors_runs_in_process():
    assert plan_resources("cpu", actors=0, cpus=4) == Resources(0, 0.0, 0.0, 4)
    out = list(run_stage(Doubler(), [[1, 2], [3]], Resources(0, 0.0, 0.0, 1)))
    assert out == [([1, 2], [2, 4]), ([3], [6])]


# -- the actor loop -----------------------------------------------------------------------------------


class Doubler:
    def setup(self) -> None:
        pass

    def process(self, batch: list[int], report=None) -> list[int]:
        return [2 * x for x in batch]


class PidStage:
    """Leaves a file per setup (its pid) and per batch started and finished, and takes a while per batch."""

    def __init__(self, folder: str, seconds: float):
        self.folder, self.seconds = folder, seconds

    def setup(self) -> None:
        Path(self.folder, f"pid-{os.getpid()}").touch()

    def process(self, batch: list[int], report=None) -> list[int]:
        Path(self.folder, f"start-{batch[0]}-{os.getpid()}").touch()
        time.sleep(self.seconds)
        Path(self.folder, f"end-{batch[0]}-{os.getpid()}").touch()
        return [2 * x for x in batch]


def kill_mid_batch(folder: Path, timeout: float = 60) -> int:
    """SIGKILL an actor while it is inside a batch; returns the batch number."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for start in folder.glob("start-*"):
            _, batch, pid = start.name.split("-")
            if not (folder / f"end-{batch}-{pid}").exists():
                os.kill(int(pid), signal.SIGKILL)
                return int(batch)
        time.sleep(0.02)
    raise TimeoutError("no batch in progress")


class BadSetup:
    def setup(self) -> None:
        raise FileNotFoundError("no model at /nowhere")

    def process(self, batch, report=None):
        return batch


class Crasher:
    def setup(self) -> None:
        pass

    def process(self, batch, report=None):
        os._exit(3)  # the process dies, as on an OOM kill


@pytest.fixture(scope="module")
def ray_session():
    from ray import cloudpickle

    # the stages above live in a test module that Ray's workers cannot import: send them by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with RaySession(num_cpus=2) as session:
        yield session


def test_actor_killed_mid_batch_is_restarted_and_its_batch_retried(ray_session, tmp_path):
    results, killed = [], None
    stage, batches = PidStage(str(tmp_path), 0.3), [[i] for i in range(16)]
    for batch, result in run_stage(stage, batches, Resources(2, 0.5, 0.0, 1)):
        results.append((batch, result))
        if killed is None:
            killed = kill_mid_batch(tmp_path)
    assert sorted(b[0] for b, _ in results) == list(range(16)), "every batch yielded exactly once"
    assert all(r == [2 * b[0]] for b, r in results)
    assert len(list(tmp_path.glob("pid-*"))) == 3, "the killed actor was restarted (its setup ran again)"
    assert len(list(tmp_path.glob(f"start-{killed}-*"))) == 2, "the interrupted batch ran again"
    assert len(list(tmp_path.glob(f"end-{killed}-*"))) == 1


class Overlapped:
    """An overlapped stage (distributed.OverlappedStage) that leaves a file per prepare and per process with
    its start and end; its model work (process) takes a while, as on a GPU."""

    overlap = True

    def __init__(self, folder: str):
        self.folder = folder

    def setup(self) -> None:
        pass

    def _mark(self, what: str, batch: list[int], start: float) -> None:
        Path(self.folder, f"{what}-{batch[0]}-{start!r}-{time.time()!r}").touch()

    def prepare(self, batch: list[int]) -> list[int]:
        start = time.time()
        time.sleep(0.05)
        self._mark("prepare", batch, start)
        return [10 * x for x in batch]

    def process(self, batch: list[int], report=None, prepared: list[int] | None = None) -> list[int]:
        prepared = prepared if prepared is not None else [10 * x for x in batch]
        start = time.time()
        time.sleep(0.25)
        self._mark("process", batch, start)
        return [p + x for p, x in zip(prepared, batch, strict=True)]


def spans(folder: Path, what: str) -> dict[int, tuple[float, float]]:
    out = {}
    for f in folder.glob(f"{what}-*"):
        _, batch, start, end = f.name.split("-", 3)
        out[int(batch)] = (float(start), float(end))
    return out


@pytest.mark.parametrize("actors", [0, 1])
def test_an_overlapped_stage_prepares_the_next_batch_while_the_model_works(actors, request, tmp_path):
    """In process and on an actor: each batch's result as `process` alone gives it, and the next batch
    prepared while the one before is in `process`."""
    if actors:
        request.getfixturevalue("ray_session")
    batches = [[i, i + 100] for i in range(6)]
    out = dict(
        (b[0], r) for b, r in run_stage(Overlapped(str(tmp_path)), batches, Resources(actors, 0.5, 0.0, 1))
    )
    assert out == {b[0]: [11 * x for x in b] for b in batches}
    prepared, processed = spans(tmp_path, "prepare"), spans(tmp_path, "process")
    assert sorted(prepared) == sorted(processed) == list(range(6)), "each batch prepared and run once"
    overlapping = [
        k for k in range(5) if prepared[k + 1][0] < processed[k][1] and processed[k][0] < prepared[k + 1][1]
    ]
    assert len(overlapping) >= 3, (prepared, processed)


def test_setup_failure_fails_the_run_quickly(ray_session):
    start = time.monotonic()
    with pytest.raises(ActorFailedError, match=r"setup failed.*no model at /nowhere"):
        list(run_stage(BadSetup(), [[1], [2]], Resources(2, 0.5, 0.0, 1)))
    assert time.monotonic() - start < 60


def test_actor_dying_on_every_batch_fails_instead_of_looping(ray_session):
    with pytest.raises(ActorFailedError, match="before finishing a batch"):
        list(run_stage(Crasher(), [[1], [2]], Resources(1, 0.5, 0.0, 1)))


# -- through the command line -------------------------------------------------------------------------


def test_n_actors_match_one_actor(tiny_llama, vector_file, tmp_path):
    data = write_chat_jsonl(tmp_path / "data.jsonl", 300)
    for n in (1, 2):
        subprocess.run(
            screen_args(data, tiny_llama, vector_file, tmp_path / f"{n}.duckdb", "--actors", str(n)),
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    one, two = scores(tmp_path / "1.duckdb"), scores(tmp_path / "2.duckdb")
    assert len(one) == 300 * 2 and one == two  # exact: fp32, same chunks, per-sample values


def peak_rss_mb(args: list[str]) -> float:
    """Peak RSS of the driver process itself (not its Ray processes), sampled while it runs."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    driver, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, driver.memory_info().rss)
        time.sleep(0.1)
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    return peak / 2**20


def test_driver_memory_does_not_grow_with_the_dataset(tiny_llama, vector_file, tmp_path):
    """20k rows against 2k: the driver's peak RSS stays flat (rows stream through in chunks)."""
    peaks = {}
    for n in (2_000, 20_000):
        data = write_chat_jsonl(tmp_path / f"{n}.jsonl", n)
        args = screen_args(data, tiny_llama, vector_file, tmp_path / f"{n}.duckdb", "--chunk-size", "512")
        peaks[n] = peak_rss_mb(args)
    print(f"driver peak RSS: {peaks}")
    assert peaks[20_000] < peaks[2_000] + 150, peaks
    assert len(scores(tmp_path / "20000.duckdb")) == 20_000 * 2
