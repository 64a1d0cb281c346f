"""DuckDB results store: schema, bulk idempotent writes, resume and duplicate detection, run status.

Every `write` is one transaction, so a killed screen leaves whole batches only (DuckDB's WAL replays
committed transactions), and rerunning the same config (same `run_id`) skips what is stored and never
duplicates a row: the store inserts only the samples it has checked are not stored (`_new_and_duplicates`;
records, turns and scores have no PRIMARY KEY, whose indexes grew with the rows: sql/schema.sql), and
rejects by their key. A run is 'running' from `begin_run`, then 'failed'
(`fail_run`, with its error) or 'finished' (`finish_run`, which first checkpoints: the .duckdb file
alone then holds every result, and a checkpoint that fails is a StorageError, not a quiet success).

Errors name the file: a database that cannot be created or written is a StorageError (exit code 4), a
file that is not a DuckDB database (or a damaged one) a DatabaseFileError (exit code 2).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from screener.choices import DEFAULT_DB
from screener.errors import BusyError, StorageError, UserError, signal_behind
from screener.idset import IdSet
from screener.records import REJECT_KINDS, Reject, Sample, Scored, content_sha256, content_sha256s
from screener.runs import RUNTIME_KEY, Run

__all__ = ["DEFAULT_DB", "SQL_DIR", "DatabaseFileError", "Store", "StoreBusyError", "one_line"]

SQL_DIR = Path(__file__).resolve().parent / "sql"  # a link to the repo's top-level sql/
# 64 KiB blocks (DuckDB's default is 256 KiB, its smallest 16 KiB): each table and index takes whole
# blocks: 68 samples take 0.6 MB (16 KiB: 0.2 MB; 256 KiB: 2.1 MB; tests/test_store.py batch); on ShareGPT
# `--turns all` 1.08x the input against 0.99x with 16 KiB and 1.29x with 256 KiB. 16 KiB cost memory at
# scale: a screen's text not yet checkpointed took ~6.9 bytes in DuckDB's pool per byte of WAL (64 KiB:
# ~2.5), so the pool filled and spilled to temporary files before each checkpoint, and DuckDB's own
# bookkeeping grew ~1 KB a block (RESULTS.md, 2026-12-03, the driver's memory).
BLOCK_SIZE = 65_536
# DuckDB settings of a writing connection (benchmarks/driver.py --duckdb measures them; RESULTS.md,
# 2026-12-03). DuckDB's defaults, on 378,588 samples: its buffer pool (80% of RAM) kept every block
# written cached, the driver's RSS growing with the database (peak 1.6 GB). A limited pool and one thread
# (the screen's own thread is the other core's work) bound that; the pool's cache of written blocks fills
# whatever limit it has, so the limit is what the database adds to the driver's RSS.
# No vacuum (`max_vacuum_tasks` 0): each checkpoint appends what was committed since as row groups of their
# own, and DuckDB's vacuum merged those into the row groups before, rewriting them (the whole records table
# at each merge): at 300k LMSYS records that doubled the checkpoints' CPU and left half the file free
# blocks (2.02x the input against 1.15x; the memory's peak was the final checkpoint's merge). The store
# never deletes from records, turns or scores, so there is nothing else for a vacuum to reclaim. Without
# the rewrites a checkpoint costs what it writes, so they can come every 64 MB of WAL: half the text held
# in the pool at a time.
WRITER_CONFIG: dict[str, str] = {
    "memory_limit": "256MB",
    "checkpoint_threshold": "64MB",
    "threads": "1",
    "max_vacuum_tasks": "0",
}


class StoreBusyError(BusyError):
    """The database file is locked by another process (DuckDB allows one writer per file)."""


class DatabaseFileError(UserError):
    """The file is not a DuckDB database, or a damaged one."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (DuckDB's span several), or its type when it has none."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


class FinishedRows:
    """A run's finished rows, for a resumed read to skip unparsed (`datasets.reader.Finished`): a row whose
    record is stored complete (every item the reader gave it committed in one chunk, none left unread by
    --limit) and which no reject names, so its items were all samples, all stored. Read from the database a
    window of rows at a time: memory per window, whatever the run's size."""

    WINDOW = 65_536  # rows

    def __init__(self, con: duckdb.DuckDBPyConnection, run_id: str, *, own: bool = False) -> None:
        self.con, self.run_id, self._own = con, run_id, own
        self._lo = self._hi = 0
        self._rows: dict[int, tuple[str, list[str]]] = {}

    def close(self) -> None:
        """Close the connection if it is this reader's own (`Store.finished(cursor=True)`)."""
        if self._own:
            with suppress(duckdb.Error):
                self.con.close()

    def ids(self, row: int, file: str) -> list[str] | None:
        if not self._lo <= row < self._hi:
            self._lo, self._hi = row, row + self.WINDOW
            found = self.con.execute(
                """SELECT r.source_row, any_value(r.source_file), list(t.sample_id)
                FROM records r JOIN turns t USING (run_id, source_row)
                WHERE r.run_id = $run_id AND r.complete AND r.source_row >= $lo AND r.source_row < $hi
                  AND t.source_row >= $lo AND t.source_row < $hi
                  AND r.source_row NOT IN (SELECT source_row FROM rejects WHERE run_id = $run_id
                                           AND source_row >= $lo AND source_row < $hi)
                GROUP BY r.source_row""",
                {"run_id": self.run_id, "lo": self._lo, "hi": self._hi},
            ).fetchall()
            self._rows = {r: (f, ids) for r, f, ids in found}
        hit = self._rows.get(row)
        return hit[1] if hit is not None and hit[0] == file else None


class Store:
    """A screen's results database. Read-write opening creates it (and its folder) and applies
    sql/schema.sql, sql/samples.sql and sql/views.sql (all idempotent; they bring a database written by an
    earlier version up to date, its `samples` table moved into records and turns). `con` is public for
    queries."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        # run_id -> its stored sample ids, ~8 bytes an id: an id the set does not hold is not stored, so
        # DuckDB is asked only about ids it holds (a false hit costs a lookup, never a wrong answer)
        self._ids: dict[str, IdSet] = {}
        existed = self.path.exists()
        if not read_only and not existed:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"{self.path}: cannot create its folder ({e.strerror or e})") from None
        try:
            # a new file in small blocks: a small screen's database is then kilobytes, not megabytes
            config = {} if existed or read_only else {"default_block_size": str(BLOCK_SIZE)}
            if not read_only:
                config |= WRITER_CONFIG
            self.con: duckdb.DuckDBPyConnection = duckdb.connect(
                str(self.path), read_only=read_only, config=config
            )
        except duckdb.IOException as e:
            if "lock" not in str(e).lower():
                raise self._open_error(e, existed) from None
            if read_only:  # only a writer keeps readers out
                raise StoreBusyError(
                    f"{self.path} is being written by a running screen (DuckDB allows one writer); "
                    f"wait for it to finish or query a copy: {e}"
                ) from e
            # A writer is kept out by any other process that has the file open, readers included.
            raise StoreBusyError(
                f"{self.path} is in use by another process: a running screen, or a query/report holding it "
                f"open (a process writing a DuckDB file needs it to itself); wait for it to finish: {e}"
            ) from e
        except duckdb.Error as e:  # a damaged file may fail with another class of error
            raise self._open_error(e, existed) from None
        if read_only:
            return
        try:
            self.con.execute((SQL_DIR / "schema.sql").read_text())
            self._migrate_samples()
            self.con.execute((SQL_DIR / "samples.sql").read_text())
            self.con.execute((SQL_DIR / "views.sql").read_text())
        except BaseException as e:
            self.con.close()
            if isinstance(e, duckdb.Error):
                raise self._open_error(e, existed) from None
            raise

    def _migrate_samples(self) -> None:
        """An earlier version's `samples` table (each turn's prompt copied whole) into records (a record's
        messages once: its last scored turn's prompt and response) and turns (with the content hash of
        each prompt and response as stored), in one transaction; then the `samples` view replaces it."""
        if not has_samples_table(self.con):
            return
        self.con.create_function(
            "_content_sha256",
            lambda prompt, response: content_sha256(json.loads(prompt), response),
            [duckdb.sqltype("VARCHAR"), duckdb.sqltype("VARCHAR")],
            duckdb.sqltype("VARCHAR"),
        )
        try:
            with self._transaction():
                self.con.execute(MIGRATE_SAMPLES)
        finally:
            self.con.remove_function("_content_sha256")

    def _open_error(self, e: duckdb.Error, existed: bool) -> Exception:
        """What is wrong with the file, from DuckDB's error: one line that names it."""
        message = one_line(e).removeprefix("IO Error: ")
        if not existed or _out_of_space(e) or "read-only file system" in message.lower():
            return StorageError(f"{self.path}: cannot create or write the database here: {message}")
        return self._damaged(e)

    def _damaged(self, e: duckdb.Error) -> DatabaseFileError:
        message = one_line(e).removeprefix("IO Error: ")
        return DatabaseFileError(
            f"{self.path}: not a DuckDB database, or a damaged one ({message}); pass another --db"
        )

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """DuckDB's errors of the file itself as one line naming it: a damaged file (DatabaseFileError)
        or one that cannot be written (StorageError). Other errors are bugs, and stay as they are."""
        try:
            yield
        except (RuntimeError, duckdb.InterruptException) as e:
            if (signal := signal_behind(e)) is not None:
                raise signal from e
            raise
        except (duckdb.IOException, duckdb.FatalException, duckdb.TransactionException) as e:
            if any(sign in str(e).lower() for sign in DAMAGE_SIGNS):
                raise self._damaged(e) from None
            raise StorageError(
                f"{self.path}: {what}: {one_line(e)}; what was committed stays, and rerunning the same "
                "command resumes the run"
            ) from None

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._errors("could not write the results"):
            self.con.begin()
            try:
                yield
                self.con.commit()
            except BaseException:
                with suppress(duckdb.Error):  # a failed rollback would hide the error that matters
                    self.con.rollback()
                raise

    def begin_run(self, run: Run) -> bool:
        """Record the run if new; True if it already existed (a resume, which reopens it)."""
        run_id = run.run_id
        with self._transaction():
            existed = self.con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
            if existed:
                # the counts as stored: an earlier version left them 0 until a run finished
                kinds = self._reject_counts(run_id)
                self.con.execute(
                    "UPDATE runs SET finished_at = NULL, status = 'running', error = NULL, input_rows = NULL,"
                    " n_scored = ?, n_rejected = ?, n_unreadable_files = ?, n_skipped = ? WHERE run_id = ?",
                    [self._counts(run_id)[0], kinds["bad"], kinds["file"], kinds["skipped"], run_id],
                )
            else:
                self.con.execute(
                    "INSERT INTO runs (run_id, model, model_sha256, dataset_uri, mode, layers, traits,"
                    " settings, started_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')",
                    [
                        run_id,
                        run.model,
                        run.model_sha256,
                        run.dataset_uri,
                        run.mode,
                        list(run.layers),
                        list(run.traits),
                        json.dumps(run.settings, sort_keys=True, ensure_ascii=False),
                        _utcnow(),
                    ],
                )
        return bool(existed)

    def _new_and_duplicates(
        self, run_id: str, items: Sequence[Sample] | Sequence[Scored]
    ) -> tuple[list, list[Reject]]:
        """Items still to store, and rejects for sample_ids owned by a different source_row.

        The owner is the stored row, else the chunk's first occurrence. A chunk whose ids are distinct
        and all missed by the run's stored ids (`_stored_ids`, which never misses a stored id) is new as it
        is: the common case of a screen's fresh chunks, answered without a query. Otherwise only the
        chunk's ids go to DuckDB (a registered arrow table joined against `turns`), so memory stays per
        chunk. (The set is this Store's: one process writes a database, through one Store.)
        """
        if not items:
            return [], []
        with self._errors("could not read the stored samples"):
            ids = [s.sample_id for s in items]
            if len(set(ids)) == len(ids) and self._stored_ids(run_id).isdisjoint(ids):
                return list(items), []  # no id repeated, none stored: nothing to ask DuckDB
            return self._split_stored(run_id, items)

    def _split_stored(
        self, run_id: str, items: Sequence[Sample] | Sequence[Scored]
    ) -> tuple[list, list[Reject]]:
        """Where each item's id is stored. A resumed item is stored at its own source_row, so the join reads
        only the chunk's span of rows (DuckDB's zone maps skip the rest: a join against the whole table
        cost O(stored rows) a chunk, quadratic over a screen). An id stored at another row (a duplicate)
        is looked up across the table, but only for the ids the run's stored ids (`_stored_ids`) hold."""
        rows = [s.source_row for s in items]
        chunk = pa.table(
            {
                "pos": pa.array(range(len(items)), pa.int64()),
                "sample_id": pa.array([s.sample_id for s in items], pa.string()),
                "source_row": pa.array(rows, pa.int64()),
            }
        )
        self.con.register("_chunk", chunk)
        try:
            seen = self.con.execute(
                """SELECT s.source_row, f.first_row, c.pos = f.first_pos
                FROM _chunk c
                JOIN (SELECT sample_id, min(pos) AS first_pos, arg_min(source_row, pos) AS first_row
                      FROM _chunk GROUP BY sample_id) f USING (sample_id)
                LEFT JOIN (SELECT sample_id, source_row FROM turns
                           WHERE run_id = $run_id AND source_row BETWEEN $lo AND $hi) s USING (sample_id)
                ORDER BY c.pos""",
                {"run_id": run_id, "lo": min(rows), "hi": max(rows)},
            ).fetchall()
        finally:
            with suppress(duckdb.Error):  # after a failed statement it fails too, hiding the cause
                self.con.unregister("_chunk")
        stored_ids = self._stored_ids(run_id)
        maybe = [s.sample_id for s, (row, *_) in zip(items, seen, strict=True) if row is None]
        elsewhere = {}
        if maybe := [i for i, hit in zip(maybe, stored_ids.holds(maybe), strict=True) if hit]:
            elsewhere = dict(
                self.con.execute(
                    "SELECT sample_id, source_row FROM turns WHERE run_id = $run_id"
                    " AND sample_id IN (SELECT unnest($ids))",
                    {"run_id": run_id, "ids": maybe},
                ).fetchall()
            )
        todo, rejects = [], []
        for item, (row, first_row, first_in_chunk) in zip(items, seen, strict=True):
            stored_row = row if row is not None else elsewhere.get(item.sample_id)
            owner_row = first_row if stored_row is None else stored_row
            if owner_row != item.source_row:
                reason = f"duplicate sample_id (first seen at source_row {owner_row})"
                rejects.append(Reject(item.source_row, item.sample_id, reason, item.source_file))
            elif first_in_chunk and stored_row is None:  # else already done (a resume) or repeated verbatim
                todo.append(item)
        return todo, rejects

    def _stored_ids(self, run_id: str) -> IdSet:
        """The run's stored sample ids (an `IdSet`), read from the table once per open (then kept up to date
        by `write`)."""
        if run_id not in self._ids:
            ids = IdSet()
            result = self.con.sql("SELECT sample_id FROM turns WHERE run_id = $r", params={"r": run_id})
            for batch in result.to_arrow_reader(100_000):  # bounded memory, whatever the run's size
                ids.add(batch.column(0).to_pylist())
            self._ids[run_id] = ids
        return self._ids[run_id]

    def finished(self, run_id: str, *, cursor: bool = False) -> FinishedRows:
        """The run's finished rows, for a resumed read to skip (`FinishedRows`); `cursor`: on a connection
        of its own (DuckDB's `cursor()`), for a read in another thread (close it when done)."""
        return FinishedRows(self.con.cursor() if cursor else self.con, run_id, own=cursor)

    def pending(self, run_id: str, samples: list[Sample]) -> tuple[list[Sample], list[Reject]]:
        """Split a chunk into samples not yet stored for this run, and rejects for duplicate sample_ids.

        A sample stored with the same source_row is dropped silently: that is a resume.
        """
        return self._new_and_duplicates(run_id, samples)

    def write(
        self,
        run_id: str,
        layers: Sequence[int],
        traits: Sequence[str],
        scored: Sequence[Scored],
        rejects: Sequence[Reject],
        *,
        samples: Sequence[Sample] = (),
        cut_row: int | None = None,
    ) -> None:
        """Store a batch in one transaction: records (each record's messages once), turns, scores
        (sample × layer × trait) and rejects.

        `samples` supplies prompt and response text, which `Scored` does not carry; matched on
        (sample_id, source_row). `cut_row`: a row whose later items the read left unread (--limit); its
        record is stored as not complete, so a resume reads it again. Idempotent. A scored sample whose id
        is owned by another source_row (possible when chunks are scored out of order) becomes a duplicate
        reject, not a lost row.
        """
        by_key = {(s.sample_id, s.source_row): s for s in samples}
        if missing := [s.sample_id for s in scored if (s.sample_id, s.source_row) not in by_key]:
            raise ValueError(f"write(samples=...) lacks the Sample for scored {missing[:5]}")
        with self._transaction():
            fresh, duplicates = self._new_and_duplicates(run_id, scored)
            added: Counter[str] = Counter()
            if fresh:
                self._write_records(run_id, _record_rows(fresh, by_key, cut_row))
                self._insert("turns", run_id, _turn_rows(fresh, by_key), keyed=False)
                self._insert("scores", run_id, _score_rows(layers, traits, fresh), keyed=False)
                added["scored"] = len(fresh)  # not stored before (`_new_and_duplicates`)
                self._stored_ids(run_id).add([s.sample_id for s in fresh])
            if all_rejects := [*rejects, *duplicates]:
                added.update(self._insert("rejects", run_id, _reject_rows(all_rejects), returning="kind"))
            if added:  # the run's counts stay true as chunks commit (a killed run's too)
                self.con.execute(
                    "UPDATE runs SET n_scored = n_scored + $scored, n_rejected = n_rejected + $bad,"
                    " n_unreadable_files = coalesce(n_unreadable_files, 0) + $file,"
                    " n_skipped = coalesce(n_skipped, 0) + $skipped WHERE run_id = $run_id",
                    {"run_id": run_id, **{k: added[k] for k in ("scored", *REJECT_KINDS)}},
                )

    def _insert(
        self, table: str, run_id: str, rows: pa.Table, returning: str | None = None, *, keyed: bool = True
    ) -> list:
        """One set-based INSERT per table (thousands of rows in milliseconds). `keyed`: the table's key
        makes a row stored before a no-op (rejects); else (turns, scores, which have no key: sql/schema.sql)
        the caller inserts only rows it has checked are new (`_new_and_duplicates`). With `returning`, that
        column of each row actually inserted."""
        self.con.register("_rows", rows)
        try:
            inserted = self.con.execute(
                f"INSERT INTO {table} BY NAME SELECT $run_id AS run_id, * FROM _rows"
                + (" ON CONFLICT DO NOTHING" if keyed else "")
                + (f" RETURNING {returning}" if returning else ""),
                {"run_id": run_id},
            ).fetchall()
        finally:
            with suppress(duckdb.Error):  # after a failed statement it fails too, hiding the cause
                self.con.unregister("_rows")
        return [r[0] for r in inserted] if returning else []

    def _write_records(self, run_id: str, rows: pa.Table) -> None:
        """Each record's messages, once. A record stored before with fewer messages (a screen cut short by
        --limit mid-record, resumed with a larger one) gets the longer list: its earlier turns' prompts are
        prefixes of it. The table has no key (sql/schema.sql): the rows stored before are found within the
        chunk's span of source_row (DuckDB's zone maps skip the rest), updated, and the others inserted."""
        rows_at = rows.column("source_row").to_pylist()
        span = {"run_id": run_id, "lo": min(rows_at), "hi": max(rows_at)}
        self.con.register("_records", rows)
        try:
            stored = self.con.execute(
                "SELECT count(*) FROM records WHERE run_id = $run_id AND source_row BETWEEN $lo AND $hi"
                " AND source_row IN (SELECT source_row FROM _records)",
                span,
            ).fetchall()[0][0]
            if stored:
                self.con.execute(
                    "UPDATE records SET messages = r.messages, source_file = r.source_file,"
                    " complete = r.complete FROM _records r"
                    " WHERE records.run_id = $run_id AND records.source_row BETWEEN $lo AND $hi"
                    " AND records.source_row = r.source_row"
                    " AND json_array_length(r.messages) > json_array_length(records.messages)",
                    span,
                )
            self.con.execute(
                "INSERT INTO records BY NAME SELECT $run_id AS run_id, * FROM _records"
                + (
                    " WHERE source_row NOT IN (SELECT source_row FROM records WHERE run_id = $run_id"
                    " AND source_row BETWEEN $lo AND $hi)"
                    if stored
                    else ""
                ),
                span if stored else {"run_id": run_id},
            )
        finally:
            with suppress(duckdb.Error):  # after a failed statement it fails too, hiding the cause
                self.con.unregister("_records")

    def write_shifts(self, rows: Sequence[dict]) -> None:
        """Store `screener shift` results (dicts with the `shifts` table's columns; `settings` a dict) in one
        transaction, stamped with the time. The same measurement again replaces its rows (the table's key)."""
        if not rows:
            return
        now = _utcnow()
        table = pa.Table.from_pylist(
            [{**r, "settings": json.dumps(r["settings"], sort_keys=True), "created_at": now} for r in rows]
        )
        with self._transaction():
            self.con.register("_shift_rows", table)
            try:
                self.con.execute("INSERT OR REPLACE INTO shifts BY NAME SELECT * FROM _shift_rows")
            finally:
                self.con.unregister("_shift_rows")

    def write_references(self, run_id: str, rows: Sequence[dict]) -> None:
        """A run's reference distributions (calibration.reference_rows), replacing what the run had: a
        resumed run shows the vectors' current calibration."""
        table = pa.Table.from_pylist(list(rows)) if rows else None
        with self._transaction():
            self.con.execute("DELETE FROM reference_distributions WHERE run_id = ?", [run_id])
            if table is None:
                return
            self.con.register("_reference_rows", table)
            try:
                self.con.execute(
                    "INSERT INTO reference_distributions BY NAME "
                    "SELECT $run_id AS run_id, * FROM _reference_rows",
                    {"run_id": run_id},
                )
            finally:
                self.con.unregister("_reference_rows")

    def finish_run(self, run_id: str, input_rows: int | None = None) -> tuple[int, int]:
        """Checkpoint, then mark the run finished with its counts; returns (n_scored, n_rejected).
        `input_rows`: the rows it read, when it read the input to its end (what export checks for rows
        added since).

        The checkpoint writes everything committed into the database file (until then part of it may be
        in the .wal file beside it only), so a finished run's results are in the .duckdb file alone. It
        runs before the run is marked finished: a checkpoint that fails (a full disk) is a StorageError
        and leaves the run unfinished."""
        self.checkpoint()
        counts = self.reject_counts(run_id)
        n_scored = self.counts(run_id)[0]
        with self._transaction():
            updated = self.con.execute(
                "UPDATE runs SET finished_at = ?, status = 'finished', error = NULL, n_scored = ?,"
                " n_rejected = ?, n_unreadable_files = ?, n_skipped = ?, input_rows = ? WHERE run_id = ?"
                " RETURNING run_id",
                [_utcnow(), n_scored, counts["bad"], counts["file"], counts["skipped"], input_rows, run_id],
            ).fetchall()
        if not updated:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        self.checkpoint()
        return n_scored, counts["bad"]

    def checkpoint(self) -> None:
        """Write what is committed from the WAL into the database file; a StorageError if that fails."""
        try:
            self.con.execute("CHECKPOINT")
        except duckdb.Error as e:
            if any(sign in str(e).lower() for sign in DAMAGE_SIGNS):
                raise self._damaged(e) from None
            raise StorageError(
                f"{self.path}: could not write the results into the database file ({one_line(e)}); they "
                f"are committed in {self.path}.wal beside it: keep both files together, free some space "
                "and rerun the same command to finish the run"
            ) from None

    def fail_run(self, run_id: str, error: str) -> None:
        """Mark the run failed with its error, if the database can still be written (best effort: the
        failure may be the database's own)."""
        # an interrupt may land between a chunk's BEGIN and its try (or inside its rollback): left open,
        # that transaction would swallow this update and roll it back at close (seen once under SIGINT)
        with suppress(duckdb.Error):
            self.con.rollback()
        with suppress(duckdb.Error):
            self.con.execute(
                "UPDATE runs SET status = 'failed', error = ? WHERE run_id = ? AND status = 'running'",
                [error, run_id],
            )

    def record_runtime(self, run_id: str, runtime: dict) -> None:
        """Keep how this invocation did the work (batch sizes, workers) in the run's settings, under
        `runtime`, which the run's identity leaves out (runs.RUNTIME_KEY)."""
        self.con.execute(
            "UPDATE runs SET settings = json_merge_patch(settings, ?) WHERE run_id = ?",
            [json.dumps({RUNTIME_KEY: None}), run_id],
        )  # replace, not merge into, an earlier invocation's record
        self.con.execute(
            "UPDATE runs SET settings = json_merge_patch(settings, ?) WHERE run_id = ?",
            [json.dumps({RUNTIME_KEY: runtime}, sort_keys=True), run_id],
        )

    def counts(self, run_id: str) -> tuple[int, int]:
        """(samples stored, rejects of kind 'bad' stored) for a run."""
        with self._errors("could not count the stored results"):
            return self._counts(run_id)

    def _counts(self, run_id: str) -> tuple[int, int]:
        return self.con.execute(
            "SELECT (SELECT count(*) FROM turns WHERE run_id = $r),"
            " (SELECT count(*) FROM rejects WHERE run_id = $r AND kind = 'bad')",
            {"r": run_id},
        ).fetchall()[0]  # all: a result left unread keeps the connection busy

    def reject_counts(self, run_id: str) -> dict[str, int]:
        """{kind: rejects stored} for a run, every kind of records.REJECT_KINDS."""
        with self._errors("could not count the stored results"):
            return self._reject_counts(run_id)

    def _reject_counts(self, run_id: str) -> dict[str, int]:
        rows = self.con.execute(
            "SELECT kind, count(*) FROM rejects WHERE run_id = $r GROUP BY kind", {"r": run_id}
        ).fetchall()
        return dict.fromkeys(REJECT_KINDS, 0) | dict(rows)


# what DuckDB says when a file's content is not what it expects (not when it cannot write)
DAMAGE_SIGNS = ("could not read enough bytes", "not a valid duckdb", "checksum", "corrupt", "invalid block")


def has_samples_table(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the database is of the layout before records and turns: `samples` a table, not a view."""
    rows = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' AND table_name = 'samples'"
        " AND NOT temporary"
    ).fetchall()  # all: a result left unread keeps the connection busy
    return bool(rows[0][0])


# An earlier version's samples table into records and turns (Store._migrate_samples). A record's messages
# are its last scored turn's prompt and response: each earlier turn's prompt is a prefix of them.
MIGRATE_SAMPLES = """
INSERT INTO records BY NAME
SELECT run_id, source_row, any_value(source_file) AS source_file,
       to_json(list_append(CAST(arg_max(prompt, turn) AS JSON[]),
                           json_object('role', 'assistant', 'content', arg_max(response, turn)))) AS messages
FROM samples GROUP BY run_id, source_row;
INSERT INTO turns BY NAME
SELECT run_id, sample_id, source_row, turn, json_array_length(prompt) AS prompt_messages, prompt_tokens,
       response_tokens, truncated, natural_response, natural_tokens,
       _content_sha256(prompt::VARCHAR, response) AS content_sha256
FROM samples;
DROP TABLE samples;
"""


def _out_of_space(e: BaseException) -> bool:
    return "no space left" in str(e).lower()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # the schema's TIMESTAMPs are naive UTC


def _record_rows(
    scored: Sequence[Scored], by_key: dict[tuple[str, int], Sample], cut_row: int | None = None
) -> pa.Table:
    """One row per record: its messages through its last scored turn (that turn's prompt, then its
    response), which every scored turn's prompt is a prefix of; complete unless it is `cut_row`."""
    last: dict[int, Sample] = {}
    for s in scored:
        src = by_key[(s.sample_id, s.source_row)]
        if s.source_row not in last or len(src.prompt) > len(last[s.source_row].prompt):
            last[s.source_row] = src
    rows = []
    for row, src in last.items():
        messages = [*src.prompt, {"role": "assistant", "content": src.response}]
        rows.append(
            {
                "source_row": int(row),
                "source_file": src.source_file,
                "messages": json.dumps(messages, ensure_ascii=False),
                "complete": row != cut_row,
            }
        )
    for s in scored:  # the view rebuilds each turn from its record: it must be a prefix of it
        src = by_key[(s.sample_id, s.source_row)]
        messages = last[s.source_row].prompt
        n = len(src.prompt)
        if src is not last[s.source_row] and (
            messages[:n] != src.prompt or messages[n].get("content") != src.response
        ):
            raise ValueError(f"sample {s.sample_id!r} is not a turn of its record's longest prompt")
    return pa.Table.from_pylist(rows)


def _turn_rows(scored: Sequence[Scored], by_key: dict[tuple[str, int], Sample]) -> pa.Table:
    sources = [by_key[(s.sample_id, s.source_row)] for s in scored]
    rows = []
    for s, src, sha in zip(scored, sources, content_sha256s(sources), strict=True):
        rows.append(
            {
                "sample_id": s.sample_id,
                "source_row": int(s.source_row),
                "turn": int(s.turn),
                "prompt_messages": len(src.prompt),
                "prompt_tokens": int(s.prompt_tokens),
                "response_tokens": int(s.response_tokens),
                "truncated": bool(s.truncated),
                "natural_response": s.natural_response,
                "natural_tokens": None if s.natural_tokens is None else int(s.natural_tokens),
                "content_sha256": sha,
            }
        )
    return pa.Table.from_pylist(rows)


def _score_rows(layers: Sequence[int], traits: Sequence[str], scored: Sequence[Scored]) -> pa.Table:
    """Long format, sample-major then layer then trait (C order of the `[n_layers, n_traits]` arrays)."""
    n, shape = len(scored), (len(layers), len(traits))
    no_natural = np.full(shape, np.nan)  # proxy mode: NULL like an empty natural response

    def stack(arrays: list[np.ndarray], what: str) -> np.ndarray:
        out = np.stack(arrays).astype(np.float64)
        if out.shape[1:] != shape:
            raise ValueError(f"{what} has shape {out.shape[1:]}, expected [n_layers, n_traits] = {shape}")
        return out.reshape(-1)

    def nullable(x: np.ndarray) -> pa.Array:
        return pa.array(x, pa.float64(), mask=np.isnan(x))

    response = stack([s.proj_response for s in scored], "proj_response")
    prompt_last = stack([s.proj_prompt_last for s in scored], "proj_prompt_last")
    natural = stack(
        [no_natural if s.proj_natural is None else s.proj_natural for s in scored], "proj_natural"
    )
    sample_index = np.repeat(np.arange(n), shape[0] * shape[1])
    trait_index = np.tile(np.arange(shape[1]), n * shape[0])
    return pa.table(
        {
            "sample_id": pa.array([s.sample_id for s in scored], pa.string()).take(sample_index),
            "layer": pa.array(np.tile(np.repeat(np.asarray(layers, np.int32), shape[1]), n)),
            "trait": pa.array(list(traits), pa.string()).take(trait_index),
            "proj_response": response,
            "proj_prompt_last": prompt_last,
            "proj_natural": nullable(natural),
            "delta_p": nullable(response - natural),
            "delta_p_proxy": response - prompt_last,
        }
    )


def _reject_rows(rejects: Sequence[Reject]) -> pa.Table:
    return pa.Table.from_pylist([asdict(r) for r in rejects])


def check_not_busy(path: str | Path) -> None:
    """Fail at once (`StoreBusyError`, exit code 3) when another process is writing the database: called
    before a command's slow set-up (resolving and hashing the model), so a second screen on a busy file
    stops in a second instead of after it. Opening read-only is enough: DuckDB refuses it while a writer
    holds the file, and it creates nothing when the file is new."""
    if Path(path).is_file():
        Store(path, read_only=True).close()
