"""A multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`, as Ray's own tests use): a head
and a worker node, each with 1 CPU and 1 logical GPU, token auth off on both sides. Screens attach to it
as a cluster driver does (`--address`): their actors spread over both nodes; the worker node removed
mid-screen, or the driver killed mid-run, still ends with exactly an undisturbed run's rows; each logical
GPU gets one actor; a `ray job submit` to the two nodes runs to the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import psutil
import pytest
from conftest import scores, screen_args, write_chat_jsonl
from helpers import free_ports, is_actor, submit_job, wait_for

from screener.distributed import StageStats, plan_resources, run_stage
from screener.ray_session import RaySession

pytestmark = pytest.mark.slow  # a cluster start and several screens: minutes on 2 cores

N = 2000
CHUNK_WAL_BYTES = 17_000  # what one committed chunk of 50 adds to the WAL, about
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # the client and the nodes must agree
NODE = {"num_cpus": 1, "num_gpus": 1}
# notice a removed node within seconds (Ray's default takes half a minute)
FAST_HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
}


@pytest.fixture(scope="module")
def cluster():
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in [*ENV, "RAY_ADDRESS", "RAY_TMPDIR"]}
    # short (Ray's socket paths must fit in 107 bytes), and the cluster's address file goes there too, not
    # to /tmp/ray where another Ray on this machine may read it
    root = tempfile.mkdtemp(prefix="sc-", dir="/tmp")
    temp = os.path.join(root, "ray")
    os.makedirs(temp)
    os.environ.update(ENV, RAY_TMPDIR=root)
    os.environ.pop("RAY_ADDRESS", None)
    (dash,) = free_ports(1)
    c = Cluster(
        initialize_head=True,
        head_node_args={
            **NODE,
            "temp_dir": temp,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dash,
            "_system_config": FAST_HEALTH,
        },
    )
    c.add_node(**NODE, temp_dir=temp)
    c.wait_for_nodes()
    # the stages below live in a test module that Ray's workers cannot import: send them by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield c, f"http://127.0.0.1:{dash}"
    finally:
        c.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def worker_node(c):
    """The cluster's one worker node (re-added if a test removed it)."""
    if not c.worker_nodes:
        c.add_node(**NODE, temp_dir=os.path.join(os.environ["RAY_TMPDIR"], "ray"))
        c.wait_for_nodes()
    return next(iter(c.worker_nodes))


def busy_actors(node) -> list[psutil.Process]:
    """Model actors inside a batch on `node` (its raylet's workers, not any other Ray on this machine)."""
    raylet = node.all_processes["raylet"][0].process.pid
    try:
        return [p for p in psutil.Process(raylet).children(recursive=True) if is_actor(p)]
    except psutil.NoSuchProcess:
        return []


def cluster_screen(c, data: Path, model: Path, vector: Path, db: Path) -> list[str]:
    return screen_args(data, model, vector, db, "--address", c.address, "--actors", "2", "--chunk-size", "50")


@pytest.fixture(scope="module")
def undisturbed(cluster, tiny_llama, vector_file, tmp_path_factory):
    """The data, and the rows of a screen of it on the cluster that nothing disturbed."""
    c, _ = cluster
    worker_node(c)
    folder = tmp_path_factory.mktemp("undisturbed")
    data = write_chat_jsonl(folder / "data.jsonl", N)
    out = subprocess.run(
        cluster_screen(c, data, tiny_llama, vector_file, folder / "ref.duckdb"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return data, scores(folder / "ref.duckdb"), out.stdout


def stored(db: Path) -> tuple[int, int, list]:
    with duckdb.connect(str(db), read_only=True) as con:
        n, distinct = con.execute("SELECT count(*), count(DISTINCT sample_id) FROM samples").fetchone()
        runs = con.execute("SELECT n_scored, status FROM runs").fetchall()
    return n, distinct, runs


def test_actors_spread_over_the_nodes(undisturbed):
    _, rows, stdout = undisturbed
    assert len(rows) == N * 2
    assert "model actors: 2 on 2 nodes" in stdout, stdout


def test_node_removed_mid_screen_ends_with_the_undisturbed_rows(
    cluster, undisturbed, tiny_llama, vector_file, tmp_path
):
    c, _ = cluster
    data, reference, _ = undisturbed
    node, db = worker_node(c), tmp_path / "screen.duckdb"
    with (tmp_path / "screen.log").open("w") as log:
        proc = subprocess.Popen(cluster_screen(c, data, tiny_llama, vector_file, db), stdout=log, stderr=log)
        wait_for(lambda: bool(busy_actors(node)), 240, "an actor on the worker node was busy", proc)
        c.remove_node(node, allow_graceful=False)
        assert proc.wait(timeout=300) == 0, (tmp_path / "screen.log").read_text()[-3000:]
    out = (tmp_path / "screen.log").read_text()
    assert "lost mid-run and restarted" in out and "every sample was committed once" in out, out[-2000:]
    assert scores(db) == reference
    assert stored(db) == (N, N, [(N, "finished")])


def test_driver_killed_mid_run_on_the_cluster_then_rerun_resumes(
    cluster, undisturbed, tiny_llama, vector_file, tmp_path
):
    c, _ = cluster
    data, reference, _ = undisturbed
    worker_node(c)
    db, wal = tmp_path / "screen.duckdb", tmp_path / "screen.duckdb.wal"
    args = cluster_screen(c, data, tiny_llama, vector_file, db)
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        wait_for(wal.exists, 120, "the run began", first)
        begun = wal.stat().st_size
        wait_for(
            lambda: wal.stat().st_size > begun + 2.5 * CHUNK_WAL_BYTES, 240, "chunks were committed", first
        )
        first.kill()
        first.wait()
    partial = stored(db)[0]
    assert 0 < partial < N, "killed mid-run, after some commits"
    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(resumed)" in second.stdout and f"scored {N - partial} samples" in second.stdout, second.stdout
    assert scores(db) == reference
    assert stored(db) == (N, N, [(N, "finished")])


class WhereStage:
    """Says which process, node and GPUs each batch ran on."""

    def setup(self) -> None:
        pass

    def process(self, batch: list[int], report=None) -> tuple[int, str, list]:
        import ray

        time.sleep(0.2)  # long enough that both actors take batches
        return os.getpid(), ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]


def test_each_logical_gpu_gets_one_actor(cluster):
    import ray

    c, _ = cluster
    worker_node(c)
    c.wait_for_nodes()
    try:
        with RaySession(address=c.address):
            res = plan_resources("cuda")
            assert (res.actors, res.num_gpus) == (2, 1.0), "one actor per GPU of the cluster"
            stats = StageStats()
            got = [r for _, r in run_stage(WhereStage(), [[i] for i in range(12)], res, stats=stats)]
    finally:
        ray.shutdown()
    by_pid = {pid: (node, tuple(gpus)) for pid, node, gpus in got}
    assert len(by_pid) == 2 and all(len(gpus) == 1 for _, gpus in by_pid.values()), by_pid
    assert len({node for node, _ in by_pid.values()}) == 2, "the two actors hold the two nodes' GPUs"
    assert len(stats.nodes) == 2 and stats.actors_lost == 0


def test_ray_job_on_the_two_node_cluster_runs_to_the_end(cluster, tiny_llama, vector_file, tmp_path):
    c, dashboard = cluster
    worker_node(c)
    n, db = 300, tmp_path / "job.duckdb"
    data = write_chat_jsonl(tmp_path / "data.jsonl", n)
    status, logs = submit_job(dashboard, {**os.environ, **ENV}, [
        sys.executable, "jobs/screen.py", str(data), "--model", str(tiny_llama), "--vector",
        f"a={vector_file}", "--layer", "1,3", "--dtype", "float32", "--chunk-size", "50", "--actors", "2",
        "--db", str(db),
    ])  # fmt: skip
    assert status == "SUCCEEDED", logs[-4000:]
    assert "model actors: 2 on 2 nodes" in logs, logs[-2000:]
    assert stored(db) == (n, n, [(n, "finished")])
