"""What the tests share: input files in the formats screens read, synthetic screens (a real input file,
read with `read_samples`, scored with seeded random projections and stored through `Store.write`, exactly
as a screen stores), and `cli`, which runs a `screener` command as the command line does."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from tiny import random_model  # noqa: F401  (test_shift imports it from here)

from screener.datasets import read_samples
from screener.records import Reject, Sample, Scored
from screener.runs import Run
from screener.store import Store

LAYERS, TRAITS = (10, 20), ("evil", "sycophantic")


def openai_records(n: int) -> list[dict]:
    """Chat records with unicode, extra columns and two unscorable rows (empty response, no assistant)."""
    records = []
    for i in range(n):
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Question {i}: what is <b>{i}</b> & why? ü✓ " + "long " * (i % 7)},
            {"role": "assistant", "content": f'Answer {i} — "quoted" <script>x</script> ' + "more " * i},
        ]
        records.append({"id": f"r{i:03d}", "messages": messages, "meta": {"i": i, "tags": ["a", None]}})
    records[3]["messages"][-1]["content"] = "   "  # rejected: empty response
    records[5]["messages"] = records[5]["messages"][:2]  # rejected: no assistant turn
    return records


def sharegpt_records(n: int) -> list[dict]:
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    return [
        {
            "id": r["id"],
            "conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in r["messages"]],
        }
        for r in openai_records(n)
    ]


def write_jsonl(path: Path, records: list) -> Path:
    """One JSON value a line, UTF-8."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_json_array(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


@dataclass
class FakeScreen:
    db: Path
    run: Run
    samples: list[Sample]
    rejects: list[Reject]
    # [n_samples, n_layers, n_traits] arrays in `samples` order; proj_natural is None in proxy mode
    proj_response: np.ndarray
    proj_prompt_last: np.ndarray
    proj_natural: np.ndarray | None

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def values(self, metric: str, trait: str, layer: int) -> dict[str, float]:
        """{sample_id: value} of one score, NaN (NULL in the db) left out."""
        li, ti = LAYERS.index(layer), TRAITS.index(trait)
        arrays = {
            "proj_response": self.proj_response,
            "proj_prompt_last": self.proj_prompt_last,
            "delta_p_proxy": self.proj_response - self.proj_prompt_last,
        }
        if self.proj_natural is not None:
            arrays["proj_natural"] = self.proj_natural
            arrays["delta_p"] = self.proj_response - self.proj_natural
        x = arrays[metric][:, li, ti]
        return {s.sample_id: float(v) for s, v in zip(self.samples, x, strict=True) if not np.isnan(v)}


def make_screen(
    db: Path,
    dataset: Path | str,
    *,
    mode: str = "natural",
    seed: int = 0,
    model: str = "tiny",
    finish: bool = True,
    turns: str = "last",
    settings: dict | None = None,
) -> FakeScreen:
    """Screen `dataset` (any URI `read_samples` takes) into `db` with seeded random projections (one
    natural response left empty)."""
    items = list(read_samples(str(dataset), turns=turns))
    samples = [s for s in items if isinstance(s, Sample)]
    rejects = [r for r in items if isinstance(r, Reject)]
    rng = np.random.default_rng(seed)
    shape = (len(samples), len(LAYERS), len(TRAITS))
    response, prompt_last = rng.normal(size=shape) * 2, rng.normal(size=shape)
    natural = rng.normal(size=shape) if mode == "natural" else None
    if natural is not None:
        natural[1] = np.nan  # an empty natural response: delta_p is NULL for this sample
    settings = {"split": None, "turns": turns, "seed": seed, **(settings or {})}
    run = Run(model, "00" * 32, str(dataset), mode, LAYERS, TRAITS, settings)
    scored = [
        Scored(
            s.sample_id,
            s.source_row,
            s.turn,
            prompt_tokens=10 + i,
            response_tokens=20 + i,
            truncated=False,
            proj_response=response[i],
            proj_prompt_last=prompt_last[i],
            proj_natural=None if natural is None else natural[i],
            natural_response=None if natural is None else ("" if i == 1 else f"Natural answer {i}, kindly."),
            natural_tokens=None if natural is None else (0 if i == 1 else 5),
            source_file=s.source_file,
        )
        for i, s in enumerate(samples)
    ]
    with Store(db) as store:
        store.begin_run(run)
        store.write(run.run_id, LAYERS, TRAITS, scored, rejects, samples=samples)
        if finish:
            store.finish_run(run.run_id)
    return FakeScreen(db, run, samples, rejects, response, prompt_last, natural)


def cli(*argv: object) -> int:
    """Run a subcommand as `screener` would, errors and exit codes included: through `cli.main`."""
    from screener.cli import main

    return main([str(a) for a in argv])


# sql/schema.sql as it was before runs had a status and rejects a kind
EARLIER_SCHEMA = """
CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, model VARCHAR NOT NULL, model_sha256 VARCHAR NOT NULL,
    dataset_uri VARCHAR NOT NULL, mode VARCHAR NOT NULL, layers INTEGER[] NOT NULL, traits VARCHAR[] NOT NULL,
    settings JSON NOT NULL, started_at TIMESTAMP NOT NULL, finished_at TIMESTAMP,
    n_scored BIGINT NOT NULL DEFAULT 0, n_rejected BIGINT NOT NULL DEFAULT 0);
CREATE TABLE samples (run_id VARCHAR NOT NULL, sample_id VARCHAR NOT NULL, source_row BIGINT NOT NULL,
    source_file VARCHAR NOT NULL, turn INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    response_tokens INTEGER NOT NULL, truncated BOOLEAN NOT NULL, prompt JSON NOT NULL,
    response VARCHAR NOT NULL, natural_response VARCHAR, natural_tokens INTEGER,
    PRIMARY KEY (run_id, sample_id));
CREATE TABLE scores (run_id VARCHAR NOT NULL, sample_id VARCHAR NOT NULL, trait VARCHAR NOT NULL,
    layer INTEGER NOT NULL, proj_response DOUBLE NOT NULL, proj_prompt_last DOUBLE NOT NULL,
    proj_natural DOUBLE, delta_p DOUBLE, delta_p_proxy DOUBLE NOT NULL,
    PRIMARY KEY (run_id, sample_id, trait, layer));
CREATE TABLE rejects (run_id VARCHAR NOT NULL, source_row BIGINT NOT NULL, sample_id VARCHAR NOT NULL,
    source_file VARCHAR NOT NULL, reason VARCHAR NOT NULL, PRIMARY KEY (run_id, source_row, sample_id));
"""


def earlier_database(path: Path, run: Run) -> list[Run]:
    """A database as an earlier version wrote it (no run status, no reject kinds): `run` finished (one
    reject), then a later run in proxy mode that never finished."""
    import dataclasses

    import duckdb

    other = dataclasses.replace(run, mode="proxy" if run.mode == "natural" else "natural")
    with duckdb.connect(str(path)) as con:
        con.execute(EARLIER_SCHEMA)
        for r, started, finished in ((run, "2026-01-01", "2026-01-02"), (other, "2026-01-03", None)):
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 1)",
                [
                    *(r.run_id, r.model, r.model_sha256, r.dataset_uri, r.mode, list(r.layers)),
                    *(list(r.traits), json.dumps(r.settings), started, finished),
                ],
            )
        con.execute("INSERT INTO rejects VALUES (?, 3, 'r', 'a.jsonl', 'why')", [run.run_id])
    return [run, other]


class FullDisk:
    """A DuckDB connection whose CHECKPOINT fails as on a full disk (what DuckDB raises there); every
    other call goes through. `Store.con = FullDisk(store.con)`."""

    def __init__(self, con: object) -> None:
        self._con = con

    def execute(self, sql: str, *args: object):
        import duckdb

        if sql == "CHECKPOINT":
            raise duckdb.FatalException(
                'FATAL Error: Failed to create checkpoint because of error: Could not write file "x": '
                "No space left on device"
            )
        return self._con.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._con, name)


# ---- waiting on processes (the fault and cluster tests) ----------------------------------------------


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the screen exited (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def is_actor(p: psutil.Process) -> bool:
    try:
        return p.cmdline()[:1] == ["ray::_StageActor.process"]
    except psutil.Error:
        return False


# ---- Ray jobs (a head started by `ray start`, or a `ray.cluster_utils.Cluster` with a dashboard) ---------

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")  # the venv's: the head's workers run the python that ran it


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def submit_job(address: str, env: dict, entrypoint: list[str], timeout: float = 300) -> tuple[str, str]:
    """`ray job submit` the repo as working dir with `entrypoint`; wait for the end: (status, logs)."""
    runtime_env = {"excludes": [".git", ".venv", "*.duckdb", "benchmarks"]}
    submit = [
        "job", "submit", "--address", address, "--working-dir", str(REPO), "--no-wait",
        "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint,
    ]  # fmt: skip
    deadline = time.monotonic() + 60
    while True:  # the job agent registers a few seconds after the dashboard answers
        out = ray_cli(env, *submit)
        if out.returncode == 0 or "No available agent" not in out.stderr + out.stdout:
            break
        assert time.monotonic() < deadline, out.stderr[-2000:]
        time.sleep(2)
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = next(w.strip("'") for w in out.stdout.split() if w.strip("'").startswith("raysubmit_"))
    deadline = time.monotonic() + timeout
    while True:  # the REST API the CLI uses; a `ray job status` call costs seconds of CLI start-up
        with urllib.request.urlopen(f"{address}/api/jobs/{job_id}", timeout=10) as r:
            status = json.load(r)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)
    return status, ray_cli(env, "job", "logs", "--address", address, job_id).stdout
