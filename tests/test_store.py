"""Tests for screener.store: run ids, idempotent bulk writes, resume, duplicates, locking, crash safety."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers import FullDisk, earlier_database

from screener.idset import IdSet
from screener.records import Reject, Sample, Scored
from screener.runs import Run
from screener.store import Store, StoreBusyError

ROOT = Path(__file__).resolve().parent.parent
LAYERS, TRAITS = (10, 20), ("evil", "sycophantic", "hallucinating")
# what a stored run has besides its identity: not part of the run_id
STATE = {
    "status": "finished",
    "error": "x",
    "started_at": None,
    "finished_at": None,
    "n_scored": 3,
    "n_rejected": 1,
    "n_unreadable_files": 1,
    "n_skipped": 1,
    "input_rows": 7,
}
RUN = Run("default", "ab" * 32, "hf://x/y", "natural", LAYERS, TRAITS, {"dtype": "bf16", "max_tokens": 512})


def sample(sid: str, row: int) -> Sample:
    prompt = [{"role": "user", "content": f"héllo {sid} ✓"}]
    return Sample(sid, row, 0, prompt, f"response {sid}", source_file="a.jsonl")


def scored(s: Sample, *, natural: bool = True, seed: int | None = None) -> Scored:
    rng = np.random.default_rng(s.source_row if seed is None else seed)
    shape = (len(LAYERS), len(TRAITS))
    return Scored(
        s.sample_id,
        s.source_row,
        s.turn,
        7,
        11,
        False,
        proj_response=rng.normal(size=shape).astype(np.float32),
        proj_prompt_last=rng.normal(size=shape),
        proj_natural=rng.normal(size=shape) if natural else None,
        natural_response="nat" if natural else None,
        natural_tokens=5 if natural else None,
        source_file=s.source_file,
    )


def batch(prefix: str, n: int, row0: int = 0, *, natural: bool = True) -> tuple[list[Sample], list[Scored]]:
    samples = [sample(f"{prefix}{i}", row0 + i) for i in range(n)]
    return samples, [scored(s, natural=natural) for s in samples]


def write(store: Store, samples: list[Sample], scores: list[Scored], rejects: Sequence[Reject] = ()) -> None:
    store.write(RUN.run_id, LAYERS, TRAITS, scores, rejects, samples=samples)


def one(store: Store, query: str) -> object:
    return store.con.execute(query).fetchone()[0]


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "s.duckdb") as s:
        s.begin_run(RUN)
        yield s


def test_run_id_stable_and_sensitive() -> None:
    # Lists for tuples and another key order in settings are the same config.
    same = dataclasses.replace(
        RUN, layers=[10, 20], traits=list(TRAITS), settings={"max_tokens": 512, "dtype": "bf16"}
    )
    assert same.run_id == RUN.run_id
    # the id is the first 16 hex digits of the sha256 of the identity's canonical JSON (runtime left out)
    identity = {
        "model": RUN.model,
        "model_sha256": RUN.model_sha256,
        "dataset_uri": RUN.dataset_uri,
        "mode": RUN.mode,
        "layers": list(LAYERS),
        "traits": list(TRAITS),
        "settings": {"dtype": "bf16", "max_tokens": 512},
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    assert RUN.run_id == hashlib.sha256(canonical).hexdigest()[:16]
    with_runtime = dataclasses.replace(RUN, settings={**RUN.settings, "runtime": {"workers": 2}})
    assert with_runtime.run_id == RUN.run_id
    changes = {
        "model": "m2",
        "model_sha256": "cd" * 32,
        "dataset_uri": "hf://x/z",
        "mode": "proxy",
        "layers": (10, 21),
        "traits": ("evil",),
        "settings": {"dtype": "fp32", "max_tokens": 512},
    }
    assert set(changes) == {f.name for f in dataclasses.fields(Run)} - STATE.keys()
    ids = {dataclasses.replace(RUN, **{k: v}).run_id for k, v in changes.items()}
    assert len(ids) == len(changes) and RUN.run_id not in ids
    # the state (and the runtime settings: how the work was done) leave the id as it is
    runtime = {**RUN.settings, "runtime": {"actors": 4}}
    assert dataclasses.replace(RUN, settings=runtime, **STATE).run_id == RUN.run_id


def test_begin_run_new_then_resume(store: Store) -> None:
    assert store.begin_run(dataclasses.replace(RUN, mode="proxy")) is False
    row = store.con.execute(
        "SELECT layers, traits, settings::VARCHAR, started_at, finished_at FROM runs "
        f"WHERE run_id = '{RUN.run_id}'"
    ).fetchone()
    assert row[:2] == (list(LAYERS), list(TRAITS)) and '"max_tokens": 512' in row[2]
    assert row[3] is not None and row[4] is None
    store.finish_run(RUN.run_id)
    assert one(store, "SELECT count(finished_at) FROM runs") == 1
    assert store.begin_run(RUN) is True
    assert one(store, "SELECT count(*) FROM runs") == 2
    assert one(store, "SELECT count(finished_at) FROM runs") == 0
    with pytest.raises(ValueError, match="mode"):
        dataclasses.replace(RUN, mode="both")


def test_write_rows_values_and_deltas(store: Store) -> None:
    samples, scores = batch("s", 5)
    write(store, samples, scores)
    assert store.counts(RUN.run_id) == (5, 0)
    assert one(store, "SELECT count(*) FROM scores") == 5 * len(TRAITS) * len(LAYERS)
    got = store.con.execute(
        "SELECT prompt::VARCHAR, response, natural_tokens FROM samples WHERE sample_id = 's1'"
    )
    # compact JSON (the samples view's to_json), non-ASCII as it is
    assert got.fetchone() == ('[{"role":"user","content":"héllo s1 ✓"}]', "response s1", 5)
    rows = store.con.execute(
        "SELECT sample_id, layer, trait, proj_response, proj_prompt_last, proj_natural,"
        " delta_p, delta_p_proxy FROM scores"
    ).fetchall()
    by_id = {s.sample_id: s for s in scores}
    for sid, layer, trait, resp, last, nat, dp, dpp in rows:
        s, i, j = by_id[sid], LAYERS.index(layer), TRAITS.index(trait)
        r64 = np.float64(s.proj_response[i, j])  # float32 in, compared after the same float64 cast
        assert (resp, last, nat) == (r64, s.proj_prompt_last[i, j], s.proj_natural[i, j])
        assert dp == r64 - s.proj_natural[i, j] and dpp == r64 - s.proj_prompt_last[i, j]


def test_proxy_mode_and_nan_natural_are_null(store: Store) -> None:
    samples, scores = batch("p", 3, natural=False)
    nan_sample = sample("n", 99)
    nan_scored = scored(nan_sample)
    nan_scored.proj_natural[1, :] = np.nan  # layer 20's natural response was empty
    write(store, [*samples, nan_sample], [*scores, nan_scored])
    q = "SELECT count(*), count(proj_natural), count(delta_p), count(delta_p_proxy) FROM scores WHERE"
    assert store.con.execute(f"{q} sample_id LIKE 'p%'").fetchone() == (18, 0, 0, 18)
    assert store.con.execute(f"{q} sample_id = 'n'").fetchone() == (6, 3, 3, 6)
    null_layer = "SELECT DISTINCT layer FROM scores WHERE sample_id = 'n' AND delta_p IS NULL"
    assert store.con.execute(null_layer).fetchall() == [(20,)]
    assert one(store, "SELECT count(natural_response) FROM samples") == 1


def test_idempotent_rewrite_including_rejects(store: Store) -> None:
    samples, scores = batch("s", 4)
    rejects = [Reject(50, "bad", "conversations[1].value: not a string", "a.jsonl")]
    for _ in range(3):
        write(store, samples, scores, rejects)
    assert store.counts(RUN.run_id) == (4, 1)
    assert one(store, "SELECT count(*) FROM scores") == 4 * 6


def test_pending_resume_and_duplicates(store: Store) -> None:
    write(store, *batch("s", 3))  # s0..s2 at rows 0..2
    chunk = [
        sample("s0", 0),
        sample("s1", 7),
        sample("x", 8),
        sample("x", 9),
        sample("x", 8),
        sample("y", 10),
    ]
    todo, rejects = store.pending(RUN.run_id, chunk)
    assert [(s.sample_id, s.source_row) for s in todo] == [("x", 8), ("y", 10)]
    assert [(r.sample_id, r.source_row, r.reason, r.source_file) for r in rejects] == [
        ("s1", 7, "duplicate sample_id (first seen at source_row 1)", "a.jsonl"),
        ("x", 9, "duplicate sample_id (first seen at source_row 8)", "a.jsonl"),
    ]
    assert store.pending(RUN.run_id, []) == ([], [])
    other_run = dataclasses.replace(RUN, model="other").run_id
    assert len(store.pending(other_run, chunk)[0]) == 4  # per run: s0, s1@7, x@8, y


def test_write_turns_late_duplicate_into_reject(store: Store) -> None:
    first, late = sample("d", 1), sample("d", 5)  # e.g. chunks scored out of order
    write(store, [first], [scored(first)])
    write(store, [late], [scored(late)])
    assert one(store, "SELECT source_row FROM samples WHERE sample_id = 'd'") == 1
    assert store.con.execute("SELECT source_row, reason FROM rejects").fetchall() == [
        (5, "duplicate sample_id (first seen at source_row 1)")
    ]


def test_pending_reads_stored_ids_on_reopen_and_finds_duplicates_far_away(
    tmp_path: Path, monkeypatch
) -> None:
    """The resume lookup reads only the chunk's span of rows; an id stored far outside it (a duplicate) is
    still found, by a reopened store too, and a filter that hits every id only costs lookups."""
    db = tmp_path / "s.duckdb"
    with Store(db) as st:
        st.begin_run(RUN)
        write(st, *batch("s", 3, row0=0))
    chunk = [sample("s2", 2), sample("s0", 5000), sample("new", 5001)]
    for hits_all in (False, True):
        if hits_all:
            monkeypatch.setattr(IdSet, "holds", lambda self, ids: np.ones(len(ids), bool))
        with Store(db) as st:  # a new process: the stored ids come from the table
            todo, rejects = st.pending(RUN.run_id, chunk)
            assert [(s.sample_id, s.source_row) for s in todo] == [("new", 5001)]
            assert [(r.sample_id, r.source_row, r.reason) for r in rejects] == [
                ("s0", 5000, "duplicate sample_id (first seen at source_row 0)")
            ]


def test_write_checks_inputs(store: Store) -> None:
    samples, scores = batch("s", 2)
    with pytest.raises(ValueError, match="lacks the Sample"):
        store.write(RUN.run_id, LAYERS, TRAITS, scores, [])
    with pytest.raises(ValueError, match="expected"):
        store.write(RUN.run_id, LAYERS[:1], TRAITS, scores, [], samples=samples)
    assert store.counts(RUN.run_id) == (0, 0)  # the failed transaction left nothing


def test_finish_run_counts(store: Store, tmp_path: Path) -> None:
    write(store, *batch("s", 6), [Reject(90, "r", "why"), Reject(91, "", "why")])
    assert store.finish_run(RUN.run_id) == (6, 2)
    row = store.con.execute("SELECT n_scored, n_rejected, finished_at IS NOT NULL FROM runs").fetchone()
    assert row == (6, 2, True)
    with pytest.raises(KeyError):
        store.finish_run("nope")
    store.close()
    with Store(tmp_path / "s.duckdb", read_only=True) as ro:  # readers see the committed rows
        assert ro.counts(RUN.run_id) == (6, 2)


def test_busy_error_while_another_process_holds_the_file(tmp_path: Path) -> None:
    path = tmp_path / "busy.duckdb"
    Store(path).close()
    hold = (
        "import duckdb,sys,time; c=duckdb.connect(sys.argv[1], read_only=sys.argv[2] == 'ro'); "
        "print('ready', flush=True); time.sleep(30)"
    )
    for holder_mode in ("rw", "ro"):  # a running screen; a long query or report
        holder = subprocess.Popen(
            [sys.executable, "-c", hold, str(path), holder_mode], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout.readline().strip() == "ready"
            if holder_mode == "rw":  # only a writer keeps a reader out
                with pytest.raises(StoreBusyError) as err:
                    Store(path, read_only=True)
                msg = str(err.value)
                assert msg.startswith(
                    f"{path} is being written by a running screen (DuckDB allows one writer); "
                )
                assert "wait for it to finish or query a copy" in msg and "lock" in msg  # the original error
            with pytest.raises(StoreBusyError) as err:  # any other process keeps a writer out
                Store(path)
            msg = str(err.value)
            assert msg.startswith(
                f"{path} is in use by another process: a running screen, or a query/report holding it open "
            )
            assert "wait for it to finish" in msg and "lock" in msg  # the original error
        finally:
            holder.kill()
            holder.wait()


CRASH_SIZE = 200


def crash_child(path: str, hang_mid_write: bool) -> None:
    """Run in a subprocess: write batches until killed, reporting each commit; or stall inside one."""
    store = Store(path)
    store.begin_run(RUN)
    if hang_mid_write:
        # Stall batch 3 after its samples INSERT, before its scores: the kill lands inside the transaction.
        insert = store._insert

        def stalling_insert(table: str, run_id: str, rows: object, **kwargs) -> list:
            inserted = insert(table, run_id, rows, **kwargs)
            if table == "turns" and rows.column("sample_id")[0].as_py().startswith("b3-"):
                print("mid-write", flush=True)
                time.sleep(60)
            return inserted

        store._insert = stalling_insert
    for b in itertools.count():  # never exits on its own, so the kill always lands mid-run
        write(store, *crash_batch(b))
        print(f"done {b}", flush=True)


def crash_batch(b: int) -> tuple[list[Sample], list[Scored], list[Reject]]:
    samples, scores = batch(f"b{b}-", CRASH_SIZE, row0=b * 1000)
    return samples, scores, [Reject(b * 1000 + 999, f"b{b}-bad", "not a string")]


@pytest.mark.parametrize("hang_mid_write", [True, False], ids=["inside-transaction", "while-writing"])
def test_sigkill_leaves_whole_batches_and_rerun_has_no_duplicates(
    tmp_path: Path, hang_mid_write: bool
) -> None:
    path = tmp_path / "crash.duckdb"
    code = f"import test_store; test_store.crash_child({str(path)!r}, {hang_mid_write})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        stop = "mid-write" if hang_mid_write else "done 1"  # else: kill at a random point of later writes
        while (line := child.stdout.readline().strip()) != stop:
            assert line, "the writer exited early"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with Store(path) as store:  # replays the WAL: committed batches only
        per_batch = store.con.execute(
            """SELECT split_part(sample_id, '-', 1) AS b, count(*) AS n,
                      (SELECT count(*) FROM scores c WHERE split_part(c.sample_id, '-', 1) = b) AS n_scores,
                      (SELECT count(*) FROM rejects r WHERE split_part(r.sample_id, '-', 1) = b) AS n_rejects
               FROM samples GROUP BY b"""
        ).fetchall()
        batches = sorted(int(b[1:]) for b, *_ in per_batch)
        assert all(tuple(c) == (CRASH_SIZE, CRASH_SIZE * 6, 1) for _, *c in per_batch), per_batch
        # No orphans: every score and reject row belongs to a batch whose samples are all there.
        assert store.counts(RUN.run_id) == (len(batches) * CRASH_SIZE, len(batches))
        assert one(store, "SELECT count(*) FROM scores") == len(batches) * CRASH_SIZE * 6
        if hang_mid_write:
            assert batches == [0, 1, 2]  # batch 3 was killed between its samples and scores inserts
        else:
            assert len(batches) >= 2 and batches == list(range(len(batches)))
        n = len(batches) + 1  # rerun what was stored plus the batch the kill interrupted
        assert store.begin_run(RUN) is True
        for b in range(n):
            write(store, *crash_batch(b))
        assert store.counts(RUN.run_id) == (n * CRASH_SIZE, n)
        assert one(store, "SELECT count(*) FROM scores") == n * CRASH_SIZE * 6


def test_bulk_write_is_fast(store: Store) -> None:
    samples, scores = batch("s", 2000)
    t0 = time.perf_counter()
    write(store, samples, scores)
    elapsed = time.perf_counter() - t0
    assert one(store, "SELECT count(*) FROM scores") == 2000 * 3 * 2
    assert elapsed < 5, f"2000-sample write took {elapsed:.2f} s"  # a smoke check; expect well under 1 s


# ---- run status, earlier databases, checkpoints, database files (issue 17) ----------------------------


def status(store: Store) -> tuple:
    return store.con.execute(
        "SELECT status, error, finished_at IS NOT NULL FROM runs WHERE run_id = ?", [RUN.run_id]
    ).fetchone()


def test_a_run_is_running_then_failed_or_finished(store: Store) -> None:
    assert status(store) == ("running", None, False)
    store.fail_run(RUN.run_id, "the model worker died")
    assert status(store) == ("failed", "the model worker died", False)
    assert store.begin_run(RUN) is True  # a rerun resumes it
    assert status(store) == ("running", None, False)
    write(store, *batch("s", 2), [Reject(7, "x", "bad"), Reject(8, "y#1", "tools only", kind="skipped")])
    write(store, [], [], [Reject(-1, "/d/b.gz", "unreadable file: ...", "/d/b.gz", kind="file")])
    assert store.finish_run(RUN.run_id) == (2, 1)
    assert status(store) == ("finished", None, True)
    row = store.con.execute("SELECT n_scored, n_rejected, n_unreadable_files, n_skipped FROM runs").fetchone()
    assert row == (2, 1, 1, 1)
    assert store.reject_counts(RUN.run_id) == {"bad": 1, "skipped": 1, "file": 1}
    store.fail_run(RUN.run_id, "too late")  # a finished run stays finished
    assert status(store) == ("finished", None, True)


def test_a_database_of_an_earlier_version_gains_status_and_kinds(tmp_path: Path) -> None:
    finished, unfinished = earlier_database(tmp_path / "old.duckdb", RUN)
    with Store(tmp_path / "old.duckdb") as store:
        rows = store.con.execute("SELECT run_id, status FROM runs ORDER BY status").fetchall()
        assert rows == [(finished.run_id, "finished"), (unfinished.run_id, "running")]
        assert store.reject_counts(finished.run_id) == {"bad": 1, "skipped": 0, "file": 0}
        store.begin_run(finished)  # and is written as any other
        assert store.finish_run(finished.run_id) == (0, 1)
    with Store(tmp_path / "old.duckdb") as store:  # applying the schema again changes nothing
        assert store.con.execute("SELECT count(*) FROM runs WHERE status = 'finished'").fetchone() == (1,)


def test_finish_run_checkpoints_so_the_database_file_alone_holds_the_run(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "s.duckdb"
    store = Store(path)
    store.begin_run(RUN)
    write(store, *batch("s", 50))
    store.finish_run(RUN.run_id)
    # copy the .duckdb alone while the screen still holds it open, as `ray rsync-down` of that file would
    copy = tmp_path / "copy.duckdb"
    copy.write_bytes(path.read_bytes())
    store.close()
    with duckdb.connect(str(copy), read_only=True) as con:
        assert con.execute("SELECT count(*), any_value(status) FROM samples, runs").fetchone() == (
            50,
            "finished",
        )


def test_a_checkpoint_never_rewrites_what_an_earlier_one_wrote(tmp_path: Path) -> None:
    """Each checkpoint appends the chunks committed since as row groups of their own; DuckDB's vacuum would
    merge them into the earlier ones, rewriting those (at LMSYS scale a merge rewrote the records table
    again and again, and the blocks it left free were half the file: RESULTS.md, 2026-12-03, the driver's
    memory). So the blocks written by one checkpoint stay the table's after later ones and the run's finish,
    and the finished file has no free blocks to speak of."""

    def blocks(table: str) -> set[int]:
        rows = store.con.execute(f"SELECT block_id FROM pragma_storage_info('{table}')").fetchall()
        return {r[0] for r in rows}

    with Store(tmp_path / "s.duckdb") as store:
        store.begin_run(RUN)
        write(store, *batch("a", 200))
        store.checkpoint()
        first = {t: blocks(t) for t in ("records", "turns", "scores")}
        for i in range(1, 3):
            write(store, *batch(f"b{i}-", 200, row0=200 * i))
            store.checkpoint()
        store.finish_run(RUN.run_id)
        for table, written in first.items():
            assert written <= blocks(table), f"{table}: the first checkpoint's blocks were rewritten"
        assert one(store, "SELECT count(*) FROM turns") == 600
        size = "SELECT total_blocks, free_blocks FROM pragma_database_size() WHERE database_name = 's'"
        total, free = store.con.execute(size).fetchone()
        assert free <= 4 < total, (total, free)  # a few: the runs row and metadata, rewritten at each


def test_a_checkpoint_that_fails_is_a_storage_error_and_the_run_is_not_finished(tmp_path: Path) -> None:
    from screener.errors import StorageError

    with Store(tmp_path / "s.duckdb") as store:
        store.begin_run(RUN)
        write(store, *batch("s", 3))
        store.con = FullDisk(store.con)
        with pytest.raises(StorageError) as e:
            store.finish_run(RUN.run_id)
        message = str(e.value)
        assert message.startswith(
            f"{tmp_path / 's.duckdb'}: could not write the results into the database file"
        )
        assert "No space left on device" in message and "s.duckdb.wal" in message and "\n" not in message
        assert e.value.exit_code == 4
        assert status(store) == ("running", None, False)


def test_a_real_full_disk_at_the_final_checkpoint(tmp_path: Path) -> None:
    """With 100 KB free, a screen reported success while its results were only in the WAL."""
    from screener.errors import StorageError

    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    store = None
    try:
        store = Store(disk / "s.duckdb")
        store.begin_run(RUN)
        store.checkpoint()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"x" * (free - 300_000))
        write(store, *batch("s", 300))  # fits in the WAL, not in the database file as well
        with pytest.raises(StorageError, match="No space left on device"):
            store.finish_run(RUN.run_id)
        store.close()
        (disk / "filler").unlink()
        with Store(disk / "s.duckdb") as again:  # the WAL replays: nothing committed was lost
            assert again.counts(RUN.run_id) == (300, 0) and status(again)[0] == "running"
    finally:
        if store is not None:
            store.close()
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_database_files_that_cannot_be_used_are_one_line_each(tmp_path: Path) -> None:
    """A truncated or random-bytes database was a traceback; it is one line naming the file, whether
    opening it fails or (a file cut short after its first blocks) a later read or write."""
    from screener.errors import StorageError
    from screener.store import DatabaseFileError

    good = tmp_path / "good.duckdb"
    with Store(good) as store:
        store.begin_run(RUN)
        write(store, *batch("s", 500))
    data = good.read_bytes()
    damaged = {f"cut-{n}": data[: len(data) * n // 10] for n in (1, 5, 7, 9)}
    damaged |= {"random": os.urandom(20_000), "empty": b""}
    for name, content in damaged.items():
        (path := tmp_path / f"{name}.duckdb").write_bytes(content)
        # a reader of a file cut after the blocks it reads reads them; one cut earlier fails to open
        for read_only in (False, True) if name in ("cut-1", "random", "empty") else (False,):
            # any step may be the first to fail
            with pytest.raises(DatabaseFileError) as e, Store(path, read_only=read_only) as store:
                store.counts(RUN.run_id)
                if not read_only:
                    store.begin_run(RUN)
                    store.pending(RUN.run_id, batch("s", 500)[0])
                    write(store, *batch("x", 10, 1000))
                    store.finish_run(RUN.run_id)
            message = str(e.value)
            assert message.startswith(f"{path}: not a DuckDB database, or a damaged one ("), name
            assert "\n" not in message and e.value.exit_code == 2
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StorageError, match=r"a-file/s\.duckdb: cannot create its folder") as e:
        Store(tmp_path / "a-file" / "s.duckdb")
    assert e.value.exit_code == 4
    with Store(tmp_path / "new" / "folder" / "s.duckdb"):  # a missing folder is created
        pass
    assert (tmp_path / "new" / "folder" / "s.duckdb").is_file()


class InterruptedCommit:
    """A connection whose next commit is cut short by a signal, as DuckDB reports it: `Query interrupted`."""

    def __init__(self, con: object) -> None:
        self._con = con

    def commit(self) -> None:
        raise RuntimeError("Query interrupted")

    def __getattr__(self, name: str) -> object:
        return getattr(self._con, name)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_a_commit_is_the_signal_and_nothing_is_half_written(
    store: Store, sig: signal.Signals, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C or SIGTERM landing in DuckDB's commit ends as the signal (exit 130/143, run failed), not as a
    `Query interrupted` traceback (exit 1), and the interrupted write is rolled back whole."""
    import screener.errors as errors

    monkeypatch.setattr(errors, "_terminated", False)
    store.begin_run(RUN)
    if sig == signal.SIGTERM:
        with pytest.raises(errors.Terminated):
            errors.raise_terminated(sig, None)
    real = store.con
    store.con = InterruptedCommit(real)
    samples, scores = batch("s", 3)
    with pytest.raises(KeyboardInterrupt) as caught:
        write(store, samples, scores)
    assert isinstance(caught.value, errors.Terminated) == (sig == signal.SIGTERM)
    store.con = real
    assert one(store, "SELECT count(*) FROM scores") == 0
    write(store, samples, scores)  # the connection is usable: a rerun writes the chunk
    assert one(store, "SELECT count(*) FROM samples") == 3


# ---- storage that grows with the input: a record's messages once (issue 25) ----------------------------


def conversation(row: int, turns: int) -> list[Sample]:
    """Every assistant turn of one conversation as the reader makes them under --turns all."""
    messages = [{"role": "system", "content": "Be kind ✓"}]
    out = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"question {t} " + "words " * 50})
        out.append(Sample(f"c{row}#{t}", row, t, list(messages), f"answer {t} " + "more " * 60, "c.jsonl"))
        messages.append({"role": "assistant", "content": out[-1].response})
    return out


def test_a_records_messages_are_stored_once_and_read_back_per_turn(store: Store) -> None:
    """Every turn's whole prompt was stored as JSON: text growing with the square of a conversation's
    turns (7.97M characters for 4.1 MB of ShareGPT)."""
    from screener.records import content_sha256

    samples = [s for row in range(3) for s in conversation(row, 12)]
    write(store, samples, [scored(s) for s in samples])
    stored = one(store, "SELECT sum(strlen(messages::VARCHAR)) FROM records")
    one_copy = sum(
        len(json.dumps([*s.prompt, s.response], ensure_ascii=False)) for s in samples if s.turn == 11
    )
    per_turn = sum(len(json.dumps(s.prompt, ensure_ascii=False)) for s in samples)
    assert one(store, "SELECT count(*) FROM records") == 3 and stored < 1.1 * one_copy < per_turn / 5
    assert one(store, "SELECT count(*) FROM turns") == len(samples)
    got = store.con.execute(
        "SELECT sample_id, source_row, source_file, turn, prompt, response, content_sha256 FROM samples"
        " ORDER BY source_row, turn"
    ).fetchall()
    assert [(g[0], g[1], g[2], g[3], json.loads(g[4]), g[5], g[6]) for g in got] == [
        (
            s.sample_id,
            s.source_row,
            s.source_file,
            s.turn,
            s.prompt,
            s.response,
            content_sha256(s.prompt, s.response),
        )
        for s in samples
    ]
    # a record cut short (--limit) and resumed with more of its turns keeps every turn readable
    longer = conversation(7, 4)
    write(store, longer[:2], [scored(s) for s in longer[:2]])
    write(store, longer[2:], [scored(s) for s in longer[2:]])
    rows = store.con.execute(
        "SELECT prompt, response FROM samples WHERE source_row = 7 ORDER BY turn"
    ).fetchall()
    assert [(json.loads(p), r) for p, r in rows] == [(s.prompt, s.response) for s in longer]


def earlier_layout(path: Path, samples: list[Sample]) -> None:
    """A database as the version before records and turns wrote it: each turn's prompt copied whole in a
    `samples` table (json.dumps' text), scores beside it."""
    import duckdb

    with Store(path) as store:
        store.begin_run(RUN)
        write(store, samples, [scored(s) for s in samples])
        store.finish_run(RUN.run_id)
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE old AS SELECT * EXCLUDE (content_sha256) FROM samples")
        con.execute("DROP VIEW samples; DROP TABLE turns; DROP TABLE records")
        con.execute("ALTER TABLE old RENAME TO samples")
        for s in samples:  # the prompt as that version wrote it
            con.execute(
                "UPDATE samples SET prompt = ? WHERE sample_id = ?",
                [json.dumps(s.prompt, ensure_ascii=False), s.sample_id],
            )


def test_an_earlier_layout_is_read_as_it_is_and_moved_into_records_when_written(tmp_path: Path) -> None:
    from screener.records import content_sha256
    from screener.results import DropFilter, open_db, pick_run, select_drops, top_samples

    samples = [s for row in range(4) for s in conversation(row, 3)]
    path = tmp_path / "old.duckdb"
    earlier_layout(path, samples)
    before = path.read_bytes()
    columns = "sample_id, source_row, source_file, turn, prompt_tokens, response_tokens, truncated, response"
    with open_db(path) as reader:  # read-only: read as it is, the file unchanged
        run = pick_run(reader.con)
        old_rows = reader.con.execute(f"SELECT {columns}, prompt FROM samples ORDER BY ALL").fetchall()
        top = top_samples(reader.con, run, TRAITS[0], LAYERS[0], "delta_p", k=3)
        drops = select_drops(reader.con, run, DropFilter("delta_p", dict.fromkeys(TRAITS, LAYERS[0])))
    assert path.read_bytes() == before and len(top) == 3
    assert drops.scored == {
        row: {f"c{row}#{t}": None for t in range(3)} for row in range(4)
    }  # no hashes then
    with Store(path) as store:  # read-write: moved into records and turns, the same samples as before
        kinds = dict(
            store.con.execute("SELECT table_name, table_type FROM information_schema.tables").fetchall()
        )
        assert (kinds["samples"], kinds["records"], kinds["turns"]) == ("VIEW", "BASE TABLE", "BASE TABLE")
        new_rows = store.con.execute(f"SELECT {columns}, prompt FROM samples ORDER BY ALL").fetchall()
        assert [(*r[:-1], json.loads(r[-1])) for r in new_rows] == [
            (*r[:-1], json.loads(r[-1])) for r in old_rows
        ]
        hashes = dict(store.con.execute("SELECT sample_id, content_sha256 FROM turns").fetchall())
        assert hashes == {s.sample_id: content_sha256(s.prompt, s.response) for s in samples}
        assert one(store, "SELECT count(*) FROM records") == 4
        more = conversation(9, 2)  # and it is written as any other
        store.begin_run(RUN)
        write(store, more, [scored(s) for s in more])
        assert store.finish_run(RUN.run_id) == (len(samples) + 2, 0)
    with open_db(path) as reader:
        run = pick_run(reader.con)
        assert len(top_samples(reader.con, run, TRAITS[0], LAYERS[0], "delta_p", k=100)) == len(samples) + 2


def test_content_hashes_of_a_chunk_are_the_one_sample_hashes() -> None:
    """`content_sha256s` encodes each message once (the turns of a record share them) and must give
    exactly `content_sha256` of every sample: export and explain compare the input against it."""
    from screener.datasets.formats import record_to_samples
    from screener.records import content_sha256, content_sha256s

    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": [1, 2.5]}'}}]
    record = {
        "messages": [
            {"role": "system", "content": "be brief ✓"},
            {"role": "user", "content": 'héllo "quoted" \\ back\nslash \u2028 🙂'},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"},
            {"role": "assistant", "content": "the answer is 42"},
            {"role": "user", "content": "\x00 a NUL"},
            {"role": "assistant", "content": "\u00e9 again"},
        ]
    }
    shared = [
        s
        for s in record_to_samples(record, "openai", source_row=0, source_file="f", turns="all")
        if isinstance(s, Sample)
    ]
    assert len(shared) == 2 and shared[0].prompt[0] is shared[1].prompt[0]  # the prompts share messages
    copied = [dataclasses.replace(s, prompt=json.loads(json.dumps(s.prompt))) for s in shared]
    odd = [  # no reader gives these, but the hash takes them
        Sample("o", 1, 0, [{"role": "user", "content": "x", "n": [1, None, True, {"b": 1, "a": 2}]}], ""),
        Sample("s", 2, 0, [{"role": "user", "content": "\ud800 a lone surrogate"}], "\udfff"),
    ]
    samples = [*shared, *conversation(3, 4), *copied, *odd]
    assert content_sha256s(samples) == [content_sha256(s.prompt, s.response) for s in samples]
    assert content_sha256s([]) == []


def keys_of(store: Store) -> dict[str, list]:
    rows = store.con.execute(
        "SELECT table_name, constraint_column_names FROM duckdb_constraints()"
        " WHERE constraint_type = 'PRIMARY KEY'"
    ).fetchall()
    return dict(rows)


def complete(store: Store) -> bool:
    return store.con.execute("SELECT complete FROM records WHERE source_row = 5").fetchall()[0][0]


@pytest.mark.parametrize("keyed", [False, True])
def test_records_turns_and_scores_hold_one_row_each_with_or_without_keys(tmp_path: Path, keyed: bool) -> None:
    """records, turns and scores have no PRIMARY KEY any more (their indexes grew with the rows): the store
    writes only what is not stored. Rewrites, a row cut by --limit and resumed, and a duplicate id still
    leave one row per key; a database whose tables have the keys (an earlier version's) takes the same
    writes."""
    import duckdb

    from screener.store import SQL_DIR

    db = tmp_path / "k.duckdb"
    if keyed:  # the schema as earlier versions created it: the keys named in its comments
        schema = (SQL_DIR / "schema.sql").read_text().replace("-- key: (", "PRIMARY KEY (")
        with duckdb.connect(str(db)) as con:
            con.execute(schema)
    with Store(db) as store:
        store.begin_run(RUN)
        keys = keys_of(store)
        assert set(keys) == {
            "runs",
            "records",
            "turns",
            "scores",
            "rejects",
            "shifts",
            "reference_distributions",
        } - (set() if keyed else {"records", "turns", "scores"})
        samples = [s for row in range(3) for s in conversation(row, 3)]
        for _ in range(2):  # a rerun of the same chunk
            write(store, samples, [scored(s) for s in samples])
        cut = conversation(5, 4)
        store.write(RUN.run_id, LAYERS, TRAITS, [scored(s) for s in cut[:2]], [], samples=cut[:2], cut_row=5)
        assert complete(store) is False
        todo, _ = store.pending(RUN.run_id, cut)  # the resume reads the cut row again
        assert [s.turn for s in todo] == [2, 3]
        write(store, todo, [scored(s) for s in todo])
        late = dataclasses.replace(samples[0], source_row=9)  # its id, at another row
        write(store, [late], [scored(late)])
        counts = store.con.execute(
            "SELECT (SELECT count(*) FROM records), (SELECT count(DISTINCT source_row) FROM records),"
            " (SELECT count(*) FROM turns), (SELECT count(DISTINCT sample_id) FROM turns),"
            " (SELECT count(*) FROM scores), (SELECT count(DISTINCT (sample_id, trait, layer)) FROM scores)"
        ).fetchall()[0]
        assert counts == (4, 4, 13, 13, 13 * 6, 13 * 6)
        assert complete(store) is True
        assert store.con.execute("SELECT source_row, reason FROM rejects").fetchall() == [
            (9, f"duplicate sample_id (first seen at source_row {samples[0].source_row})")
        ]
        got = store.con.execute("SELECT prompt, response FROM samples WHERE source_row = 5 ORDER BY turn")
        assert [(json.loads(p), r) for p, r in got.fetchall()] == [(s.prompt, s.response) for s in cut]
        assert store.counts(RUN.run_id) == (13, 1)
