"""Filtered training splits: the input's own records, minus the ones a screen flagged.

Every filter selects *samples to drop* (rows of the `scored` view of one run and layer); a record is
dropped when any of its scored samples is selected. Records the screen did not score (rejected, or past
`--limit`) are kept unless `--drop-unscored`; unparseable input lines are in neither split (the manifest
counts them as `unreadable_rows`). `--invert` writes the dropped records instead. Records are re-read from
the run's dataset with `iter_records` and written back unchanged, so a jsonl export without a filter
reproduces the input records exactly. Parquet and hf are columnar, with one schema for all records: where
records have differing keys, each record gains the keys it lacks, with null values. A manifest beside the
output says what was done.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from screener.datasets import (
    data_suffix,
    detect_format,
    is_glob,
    is_hub_name,
    iter_records,
    record_to_samples,
)
from screener.errors import QueryError
from screener.results import DropFilter, Selection
from screener.runs import Run

__all__ = ["FORMATS", "ExportResult", "export_records", "manifest_path"]

FORMATS = ("jsonl", "parquet", "hf")
PARQUET_BATCH = 1000


@dataclass
class ExportResult:
    """The counts written to the manifest. kept + dropped = records read; `written` is one of the two
    (dropped with --invert). per_trait[t]: records scored for trait t, those dropped because t selected
    them, and those kept (a record dropped for another trait is not kept)."""

    run_id: str
    dataset_uri: str
    output: str
    format: str
    filter: dict
    records_read: int = 0
    kept: int = 0
    dropped: int = 0
    written: int = 0
    dropped_unscored: int = 0
    unreadable_rows: int = 0  # rows iter_records skipped (invalid JSON): in neither split
    dropped_by_trait: dict[str, int] = field(default_factory=dict)  # a record may count for several
    per_trait: dict[str, dict[str, int]] = field(default_factory=dict)
    created_at: str = ""


def manifest_path(out: str | Path, fmt: str) -> Path:
    out = Path(out)
    return out / "manifest.json" if fmt == "hf" else out.with_name(out.name + ".manifest.json")


def _split(
    uri: str,
    split: str | None,
    flt: DropFilter,
    selected: dict[int, set[str]],
    scored: dict[int, set[str]],
    turns: str,
    result: ExportResult,
) -> Iterator[dict]:
    """The records to write, counting both sides in `result` as it goes (from zero on every pass)."""
    result.records_read = result.kept = result.dropped = result.written = 0
    result.dropped_unscored = result.unreadable_rows = 0
    expected_row, dropped_by_trait, fmt = 0, Counter(), None
    for row, source, record in iter_records(uri, split=split):
        result.unreadable_rows += row - expected_row
        expected_row = row + 1
        if row in scored:
            # The record must still be the one scored at this row, or we would drop the wrong records.
            fmt = fmt or detect_format(record)
            here = {
                s.sample_id
                for s in record_to_samples(record, fmt, source_row=row, source_file=source, turns=turns)
            }
            if not scored[row] <= here:
                raise QueryError(
                    f"{source}, row {row}: the screen scored {sorted(scored[row])[:3]} here, but this record "
                    f"has {sorted(here)[:3]}: the input changed since the screen; pass the screened data "
                    "with --input"
                )
        unscored = row not in scored
        drop = row in selected or (flt.drop_unscored and unscored)
        result.records_read += 1
        if drop:
            result.dropped += 1
            result.dropped_unscored += unscored
            dropped_by_trait.update(selected.get(row, ()))
        else:
            result.kept += 1
        if drop == flt.invert:
            result.written += 1
            yield record
    if scored and max(scored) >= expected_row:
        raise QueryError(
            f"the screen scored row {max(scored)}, but the input has {expected_row} rows: "
            "the input changed since the screen; pass the screened data with --input"
        )
    result.dropped_by_trait = dict(dropped_by_trait)


def export_records(
    run: Run,
    flt: DropFilter,
    selection: Selection,
    out: str | Path,
    fmt: str,
    *,
    input_uri: str | None = None,
    hf_cache_dir: str | None = None,
) -> ExportResult:
    """Write the records chosen by `results.select_drops` (no database needed) and the manifest."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    selected, scored, by_trait = selection.dropped, selection.scored, selection.by_trait
    uri = input_uri or run.dataset_uri
    _check_input(uri)
    split = run.settings.get("split")
    out = Path(out)
    result = ExportResult(run.run_id, uri, str(out), fmt, {"description": flt.describe(), **asdict(flt)})

    def records() -> Iterator[dict]:
        return _split(uri, split, flt, selected, scored, run.settings.get("turns") or "last", result)

    {"jsonl": _write_jsonl, "parquet": _write_parquet, "hf": _write_hf}[fmt](out, records, hf_cache_dir)

    for trait in run.traits:
        rows = by_trait.get(trait, set())
        dropped = result.dropped_by_trait.get(trait, 0)
        kept = sum(1 for r in rows if r not in selected)
        result.per_trait[trait] = {"scored_records": len(rows), "dropped": dropped, "kept": kept}
    result.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = {
        "run_id": run.run_id,
        "dataset_uri": run.dataset_uri,
        "input": uri,
        "split": split,
        "metric": flt.metric,
        "layer": flt.layer,
        **{k: v for k, v in asdict(result).items() if k not in ("run_id", "dataset_uri")},
    }
    manifest_path(out, fmt).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return result


def _check_input(uri: str) -> None:
    """Fail in one line, naming the file, when the dataset is not where the run (or --input) says."""
    if uri.startswith("hf://") or Path(uri).exists():
        return
    where = "" if Path(uri).is_absolute() else f" (relative to {Path.cwd()})"
    if is_glob(uri):
        if glob.glob(uri, recursive=True):
            return
        problem = f"{uri} matches no files{where}"
    # `org/name` is a hub dataset; with a data suffix (`data/x.jsonl`, stored as typed by a screen run
    # from another directory) it is a local file that is not here.
    elif is_hub_name(uri) and not data_suffix(uri):
        return
    else:
        problem = f"{uri}: no such file or directory{where}"
    raise QueryError(f"the screened dataset is not here: {problem}; pass its location with --input")


# ---- writers: each takes a callable that streams the records (the parquet writer reads twice) ----------


def _atomic_file(out: Path) -> tuple[Path, Callable[[], None]]:
    """A temp path beside `out` and a function that moves it into place: no half-written outputs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    return Path(tmp), lambda: os.replace(tmp, out)


def _write_jsonl(out: Path, records: Callable[[], Iterator[dict]], _cache: str | None) -> None:
    tmp, commit = _atomic_file(out)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records():
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        commit()
    finally:
        tmp.unlink(missing_ok=True)


def _batches(records: Iterator[dict]) -> Iterator[list[dict]]:
    batch = []
    for record in records:
        batch.append(record)
        if len(batch) == PARQUET_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_parquet(out: Path, records: Callable[[], Iterator[dict]], _cache: str | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Pass 1 infers one schema for all records (a field that is null in the first batch would otherwise
    # be typed null and fail later); pass 2 writes. Both passes stream.
    schemas = [pa.Table.from_pylist(b).schema for b in _batches(records())]
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    tmp, commit = _atomic_file(out)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in _batches(records()):
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        commit()
    finally:
        tmp.unlink(missing_ok=True)


def _write_hf(out: Path, records: Callable[[], Iterator[dict]], cache_dir: str | None) -> None:
    import datasets

    datasets.disable_progress_bars()  # the command prints its own summary
    if out.exists() and any(out.iterdir()):
        raise QueryError(f"{out} exists and is not empty; choose a new directory for --format hf")

    def gen() -> Iterator[dict]:
        yield from records()

    # A fresh cache dir: datasets' fingerprint cannot see the input file change, so never reuse a cache.
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        try:
            ds = datasets.Dataset.from_generator(gen, cache_dir=tmp, keep_in_memory=False)
        except datasets.exceptions.DatasetGenerationError as e:
            if isinstance(e.__cause__, QueryError):  # our own check failed inside datasets' builder
                raise e.__cause__ from None
            raise
        ds.save_to_disk(str(out))
