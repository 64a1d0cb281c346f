"""Read-only access to a screen's database: opening it, picking a run, canned queries, `screener query`.

Every read command opens the file read-only. DuckDB lets one process hold a file it writes, so while a
screen is writing, opening fails at once: `Store` raises `StoreBusyError`, which the commands turn into a
clear message and exit code 3. A reader never blocks, slows or corrupts the writer.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb

from screener.store import SQL_DIR, Store, StoreBusyError

__all__ = [
    "DEFAULT_DB",
    "EXIT_BUSY",
    "METRICS",
    "QUERIES_DIR",
    "QueryError",
    "RunChoice",
    "add_db_args",
    "canned",
    "command",
    "default_metric",
    "open_db",
    "pick_run",
    "run_sql",
]

DEFAULT_DB = "screen.duckdb"
QUERIES_DIR = SQL_DIR / "queries"
METRICS = ("delta_p", "delta_p_proxy", "proj_response")
EXIT_ERROR, EXIT_BUSY = 1, 3
CSV_NATIVE = {
    *("boolean", "varchar", "float", "double", "decimal"),
    *(f"{u}{t}" for u in ("", "u") for t in ("tinyint", "smallint", "integer", "bigint")),
}


class QueryError(RuntimeError):
    """A user-facing problem (no such run, bad SQL, missing file); the command prints it, exit code 1."""


@dataclass(frozen=True)
class RunChoice:
    """The run a command reports on, as stored in `runs`."""

    run_id: str
    model: str
    dataset_uri: str
    mode: str
    layers: tuple[int, ...]
    traits: tuple[str, ...]
    settings: dict
    started_at: datetime
    finished_at: datetime | None
    n_samples: int
    n_rejects: int

    def layer(self, layer: int | None, trait: str | None = None) -> int:
        """The given layer, checked against the run; else `trait`'s own vector layer when the run recorded
        it (vectors chosen at different layers are each read at their own); else the run's first layer."""
        if layer is None:
            own = (self.settings.get("vectors") or {}).get(trait or "", {}).get("layer")
            return own if own in self.layers else self.layers[0]
        if layer not in self.layers:
            raise QueryError(f"run {self.run_id} has layers {list(self.layers)}, not {layer}")
        return layer

    def check_trait(self, trait: str) -> str:
        if trait not in self.traits:
            raise QueryError(f"run {self.run_id} has traits {list(self.traits)}, not {trait!r}")
        return trait


def default_metric(run: RunChoice) -> str:
    """ΔP when the run generated natural responses, else its last-prompt-token proxy."""
    return "delta_p" if run.mode == "natural" else "delta_p_proxy"


def open_db(path: str | Path) -> Store:
    """Open a screen database read-only, with the views of sql/views.sql (as TEMP views, which shadow
    any stored older version, so every reader sees the current definitions), and no access to any other
    file: SQL run on it can read the database and nothing else, and write nothing."""
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"{path}: no such database (pass --db, default {DEFAULT_DB})")
    store = Store(path, read_only=True)  # raises StoreBusyError while a screen writes this file
    try:
        views = (SQL_DIR / "views.sql").read_text()
        store.con.execute(re.sub(r"CREATE OR REPLACE VIEW", "CREATE OR REPLACE TEMP VIEW", views))
        # read_only stops writes to the database only: `COPY ... TO 'file'` would still overwrite any
        # file (this one included). User SQL runs here (query, export --where), so it gets no file
        # access at all, and the lock keeps that SQL from turning access back on.
        store.con.execute("SET enable_external_access = false; SET lock_configuration = true")
    except BaseException:
        store.close()
        raise
    return store


def canned(name: str) -> str:
    """The text of sql/queries/<name>.sql."""
    path = QUERIES_DIR / f"{name}.sql"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in QUERIES_DIR.glob("*.sql")))
        raise QueryError(f"no canned query {name!r}; known: {known}")
    return path.read_text()


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> duckdb.DuckDBPyRelation:
    """Run SQL with the named `$params` it uses (DuckDB rejects unused ones, so extras are dropped)."""
    params = params or {}
    used = set(re.findall(r"\$([A-Za-z_]\w*)", _strip_comments(sql)))
    if missing := sorted(used - params.keys()):
        raise QueryError(f"the query needs parameters {missing}; pass them with -p NAME=VALUE")
    return con.sql(sql, params={k: v for k, v in params.items() if k in used} or None)


def _strip_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)


def pick_run(con: duckdb.DuckDBPyConnection, run_id: str | None = None) -> RunChoice:
    """The given run (a unique prefix of its id will do), else the latest started run."""
    rows = con.execute(
        """SELECT run_id, model, dataset_uri, mode, layers, traits, settings, started_at, finished_at,
                  (SELECT count(*) FROM samples s WHERE s.run_id = r.run_id),
                  (SELECT count(*) FROM rejects j WHERE j.run_id = r.run_id)
           FROM runs r WHERE starts_with(run_id, coalesce($run_id, ''))
           ORDER BY started_at DESC, run_id""",
        {"run_id": run_id},
    ).fetchall()
    if not rows:
        raise QueryError(f"no run {run_id!r} in this database" if run_id else "no runs in this database")
    if run_id and len(rows) > 1 and rows[0][0] != run_id:
        raise QueryError(f"run id prefix {run_id!r} is ambiguous: {[r[0] for r in rows]}")
    r = rows[0]
    settings = json.loads(r[6]) if isinstance(r[6], str) else (r[6] or {})
    return RunChoice(r[0], r[1], r[2], r[3], tuple(r[4]), tuple(r[5]), settings, *r[7:])


def add_db_args(parser: argparse.ArgumentParser, *, run: bool = True) -> None:
    parser.add_argument("--db", default=DEFAULT_DB, help=f"the screen's DuckDB file (default {DEFAULT_DB})")
    if run:
        parser.add_argument(
            "--run", metavar="RUN_ID", help="run id or unique prefix (default: the latest run)"
        )


def command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the expected failures of a read command into a message on stderr and an exit code."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except StoreBusyError:
            print(
                f"error: a screen is writing to {args.db} right now, and DuckDB lets no other process open "
                "the file while it does. Rerun this command when the screen has finished.",
                file=sys.stderr,
            )
            return EXIT_BUSY
        except (QueryError, duckdb.Error) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_ERROR
        except BrokenPipeError:  # `screener top | head`: the reader left; not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    return wrapper


def terminal_width() -> int:
    return shutil.get_terminal_size((100, 24)).columns


# ---- screener query ---------------------------------------------------------------------------------


def _parse_param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:  # numbers (and true/false/null) as such, anything else as a string
        parsed = json.loads(value)
        if isinstance(parsed, (list, dict)):
            parsed = value
    except ValueError:
        parsed = value
    return name, parsed


def write_relation(rel: duckdb.DuckDBPyRelation, fmt: str, out: str | None, max_rows: int) -> None:
    """Print or save a result as a table, CSV, a JSON array of objects, or parquet (needs `out`)."""
    if fmt == "table":
        if out:
            raise QueryError("--out needs --format csv, json or parquet")
        rel.show(max_width=terminal_width(), max_rows=max_rows)
        return
    if fmt == "parquet":
        if not out:
            raise QueryError("--format parquet needs --out FILE")
        import pyarrow.parquet as pq

        pq.write_table(rel.to_arrow_table(), out)
        return
    text = _csv_ready(rel).pl().write_csv() if fmt == "csv" else rel.pl().write_json()
    if out:
        Path(out).write_text(text + ("" if fmt == "csv" else "\n"))
    else:
        sys.stdout.write(text + ("" if fmt == "csv" else "\n"))


def _csv_ready(rel: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """The result with every cell a number, a boolean or text, which any CSV writer takes: nested values
    (run_overview's `layers`, `traits`) as JSON text, other types (timestamps, blobs...) as DuckDB's text.
    Polars' CSV writer rejects nested columns, and polars cannot even import some DuckDB types."""
    cols = []
    for i, (name, dtype) in enumerate(zip(rel.columns, rel.types, strict=True), start=1):
        alias = '"' + name.replace('"', '""') + '"'
        if dtype.id in ("list", "struct", "map", "array", "union"):
            cols.append(f"to_json(#{i})::VARCHAR AS {alias}")
        elif dtype.id in CSV_NATIVE:
            cols.append(f"#{i} AS {alias}")  # by position: result column names may repeat
        else:
            cols.append(f"CAST(#{i} AS VARCHAR) AS {alias}")
    return rel.project(", ".join(cols))


READ_ONLY = (
    "screener query is read-only: it reads this database and cannot modify it, read or write other files, "
    "or change settings"
)
# Statements that only read. Everything else (COPY, SET, ATTACH, INSERT, CREATE, PRAGMA, CALL, ...) is
# refused by its parsed type before it runs, so the refusal does not depend on DuckDB's error wording.
READ_STATEMENTS = frozenset({"SELECT", "EXPLAIN"})


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse, before running it, SQL with any statement that is not a plain read."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(str(e)) from e
    for st in statements:
        kind = st.type.name
        if kind not in READ_STATEMENTS:
            raise QueryError(f"{READ_ONLY} (a {kind} statement was given)")


@command
def cmd_query(args: argparse.Namespace) -> int:
    sql = args.sql
    if re.fullmatch(r"[A-Za-z_]\w*", sql):  # a bare name is a canned query from sql/queries
        sql = canned(sql)
    elif sql.endswith(".sql") and Path(sql).is_file():
        sql = Path(sql).read_text()
    params = dict(args.param or [])
    with open_db(args.db) as store:
        needed = set(re.findall(r"\$([A-Za-z_]\w*)", _strip_comments(sql))) - params.keys()
        if needed & {"run_id", "layer", "metric"}:  # the run's own defaults, as hist/top/export use
            run = pick_run(store.con, args.run)
            defaults = {"run_id": run.run_id, "layer": run.layer(None), "metric": default_metric(run)}
            params.update({k: v for k, v in defaults.items() if k in needed})
        check_read_only(store.con, sql)
        try:
            rel = run_sql(store.con, sql, params)
        except duckdb.PermissionException as e:  # file access from a SELECT (read_csv...): see `open_db`
            raise QueryError(f"{READ_ONLY} ({e})") from e
        if rel is None:  # a statement with no result
            return 0
        write_relation(rel, args.format, args.out, args.max_rows)
    return 0


def add_query_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query",
        help="run a read-only SQL query on a screen's database",
        description=(
            "Run SQL against the tables of sql/schema.sql and the views of sql/views.sql (scored, "
            "top_delta_p, trait_percentiles, dataset_summary, run_overview), read-only: it reads the "
            "database and no other file. SQL may also be a canned query's name from sql/queries (top, "
            "hist, summary, percentiles, runs) or a .sql file; $run_id defaults to --run, the latest run; "
            "$layer and $metric to that run's first layer and its ΔP metric. --format csv writes nested "
            "values (lists, structs) as JSON text."
        ),
    )
    p.add_argument("sql", help="SQL text, a canned query name, or a .sql file")
    add_db_args(p)
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table")
    p.add_argument("--out", help="write to this file instead of stdout (required for parquet)")
    p.add_argument(
        "-p",
        "--param",
        action="append",
        type=_parse_param,
        metavar="NAME=VALUE",
        help="a $NAME parameter of the query; numbers are passed as numbers (repeatable)",
    )
    p.add_argument("--max-rows", type=int, default=40, help="rows shown by --format table (default 40)")
    p.set_defaults(func=cmd_query)
