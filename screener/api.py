"""The Python API: screen a dataset, open its results, read, export and explain them; the `screener`
commands are a thin layer over these same functions.

    import screener
    run = screener.screen("data/train.jsonl", traits=["evil"], db="screen.duckdb")
    run.scores("evil").head()                  # polars DataFrame, one row per sample
    run.top("evil", k=5)                       # the highest-scoring samples, as dicts
    run.export("clean.jsonl", drop_top="5%")   # the input minus its top 5% per trait
    screener.score(records, traits=["evil"])   # in memory: the records with score columns

Every failure is a `screener.errors.ScreenerError` (its `exit_code` is the command's), never SystemExit.
A `Run` holds no database connection: each call opens the file read-only and closes it, so a notebook
never keeps a screen from writing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from screener import choices
from screener.choices import checked
from screener.errors import QueryError, UserError

if TYPE_CHECKING:
    import polars as pl

    from screener.explain import Explanation
    from screener.export import ExportResult
    from screener.outputs import Protected
    from screener.results import Histogram, ReportData
    from screener.runs import Run as StoredRun
    from screener.screen import Summary
    from screener.store import Store

__all__ = ["Run", "open_run", "score", "screen"]


# ---- reading a screen's results -------------------------------------------------------------------------


@dataclass
class Run:
    """One screen's results in a database: what it stored, read on demand (`open_run`, `screen`)."""

    db: Path
    info: StoredRun  # the run's identity and state as stored (screener.runs.Run)
    passed_over: list[str] = field(default_factory=list)  # later runs that did not finish (by default)
    summary: Summary | None = None  # what `screen` did, when this Run comes from it

    @property
    def run_id(self) -> str:
        return self.info.run_id

    @property
    def traits(self) -> tuple[str, ...]:
        return self.info.traits

    def __repr__(self) -> str:
        return f"<screener.Run {self.info.describe()} in {self.db}>"

    def notes(self) -> list[str]:
        """What a read command tells on stderr: the run it read, and later runs it passed over."""
        notes = [f"reading {self.info.describe()}"]
        if newer := self.passed_over:
            notes.append(
                f"note: {len(newer)} later run{'s' * (len(newer) != 1)} did not finish "
                f"({', '.join(newer[:3])}{', ...' * (len(newer) > 3)}); read one with --run ID"
            )
        return notes

    @contextmanager
    def _open(self) -> Iterator[Store]:
        from screener.results import open_db

        with open_db(self.db) as store:
            yield store

    def layers(self, traits: Sequence[str] = (), layer: int | None = None) -> dict[str, int]:
        """{trait: the layer it is read at}: `layer` for all, else each trait's own vector's layer."""
        return {t: at for at, ts in self.info.by_layer(traits, layer).items() for t in ts}

    def protected(self) -> Protected:
        """What no output may replace: the database, its WAL and every stored run's input."""
        return protected_by(self.db)

    # -- scores ----------------------------------------------------------------------------------------

    def scores(self, trait: str | Sequence[str] | None = None, layer: int | None = None) -> pl.DataFrame:
        """The stored scores as a polars DataFrame, one row per sample and trait (`metric` is the run's
        headline score: delta_p in natural mode, else delta_p_proxy); `trait` one or several (default
        all), each at `layer` (default: its own vector's layer)."""
        from screener import results

        traits = [trait] if isinstance(trait, str) else list(trait or ())
        at = self.layers(traits, layer)
        with self._open() as store:
            return results.scores(store.con, self.info, at)

    def top(
        self, trait: str, k: int = 20, *, layer: int | None = None, metric: str | None = None
    ) -> list[dict]:
        """The `k` highest-scoring samples of `trait` (as `screener top` shows them): dicts with rank,
        sample_id, source_row, turn, value, the scores, prompt (messages) and response."""
        from screener import results

        k = checked("k", lambda v: choices.check_int(v, 1), k)
        with self._open() as store:
            return results.top_samples(store.con, self.info, *self._at(trait, layer), self._metric(metric), k)

    def hist(
        self, trait: str, bins: int = 20, *, layer: int | None = None, metric: str | None = None
    ) -> Histogram:
        """Equal-width bins of `trait`'s score (`results.Histogram`: lower, upper, counts)."""
        from screener import results

        bins = checked("bins", lambda v: choices.check_int(v, 1), bins)
        with self._open() as store:
            return results.histogram(
                store.con, self.info, *self._at(trait, layer), self._metric(metric), bins
            )

    def _at(self, trait: str, layer: int | None) -> tuple[str, int]:
        return self.info.check_trait(trait), self.info.layer(layer, trait)

    def _metric(self, metric: str | None) -> str:
        return checked(
            "metric", lambda m: choices.check_choice(m, choices.METRICS), metric or self.info.metric
        )

    def report_data(
        self, layer: int | None = None, metric: str | None = None, *, bins: int = 30, k: int = 10
    ) -> ReportData:
        """Everything the HTML report shows (`results.ReportData`)."""
        from screener import results

        with self._open() as store:
            return results.report_data(store.con, self.info, layer, self._metric(metric), bins=bins, k=k)

    def report(
        self,
        out: str | Path,
        *,
        layer: int | None = None,
        metric: str | None = None,
        bins: int = 30,
        k: int = 10,
        explain_k: int = 3,
        input: str | None = None,
        force: bool = False,
    ) -> ReportData:
        """Write the self-contained HTML report to `out`: histograms, summary, top samples, and the top
        `explain_k` samples per trait shaded token by token (0: no model is loaded)."""
        from screener import results
        from screener.outputs import output_file
        from screener.report import html_report

        bins = checked("bins", lambda v: choices.check_int(v, 1), bins)
        explain_k = checked("explain_k", lambda v: choices.check_int(v, 0), explain_k)
        protected = self.protected()
        protected.check(out, force=force)
        data = self.report_data(layer, metric, bins=bins, k=k)
        explained = None
        if explain_k:
            from screener.explain import explain_report

            by_layer = self.info.by_layer(list(data.layers), layer)
            with self._open() as store:  # a sample explained once serves every trait read at its layer
                top = {
                    t: results.stored_samples(
                        store.con,
                        self.info,
                        [r["sample_id"] for r in found.top[:explain_k]],
                        data.layers[t],
                        by_layer[data.layers[t]],
                    )
                    for t, found in data.traits.items()
                }
            # the database is closed: the model loads and the dataset is read
            explained = explain_report(self.info, layer, top, k=explain_k, input_uri=input)
        with output_file(out, protected, force=force) as tmp:
            tmp.write_text(html_report(data, explained), encoding="utf-8")
        return data

    # -- export and explain ----------------------------------------------------------------------------

    def export(
        self,
        path: str | Path,
        *,
        drop_top: str | int | None = None,
        threshold: float | str | None = None,
        where: str | None = None,
        trait: str | Sequence[str] | None = None,
        layer: int | None = None,
        metric: str | None = None,
        format: str | None = None,  # default: from the path's suffix (.jsonl, .parquet), else jsonl
        drop_unscored: bool = False,
        invert: bool = False,
        input: str | None = None,
        force: bool = False,
    ) -> ExportResult:
        """Write the run's input records to `path` minus those a filter drops: `drop_top` ('5%' or a
        count, per trait), `threshold` (metric above a value, or 'p95': above that percentile of the
        vector's reference distribution, from `screener calibrate`) or `where` (SQL over `scored`), for
        `trait` (default every trait), each trait at `layer` (default its own vector's layer; `where`
        sees every layer unless `layer` is given). `input`: where the screened data is now."""
        from screener.export import export_records
        from screener.outputs import Protected
        from screener.results import DropFilter, dataset_uris, select_drops

        percent, count = parse_drop_top(drop_top) if drop_top is not None else (None, None)
        value, percentile = parse_threshold(threshold) if threshold is not None else (None, None)
        traits = [trait] if isinstance(trait, str) else list(trait or ())
        flt = DropFilter(
            metric=self._metric(metric),
            layers=None if where and layer is None else self.layers((), layer),
            traits=tuple(self.info.check_trait(t) for t in traits),
            drop_top_percent=percent,
            drop_top_count=count,
            threshold=value,
            ref_percentile=percentile,
            where=where,
            drop_unscored=drop_unscored,
            invert=invert,
        )
        with self._open() as store:
            selection = select_drops(store.con, self.info, flt)
            protected = Protected.of_database(self.db, dataset_uris(store.con))
        # the database is closed: reading and writing the records may take minutes
        return export_records(
            self.info, flt, selection, path, format, input_uri=input, force=force, protected=protected
        )

    def explain(
        self,
        sample_id: str,
        trait: str | Sequence[str] | None = None,
        *,
        layer: int | None = None,
        input: str | None = None,
        model: str | None = None,
        device: str = "auto",
    ) -> list[Explanation]:
        """Why `sample_id` scored as it did: its per-token projections recomputed with the run's own
        model and vectors, one `explain.Explanation` per layer read (each trait at `layer`, default its
        own vector's layer), with the stored scores beside the recomputed ones."""
        from screener import results
        from screener.explain import explain_samples

        device = checked("device", choices.check_device, device)
        traits = [trait] if isinstance(trait, str) else list(trait or ())
        groups = self.info.by_layer(traits, layer)
        with self._open() as store:
            stored = {
                at: results.stored_samples(store.con, self.info, [sample_id], at, ts)
                for at, ts in groups.items()
            }
        # the database is closed: loading the model and reading the dataset take a while (once for all)
        explained = explain_samples(self.info, stored, groups, input_uri=input, model=model, device=device)
        return [explained[at][0] for at in groups]


def parse_drop_top(value: str | int | float) -> tuple[float | None, int | None]:
    """'5%' → (5.0, None): a percentage; '20' or 20 → (None, 20): a count."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]), None
        return None, int(text)
    except ValueError:
        raise QueryError(f"--drop-top takes a percentage like 5% or a count like 20, not {text!r}") from None


def parse_threshold(value: str | float) -> tuple[float | None, float | None]:
    """'2.5' or 2.5 → (2.5, None): a value of the metric; 'p95' → (None, 95.0): a reference percentile."""
    text = str(value).strip()
    try:
        if text.lower().startswith("p"):
            return None, float(text[1:])
        return float(text), None
    except ValueError:
        raise QueryError(
            f"--threshold takes a value like 2.5 or a reference percentile like p95, not {text!r}"
        ) from None


def open_run(db: str | Path = choices.DEFAULT_DB, run: str | None = None) -> Run:
    """The run `run` (an id or a unique prefix, of any status) in the database `db`, else its latest
    finished run. QueryError when there is none; ScreenWritingError (exit code 3) while a screen writes it."""
    from screener.results import open_db, pick_run, unfinished_since

    with open_db(db) as store:
        info = pick_run(store.con, run)
        passed_over = [] if run else unfinished_since(store.con, info)
    return Run(Path(db), info, passed_over)


@contextmanager
def query(db: str | Path, sql: str, params: dict | None = None, run: str | None = None):
    """Run read-only SQL on a screen's database: yields (relation or None, notes). `$run_id`, `$layer`
    and `$metric`, when the SQL uses them and `params` lacks them, come from `run` (default the latest
    finished run); `notes` says which run that was. The relation is read inside the block."""
    from screener.results import check_read_only, open_db, pick_run, query_params, run_params, run_sql

    params = dict(params or {})
    notes: list[str] = []
    with open_db(db) as store:
        needed = query_params(sql) - params.keys()
        if needed & {"run_id", "layer", "metric"}:
            chosen = Run(Path(db), pick_run(store.con, run))
            if not run:
                from screener.results import unfinished_since

                chosen.passed_over = unfinished_since(store.con, chosen.info)
            params |= {k: v for k, v in run_params(chosen.info).items() if k in needed}
            notes = chosen.notes()
        check_read_only(store.con, sql)
        yield run_sql(store.con, sql, params), notes


def protected_by(db: str | Path) -> Protected:
    """What no output of a read command on `db` may replace (see `outputs.Protected`)."""
    from screener.outputs import Protected
    from screener.results import dataset_uris, open_db

    with open_db(db) as store:
        return Protected.of_database(db, dataset_uris(store.con))


# ---- screening --------------------------------------------------------------------------------------


Data = Any  # a URI (str or Path), a list of records (dicts), or a datasets.Dataset / IterableDataset


def screen(
    data: Data,
    *,
    traits: Sequence[str] = (),
    vectors: Sequence[str] = (),
    model: str = choices.DEFAULT_MODEL,
    mode: str = "proxy",
    db: str | Path = choices.DEFAULT_DB,
    layers: Sequence[int] = (),
    turns: str = "all",
    limit: int | None = None,
    max_tokens: int = choices.DEFAULT_MAX_TOKENS,
    dtype: str = "auto",
    device: str = "auto",
    actors: int | None = 0,
    progress: bool = False,
    **options: Any,
) -> Run:
    """Screen `data` against persona vectors into the DuckDB file `db` and return the run.

    `data`: a file, folder, glob or hub dataset (as `screener screen` takes), a list of records (dicts in
    any row format the screen reads), or a `datasets.Dataset` / `IterableDataset`; records in memory are
    written once beside the database (`<db>.inputs/<sha256>.jsonl`), so export and explain can read them
    again. `traits`: built-in vectors (default: the model's default traits); `vectors`: 'NAME=PATH' files.
    Resumable: the same call again resumes the run and scores only what is not stored. `actors`: model
    workers (0, the default here, scores in this process; None: as the command line chooses). Other
    `options` are `screen.ScreenConfig` fields (split, batch_tokens, chunk_size, compile, address, ...).
    """
    from screener.screen import ScreenConfig

    dataset = _dataset_uri(data, Path(db))
    generation = options.pop("generation", None)
    if unknown := set(options) - ScreenConfig.__dataclass_fields__.keys():
        raise UserError(f"screen() got unknown options: {', '.join(sorted(unknown))}")
    cfg = ScreenConfig(
        dataset=dataset,
        db=str(db),
        model=model,
        traits=list(traits),
        vectors=list(vectors),
        layers=[checked("layers", lambda v: choices.check_int(v, 0, "a layer"), x) for x in layers],
        mode=checked("mode", lambda m: choices.check_choice(m, choices.MODES), mode),
        turns=checked("turns", lambda t: choices.check_choice(t, choices.TURNS), turns),
        limit=None if limit is None else checked("limit", choices.check_limit, limit),
        max_tokens=checked("max_tokens", choices.check_max_tokens, max_tokens),
        dtype=checked("dtype", choices.check_dtype, dtype),
        device=checked("device", choices.check_device, device),
        actors=None if actors is None else checked("actors", lambda v: choices.check_int(v, 0), actors),
        progress=progress,
        **options,
    )
    if generation is not None:
        cfg.generation = generation
    return screen_config(cfg)


def screen_config(cfg) -> Run:
    """Run a screen as configured (`screen.ScreenConfig`, what the command line builds) and open it."""
    from screener.screen import screen as run_screen

    summary = run_screen(cfg)
    run = open_run(cfg.db, summary.run_id)
    run.summary = summary
    return run


def _dataset_uri(data: Data, db: Path) -> str:
    """A URI the screen reads: `data` itself when it is one, else records in memory written once to
    `<db>.inputs/<sha256 of their JSON lines>.jsonl` (the same records, the same file: the run resumes)."""
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    records = _records(data)
    folder = db.with_name(db.name + ".inputs")
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, record in enumerate(records):
                if not isinstance(record, dict):
                    raise UserError(f"record {i}: not a dict (a record is a mapping of fields to values)")
                line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
                digest.update(line.encode())
                f.write(line)
        out = folder / f"{digest.hexdigest()[:16]}.jsonl"
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(out)


def _records(data: Data) -> Iterable[dict]:
    """Rows of a list of records, or of a datasets.Dataset / IterableDataset (iterated as dicts)."""
    if isinstance(data, (list, tuple)):
        return data
    if type(data).__module__.startswith("datasets.") and hasattr(data, "__iter__"):
        return iter(data)
    raise UserError(
        "data: a path or URI, a list of records, or a datasets.Dataset is expected, "
        f"not {type(data).__name__}"
    )


# ---- scoring in memory ------------------------------------------------------------------------------


def score(
    data: Any,
    *,
    traits: Sequence[str] = (),
    vectors: Sequence[str] = (),
    model: str = choices.DEFAULT_MODEL,
    mode: str = "proxy",
    turns: str = "last",
    **options: Any,
):
    """Score records in memory and return them with score columns, one `<trait>` column per trait (the
    run's headline score of the record's last scored assistant turn, at the trait's own vector's layer;
    None where a record was not scored) and `<trait>_turns` (how many of its turns were scored).

    `data`: a list of records (returns a polars DataFrame of the records with the columns added), or a
    `datasets.Dataset` (returns a Dataset, the columns added with `add_column`). Nothing is kept: the
    screen runs into a temporary database (`screen` keeps one, and resumes). `turns='all'` scores every
    assistant turn and the columns take each record's highest."""
    is_dataset = type(data).__module__.startswith("datasets.")
    if is_dataset and not hasattr(data, "add_column"):
        raise UserError("score() needs a datasets.Dataset (an IterableDataset has no columns to add to)")
    rows = data if is_dataset else list(_records(data))
    with tempfile.TemporaryDirectory(prefix="screener-score-") as tmp:
        db = Path(tmp) / "score.duckdb"
        run = screen(
            rows, traits=traits, vectors=vectors, model=model, mode=mode, db=db, turns=turns, **options
        )
        frame = run.scores()
    n = len(data)
    columns: dict[str, list] = {}
    for trait in run.traits:
        best: list[float | None] = [None] * n
        count = [0] * n
        for row, value in frame.filter(frame["trait"] == trait).select("source_row", "metric").iter_rows():
            count[row] += 1
            if value is not None and (best[row] is None or value > best[row]):
                best[row] = value
        columns[trait], columns[f"{trait}_turns"] = best, count
    if is_dataset:
        for name, values in columns.items():
            data = data.add_column(name, values)
        return data
    import polars as pl

    return pl.DataFrame(rows).with_columns(pl.Series(name, values) for name, values in columns.items())
