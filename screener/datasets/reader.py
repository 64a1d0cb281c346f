"""The one streaming reader: every row of a dataset, numbered over all its files, with its file's row format
(`read_rows`), and one way to turn the rows into samples (`Rebuild`). The screen (`read_samples`), export and
explain all read through these two, so a row means the same record with the same samples everywhere."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from screener.datasets.base import (
    BadRecord,
    DatasetFormatError,
    DatasetReadError,
    ReadStats,
    content_hash,
)
from screener.datasets.containers import CONTENT_ERRORS, Line, file_reason
from screener.datasets.formats import detect_format, own_id, record_to_samples
from screener.datasets.sources import Data, Source, sources
from screener.idset import IdSet
from screener.records import TURNS, Reject, Sample


class Finished(Protocol):
    """The rows a resumed screen has finished, for the read to skip unparsed (`Store.finished`)."""

    def ids(self, row: int, file: str) -> list[str] | None:
        """The sample ids row `row` of `file` gave, all stored, when it is finished; else None. Asked of
        every row in increasing order."""


@dataclass(frozen=True, slots=True)
class Done:
    """A row the resumed screen finished (`Finished`), not parsed again: the sample ids it gave."""

    ids: list[str]
    source_file: str
    source_row: int


class Row(NamedTuple):
    """One row of a dataset. `row` is 0-based over every file in order (-1 for a file-level reject);
    `format` is the file's row format (None before its first record, or when formats are not detected);
    `record` is the record exactly as parsed, or a Reject: a row that did not parse (invalid JSON, not an
    object, a CSV line of the wrong width) or a file that could not be read to its end (kind "file"); or,
    in a resumed screen's read only, `Done`: a row finished before, left unparsed."""

    file: str
    row: int
    format: str | None
    record: dict | Reject | Done


def read_rows(
    data: Data,
    *,
    split: str | None = None,
    stats: ReadStats | None = None,
    formats: bool = True,
    finished: Finished | None = None,
) -> Iterator[Row]:
    """Every row of `data` (a URI, or records in memory), streamed; see `Row`.

    Each file's row format is detected from its first record (unless `formats` is False: records of any
    shape come as they are, e.g. labelled examples). A file whose content fails yields the rows read
    before the failure, then a file-level Reject; so does, in a dataset of several files, a file of no
    known row format (a dataset of one such file stops with the columns it has). A file that cannot be
    opened or read at all stops the read (see the package docstring). `split` applies to hub datasets only.
    The URI is resolved now, so a bad one fails at the call rather than at the first `next()`.
    `finished`: the rows it says are finished come as `Done`, unparsed where the container allows (JSON
    lines); a file's first record is always parsed, for its format."""
    stats = stats if stats is not None else ReadStats()
    stats.lazy = finished is not None
    return _numbered(sources(data, split, stats.ignored), stats, formats, finished)


class Rebuild:
    """The samples of each row of one read, as the screen scores them: `rebuild = Rebuild(turns)`, then
    `rebuild(row)` for every row in order. A row gives one Sample per scored assistant turn (the last one,
    or all), or Rejects that name the field; a row that did not parse is its own Reject.

    Sample ids are unique over the read, so every record is scored under an id of its own: a record
    keeps its own id unless one of its samples' ids was already given to a sample of an earlier row (a
    reused id, or a literal `x#0` before turn 0 of a record `x`); it is then `<id>@<row>` (with its
    `#<turn>` suffixes), `row` being its row over the whole dataset (`.1`, `.2`... appended in the
    unlikely case that is taken too). Only samples count: a rejected record's id may repeat (the
    `rejects` table is keyed by row too), so a dataset whose reused ids were never both scored keeps the
    ids it had before. A sample id is a function of the rows read before it and its own (file, row, turn,
    id), the same on every read of the same input: the screen, export and explain all rebuild every row
    in order."""

    def __init__(self, turns: str):
        if turns not in TURNS:
            raise ValueError(f"turns must be 'last' or 'all', got {turns!r}")
        self.turns = turns
        # every sample id given so far, for the whole read: ~8 bytes an id (a set of Python ints took ~75,
        # the driver's memory growing with the read: ~140 MB at 1.89M samples; RESULTS.md, 2026-12-03).
        # Exact on 8-byte digests, the same in every process: a false hit would rename an id.
        self._given = IdSet()

    def given(self, ids: list[str]) -> None:
        """A finished row's ids (`Done`), given as they were when it was read in full."""
        self._given.add(ids)

    def __call__(self, row: Row) -> list[Sample | Reject]:
        if isinstance(row.record, Done):
            raise ValueError(f"{row.file}, row {row.row}: a finished row has no items (Rebuild.given)")
        base, items = self._items(row)
        if row.row < 0:  # a file-level reject: its id is the file
            return items
        ids = [item.sample_id for item in items]
        scored = [isinstance(item, Sample) for item in items]
        k = 0
        while not self._given.add_if_disjoint([i for i, s in zip(ids, scored, strict=True) if s]):
            renamed = f"{base}@{row.row}" + (f".{k}" if k else "")
            ids = [renamed + item.sample_id[len(base) :] for item in items]
            k += 1
        for item, sample_id in zip(items, ids, strict=True):
            item.sample_id = sample_id
        return items

    def _items(self, row: Row) -> tuple[str, list[Sample | Reject]]:
        """The row's own id (every item's id starts with it) and its items."""
        if isinstance(row.record, Reject):
            return row.record.sample_id, [row.record]
        if row.format is None:
            raise ValueError(f"{row.file}, row {row.row}: read with formats=False, so it has no row format")
        try:
            base = own_id(row.record)
            items = record_to_samples(
                row.record,
                row.format,
                source_row=row.row,
                source_file=row.file,
                turns=self.turns,
                record_id=base,
            )
        except RecursionError:  # parsed, but too deep to hash or normalise
            base = content_hash(f"{row.file}\x1f{row.row}".encode())
            items = [Reject(row.row, base, "record nested too deeply to process", row.file)]
        return base, items


def read_samples(
    data: Data,
    *,
    turns: str = "last",
    split: str | None = None,
    limit: int | None = None,
    stats: ReadStats | None = None,
    finished: Finished | None = None,
) -> Iterator[Sample | Reject | Done]:
    """Normalised samples (and rejects) from any supported URI (or records in memory), streamed: what the
    screen scores. `limit` caps the Samples yielded (rejects don't count); a row it stops inside is
    `stats.cut_row`. `finished` (a resume): a row it says is finished is one `Done` (its samples count
    towards `limit`, and their ids are given, so every later row has the ids of a read in full)."""
    rebuild = Rebuild(turns)
    if limit is not None and limit < 0:  # --limit is checked where it is parsed; this is the library's check
        raise ValueError(f"limit must be a number of samples, 0 or more (or None for all), got {limit}")
    stats = stats if stats is not None else ReadStats()
    rows = read_rows(data, split=split, stats=stats, finished=finished)
    return _samples(rows, rebuild, limit, stats)


def iter_records(
    data: Data, *, split: str | None = None, stats: ReadStats | None = None
) -> Iterator[tuple[int, str, dict]]:
    """(row, file, record) for the rows of `read_rows` that are records: the input as parsed, for writing
    it back (rows that did not parse and unreadable files are left out; rows keep their numbers)."""
    rows = read_rows(data, split=split, stats=stats)
    return ((r.row, r.file, r.record) for r in rows if isinstance(r.record, dict))


def _samples(
    rows: Iterator[Row], rebuild: Rebuild, limit: int | None, stats: ReadStats
) -> Iterator[Sample | Reject | Done]:
    n_samples = 0
    if limit is not None and limit <= 0:
        return
    for row in rows:
        if isinstance(row.record, Done):  # every item a sample, all stored
            rebuild.given(row.record.ids)
            stats.samples += len(row.record.ids)
            n_samples += len(row.record.ids)
            yield row.record
            if limit is not None and n_samples >= limit:
                return
            continue
        items = rebuild(row)
        for k, item in enumerate(items):
            if isinstance(item, Sample):
                stats.samples += 1
                n_samples += 1
            elif item.kind == "skipped":
                stats.skipped += 1
            elif item.kind == "bad":
                stats.rejects += 1
            yield item
            if n_samples == limit:
                if k + 1 < len(items):
                    stats.cut_row = row.row
                return


class _UnknownFormat(DatasetFormatError):
    """A file of a dataset of several whose first record has no known row format: a file-level reject."""


class _NoFormat(DatasetFormatError):
    """The one source of a dataset has no known row format: the read stops."""


def _numbered(
    sources: list[Source], stats: ReadStats, formats: bool, finished: Finished | None
) -> Iterator[Row]:
    """Number the rows of every source in order: the one path shared by files, hub and in-memory data."""
    row = 0
    stats.bytes_total = sum(os.path.getsize(s.name) for s in sources if s.local and os.path.isfile(s.name))
    for source in sources:
        name = source.name
        stats.files.append(name)
        stats.per_file[name] = 0
        try:
            for record in source.read(stats):
                if finished is not None and name in stats.formats and (ids := finished.ids(row, name)):
                    record = Done(ids, name, row)
                elif isinstance(record, Line):
                    record = record.parse()
                if formats and isinstance(record, dict) and name not in stats.formats:
                    try:
                        stats.formats[name] = detect_format(record)
                    except DatasetFormatError as e:
                        if len(sources) == 1 or not source.local:
                            raise _NoFormat(f"{name}, row {row}: {e}") from None
                        raise _UnknownFormat(f"{e} (its first record, row {row})") from None
                stats.records += 1
                stats.per_file[name] += 1
                if isinstance(record, BadRecord):
                    record = Reject(row, record.sample_id, record.reason, name)
                yield Row(name, row, stats.formats.get(name), record)
                row += 1
        except Exception as e:
            if isinstance(e, _NoFormat) or not source.local:
                raise
            if isinstance(e, OSError) and e.errno is not None:
                raise DatasetReadError(
                    f"{name}: cannot read the file ({e.strerror}); a file that cannot be opened stops the "
                    "screen, as skipping it would renumber the rows of the files after it"
                ) from None
            if not isinstance(e, CONTENT_ERRORS):
                raise
            if isinstance(e, _UnknownFormat):
                reason = f"unreadable file: {e}"
            else:
                reason = file_reason(e, name, stats.per_file[name])
            stats.unreadable[name] = reason
            yield Row(name, -1, stats.formats.get(name), Reject(-1, name, reason, name, kind="file"))
        finally:
            stats.position = None
            if source.local and os.path.isfile(name):
                stats.bytes_done += os.path.getsize(name)
