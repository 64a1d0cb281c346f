"""The one-file HTML report of a run: metadata, the dataset-level summary, and per trait a histogram (inline
SVG) and the top samples. It renders a `results.ReportData`; it reads no database itself.
"""

from __future__ import annotations

import html
import json
import math
import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from screener.render import (
    HIGH_RGB,
    LOW_RGB,
    METRIC_LABELS,
    MID_RGB,
    diff_text,
    diverging_rgb,
    excerpt,
    histogram_title,
    prompt_excerpt,
)
from screener.results import Histogram, ReportData
from screener.runs import Run

if TYPE_CHECKING:
    from screener.explain import Explanation, ExplanationView, ReportExplanations

__all__ = ["explanation_html", "explanation_page", "histogram_svg", "html_report", "shaded_html"]

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0;
       background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
.sub { color: #666; margin: 0 0 16px; }
section { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; padding: 12px 16px;
          margin: 12px 0; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
pre { white-space: pre-wrap; word-break: break-word; margin: 4px 0; font-size: 12px; }
details summary { cursor: pointer; color: #345; }
.natural { color: #2a6a2a; } .stats { color: #555; font-size: 13px; margin: 4px 0 8px; }
nav a { margin-right: 12px; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
"""


def _slug(trait: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", trait)


def _num(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """An HTML table; cells are already escaped HTML."""
    th = "".join(
        f'<th class="num">{h}</th>' if i in numeric else f"<th>{h}</th>" for i, h in enumerate(header)
    )
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def histogram_svg(h: Histogram, width: int = 720, height: int = 260) -> str:
    """An inline SVG bar chart of a histogram, with axes, tick labels and a hover title per bar."""
    if not h.counts:
        return "<p>No values: this score is NULL for every sample.</p>"
    left, right, top, bottom = 56, 16, 12, 44
    pw, ph = width - left - right, height - top - bottom
    peak = max(h.counts) or 1
    lo, hi = h.lower[0], h.upper[-1]
    bw = pw / len(h.counts)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(histogram_title(h))}">'
    ]
    for i, c in enumerate(h.counts):
        bh = ph * c / peak
        tip = html.escape(f"[{h.lower[i]:.4g}, {h.upper[i]:.4g}): {c:,} samples")
        parts.append(
            f'<rect x="{left + i * bw + 0.5:.1f}" y="{top + ph - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
            f'height="{bh:.1f}" fill="#4c72b0"><title>{tip}</title></rect>'
        )
    if ref := h.reference_shares():  # ordinary chat at the dataset's scale: a step outline over the bars
        peak_ref = max(r * h.n for r in ref)
        scale = peak / peak_ref if peak_ref > peak else 1.0  # keep the outline inside the plot
        points = []
        for i, r in enumerate(ref):
            y = top + ph - ph * r * h.n * scale / peak
            points += [f"{left + i * bw:.1f},{y:.1f}", f"{left + (i + 1) * bw:.1f},{y:.1f}"]
        tip = html.escape(f"ordinary chat (reference, n = {h.reference_n:,}), scaled to this dataset's n")
        parts.append(
            f'<polyline points="{" ".join(points)}" fill="none" stroke="#dd8452" stroke-width="2">'
            f"<title>{tip}{'' if scale == 1 else f' (and by {scale:.2g} to fit)'}</title></polyline>"
        )
        if lo <= h.reference[95] <= hi:
            x = left + pw * (h.reference[95] - lo) / ((hi - lo) or 1)
            parts.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#dd8452" '
                f'stroke-dasharray="2 2"><title>reference p95 {h.reference[95]:.4g}</title></line>'
            )
    axis = 'stroke="#555" stroke-width="1"'
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" {axis}/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" {axis}/>')
    for j in range(5):  # x ticks at 0, 1/4, ..., 1 of the range
        x, value = left + pw * j / 4, lo + (hi - lo) * j / 4
        parts.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" {axis}/>')
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{value:.3g}</text>')
    for value in sorted({0, peak // 2, peak}):  # whole-number y ticks
        y = top + ph - ph * value / peak
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{value:,}</text>')
    if lo < 0 < hi:  # the sign of a projection difference matters: mark zero
        x = left + pw * (0 - lo) / (hi - lo)
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" '
            'stroke="#c44" stroke-dasharray="4 3"/>'
        )
    label = html.escape(f"{METRIC_LABELS.get(h.metric, h.metric)}, layer {h.layer}")
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">{label}</text>')
    parts.append(
        f'<text transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle">samples</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _metadata_section(run: Run, layer: str, metric: str) -> str:
    fields = [
        ("run id", run.run_id),
        ("mode", run.mode),
        ("model", run.model),
        ("dataset", run.dataset_uri),
        ("layers", ", ".join(map(str, run.layers))),
        ("traits", ", ".join(run.traits)),
        ("started (UTC)", str(run.started_at)),
        ("finished (UTC)", str(run.finished_at) if run.finished_at else "not finished (running or crashed)"),
        ("samples scored", f"{run.n_scored:,}"),
        ("rejected", f"{run.n_rejected:,}"),
        ("report layer / metric", f"{layer} / {metric}"),  # "layer 20" or "layers evil 17, ..."
    ]
    rows = [[html.escape(k), html.escape(v)] for k, v in fields]
    settings = html.escape(json.dumps(run.settings, indent=2, sort_keys=True, ensure_ascii=False))
    rows.append(["settings", f"<pre>{settings}</pre>"])
    return f'<section id="run-metadata"><h2>Run</h2>{_table(["field", "value"], rows)}</section>'


def _summary_section(rows: list[dict]) -> str:
    header = [
        "trait",
        "layer",
        "samples",
        "mean ΔP",
        "mean ΔP proxy",
        "mean proj_response",
        "mean proj_natural",
        "std ΔP",
        "std ΔP proxy",
    ]
    cells = [
        [
            html.escape(r["trait"]),
            str(r["layer"]),
            f"{r['n_samples']:,}",
            _num(r["mean_delta_p"]),
            _num(r["mean_delta_p_proxy"]),
            _num(r["mean_proj_response"]),
            _num(r["mean_proj_natural"]),
            _num(r["std_delta_p"]),
            _num(r["std_delta_p_proxy"]),
        ]
        for r in rows
    ]
    note = (
        "<p class='stats'>Dataset-level means per trait and layer. The mean projection difference (ΔP, "
        "or its proxy in proxy mode) predicts how far fine-tuning on this data shifts the trait.</p>"
    )
    table = _table(header, cells, numeric=set(range(1, 9))) if cells else "<p>No scored samples.</p>"
    return f'<section id="dataset-summary"><h2>Dataset-level summary</h2>{note}{table}</section>'


def _expandable(short: str, full: str | None, cls: str = "") -> str:
    """A cell showing an excerpt that opens to the full text; a dash when there is no text."""
    if full is None:
        return "—"
    return (
        f'<details class="{cls}"><summary>{html.escape(short or "(empty)")}</summary>'
        f"<pre>{html.escape(full)}</pre></details>"
    )


def _top_section(trait: str, rows: list[dict], metric: str, limit: int = 160) -> str:
    body = []
    for r in rows:
        prompt_full = "\n\n".join(f"[{m.get('role')}] {m.get('content', '')}" for m in r["prompt"])
        body.append(
            [
                str(r["rank"]),
                _num(r["value"]),
                html.escape(
                    f"{r['sample_id']} (row {r['source_row']}"
                    + (
                        f", assistant turn {r['turn'] + 1}; {r['record_turns']} of the record's scored"
                        if r.get("record_turns", 1) > 1
                        else ""
                    )
                    + ")"
                ),
                _expandable(prompt_excerpt(r["prompt"], limit), prompt_full),
                _expandable(excerpt(r["response"], limit), r["response"]),
                _expandable(excerpt(r["natural_response"], limit), r["natural_response"], "natural"),
            ]
        )
    table = (
        _table(
            ["#", html.escape(metric), "sample", "prompt", "response", "natural response"],
            body,
            numeric={0, 1},
        )
        if body
        else f"<p>No samples with a {html.escape(metric)} score.</p>"
    )
    return (
        f'<section id="top-{_slug(trait)}"><h2>Top samples: {html.escape(trait)}</h2>'
        f"<p class='stats'>Highest {html.escape(metric)} first; click a cell for the full text.</p>"
        f"{table}</section>"
    )


def _hist_section(h: Histogram, stats: dict | None) -> str:
    line = ""
    if stats:
        line = (
            "<p class='stats'>"
            + " · ".join(f"{k} {_num(stats[k])}" for k in ("mean", "std", "p05", "p50", "p95", "max"))
            + "</p>"
        )
    if above := h.share_above_reference(95.0):
        line += (
            "<p class='stats'>orange: ordinary chat (the vector's reference, n = "
            f"{h.reference_n:,}), scaled to this dataset; its p95 {_num(above[0])} (dashed): "
            f"{100 * above[1]:.1f}% of this dataset lies above it</p>"
        )
    return (
        f'<section id="hist-{_slug(h.trait)}"><h2>Distribution: {html.escape(h.trait)}</h2>'
        f"<p class='stats'>{html.escape(histogram_title(h))}</p>{line}{histogram_svg(h)}</section>"
    )


def html_report(data: ReportData, explained: ReportExplanations | None = None) -> str:
    """One self-contained HTML page (inline CSS and SVG, no scripts, nothing fetched). With `explained`,
    each trait's top samples are followed by their shaded responses (or why they could not be computed)."""
    run, metric = data.run, data.metric
    nav = "".join(f'<a href="#hist-{_slug(t)}">{html.escape(t)}</a>' for t in data.traits)
    sections = [_metadata_section(run, data.layer_text, metric), _summary_section(data.summary)]
    for trait, found in data.traits.items():
        sections.append(_hist_section(found.histogram, found.stats))
        sections.append(_top_section(trait, found.top, metric))
        if explained is not None:
            sections.append(_explain_section(trait, explained, metric))
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sub = f"{run.mode} mode · {metric} at {data.layer_text} · generated {created}"
    return _page(f"persona-screen report: run {run.run_id}", sub, f"<nav>{nav}</nav>" + "".join(sections))


def _page(title: str, sub: str, body: str) -> str:
    """The self-contained page around a report or an explanation (`title` and `sub` as plain text)."""
    title = html.escape(title)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}{EXPLAIN_CSS}</style></head><body><main>"
        f"<h1>{title}</h1><p class='sub'>{html.escape(sub)}</p>{body}</main></body></html>\n"
    )


# ---- explain: shaded tokens (screener explain --format html, and the report's per-token view) ----------

EXPLAIN_CSS = f"""
h3 {{ font-size: 15px; margin: 10px 0 4px; }}
.tokens {{ white-space: pre-wrap; word-break: break-word; font: 12.5px/1.8 ui-monospace, SFMono-Regular,
          Menlo, Consolas, monospace; background: #fff; border: 1px solid #e3e3e3; border-radius: 4px;
          padding: 6px 8px; margin: 6px 0; max-height: 420px; overflow: auto; }}
.tokens span {{ border-radius: 2px; }}
.scale {{ display: inline-block; width: 180px; height: 11px; vertical-align: middle; margin: 0 6px;
          border: 1px solid #bbb; background: linear-gradient(to right, rgb{LOW_RGB}, rgb{MID_RGB},
          rgb{HIGH_RGB}); }}
.explained {{ margin: 14px 0 4px; padding-top: 6px; border-top: 1px solid #eee; }}
ol.spans {{ margin: 4px 0; padding-left: 22px; font-size: 13px; }} ol.spans li {{ margin: 2px 0; }}
code {{ font-size: 12px; background: #f3f3f3; padding: 0 3px; border-radius: 2px; }}
"""


def _hex(level: float) -> str:
    return "#{:02x}{:02x}{:02x}".format(*diverging_rgb(level))


def shaded_html(pieces, values, levels, first: int = 0) -> str:
    """Tokens as spans shaded by their level (−1 blue … +1 red), each titled with its index and value; a
    newline shows as a shaded ↵ before it."""
    spans = "".join(
        f'<span style="background:{_hex(x)}" title="{first + i}: {v:.4g}">'
        f"{html.escape(piece).replace(chr(10), '↵' + chr(10))}</span>"
        for i, (piece, v, x) in enumerate(zip(pieces, values, levels, strict=True))
    )
    return f'<div class="tokens">{spans}</div>'


def _scale_html(v: ExplanationView) -> str:
    centre, centre_is, half = v.scale
    return (
        f"<p class='stats'>scale: ≤ {centre - half:.4g}<span class='scale'></span>"
        f"≥ {centre + half:.4g} · white = {centre:.4g}, {v.centre_what} ({centre_is}); "
        "hover a token for its value</p>"
    )


def explanation_html(e: Explanation, trait: str, *, prompt: bool = False) -> str:
    """One trait's explanation (`Explanation.view`): the scores (stored and recomputed, with their
    differences), the scale, the shaded response (and prompt, folded, with `prompt`), the top spans and
    the natural answer."""
    v = e.view(trait)
    k = e.response_start
    (resp, resp_diff), (last, last_diff) = v.recomputed["proj_response"], v.recomputed["proj_prompt_last"]
    stored = " · ".join(f"{c} {_num(x, 6)}" for c, x in v.stored.items())
    parts = [
        f"<p class='stats'>stored: {stored}<br>recomputed ({html.escape(e.dtype)}, one unpadded sequence): "
        f"proj_response {_num(resp, 6)} (diff {diff_text(resp_diff)}) · "
        f"proj_prompt_last {_num(last, 6)} (diff {diff_text(last_diff)}) · "
        f"last prompt token <code>{html.escape(repr(v.last_prompt_token))}</code></p>",
        _scale_html(v),
    ]
    if prompt:
        parts.append(
            f"<details><summary>prompt ({k} tokens, shaded the same way)</summary>"
            f"{shaded_html(*v.prompt)}</details>"
        )
    tokens = v.response[0]
    cut = "; truncated to --max-tokens" if e.truncated else ""
    parts.append(f"<p class='stats'>response ({len(tokens)} tokens{cut}):</p>")
    parts.append(shaded_html(*v.response, k))
    spans = "".join(
        f"<li><b>{s.mean:.4g}</b> (tokens {s.start}–{s.end - 1}): {html.escape(excerpt(s.text, 240))}</li>"
        for s in v.spans
    )
    parts.append(
        "<p class='stats'>top spans (sentences or lines, highest mean first):</p>"
        f"<ol class='spans'>{spans}</ol>"
    )
    if e.mode == "natural":
        if (n := v.natural) is None:
            parts.append("<p class='stats'>natural answer: none (empty)</p>")
        else:
            parts.append(
                f"<p class='stats natural'>natural answer ({len(n.tokens)} tokens re-tokenised, "
                f"{n.generated} generated; read teacher-forced): proj_natural "
                f"{_num(n.proj_natural, 6)} (stored {_num(n.stored, 6)}, diff {diff_text(n.diff)})</p>"
            )
            parts.append(shaded_html(n.tokens, n.values, n.levels))
    return "".join(parts)


def explanation_page(*explanations: Explanation) -> str:
    """`screener explain --format html`: one self-contained page, a section per trait (the explanations
    of one sample, one per layer its traits are read at)."""
    e = explanations[0]
    sections = "".join(
        f'<section id="trait-{_slug(trait)}"><h2>{html.escape(trait)} · layer {x.layer}</h2>'
        f"{explanation_html(x, trait, prompt=True)}</section>"
        for x in explanations
        for trait in x.traits
    )
    layers = ", ".join(str(x.layer) for x in explanations)
    sub = (
        f"run {e.run_id} · row {e.source_row}, assistant turn {e.turn + 1} · layer {layers} · "
        f"{e.mode} mode · each token shaded by h·v̂ relative to the value the run's metric subtracts"
    )
    return _page(f"persona-screen explain: sample {e.sample_id}", sub, sections)


def _explain_section(trait: str, explained: ReportExplanations, metric: str) -> str:
    head = f'<section id="explain-{_slug(trait)}"><h2>Per-token view: {html.escape(trait)}</h2>'
    if explained.error:
        return (
            f"{head}<p class='stats'>Not computed: {html.escape(explained.error)}. "
            "(<code>screener report --no-explain</code> leaves this section out.)</p></section>"
        )
    items = explained.by_trait.get(trait, [])
    if not items:
        return f"{head}<p class='stats'>No top samples to show.</p></section>"
    intro = (
        f"<p class='stats'>The top {len(items)} samples' responses, each token shaded by its projection "
        f"h·v̂ at layer {items[0].layer}: red above the value {html.escape(metric)} subtracts, blue below. "
        "Computed with the run's model when this report was built; <code>screener explain SAMPLE_ID</code> "
        "shows one sample in full.</p>"
    )
    blocks = "".join(
        f"<div class='explained'><h3>#{rank} {html.escape(e.sample_id)} · {html.escape(metric)} "
        f"{_num(e.traits[trait].stored.get(metric))}</h3>{explanation_html(e, trait)}</div>"
        for rank, e in enumerate(items, 1)
    )
    return f"{head}{intro}{blocks}</section>"
