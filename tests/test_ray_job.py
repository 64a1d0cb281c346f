"""The cluster path on one machine: a real head (`ray start --head`), `ray job submit` of jobs/screen.py
with the repo as working dir, the job's rows in DuckDB, and its progress line in `ray job logs`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import pytest
from conftest import write_chat_jsonl
from helpers import RAY, free_ports, submit_job

REPO = Path(__file__).resolve().parent.parent
N = 200


@pytest.fixture()
def head(tmp_path_factory):
    """A Ray head on 127.0.0.1 with every port free-picked (others may run Ray on this machine), token
    authentication off on both sides (`RAY_AUTH_MODE=disabled`: client and head must agree)."""
    temp = tmp_path_factory.mktemp("head")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(9)
    cmd = [
        RAY, "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", str(temp),
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
        "--metrics-export-port", str(metrics), "--node-manager-port", str(node_manager),
        "--object-manager-port", str(object_manager), "--disable-usage-stats",
    ]  # fmt: skip
    # `--block` and a session of its own: SIGTERM stops this head only (`ray stop` stops every Ray here)
    with (temp / "head.log").open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the head did not start: {(temp / 'head.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield address, env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ray_job_submit_screens_into_duckdb(head, tiny_llama, vector_file, tmp_path):
    address, env = head
    data = write_chat_jsonl(tmp_path / "data.jsonl", N)
    db = tmp_path / "job.duckdb"
    status, logs = submit_job(address, env, [
        sys.executable, "jobs/screen.py", str(data), "--model", str(tiny_llama),
        "--vector", f"a={vector_file}", "--layer", "1,3", "--dtype", "float32", "--chunk-size", "50",
        "--db", str(db),
    ])  # fmt: skip
    assert status == "SUCCEEDED", logs[-4000:]

    assert f"{N}/{N} samples" in logs or f"{N} samples" in logs, "the progress line is in the job's logs"
    assert "samples/s" in logs
    with duckdb.connect(str(db), read_only=True) as con:
        samples = con.execute("SELECT count(*), count(DISTINCT sample_id) FROM samples").fetchone()
        nulls = con.execute("SELECT count(*) FROM scores WHERE proj_response IS NULL").fetchone()[0]
        n_scores = con.execute("SELECT count(*) FROM scores").fetchone()[0]
        runs = con.execute("SELECT n_scored, finished_at IS NOT NULL FROM runs").fetchall()
    assert samples == (N, N) and n_scores == N * 2 and nulls == 0
    assert runs == [(N, True)]


def test_cluster_yaml_passes_rays_own_validation():
    """cluster.yaml through the launcher's own steps that need no cloud: defaults, schema, checks."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs the driver, never a model actor"
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 for t in workers), "GPU workers autoscale from zero"
    assert any("p5." in t["node_config"]["InstanceType"] for t in workers)
    setup = " ".join(config["setup_commands"])
    assert "download.pytorch.org/whl/cu" in setup and "pip install -e /home/ray/persona-screen" in setup
    assert setup.index("torch==") < setup.index("pip install -e"), "CUDA torch before the project"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=disabled" in " ".join(config[key]), "client and cluster must agree on auth"
