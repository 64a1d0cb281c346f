"""The read side of a screen's database: opening it safely, choosing a run, the canned queries, and the
numbers the commands, the HTML report and export are made of. No printing, no HTML, no argparse.

Every reader opens the file read-only. DuckDB lets one process hold a file it writes, so while a screen
is writing, opening fails at once with `ScreenWritingError` (exit code 3): a reader never blocks, slows
or corrupts the writer. The numbers come from sql/queries (the canned queries `screener query` runs too),
so the terminal, the report and a user's own SQL always agree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np

from screener.choices import METRICS
from screener.errors import QueryError
from screener.reference import share_below
from screener.runs import Run
from screener.store import DEFAULT_DB, SQL_DIR, Store, StoreBusyError, has_samples_table

__all__ = [
    "METRICS",
    "QUERIES_DIR",
    "READ_ONLY",
    "SCORE_COLUMNS",
    "DropFilter",
    "Histogram",
    "ReportData",
    "ScreenWritingError",
    "Selection",
    "StoredSample",
    "TraitReport",
    "canned",
    "check_read_only",
    "dataset_uris",
    "histogram",
    "load_run",
    "open_db",
    "percentiles",
    "pick_run",
    "query_params",
    "report_data",
    "run_params",
    "run_sql",
    "scores",
    "select_drops",
    "sql_errors",
    "stored_samples",
    "summary",
    "top_samples",
    "unfinished_since",
]

QUERIES_DIR = SQL_DIR / "queries"
READ_ONLY = (
    "screener query is read-only: it reads this database and cannot modify it, read or write other files, "
    "or change settings"
)
# Statements that only read. Everything else (COPY, SET, ATTACH, INSERT, CREATE, PRAGMA, CALL, ...) is
# refused by its parsed type before it runs, so the refusal does not depend on DuckDB's error wording.
READ_STATEMENTS = frozenset({"SELECT", "EXPLAIN"})


class ScreenWritingError(StoreBusyError):
    """A read command met a screen writing the file (exit code 3): rerun it when the screen is done."""


# ---- opening the database and running SQL on it --------------------------------------------------------


def open_db(path: str | Path) -> Store:
    """Open a screen database read-only, with the views of sql/views.sql (as TEMP views, which shadow
    any stored older version, so every reader sees the current definitions), and no access to any other
    file: SQL run on it can read the database and nothing else, and write nothing."""
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"{path}: no such database (pass --db, default {DEFAULT_DB})")
    try:
        store = Store(path, read_only=True)
    except StoreBusyError as e:
        raise ScreenWritingError(
            f"a screen is writing to {path} right now, and DuckDB lets no other process open the file while "
            "it does. Rerun this command when the screen has finished."
        ) from e
    try:
        _check_tables(store.con, path)
        _older_tables(store.con)
        # an earlier version's database has a samples table, read as it is; else the view over records
        names = ["views.sql"] if has_samples_table(store.con) else ["samples.sql", "views.sql"]
        for name in names:
            views = (SQL_DIR / name).read_text()
            store.con.execute(views.replace("CREATE OR REPLACE VIEW", "CREATE OR REPLACE TEMP VIEW"))
        # read_only stops writes to the database only: `COPY ... TO 'file'` would still overwrite any
        # file (this one included). User SQL runs here (query, export --where), so it gets no file
        # access at all, and the lock keeps that SQL from turning access back on.
        store.con.execute("SET enable_external_access = false; SET lock_configuration = true")
    except BaseException:
        store.close()
        raise
    return store


RESULT_TABLES = ("runs", "records", "turns", "scores", "rejects")
EARLIER_TABLES = ("runs", "samples", "scores", "rejects")  # before records and turns


def _check_tables(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """A DuckDB file without a screen's tables: most likely a .duckdb copied without the .wal beside it
    (results not yet checkpointed into the file live there), or another program's database."""
    found = {
        r[0]
        for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()
    }
    missing = [t for t in RESULT_TABLES if t not in found]
    if missing and not [t for t in EARLIER_TABLES if t not in found]:
        return
    if missing:
        raise QueryError(
            f"{path}: not a screen's results database (no table {', '.join(missing)}); if it was copied from "
            f"where a screen ran, copy {path.name}.wal from beside it too, or rerun that screen to finish it"
        )


def _older_tables(con: duckdb.DuckDBPyConnection) -> None:
    """A database from before a table the views read (reference_distributions) gets it empty, as a TEMP
    table from sql/schema.sql's own definition, so the views work read-only."""
    found = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    for statement in (SQL_DIR / "schema.sql").read_text().split(";"):
        ddl = "\n".join(line for line in statement.splitlines() if not line.lstrip().startswith("--"))
        if (
            "CREATE TABLE IF NOT EXISTS reference_distributions" in ddl
            and "reference_distributions" not in found
        ):
            con.execute(ddl.replace("CREATE TABLE IF NOT EXISTS", "CREATE TEMP TABLE"))


@contextmanager
def sql_errors(context: str = "") -> Iterator[None]:
    """DuckDB's errors inside the block as a QueryError (exit code 1): `context`, then DuckDB's message."""
    try:
        yield
    except duckdb.Error as e:
        raise QueryError(f"{context}{e}") from e


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse, before running it, SQL with any statement that is not a plain read."""
    with sql_errors():
        statements = con.extract_statements(sql)
    for st in statements:
        kind = st.type.name
        if kind not in READ_STATEMENTS:
            raise QueryError(f"{READ_ONLY} (a {kind} statement was given)")


def query_params(sql: str) -> set[str]:
    """The names of the `$params` the SQL uses: `$name` outside string literals, quoted identifiers and
    comments (DuckDB's own tokenizer finds those), so `SELECT 'cost $x'` has none."""
    try:
        tokens = duckdb.tokenize(sql)
    except duckdb.Error:  # let DuckDB report the SQL's own error when it runs
        tokens = []
    code = list(sql)
    ends = [pos for pos, _ in tokens[1:]] + [len(sql)]
    for (pos, kind), end in zip(tokens, ends, strict=True):
        quoted_name = kind == duckdb.token_type.identifier and sql[pos] == '"'
        if kind in (duckdb.token_type.string_const, duckdb.token_type.comment) or quoted_name:
            code[pos:end] = " " * (end - pos)
    return set(re.findall(r"\$([A-Za-z_]\w*)", "".join(code)))


def run_sql(
    con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None
) -> duckdb.DuckDBPyRelation | None:
    """Run SQL with the named `$params` it uses (DuckDB rejects unused ones, so extras are dropped).

    A SELECT comes back as a relation, executed when read: errors of reading it are the caller's to
    turn into QueryErrors (`sql_errors`). None for a statement with no result."""
    params = params or {}
    used = query_params(sql)
    if missing := sorted(used - params.keys()):
        raise QueryError(f"the query needs parameters {missing}; pass them with -p NAME=VALUE")
    try:
        return con.sql(sql, params={k: v for k, v in params.items() if k in used} or None)
    except duckdb.PermissionException as e:  # file access (read_csv...), which `open_db` turns off
        raise QueryError(f"{READ_ONLY} ({e})") from e
    except duckdb.Error as e:
        raise QueryError(str(e)) from e


def canned(name: str) -> str:
    """The text of sql/queries/<name>.sql."""
    path = QUERIES_DIR / f"{name}.sql"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in QUERIES_DIR.glob("*.sql")))
        raise QueryError(f"no canned query {name!r}; known: {known}")
    return path.read_text()


def _rows(rel: duckdb.DuckDBPyRelation) -> list[dict]:
    return [dict(zip(rel.columns, r, strict=True)) for r in rel.fetchall()]


# ---- runs ---------------------------------------------------------------------------------------------


def pick_run(con: duckdb.DuckDBPyConnection, run_id: str | None = None) -> Run:
    """The given run, whatever its status (a unique prefix of its id will do), else the latest finished
    run: a run that failed, or is still running or was stopped, is read only when asked for by id."""
    status = _status_column(con)
    rows = con.execute(
        f"SELECT run_id, {status} FROM runs WHERE starts_with(run_id, coalesce($run_id, ''))"
        " ORDER BY started_at DESC, run_id",
        {"run_id": run_id},
    ).fetchall()
    if not rows:
        raise QueryError(f"no run {run_id!r} in this database" if run_id else "no runs in this database")
    ids = [r[0] for r in rows]
    if run_id:
        if len(ids) > 1 and ids[0] != run_id:
            raise QueryError(f"run id prefix {run_id!r} is ambiguous: {ids}")
        return load_run(con, ids[0])
    finished = [r[0] for r in rows if r[1] == "finished"]
    if not finished:
        latest = load_run(con, ids[0])
        raise QueryError(
            f"no finished run in this database; the latest is {latest.describe()}: pass --run "
            f"{latest.run_id} to read what it stored"
        )
    return load_run(con, finished[0])


def unfinished_since(con: duckdb.DuckDBPyConnection, run: Run) -> list[str]:
    """Runs started after `run` that did not finish (failed, running or stopped), newest first: what a
    reader defaulting to the latest finished run passed over."""
    rows = con.execute(
        f"SELECT run_id FROM runs WHERE started_at > $started AND {_status_column(con)} <> 'finished'"
        " ORDER BY started_at DESC, run_id",
        {"started": run.started_at},
    ).fetchall()
    return [r[0] for r in rows]


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    return {r[0] for r in con.execute("SELECT name FROM pragma_table_info(?)", [table]).fetchall()}


def _status_column(con: duckdb.DuckDBPyConnection) -> str:
    """SQL for a run's status: the column, or, in a database written before it existed (read-only, so
    not brought up to date), what finished_at says."""
    if "status" in _columns(con, "runs"):
        return "coalesce(status, CASE WHEN finished_at IS NULL THEN 'running' ELSE 'finished' END)"
    return "CASE WHEN finished_at IS NULL THEN 'running' ELSE 'finished' END"


def load_run(con: duckdb.DuckDBPyConnection, run_id: str) -> Run:
    """The run as stored, with the samples and rejects stored for it so far (a running screen's too)."""
    has_kind = "kind" in _columns(con, "rejects")
    error = "error" if "error" in _columns(con, "runs") else "NULL"
    input_rows = "input_rows" if "input_rows" in _columns(con, "runs") else "NULL"

    def rejects(kind: str) -> str:
        if not has_kind:  # an earlier version's database: every reject is a bad record
            return "(SELECT count(*) FROM rejects j WHERE j.run_id = r.run_id)" if kind == "bad" else "0"
        return f"(SELECT count(*) FROM rejects j WHERE j.run_id = r.run_id AND j.kind = '{kind}')"

    rows = con.execute(
        f"""SELECT model, model_sha256, dataset_uri, mode, layers, traits, settings, started_at, finished_at,
                  {_status_column(con)}, {error}, {input_rows},
                  (SELECT count(*) FROM samples s WHERE s.run_id = r.run_id),
                  {rejects("bad")}, {rejects("file")}, {rejects("skipped")}
           FROM runs r WHERE run_id = $run_id""",
        {"run_id": run_id},
    ).fetchall()  # all: a result left unread keeps the connection busy
    if not rows:
        raise QueryError(f"no run {run_id!r} in this database")
    (model, sha, dataset, mode, layers, traits, settings, started, finished, status, err, read, *counts) = (
        rows[0]
    )
    run = Run(
        model,
        sha,
        dataset,
        mode,
        tuple(layers),
        tuple(traits),
        json.loads(settings) if isinstance(settings, str) else (settings or {}),
        status=status,
        error=err,
        started_at=started,
        finished_at=finished,
        n_scored=counts[0],
        n_rejected=counts[1],
        n_unreadable_files=counts[2],
        n_skipped=counts[3],
        input_rows=read,
    )
    if run.run_id != run_id:  # every query below selects by run.run_id: it must be the stored one
        raise QueryError(f"run {run_id}: its stored configuration hashes to {run.run_id}, not to its id")
    return run


def dataset_uris(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The input of every run stored in the database: what no output may replace (`outputs.Protected`)."""
    return [r[0] for r in con.execute("SELECT DISTINCT dataset_uri FROM runs ORDER BY 1").fetchall()]


def run_params(run: Run) -> dict:
    """The `$params` a run answers for a canned query: its id, its first layer and its default metric."""
    return {"run_id": run.run_id, "layer": run.layer(None), "metric": run.metric}


# ---- what a run found: scores, histograms, top samples, summary, percentiles -----------------------------


def scores(con: duckdb.DuckDBPyConnection, run: Run, at: dict[str, int]):
    """Every stored score of the traits in `at`, each at its layer there, as a polars DataFrame: one row
    per sample and trait, in input order (file, row, turn)."""
    params = {"run_id": run.run_id, "at": [f"{t}@{layer}" for t, layer in at.items()]}
    sql = """SELECT sample_id, source_file, source_row, turn, trait, layer, metric, delta_p, delta_p_proxy,
                    proj_response, proj_prompt_last, proj_natural, prompt_tokens, response_tokens, truncated
             FROM scored WHERE run_id = $run_id AND list_contains($at, concat(trait, '@', layer))
             ORDER BY source_file, source_row, turn, trait"""
    with sql_errors():
        return run_sql(con, sql, params).pl()


@dataclass(frozen=True)
class Histogram:
    """Equal-width bins of one score of one trait; `lower[i] <= x < upper[i]` (the last bin is closed)."""

    run_id: str
    trait: str
    layer: int
    metric: str
    lower: list[float]
    upper: list[float]
    counts: list[int]
    # the vector's reference distribution on ordinary chat (`screener calibrate`), when the run has one for
    # this trait, layer and metric: its 0th..100th percentiles and how many samples they summarise
    reference: list[float] | None = None
    reference_n: int | None = None

    @property
    def n(self) -> int:
        return sum(self.counts)

    def reference_shares(self) -> list[float] | None:
        """The reference's share (0..1) in each bin, for drawing it beside the dataset's counts."""
        if not self.reference or not self.counts:
            return None
        below = share_below([self.lower[0], *self.upper], self.reference)
        return [float(x) for x in np.diff(below)]

    def reference_shares_outside(self) -> tuple[float, float]:
        """The reference's share below the first bin and above the last (0 without a reference)."""
        if not self.reference or not self.counts:
            return 0.0, 0.0
        below = share_below([self.lower[0], self.upper[-1]], self.reference)
        return float(below[0]), float(1 - below[1])

    def share_above_reference(self, percentile: float = 95.0) -> tuple[float, float] | None:
        """(the reference's value at `percentile`, the share of this dataset's binned samples above it),
        counting a bin that straddles the value by the part of it above, as if its samples were spread."""
        if not self.reference or not self.n:
            return None
        cut = float(np.percentile(self.reference, percentile))  # between the stored whole percentiles
        above = 0.0
        for lo, hi, c in zip(self.lower, self.upper, self.counts, strict=True):
            if lo >= cut:
                above += c
            elif hi > cut:
                above += c * (hi - cut) / (hi - lo)
        return cut, above / self.n


def histogram(
    con: duckdb.DuckDBPyConnection, run: Run, trait: str, layer: int, metric: str, bins: int = 20
) -> Histogram:
    """Bin a score with sql/queries/hist.sql; no bins when the score is NULL for every sample."""
    if bins < 1:
        raise ValueError("bins must be >= 1")
    params = {"run_id": run.run_id, "trait": trait, "layer": layer, "metric": metric, "bins": bins}
    rows = run_sql(con, canned("hist"), params).fetchall()
    ref = run_sql(
        con,
        "SELECT quantiles, n FROM reference_distributions "
        "WHERE run_id = $run_id AND trait = $trait AND layer = $layer AND metric = $metric",
        {k: params[k] for k in ("run_id", "trait", "layer", "metric")},
    ).fetchall()
    ref = ref[0] if ref else None
    return Histogram(
        run.run_id,
        trait,
        layer,
        metric,
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        list(ref[0]) if ref else None,
        ref[1] if ref else None,
    )


def top_samples(
    con: duckdb.DuckDBPyConnection, run: Run, trait: str, layer: int, metric: str, k: int = 20
) -> list[dict]:
    """The k highest-scoring samples (sql/queries/top.sql), as dicts with their rank and the prompt
    parsed (a list of messages)."""
    params = {"run_id": run.run_id, "trait": trait, "layer": layer, "metric": metric, "k": k}
    rows = _rows(run_sql(con, canned("top"), params))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
        row["prompt"] = json.loads(row["prompt"]) if isinstance(row["prompt"], str) else row["prompt"]
    return rows


def summary(con: duckdb.DuckDBPyConnection, run: Run) -> list[dict]:
    """The dataset-level summary (sql/queries/summary.sql), one dict per trait and layer."""
    return _rows(run_sql(con, canned("summary"), {"run_id": run.run_id}))


def percentiles(con: duckdb.DuckDBPyConnection, run: Run) -> dict[tuple[str, int, str], dict]:
    """{(trait, layer, metric): row of trait_percentiles} for a run."""
    rows = _rows(run_sql(con, canned("percentiles"), {"run_id": run.run_id}))
    return {(r["trait"], r["layer"], r["metric"]): r for r in rows}


@dataclass(frozen=True)
class TraitReport:
    histogram: Histogram
    stats: dict | None  # the trait_percentiles row of the report's layer and metric
    top: list[dict]  # as `top_samples` returns them


@dataclass(frozen=True)
class ReportData:
    """Everything the HTML report shows, read in one go so the database can be closed before rendering."""

    run: Run
    layer: int | None  # the layer asked for; None: each trait at its own vector's layer
    metric: str
    summary: list[dict]
    traits: dict[str, TraitReport]
    layers: dict[str, int] = field(default_factory=dict)  # each trait's layer (default: `layer` for all)

    def __post_init__(self) -> None:
        if not self.layers:
            object.__setattr__(self, "layers", dict.fromkeys(self.traits, self.layer))

    @property
    def layer_text(self) -> str:
        """ "layer 20", or "layers evil 17, sycophantic 13" when the traits are read at different ones."""
        if len(set(self.layers.values())) == 1:
            return f"layer {next(iter(self.layers.values()))}"
        return "layers " + ", ".join(f"{t} {layer}" for t, layer in self.layers.items())


def report_data(
    con: duckdb.DuckDBPyConnection,
    run: Run,
    layer: int | None,
    metric: str,
    *,
    bins: int = 30,
    k: int = 10,
) -> ReportData:
    """The report's data: each trait at `layer`, else at its own vector's layer (`Run.layer`)."""
    stats = percentiles(con, run)
    layers = {trait: run.layer(layer, trait) for trait in run.traits}
    traits = {
        trait: TraitReport(
            histogram(con, run, trait, at, metric, bins),
            stats.get((trait, at, metric)),
            top_samples(con, run, trait, at, metric, k),
        )
        for trait, at in layers.items()
    }
    return ReportData(run, layer, metric, summary(con, run), traits, layers)


# ---- selections: the samples a filter drops -------------------------------------------------------------


@dataclass(frozen=True)
class DropFilter:
    """Which samples to drop. At most one of drop_top_percent, drop_top_count, threshold, ref_percentile
    (above that percentile of the vector's reference distribution: `export --threshold p95`) and where."""

    metric: str
    # the layer each trait is read at (its own vector's, or --layer for all); None: every layer of the run
    # (only --where without --layer)
    layers: dict[str, int] | None
    traits: tuple[str, ...] = ()  # empty: every trait (for --where: no restriction on trait)
    drop_top_percent: float | None = None
    drop_top_count: int | None = None
    threshold: float | None = None
    ref_percentile: float | None = None
    where: str | None = None
    drop_unscored: bool = False
    invert: bool = False

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise QueryError(f"metric must be one of {METRICS}, not {self.metric!r}")
        chosen = [
            x
            for x in (
                self.drop_top_percent,
                self.drop_top_count,
                self.threshold,
                self.ref_percentile,
                self.where,
            )
            if x is not None
        ]
        if len(chosen) > 1:
            raise QueryError("choose one of --drop-top, --threshold and --where")
        if self.ref_percentile is not None and not 0 <= self.ref_percentile <= 100:
            raise QueryError(f"--threshold p{self.ref_percentile:g}: a percentile is in 0..100")
        if self.drop_top_percent is not None and not 0 <= self.drop_top_percent <= 100:
            raise QueryError(f"--drop-top percent must be in [0, 100], not {self.drop_top_percent:g}")
        if self.drop_top_count is not None and self.drop_top_count < 0:
            raise QueryError(f"--drop-top count must be at least 0, not {self.drop_top_count}")

    def describe(self) -> str:
        traits = ", ".join(self.traits) or "every trait"
        if self.drop_top_percent is not None:
            what = f"drop the top {self.drop_top_percent:g}% by {self.metric} per trait ({traits})"
        elif self.drop_top_count is not None:
            what = f"drop the top {self.drop_top_count} samples by {self.metric} per trait ({traits})"
        elif self.threshold is not None:
            what = f"drop samples with {self.metric} > {self.threshold:g} for any of: {traits}"
        elif self.ref_percentile is not None:
            what = (
                f"drop samples above the {self.ref_percentile:g}th percentile of ordinary chat (the vector's "
                f"reference distribution of the run's metric) for any of: {traits}"
            )
        elif self.where is not None:
            what = f"drop samples of the scored view ({self.layer_text()}) where: {self.where}"
        else:
            what = "no filter (every record)"
        if self.drop_unscored:
            what += "; drop records the screen did not score"
        return what + "; write the dropped records" * self.invert

    def layer_text(self) -> str:
        if self.layers is None:
            return "any layer"
        at = sorted(set(self.layers.values()))
        if len(at) == 1:
            return f"layer {at[0]}"
        return ", ".join(f"{t} at layer {layer}" for t, layer in self.layers.items())

    def layer_params(self) -> dict:
        """`$all_layers`, `$at` for `_AT_LAYERS`: each trait's row at its layer ('trait@layer')."""
        at = [f"{t}@{layer}" for t, layer in (self.layers or {}).items()]
        return {"all_layers": self.layers is None, "at": at}


# a scored row at the layer its trait is read at (DropFilter.layer_params)
_AT_LAYERS = "($all_layers OR list_contains($at, concat(trait, '@', layer)))"


@dataclass(frozen=True)
class Selection:
    """What a filter selects in one run (and layer), by the input's source rows."""

    dropped: dict[int, set[str]]  # source_row -> the traits whose samples there the filter selected
    # source_row -> {sample_id the screen scored there: the content_sha256 of what it scored (None in an
    # earlier version's database, which did not record it)}
    scored: dict[int, dict[str, str | None]]
    by_trait: dict[str, set[int]]  # trait -> the source_rows scored for it


def select_drops(con: duckdb.DuckDBPyConnection, run: Run, flt: DropFilter) -> Selection:
    """The source rows the filter drops, and what the screen scored, for one run (and layer)."""
    sha = "content_sha256" if "content_sha256" in _columns(con, "samples") else "NULL"
    scored = run_sql(
        con,
        f"SELECT source_row, map(list(sample_id), list({sha})) FROM samples WHERE run_id = $run_id"
        " GROUP BY ALL",
        {"run_id": run.run_id},
    ).fetchall()
    by_trait: dict[str, set[int]] = {}
    for trait, row in run_sql(
        con,
        f"SELECT DISTINCT trait, source_row FROM scored WHERE run_id = $run_id AND {_AT_LAYERS}",
        {"run_id": run.run_id} | flt.layer_params(),
    ).fetchall():
        by_trait.setdefault(trait, set()).add(row)
    dropped: dict[int, set[str]] = {}
    for row, trait in _dropped_samples(con, run, flt):
        dropped.setdefault(row, set()).add(trait)
    return Selection(dropped, dict(scored), by_trait)


def _check_references(con: duckdb.DuckDBPyConnection, run: Run, flt: DropFilter) -> None:
    """A percentile threshold needs every trait's reference distribution at the layer it is read at."""
    have = {
        (t, layer)
        for t, layer in run_sql(
            con,
            "SELECT trait, layer FROM reference_distributions WHERE run_id = $run_id AND metric = $metric",
            {"run_id": run.run_id, "metric": run.metric},
        ).fetchall()
    }
    for trait in flt.traits or run.traits:
        layer = (flt.layers or {}).get(trait)
        if (trait, layer) not in have:
            raise QueryError(
                f"--threshold p{flt.ref_percentile:g}: run {run.run_id} has no reference distribution of "
                f"{run.metric} for {trait} at layer {layer}; calibrate its vector (screener calibrate) and "
                "rerun the same screen (it resumes and copies the calibration in), or give a value"
            )


def _dropped_samples(con: duckdb.DuckDBPyConnection, run: Run, flt: DropFilter) -> list[tuple[int, str]]:
    """(source_row, trait) of every sample the filter selects."""
    traits = list(flt.traits)
    value = flt.metric  # validated against METRICS: safe to name in SQL
    scope = f"run_id = $run_id AND {_AT_LAYERS}" + (" AND list_contains($traits, trait)" if traits else "")
    params = {"run_id": run.run_id, "traits": traits} | flt.layer_params()
    if flt.drop_top_percent is not None or flt.drop_top_count is not None:
        # Rank per trait, highest first, ties broken by sample_id so the cut is deterministic.
        limit = "ceil(n * $pct / 100)" if flt.drop_top_percent is not None else "$count"
        sql = f"""SELECT source_row, trait FROM (
                SELECT source_row, trait,
                       row_number() OVER (PARTITION BY trait ORDER BY {value} DESC, sample_id) AS rank,
                       count(*) OVER (PARTITION BY trait) AS n
                FROM scored WHERE {scope} AND {value} IS NOT NULL)
            WHERE rank <= {limit}"""
        params |= {"pct": flt.drop_top_percent, "count": flt.drop_top_count}
    elif flt.threshold is not None:
        sql = f"SELECT source_row, trait FROM scored WHERE {scope} AND {value} > $threshold"
        params["threshold"] = flt.threshold
    elif flt.ref_percentile is not None:
        _check_references(con, run, flt)
        sql = f"SELECT source_row, trait FROM scored WHERE {scope} AND ref_percentile > $pct"
        params["pct"] = flt.ref_percentile
    elif flt.where is not None:
        sql = f"SELECT * FROM scored WHERE {scope}"
    else:
        return []
    with sql_errors("the filter failed: "):
        rel = run_sql(con, sql, params)
        if flt.where is not None:
            # Not spliced into the SQL text: `filter` parses exactly one expression, so the predicate
            # cannot close the scope's parenthesis (`x) OR (true`) and select other runs' rows. It runs
            # on `open_db`'s connection, which can read the database and write nothing.
            rel = rel.filter(flt.where).project("source_row, trait")
        return rel.fetchall()


# ---- stored samples, for explaining them ---------------------------------------------------------------

SCORE_COLUMNS = ("proj_response", "proj_prompt_last", "proj_natural", "delta_p", "delta_p_proxy")


@dataclass(frozen=True)
class StoredSample:
    """A scored sample as the run stored it, with its scores per trait at one layer."""

    sample_id: str
    source_row: int
    source_file: str
    turn: int
    prompt_tokens: int
    response_tokens: int
    truncated: bool
    prompt: list[dict]
    response: str
    natural_response: str | None
    natural_tokens: int | None
    scores: dict[str, dict[str, float | None]]  # trait -> {column of SCORE_COLUMNS: value}
    content_sha256: str | None = None  # of the prompt and response scored (None: an earlier version's run)


def stored_samples(
    con, run: Run, sample_ids: Sequence[str], layer: int, traits: Sequence[str]
) -> list[StoredSample]:
    """The samples with these ids, in order, as `StoredSample`s; a QueryError names an id the run did not
    score (and why, when the screen rejected it)."""
    sha = "s.content_sha256" if "content_sha256" in _columns(con, "samples") else "NULL"
    rows = con.execute(
        f"""SELECT s.sample_id, s.source_row, s.source_file, s.turn, s.prompt_tokens, s.response_tokens,
                  s.truncated, s.prompt, s.response, s.natural_response, s.natural_tokens, c.trait,
                  c.proj_response, c.proj_prompt_last, c.proj_natural, c.delta_p, c.delta_p_proxy, {sha}
           FROM samples s JOIN scores c USING (run_id, sample_id)
           WHERE s.run_id = $run_id AND list_contains($ids, s.sample_id) AND c.layer = $layer
                 AND list_contains($traits, c.trait)""",
        {"run_id": run.run_id, "ids": list(sample_ids), "layer": layer, "traits": list(traits)},
    ).fetchall()
    found: dict[str, StoredSample] = {}
    for row in rows:
        sid = row[0]
        if sid not in found:
            prompt = json.loads(row[7]) if isinstance(row[7], str) else row[7]
            found[sid] = StoredSample(*row[:7], prompt, *row[8:11], scores={}, content_sha256=row[17])
        found[sid].scores[row[11]] = dict(zip(SCORE_COLUMNS, row[12:17], strict=True))
    for sid in sample_ids:
        if sid not in found:
            raise QueryError(_not_scored(con, run, sid))
    return [found[sid] for sid in sample_ids]


def _not_scored(con, run: Run, sample_id: str) -> str:
    params = {"run_id": run.run_id, "id": sample_id}
    reject = con.execute(
        "SELECT source_row, reason FROM rejects WHERE run_id = $run_id AND sample_id = $id LIMIT 1", params
    ).fetchall()
    if reject:
        return f"sample {sample_id!r} was rejected by run {run.run_id} (row {reject[0][0]}): {reject[0][1]}"
    turns = [
        r[0]
        for r in con.execute(
            "SELECT sample_id FROM samples WHERE run_id = $run_id AND starts_with(sample_id, $id || '#')"
            " ORDER BY turn LIMIT 6",
            params,
        ).fetchall()
    ]
    hint = f"; this record's turns are {', '.join(turns)}" if turns else ""
    return f"no sample {sample_id!r} in run {run.run_id}{hint}"
