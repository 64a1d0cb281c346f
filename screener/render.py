"""What the read commands show: text histograms and top-sample excerpts for the terminal, a histogram as
a PNG, and a query result as a table, CSV, JSON or parquet. The data comes from `screener.results`."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from screener.choices import OUTPUT_FORMATS
from screener.results import Histogram

if TYPE_CHECKING:
    from screener.explain import Explanation, ExplanationView

__all__ = [
    "METRIC_LABELS",
    "OUTPUT_FORMATS",
    "diff_text",
    "diverging_rgb",
    "excerpt",
    "format_explanation",
    "format_histogram",
    "format_top",
    "histogram_title",
    "mark_plain",
    "prompt_excerpt",
    "save_histogram_png",
    "shade_ansi",
    "terminal_width",
    "use_color",
    "write_relation",
]

METRIC_LABELS = {
    "delta_p": "ΔP (response − natural response projection)",
    "delta_p_proxy": "ΔP proxy (response − last prompt token projection)",
    "proj_response": "response projection",
}
BLOCKS = " ▏▎▍▌▋▊▉█"  # eighths, for smooth text bars
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
    """A text histogram: one line per bin with its range, a bar and its count; with a reference
    distribution (ordinary chat, `screener calibrate`), each bin's share of the dataset and of the
    reference side by side, and how much of the dataset lies above the reference's 95th percentile."""
    if not h.counts:
        return f"{histogram_title(h)}\n(no values: {h.metric} is NULL for every sample of this trait)"
    labels = [
        f"[{lo:>9.4g}, {hi:>9.4g}{']' if i == len(h.counts) - 1 else ')'}"
        for i, (lo, hi) in enumerate(zip(h.lower, h.upper, strict=True))
    ]
    ref = h.reference_shares()
    count_width = len(f"{max(h.counts):,}")
    extra = 16 if ref else 0  # "  12.3%   4.5%" beside the count
    bar_width = max(10, width - len(labels[0]) - count_width - 3 - extra)
    top = max(h.counts)
    lines = [histogram_title(h)]
    if ref:
        pad = " " * (len(labels[0]) + bar_width + count_width + 2)
        lines.append(f"{pad}{'data':>7}{'ref':>7}")
    for i, (label, count) in enumerate(zip(labels, h.counts, strict=True)):
        eighths = round(count / top * bar_width * 8) if top else 0
        bar = "█" * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")
        line = f"{label} {bar:<{bar_width}} {count:>{count_width},}"
        if ref:
            line += f" {100 * count / h.n:>6.1f}%{100 * ref[i]:>6.1f}%"
        lines.append(line)
    if ref and (above := h.share_above_reference(95.0)):
        below, beyond = h.reference_shares_outside()
        lines.append(
            f"reference: ordinary chat (n = {h.reference_n:,}), {100 * below:.1f}% of it below this range "
            f"and {100 * beyond:.1f}% above; its p50 {h.reference[50]:.4g}, p95 {above[0]:.4g}: "
            f"{100 * above[1]:.1f}% of this dataset lies above its p95"
        )
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
        if ref := h.reference_shares():  # the reference at the dataset's scale, as a step outline
            ax.stairs(
                [r * h.n for r in ref],
                [h.lower[0], *h.upper],
                color="#dd8452",
                linewidth=1.5,
                label=f"ordinary chat (reference, n = {h.reference_n:,}), scaled to n",
            )
            ax.axvline(h.reference[95], color="#dd8452", linestyle="--", linewidth=1, label="reference p95")
            ax.legend(loc="upper right", fontsize=8)
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
            # 1-based for people (ids are 0-based: `id#2` is the third assistant turn)
            where += f", assistant turn {row['turn'] + 1}; {row['record_turns']} of the record's scored"
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


# ---- explain: per-token shading -------------------------------------------------------------------------

# A diverging scale (ColorBrewer RdBu's middle): blue below the centre, near-white at it, red above; light
# enough at both ends for dark text.
LOW_RGB, MID_RGB, HIGH_RGB = (67, 147, 195), (247, 247, 247), (214, 96, 77)
PLAIN_LEVEL = 0.5  # without colour, tokens at least this far along the scale are marked
RESET = "\x1b[0m"
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if chr(c) not in "\n\t"}


def diverging_rgb(level: float) -> tuple[int, int, int]:
    """The colour of a level in [-1, 1]: blue at −1, near-white at 0, red at +1."""
    level = max(-1.0, min(1.0, float(level)))
    end = HIGH_RGB if level > 0 else LOW_RGB
    a = abs(level)
    return tuple(round(m + (e - m) * a) for m, e in zip(MID_RGB, end, strict=True))  # type: ignore[return-value]


def use_color(choice: str, stream=None) -> bool:
    """--color auto|always|never: auto is a terminal that is not `dumb`, unless NO_COLOR is set."""
    import os

    if choice != "auto":
        return choice == "always"
    stream = stream or sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return tty and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _ansi_bg(rgb: tuple[int, int, int], truecolor: bool) -> str:
    if truecolor:
        return "\x1b[48;2;{};{};{}m\x1b[38;2;0;0;0m".format(*rgb)
    r, g, b = (round(c / 255 * 5) for c in rgb)  # the 6x6x6 cube of 256-colour terminals
    return f"\x1b[48;5;{16 + 36 * r + 6 * g + b}m\x1b[38;5;16m"


def _printable(text: str) -> str:
    """Text with control characters (an escape sequence in the data would drive the terminal) as \\xNN."""
    return text.translate(_CONTROL)


def shade_ansi(pieces: Sequence[str], levels: Sequence[float], truecolor: bool = True) -> str:
    """Each token's text on the colour of its level; a newline shows as a shaded ↵ before it."""
    out = []
    for piece, level in zip(pieces, levels, strict=True):
        colour = _ansi_bg(diverging_rgb(level), truecolor)
        for i, line in enumerate(_printable(piece).split("\n")):
            if i:
                out.append(f"{colour}↵{RESET}\n")
            if line:
                out.append(f"{colour}{line}{RESET}")
    return "".join(out)


def mark_plain(pieces: Sequence[str], levels: Sequence[float], level: float = PLAIN_LEVEL) -> str:
    """Without colour: runs of tokens at least `level` above the centre in {+…+}, below it in [-…-]."""
    out, state = [], 0
    for piece, x in zip(pieces, levels, strict=True):
        now = 1 if x >= level else -1 if x <= -level else 0
        if now != state:
            out.append({1: "+}", -1: "-]", 0: ""}[state] + {1: "{+", -1: "[-", 0: ""}[now])
            state = now
        out.append(_printable(piece))
    out.append({1: "+}", -1: "-]", 0: ""}[state])
    return "".join(out)


def _legend(v: ExplanationView, color: bool, truecolor: bool) -> str:
    centre, centre_is, half = v.scale
    lo, hi = centre - half, centre + half
    if color:
        cells = "".join(f"{_ansi_bg(diverging_rgb(i / 7 - 1), truecolor)} {RESET}" for i in range(15))
        return f"scale: ≤ {lo:.4g} {cells} ≥ {hi:.4g}; white = {centre:.4g}, {v.centre_what} ({centre_is})"
    lo_mark, hi_mark = centre - PLAIN_LEVEL * half, centre + PLAIN_LEVEL * half
    return (
        f"marks: {{+…+}} ≥ {hi_mark:.4g}, [-…-] ≤ {lo_mark:.4g}, around {centre:.4g} = {v.centre_what} "
        f"({centre_is}); full scale {lo:.4g} … {hi:.4g}"
    )


def diff_text(x: float | None) -> str:
    """A recomputed-minus-stored difference as both explanation views print it."""
    return "n/a" if x is None else f"{x:+.2e}"


def _stored(x: float | None) -> str:
    return "NULL" if x is None or x != x else f"{x:.6g}"


def format_explanation(
    e: Explanation, trait: str, *, color: bool, truecolor: bool = True, width: int = 100
) -> str:
    """One trait's explanation for the terminal (`Explanation.view`): the scores (stored and recomputed,
    with their differences), the scale, the shaded response, the top spans and, in natural mode, the
    natural answer."""
    v = e.view(trait)
    where = f"row {e.source_row}" + (f", assistant turn {e.turn + 1}" if "#" in e.sample_id else "")
    (resp, resp_diff), (last, last_diff) = v.recomputed["proj_response"], v.recomputed["proj_prompt_last"]
    tokens, _, levels = v.response
    lines = [
        f"== {trait} · layer {e.layer} · sample {e.sample_id} ({where}) · run {e.run_id}",
        "stored:     " + "  ".join(f"{c} {_stored(x)}" for c, x in v.stored.items()),
        f"recomputed: proj_response {resp:.6g} (diff {diff_text(resp_diff)})  "
        f"proj_prompt_last {last:.6g} (diff {diff_text(last_diff)})  "
        f"[{e.dtype}, one sequence, unpadded]",
        f"last prompt token {_printable(repr(v.last_prompt_token))} = {last:.6g}; "
        f"mean over the response = {resp:.6g}",
        _legend(v, color, truecolor),
        f"response ({len(tokens)} tokens{'; truncated to --max-tokens' if e.truncated else ''}):",
    ]
    body = shade_ansi(tokens, levels, truecolor) if color else mark_plain(tokens, levels)
    lines += [body, "", "top spans (sentences or lines, highest mean projection first):"]
    for i, s in enumerate(v.spans, 1):
        text = excerpt(_printable(s.text), max(20, width - 32))
        lines.append(f"  {i}. {s.mean:>9.4g}  tokens {s.start}-{s.end - 1}  {text}")
    if e.mode == "natural":
        lines.append("")
        if (n := v.natural) is None:
            lines.append("natural answer: none stored (empty)")
        else:
            lines.append(
                f"natural answer ({len(n.tokens)} tokens re-tokenised, {n.generated} "
                f"generated; read teacher-forced): proj_natural {n.proj_natural:.6g} "
                f"(stored {_stored(n.stored)}, diff {diff_text(n.diff)})"
            )
            shaded = shade_ansi(n.tokens, n.levels, truecolor) if color else mark_plain(n.tokens, n.levels)
            lines.append(shaded)
    return "\n".join(lines)
