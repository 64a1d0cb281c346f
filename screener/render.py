"""What the read commands show: text histograms and top-sample excerpts for the terminal, a histogram as
a PNG, and a query result as a table, CSV, JSON or parquet. The data comes from `screener.results`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import duckdb

from screener.results import Histogram

__all__ = [
    "METRIC_LABELS",
    "OUTPUT_FORMATS",
    "excerpt",
    "format_histogram",
    "format_top",
    "histogram_title",
    "prompt_excerpt",
    "save_histogram_png",
    "terminal_width",
    "write_relation",
]

METRIC_LABELS = {
    "delta_p": "ΔP (response − natural response projection)",
    "delta_p_proxy": "ΔP proxy (response − last prompt token projection)",
    "proj_response": "response projection",
}
BLOCKS = " ▏▎▍▌▋▊▉█"  # eighths, for smooth text bars
OUTPUT_FORMATS = ("table", "csv", "json", "parquet")
CSV_NATIVE = {
    *("boolean", "varchar", "float", "double", "decimal"),
    *(f"{u}{t}" for u in ("", "u") for t in ("tinyint", "smallint", "integer", "bigint")),
}


def terminal_width() -> int:
    return shutil.get_terminal_size((100, 24)).columns


# ---- histograms -----------------------------------------------------------------------------------------


def histogram_title(h: Histogram) -> str:
    return f"{h.trait} · {h.metric} · layer {h.layer} · run {h.run_id} · n = {h.n:,}"


def format_histogram(h: Histogram, width: int = 100) -> str:
    """A text histogram: one line per bin with its range, a bar and its count."""
    if not h.counts:
        return f"{histogram_title(h)}\n(no values: {h.metric} is NULL for every sample of this trait)"
    labels = [
        f"[{lo:>9.4g}, {hi:>9.4g}{']' if i == len(h.counts) - 1 else ')'}"
        for i, (lo, hi) in enumerate(zip(h.lower, h.upper, strict=True))
    ]
    count_width = len(f"{max(h.counts):,}")
    bar_width = max(10, width - len(labels[0]) - count_width - 3)
    top = max(h.counts)
    lines = [histogram_title(h)]
    for label, count in zip(labels, h.counts, strict=True):
        eighths = round(count / top * bar_width * 8) if top else 0
        bar = "█" * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")
        lines.append(f"{label} {bar:<{bar_width}} {count:>{count_width},}")
    return "\n".join(lines)


def save_histogram_png(h: Histogram, path: str | Path) -> None:
    """The histogram as a PNG, with axis labels and a title naming the run, the trait and the count."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    try:
        widths = [hi - lo for lo, hi in zip(h.lower, h.upper, strict=True)]
        ax.bar(
            h.lower,
            h.counts,
            width=[w or 1.0 for w in widths],
            align="edge",
            color="#4c72b0",
            edgecolor="white",
            linewidth=0.5,
        )
        ax.set_xlabel(f"{METRIC_LABELS.get(h.metric, h.metric)}, layer {h.layer}")
        ax.set_ylabel("samples")
        ax.set_title(f"{h.trait}: {h.metric}  (run {h.run_id}, n = {h.n:,})")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


# ---- top samples ----------------------------------------------------------------------------------------


def excerpt(text: str | None, limit: int) -> str:
    """Whitespace collapsed to single spaces, cut to `limit` characters with an ellipsis."""
    if text is None:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: max(limit - 1, 0)].rstrip() + "…"


def prompt_excerpt(prompt: list[dict], limit: int) -> str:
    """The last user message (what the response answers), else the last message of the prompt."""
    users = [m for m in prompt if m.get("role") == "user"] or prompt
    return excerpt(users[-1].get("content", "") if users else "", limit)


def format_top(rows: list[dict], metric: str, width: int = 100) -> str:
    """Samples as blocks: rank, score and ids, then prompt, response and natural response excerpts."""
    if not rows:
        return f"(no samples with a {metric} score)"
    indent, text_width = "    ", max(20, width - 14)
    out = []
    for row in rows:
        other = [
            f"{m}={row[m]:.4g}"
            for m in ("delta_p", "delta_p_proxy", "proj_response")
            if m != metric and row[m] is not None
        ]
        where = f"row {row['source_row']}"
        if row.get("record_turns", 1) > 1:  # one of a record's several scored turns
            where += f", turn {row['turn']} of {row['record_turns']}"
        head = f"#{row['rank']:<3} {metric}={row['value']:.4g}  {row['sample_id']} ({where})"
        out.append(excerpt(f"{head}  {' '.join(other)}", width))
        out.append(f"{indent}prompt:   {prompt_excerpt(row['prompt'], text_width)}")
        out.append(f"{indent}response: {excerpt(row['response'], text_width)}")
        if row["natural_response"] is not None:
            natural = excerpt(row["natural_response"], text_width) or "(empty)"
            out.append(f"{indent}natural:  {natural}")
    return "\n".join(out)


# ---- query results --------------------------------------------------------------------------------------


def write_relation(rel: duckdb.DuckDBPyRelation, fmt: str, out: str | Path | None, max_rows: int) -> None:
    """Print a result as a table (at most `max_rows` rows), or print or save it as CSV or a JSON array of
    objects, or save it as parquet. `out` is a file (for csv and json, else stdout; required for parquet)."""
    if fmt not in OUTPUT_FORMATS or (fmt == "table" and out) or (fmt == "parquet" and not out):
        raise ValueError(f"cannot write format {fmt!r} to {out or 'stdout'}")
    if fmt == "table":
        rel.show(max_width=terminal_width(), max_rows=max_rows)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(rel.to_arrow_table(), out)
    else:
        text = _csv_ready(rel).pl().write_csv() if fmt == "csv" else rel.pl().write_json() + "\n"
        if out:
            Path(out).write_text(text)
        else:
            sys.stdout.write(text)


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
