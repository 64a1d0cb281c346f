"""Filtered training data: the input's own records, minus the ones a screen flagged.

`results.select_drops` says which source rows a filter drops (every filter selects *samples to drop*; a
record is dropped when any of its scored samples is selected). `export_records` then reads the run's
dataset once with `datasets.read_rows` and writes the records back unchanged, so a jsonl export without a
filter reproduces the input records exactly. Records the screen did not score (rejected, or past
`--limit`, or with tool-call turns only) are kept unless `drop_unscored`; unparseable input lines and
unreadable files are written to neither side (the manifest counts them: `unreadable_rows`,
`unreadable_files`). `invert` writes the dropped records instead. Parquet and hf are columnar, with one
schema for all records: where records have differing keys, each record gains the keys it lacks, with null
values. A manifest beside the output says what was done. Outputs go through `screener.outputs`: never
over the screened input or the database, never over an existing output without `force`, and written
under a temporary name, renamed when complete.
"""

from __future__ import annotations

import base64
import json
import pickle
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from screener.choices import EXPORT_FORMATS
from screener.datasets import ReadStats, Rebuild, Row, check_input, data_suffix, read_rows
from screener.errors import QueryError, UserError
from screener.outputs import TEMP_SUFFIX, Protected, output_file, output_folder, temp_prefix
from screener.records import Reject, Sample, content_sha256
from screener.results import DropFilter, Selection
from screener.runs import Run

__all__ = ["FORMATS", "ExportCounts", "ExportResult", "export_records", "manifest_path"]

FORMATS = EXPORT_FORMATS
SPOOL_BATCH = 1000  # records per pickled batch of a spool, and per parquet row group

Write = Callable[[dict], object]
# what a jsonl export writes for values JSON has no type for (a parquet input's binary or timestamp columns)
JSONL_VALUES = "binary values as base64 strings; dates, times and timestamps as ISO 8601 strings"


def _json_value(value: object) -> object:
    """A value of a parquet column that JSON has no type for, as JSONL_VALUES says."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"a value of type {type(value).__name__} cannot be written as JSON")


@dataclass(frozen=True)
class ExportCounts:
    """What one pass over the input did. kept + dropped = records_read; `written` is one of the two
    (the dropped ones with invert)."""

    records_read: int = 0
    kept: int = 0
    dropped: int = 0
    written: int = 0
    dropped_unscored: int = 0
    unreadable_rows: int = 0  # rows that did not parse (invalid JSON): on neither side
    added_rows: int = 0  # rows past those the screen read to the input's end (dropped: --drop-unscored)
    unreadable_files: int = 0  # files that could not be read to their end: what follows is on neither side
    dropped_by_trait: dict[str, int] = field(default_factory=dict)  # a record may count for several


@dataclass(frozen=True)
class ExportResult:
    """What an export did: the manifest. per_trait[t]: records scored for trait t, those dropped because
    t selected them, and those kept (a record dropped for another trait is not kept)."""

    run_id: str
    input: str  # where the records were read: the run's dataset, or --input
    output: str
    format: str
    filter: dict
    counts: ExportCounts
    per_trait: dict[str, dict[str, int]]
    created_at: str
    unreadable: dict[str, str] = field(default_factory=dict)  # file → why it could not be read
    ignored: list[str] = field(default_factory=list)  # files of the input folder that are not data: not read

    def manifest(self, run: Run, flt: DropFilter) -> dict:
        return {
            "run_id": self.run_id,
            "dataset_uri": run.dataset_uri,
            "input": self.input,
            "split": run.settings.get("split"),
            "metric": flt.metric,
            "layers": flt.layers,  # each trait's layer; null: every layer (--where without --layer)
            "output": self.output,
            "format": self.format,
            "filter": self.filter,
            **asdict(self.counts),
            "per_trait": self.per_trait,
            "unreadable": self.unreadable,
            "ignored_files": self.ignored,
            **({"jsonl_values": JSONL_VALUES} if self.format == "jsonl" else {}),
            "created_at": self.created_at,
        }


def manifest_path(out: str | Path, fmt: str) -> Path:
    out = Path(out)
    return out / "manifest.json" if fmt == "hf" else out.with_name(out.name + ".manifest.json")


def export_records(
    run: Run,
    flt: DropFilter,
    selection: Selection,
    out: str | Path,
    fmt: str,
    *,
    input_uri: str | None = None,
    hf_cache_dir: str | None = None,
    force: bool = False,
    protected: Protected | None = None,
) -> ExportResult:
    """Read the run's records once and write the ones the filter keeps (those it drops, with invert) to
    `out`, then the manifest beside it. Needs no database: `selection` was read from it before.

    Nothing is written over the run's input (or `protected`: the database, other runs' inputs), nor over
    an existing output without `force`; both are checked before the input is read."""
    fmt = export_format(out, fmt)
    uri = input_uri or run.dataset_uri
    check_input(uri)
    protected = (protected or Protected()).with_inputs([run.dataset_uri, uri])
    out = Path(out)
    if fmt == "hf":
        protected.check(out, force=force, folder=True)
    else:
        protected.check(out, force=force)
        protected.check(manifest_path(out, fmt), force=force)
    stats = ReadStats()
    rows = read_rows(uri, split=run.settings.get("split"), stats=stats)  # a hub split, as screened
    result: ExportResult | None = None

    def manifest() -> str:
        assert result is not None
        return json.dumps(result.manifest(run, flt), indent=2, ensure_ascii=False) + "\n"

    writer = WRITERS[fmt](out, manifest, protected, force, hf_cache_dir)
    with _utf8_only(uri, fmt), writer as write:
        counts = _write_chosen(rows, selection, flt, run, write, stats)
        result = ExportResult(
            run_id=run.run_id,
            input=uri,
            output=str(out),
            format=fmt,
            filter={"description": flt.describe(), **asdict(flt)},
            counts=counts,
            per_trait=_per_trait(run, selection, counts),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            unreadable=dict(stats.unreadable),
            ignored=list(stats.ignored),
        )
    return result


def export_format(out: str | Path, fmt: str | None) -> str:
    """The output's format: `fmt` (--format), else the one its suffix names (.jsonl, .parquet; a name with
    no data suffix is jsonl). A data suffix that names another format (x.parquet with --format jsonl, or
    x.csv) is refused: the file would hold what its name says it does not."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    suffix = data_suffix(str(out))
    named = {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix or "")
    if fmt is None and (named or suffix is None):
        return named or "jsonl"
    if fmt is not None and (named == fmt or suffix is None):
        return fmt
    given = f"--format {fmt}" if fmt else "export"
    raise UserError(
        f"{out}: {given} does not write {suffix} files; name the output .jsonl or .parquet (a folder "
        "without a data suffix for --format hf), or pass the --format its name says"
    )


@contextmanager
def _utf8_only(uri: str, fmt: str) -> Iterator[None]:
    """Columnar outputs hold UTF-8 text only (jsonl escapes what is not): one line instead of Arrow's
    error (which `datasets` wraps in its own)."""
    try:
        yield
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, UnicodeEncodeError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise UserError(
            f"{uri} holds text that is not valid Unicode (a lone surrogate; the screen rejected those "
            f"records, naming the field), which {fmt} cannot store: export as jsonl, or leave them out with "
            "--drop-unscored"
        ) from None


def _write_chosen(
    rows: Iterator[Row],
    selection: Selection,
    flt: DropFilter,
    run: Run,
    write: Write,
    stats: ReadStats,
) -> ExportCounts:
    """Decide for every record whether it is dropped, `write` the side the filter asks for, and count
    both sides. `stats` is the reader's: the files it could not read.

    A scored record must be what was scored (`_check_same_samples`), and a row past those the finished
    screen read to the input's end (`run.input_rows`) was added since: refused unless --drop-unscored."""
    turns = run.settings.get("turns") or "last"
    n: Counter[str] = Counter()
    dropped_by_trait: Counter[str] = Counter()
    n_rows = 0
    rebuild = Rebuild(turns)  # every row, in order, as the screen did: sample ids depend on the rows before
    for item in rows:
        here = {s.sample_id: s for s in rebuild(item) if isinstance(s, Sample)}
        if isinstance(item.record, Reject):  # a row that did not parse, or a file that failed: neither side
            n["unreadable_rows"] += item.record.kind != "file"
            n_rows = max(n_rows, item.row + 1)
            continue
        row, record = item.row, item.record
        n_rows = row + 1
        unscored = row not in selection.scored
        if run.input_rows is not None and row >= run.input_rows:
            if not flt.drop_unscored:
                raise QueryError(
                    f"{item.file}, row {row}: a record added to the input since the screen, which read "
                    f"{run.input_rows:,} rows to its end: it is not scored; rerun the screen (it resumes and "
                    "scores the new rows only), or pass --drop-unscored to leave such records out"
                )
            n["added_rows"] += 1
        if not unscored:
            _check_same_samples(item, selection.scored[row], here)
        drop = row in selection.dropped or (flt.drop_unscored and unscored)
        n["records_read"] += 1
        if drop:
            n["dropped"] += 1
            n["dropped_unscored"] += unscored
            dropped_by_trait.update(selection.dropped.get(row, ()))
        else:
            n["kept"] += 1
        if drop == flt.invert:
            write(record)
            n["written"] += 1
    if selection.scored and max(selection.scored) >= n_rows:
        raise QueryError(
            f"the screen scored row {max(selection.scored)}, but the input has {n_rows} rows: "
            "the input changed since the screen; pass the screened data with --input"
        )
    n["unreadable_files"] = len(stats.unreadable)
    return ExportCounts(**n, dropped_by_trait=dict(dropped_by_trait))


def _check_same_samples(row: Row, scored: dict[str, str | None], here: dict[str, Sample]) -> None:
    """The record must still be the one scored at this row, with the same prompt and response in every
    scored turn (their content_sha256), or the export would ship it under another record's scores. `here`
    are its samples, rebuilt as the screen built them (with its file's own row format)."""
    if missing := sorted(scored.keys() - here.keys()):
        raise QueryError(
            f"{row.file}, row {row.row}: the screen scored {missing[:3]} here, but this record has "
            f"{sorted(here)[:3]}: the input changed since the screen; pass the screened data with --input"
        )
    for sample_id, sha in scored.items():
        sample = here[sample_id]
        if sha is not None and content_sha256(sample.prompt, sample.response) != sha:
            raise QueryError(
                f"{row.file}, row {row.row}: {_turn_name(sample)} of record "
                f"{sample_id.partition('#')[0]!r} is not what the screen scored (its prompt or response was "
                "edited): the input changed since the screen; screen it into another --db (a rerun into this "
                "one keeps the stored scores), or pass the screened data with --input"
            )


def _turn_name(sample: Sample) -> str:
    """'assistant turn 3' (numbered from 1, as top and the report number them)."""
    return f"the response of assistant turn {sample.turn + 1}"


def _per_trait(run: Run, selection: Selection, counts: ExportCounts) -> dict[str, dict[str, int]]:
    per_trait = {}
    for trait in run.traits:
        rows = selection.by_trait.get(trait, set())
        per_trait[trait] = {
            "scored_records": len(rows),
            "dropped": counts.dropped_by_trait.get(trait, 0),
            "kept": sum(1 for r in rows if r not in selection.dropped),
        }
    return per_trait


# ---- writers: context managers that take records one at a time and leave no half-written output ---------
# Each takes (out, manifest, protected, force, cache_dir): `manifest()` gives the manifest's text once the
# block is done; it is written beside the output (inside it for hf).

Manifest = Callable[[], str]


def _write_manifest(out: Path, fmt: str, manifest: Manifest, protected: Protected, force: bool) -> None:
    with output_file(manifest_path(out, fmt), protected, force=force) as tmp:
        tmp.write_text(manifest(), encoding="utf-8")


@contextmanager
def _spool(path: Path) -> Iterator[Write]:
    """Records written to `path` in pickled batches, for `_unspool` to read back in order."""
    batch: list[dict] = []
    with open(path, "wb") as f:

        def write(record: dict) -> None:
            batch.append(record)
            if len(batch) == SPOOL_BATCH:
                pickle.dump(batch, f)
                batch.clear()

        yield write
        if batch:
            pickle.dump(batch, f)


def _unspool(path: str | Path) -> Iterator[list[dict]]:
    with open(path, "rb") as f:  # our own temp file
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return


@contextmanager
def _jsonl_writer(
    out: Path, manifest: Manifest, protected: Protected, force: bool, _cache_dir: str | None
) -> Iterator[Write]:
    with output_file(out, protected, force=force) as tmp, open(tmp, "w", encoding="utf-8") as f:

        def write(record: dict) -> None:
            try:  # the text is encoded here, before any of it is written
                f.write(json.dumps(record, ensure_ascii=False, default=_json_value) + "\n")
            except UnicodeEncodeError:  # a lone surrogate, which the input's JSON carried as an escape:
                f.write(json.dumps(record) + "\n")  # escaped again, the line parses to the same record

        yield write
    _write_manifest(out, "jsonl", manifest, protected, force)


@contextmanager
def _parquet_writer(
    out: Path, manifest: Manifest, protected: Protected, force: bool, _cache_dir: str | None
) -> Iterator[Write]:
    """One schema for all records: a field that is null in the first batch would otherwise be typed null
    and fail later. The records are spooled as they come, their schemas unified, then written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with (
        output_file(out, protected, force=force) as part,
        tempfile.TemporaryDirectory(prefix=temp_prefix(out), suffix=TEMP_SUFFIX, dir=out.parent) as tmp,
    ):
        spool = Path(tmp) / "records.pickle"
        with _spool(spool) as write:
            yield write
        # by all the keys of a batch (Table.from_pylist would take the first record's keys only)
        schemas = [pa.schema(list(pa.array(batch).type)) for batch in _unspool(spool)]
        schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
        with pq.ParquetWriter(part, schema) as writer:
            for batch in _unspool(spool):
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    _write_manifest(out, "parquet", manifest, protected, force)


@contextmanager
def _hf_writer(
    out: Path, manifest: Manifest, protected: Protected, force: bool, cache_dir: str | None
) -> Iterator[Write]:
    """A `datasets` folder (save_to_disk), built from the spooled records once they are all chosen."""
    import datasets

    datasets.disable_progress_bars()  # the command prints its own summary
    # A fresh cache dir: datasets' fingerprint cannot see the input file change, so never reuse a cache.
    with (
        output_folder(out, protected, force=force) as folder,
        tempfile.TemporaryDirectory(
            prefix=temp_prefix(out), suffix=TEMP_SUFFIX, dir=cache_dir or out.parent
        ) as tmp,
    ):
        spool = Path(tmp) / "records.pickle"
        with _spool(spool) as write:
            yield write
        ds = datasets.Dataset.from_generator(
            _spooled_records, gen_kwargs={"spool": str(spool)}, cache_dir=tmp, keep_in_memory=False
        )
        ds.save_to_disk(str(folder))
        (folder / "manifest.json").write_text(manifest(), encoding="utf-8")


def _spooled_records(spool: str) -> Iterator[dict]:
    for batch in _unspool(spool):
        yield from batch


WRITERS = {"jsonl": _jsonl_writer, "parquet": _parquet_writer, "hf": _hf_writer}
