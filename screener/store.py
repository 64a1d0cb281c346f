"""DuckDB results store: schema, bulk idempotent writes, resume and duplicate detection.

Every `write` is one transaction over primary-keyed tables, so a killed screen leaves whole batches
only (DuckDB's WAL replays committed transactions), and rerunning the same config (same `run_id`)
skips what is stored and never duplicates a row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from screener.errors import BusyError
from screener.records import Reject, Sample, Scored

__all__ = ["SQL_DIR", "RunInfo", "Store", "StoreBusyError"]

SQL_DIR = Path(__file__).resolve().parent / "sql"  # a link to the repo's top-level sql/


class StoreBusyError(BusyError):
    """The database file is locked by another process (DuckDB allows one writer per file)."""


@dataclass(frozen=True)
class RunInfo:
    """Everything that determines a run's values; its hash is the run's key."""

    model: str
    model_sha256: str
    dataset_uri: str
    mode: str  # 'proxy' | 'natural'
    layers: tuple[int, ...]
    traits: tuple[str, ...]
    settings: dict = field(hash=False)  # JSON-serialisable: dtype, max_tokens, turns, split, vector files...

    def __post_init__(self) -> None:
        if self.mode not in ("proxy", "natural"):
            raise ValueError(f"mode must be 'proxy' or 'natural', not {self.mode!r}")
        # Callers pass lists or numpy ints: normalise so equal configs compare and hash equal.
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "traits", tuple(str(t) for t in self.traits))

    @property
    def run_id(self) -> str:
        """First 16 hex of the sha256 of the canonical JSON of all fields: same config, same id."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Store:
    """A screen's results database. Read-write opening creates it and applies sql/schema.sql (and
    sql/views.sql when present; both are idempotent). `con` is public for queries."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        try:
            self.con: duckdb.DuckDBPyConnection = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as e:
            if "lock" not in str(e).lower():
                raise
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
        if read_only:
            return
        try:
            self.con.execute((SQL_DIR / "schema.sql").read_text())
            if (views := SQL_DIR / "views.sql").exists():
                self.con.execute(views.read_text())
        except BaseException:
            self.con.close()
            raise

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.con.begin()
        try:
            yield
        except BaseException:
            self.con.rollback()
            raise
        self.con.commit()

    def begin_run(self, run: RunInfo) -> bool:
        """Record the run if new; True if it already existed (a resume, which reopens it)."""
        run_id = run.run_id
        with self._transaction():
            existed = self.con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
            if existed:
                self.con.execute("UPDATE runs SET finished_at = NULL WHERE run_id = ?", [run_id])
            else:
                self.con.execute(
                    "INSERT INTO runs (run_id, model, model_sha256, dataset_uri, mode, layers, traits,"
                    " settings, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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

    def _split(self, run_id: str, items: Sequence[Sample] | Sequence[Scored]) -> tuple[list, list[Reject]]:
        """Items still to store, and rejects for sample_ids owned by a different source_row.

        The owner is the stored row, else the chunk's first occurrence. Only the chunk's ids go to
        DuckDB (a registered arrow table joined against `samples`), so memory stays per chunk.
        """
        if not items:
            return [], []
        chunk = pa.table(
            {
                "pos": pa.array(range(len(items)), pa.int64()),
                "sample_id": pa.array([s.sample_id for s in items], pa.string()),
                "source_row": pa.array([s.source_row for s in items], pa.int64()),
            }
        )
        self.con.register("_chunk", chunk)
        try:
            seen = self.con.execute(
                """SELECT coalesce(s.source_row, f.first_row), s.source_row IS NOT NULL, c.pos = f.first_pos
                FROM _chunk c
                JOIN (SELECT sample_id, min(pos) AS first_pos, arg_min(source_row, pos) AS first_row
                      FROM _chunk GROUP BY sample_id) f USING (sample_id)
                LEFT JOIN samples s ON s.run_id = $run_id AND s.sample_id = c.sample_id
                ORDER BY c.pos""",
                {"run_id": run_id},
            ).fetchall()
        finally:
            self.con.unregister("_chunk")
        todo, rejects = [], []
        for item, (owner_row, stored, first_in_chunk) in zip(items, seen, strict=True):
            if owner_row != item.source_row:
                reason = f"duplicate sample_id (first seen at source_row {owner_row})"
                rejects.append(Reject(item.source_row, item.sample_id, reason, item.source_file))
            elif first_in_chunk and not stored:  # else already done (a resume) or repeated verbatim
                todo.append(item)
        return todo, rejects

    def pending(self, run_id: str, samples: list[Sample]) -> tuple[list[Sample], list[Reject]]:
        """Split a chunk into samples not yet stored for this run, and rejects for duplicate sample_ids.

        A sample stored with the same source_row is dropped silently: that is a resume.
        """
        return self._split(run_id, samples)

    def write(
        self,
        run_id: str,
        layers: Sequence[int],
        traits: Sequence[str],
        scored: Sequence[Scored],
        rejects: Sequence[Reject],
        *,
        samples: Sequence[Sample] = (),
    ) -> None:
        """Store a batch in one transaction: samples, scores (sample × layer × trait) and rejects.

        `samples` supplies prompt and response text, which `Scored` does not carry; matched on
        (sample_id, source_row). Idempotent. A scored sample whose id is owned by another source_row
        (possible when chunks are scored out of order) becomes a duplicate reject, not a lost row.
        """
        by_key = {(s.sample_id, s.source_row): s for s in samples}
        if missing := [s.sample_id for s in scored if (s.sample_id, s.source_row) not in by_key]:
            raise ValueError(f"write(samples=...) lacks the Sample for scored {missing[:5]}")
        with self._transaction():
            fresh, duplicates = self._split(run_id, scored)
            if fresh:
                self._insert("samples", run_id, _sample_rows(fresh, by_key))
                self._insert("scores", run_id, _score_rows(layers, traits, fresh))
            if all_rejects := [*rejects, *duplicates]:
                self._insert("rejects", run_id, _reject_rows(all_rejects))

    def _insert(self, table: str, run_id: str, rows: pa.Table) -> None:
        # One set-based INSERT per table: thousands of rows in milliseconds; keys make reruns no-ops.
        self.con.register("_rows", rows)
        try:
            self.con.execute(
                f"INSERT INTO {table} BY NAME SELECT $run_id AS run_id, * FROM _rows ON CONFLICT DO NOTHING",
                {"run_id": run_id},
            )
        finally:
            self.con.unregister("_rows")

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

    def finish_run(self, run_id: str) -> tuple[int, int]:
        """Mark the run finished and record its counts; returns (n_scored, n_rejected)."""
        n_scored, n_rejected = self.counts(run_id)
        updated = self.con.execute(
            "UPDATE runs SET finished_at = ?, n_scored = ?, n_rejected = ? WHERE run_id = ? RETURNING run_id",
            [_utcnow(), n_scored, n_rejected, run_id],
        ).fetchall()
        if not updated:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        return n_scored, n_rejected

    def counts(self, run_id: str) -> tuple[int, int]:
        """(samples stored, rejects stored) for a run."""
        return self.con.execute(
            "SELECT (SELECT count(*) FROM samples WHERE run_id = $r),"
            " (SELECT count(*) FROM rejects WHERE run_id = $r)",
            {"r": run_id},
        ).fetchone()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # the schema's TIMESTAMPs are naive UTC


def _sample_rows(scored: Sequence[Scored], by_key: dict[tuple[str, int], Sample]) -> pa.Table:
    rows = []
    for s in scored:
        src = by_key[(s.sample_id, s.source_row)]
        rows.append(
            {
                "sample_id": s.sample_id,
                "source_row": int(s.source_row),
                "source_file": s.source_file or src.source_file,
                "turn": int(s.turn),
                "prompt_tokens": int(s.prompt_tokens),
                "response_tokens": int(s.response_tokens),
                "truncated": bool(s.truncated),
                "prompt": json.dumps(src.prompt, ensure_ascii=False),
                "response": src.response,
                "natural_response": s.natural_response,
                "natural_tokens": None if s.natural_tokens is None else int(s.natural_tokens),
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
