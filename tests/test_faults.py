"""Crash safety of `screener screen` end to end: the driver killed with SIGKILL mid-run and the same
command rerun, with a model actor killed during the rerun, ends with exactly the rows and values of an
uninterrupted run, and the killed driver's private Ray does not outlive it."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import duckdb
import psutil
import pytest
from conftest import scores, screen_args, write_chat_jsonl
from helpers import is_actor, wait_for

N = 2000
CHUNK_WAL_BYTES = 17_000  # what one committed chunk of 50 adds to the WAL, about


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_driver_sigkill_then_rerun_gives_the_uninterrupted_result(tiny_llama, vector_file, tmp_path):
    data = write_chat_jsonl(tmp_path / "data.jsonl", N)
    ref_db, db = tmp_path / "reference.duckdb", tmp_path / "screen.duckdb"
    args = screen_args(data, tiny_llama, vector_file, db, "--chunk-size", "50", "--actors", "1")
    ref = screen_args(data, tiny_llama, vector_file, ref_db, "--chunk-size", "50", "--actors", "0")
    subprocess.run(ref, check=True, capture_output=True, timeout=300)

    # 1. kill -9 the driver once a few chunks are committed: watch the WAL grow (the file is locked)
    wal = Path(f"{db}.wal")
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        wait_for(wal.exists, 120, "the run began", first)
        begun = wal.stat().st_size  # schema and run row
        grown = lambda: wal.stat().st_size > begun + 2.5 * CHUNK_WAL_BYTES  # noqa: E731
        wait_for(grown, 240, "chunks were committed", first)
        ray_processes = descendants(first.pid)
        first.kill()
        first.wait()
    # its raylet, GCS and workers die with it (kernel fate-sharing), the agents by the reaper
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not alive, f"left behind by the killed driver: {alive}"
    with duckdb.connect(str(db), read_only=True) as con:
        partial = con.execute("SELECT count(*) FROM samples").fetchone()[0]
    assert 0 < partial < N, "the driver was killed mid-run, after some commits"

    # 2. the same command again, with one model actor killed mid-run
    with (tmp_path / "second.log").open("w") as log:
        second = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: any(is_actor(p) for p in descendants(second.pid)), 240, "an actor was busy", second)
        time.sleep(0.3)
        for p in descendants(second.pid):
            if is_actor(p):
                p.kill()
                break
        assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert "(resumed)" in (tmp_path / "second.log").read_text()

    # 3. exactly the uninterrupted run's rows and values, no duplicates
    assert scores(db) == scores(ref_db)
    with duckdb.connect(str(db), read_only=True) as con:
        n, distinct = con.execute("SELECT count(*), count(DISTINCT sample_id) FROM samples").fetchone()
        runs = con.execute("SELECT n_scored, finished_at IS NOT NULL FROM runs").fetchall()
    assert n == distinct == N
    assert runs == [(N, True)]


def test_in_process_screen_killed_then_rerun_gives_the_uninterrupted_result(
    tiny_llama, vector_file, tmp_path
):
    """The default on a small machine: one worker, in the driver's own process, no Ray. A kill -9 leaves
    whole chunks only, and the rerun resumes to exactly the uninterrupted run's rows."""
    data = write_chat_jsonl(tmp_path / "data.jsonl", N)
    ref_db, db = tmp_path / "reference.duckdb", tmp_path / "screen.duckdb"
    args = screen_args(data, tiny_llama, vector_file, db, "--chunk-size", "50", "--no-progress")
    subprocess.run(
        screen_args(data, tiny_llama, vector_file, ref_db, "--chunk-size", "50", "--actors", "0"),
        check=True,
        capture_output=True,
        timeout=300,
    )
    wal = Path(f"{db}.wal")
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        wait_for(wal.exists, 120, "the run began", first)
        begun = wal.stat().st_size
        wait_for(
            lambda: wal.stat().st_size > begun + 2.5 * CHUNK_WAL_BYTES, 240, "chunks were committed", first
        )
        assert not descendants(first.pid), "one local worker runs in the driver's process: no Ray"
        first.kill()
        first.wait()
    with duckdb.connect(str(db), read_only=True) as con:
        partial = con.execute("SELECT count(*) FROM samples").fetchone()[0]
    assert 0 < partial < N
    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(resumed)" in second.stdout
    assert scores(db) == scores(ref_db)
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT sample_id) FROM samples").fetchone() == (N, N)


@pytest.mark.parametrize(
    ("sig", "rc", "said", "error"),
    [
        (signal.SIGTERM, 143, "terminated (SIGTERM)", "terminated"),
        (signal.SIGINT, 130, "interrupted", "interrupted"),
    ],
)
def test_sigterm_and_ctrl_c_fail_the_run_with_true_counts(
    tiny_llama, vector_file, tmp_path, sig, rc, said, error
):
    """SIGTERM (what `timeout`, `ray job stop`, Kubernetes send) exited 143 without a word and left the run
    'running'; after either signal `runs.n_scored` read 0 while rows were stored."""
    data = write_chat_jsonl(tmp_path / "data.jsonl", N)
    db = tmp_path / "screen.duckdb"
    args = screen_args(data, tiny_llama, vector_file, db, "--chunk-size", "50", "--no-progress")
    wal = Path(f"{db}.wal")
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(wal.exists, 120, "the run began", first)
    begun = wal.stat().st_size
    wait_for(lambda: wal.stat().st_size > begun + 2.5 * CHUNK_WAL_BYTES, 240, "chunks were committed", first)
    first.send_signal(sig)
    _, err = first.communicate(timeout=60)
    assert first.returncode == rc, err[-3000:]
    assert err.strip().splitlines()[-1] == f"{said}; rerun the same command to resume"
    assert "Traceback" not in err
    with duckdb.connect(str(db), read_only=True) as con:
        stored = con.execute("SELECT count(*) FROM samples").fetchone()[0]
        run = con.execute("SELECT status, error, n_scored FROM runs").fetchall()
    assert 0 < stored < N
    assert run == [("failed", error, stored)]
