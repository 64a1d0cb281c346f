"""Why did a sample score high: the per-token projections behind a stored score.

`explain_samples` takes samples as a run stored them (`results.stored_samples`), re-reads each from the run's
dataset (as export does; `input_uri` when it moved), rebuilds it with the run's `turns` setting, and
re-scores it with the run's own model, vectors, dtype and `max_tokens` (the same truncation), after
checking that the model's weights and the vector files are the ones the run recorded: a changed sha256 is
refused (`DriftError`), never explained with other weights. One `Explainer` serves every layer asked
for (traits whose vectors were chosen at different layers): the model loads once, the dataset is read
once, and one pass per sample reads all the layers. `Scorer.project_tokens` gives h_L · v̂ at every
position of prompt + response, one sample at a time (no padding), so

    mean(projections[response_start:])  = the stored proj_response
    projections[response_start - 1]     = the stored proj_prompt_last

up to float rounding: the screen may have read the sample inside a padded batch, or (`--turns all`) from a
pass shared with the record's later turns. In fp32 that is ~1e-7 relative; the differences are reported.

Spans (`sentence_spans`): the response cut into lines (at newlines), each line into sentences (after a
token ending in `.`, `!` or `?` followed by whitespace) of at least `MIN_SPAN` tokens (a shorter piece
joins its neighbour in the line, so "1." or "Co." is no sentence) and at most `MAX_SPAN`; the `TOP_SPANS`
with the highest mean projection, lines shorter than `MIN_SPAN` tokens left out unless nothing else is. A
sentence is what a reviewer reads and drops; a fixed window would cut through one, and "the highest mean
over any window" is always a single token.

Colour scale (`TraitExplanation.centre`, `half_range`): white is the value the run's metric subtracts (the
last prompt token's projection in proxy mode, the natural answer's mean in natural mode), so a red token
pulls the score up and a blue one down (ΔP is the mean over the response of value − centre); full colour is
the 95th percentile of |value − centre| over the response, so one outlier does not wash out the rest.

Natural mode: the stored natural answer (`samples.natural_response`) is re-tokenised and read
teacher-forced after the prompt, not regenerated: regeneration reproduces the stored answer only for greedy
fp32 runs (sampling seeds depend on the batch the screen formed; batched bf16 argmax ties differ from batch
1), and the reviewer wants the answer that is stored. Its text does not always re-tokenise to the ids the
model generated, so its mean can differ from the stored proj_natural by more than rounding; both the token
counts and the difference are reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from screener.datasets import Rebuild, check_input, read_rows
from screener.errors import QueryError, ScreenerError, UserError
from screener.records import Reject, Sample, content_sha256
from screener.results import SCORE_COLUMNS, StoredSample, stored_samples
from screener.runs import Run

__all__ = [
    "MAX_SPAN",
    "MIN_SPAN",
    "SCORE_COLUMNS",
    "TOP_SPANS",
    "DriftError",
    "Explainer",
    "Explanation",
    "ExplanationView",
    "NaturalView",
    "ReportExplanations",
    "Span",
    "SpanView",
    "StoredSample",
    "TraitExplanation",
    "colour_scale",
    "explain_report",
    "explain_samples",
    "read_back",
    "sentence_spans",
    "stored_samples",
    "token_pieces",
]

TOP_SPANS, MIN_SPAN, MAX_SPAN = 3, 3, 48
SCALE_QUANTILE = 0.95
NATURAL_METHOD = "the stored natural_response, re-tokenised and read teacher-forced after the prompt"


class DriftError(UserError):
    """The run's model or vector files are not the ones it screened with (sha256): explaining would use
    other weights than the stored scores came from."""


# ---- what the run stored --------------------------------------------------------------------------------


def read_back(run: Run, stored: Sequence[StoredSample], input_uri: str | None = None) -> dict[str, Sample]:
    """{sample_id: Sample} rebuilt from the run's dataset (or `input_uri`), read once and only as far as
    the last row needed. The record at each stored row must still give that sample with the same prompt and
    response, or the dataset changed since the screen (QueryError, as for export)."""
    uri = input_uri or run.dataset_uri
    check_input(uri)
    wanted: dict[int, list[StoredSample]] = {}
    for s in stored:
        wanted.setdefault(s.source_row, []).append(s)
    rebuild = Rebuild(run.settings.get("turns") or "last")
    found = {}
    changed = "the input changed since the screen; pass the screened data with --input"
    for row in read_rows(uri, split=run.settings.get("split")):
        items = rebuild(row)  # every row up to the last wanted: a sample id depends on the rows before
        if row.row not in wanted:
            continue
        rebuilt = {s.sample_id: s for s in items if isinstance(s, Sample)}
        for st in wanted.pop(row.row):
            sample = rebuilt.get(st.sample_id)
            if (
                sample is None
                or sample.response != st.response
                or sample.prompt != st.prompt
                or (
                    st.content_sha256 is not None
                    and content_sha256(sample.prompt, sample.response) != st.content_sha256
                )
            ):
                raise QueryError(
                    f"{row.file}, row {row.row}: not the record the screen scored as {st.sample_id!r}: "
                    + changed
                )
            found[st.sample_id] = sample
        if not wanted:
            break
    if wanted:
        raise QueryError(f"{uri} has no row {min(wanted)}, which the screen scored: {changed}")
    return found


# ---- the math -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """Tokens `[start, end)` (indices into `Explanation.tokens`) and their mean projection."""

    start: int
    end: int
    mean: float


def _ends_sentence(piece: str, following: str) -> bool:
    stripped = piece.rstrip()
    return stripped[-1:] in (".", "!", "?") and (
        stripped != piece or not following or following[:1].isspace()
    )


def _cut_line(pieces: Sequence[str], begin: int, end: int, min_tokens: int, max_tokens: int) -> list:
    """One line's tokens `[begin, end)` as sentences of at least `min_tokens` tokens (a shorter piece
    joins its neighbour: "1.", "Co.", "Ltd." are not sentences), cut every `max_tokens`."""
    cuts, start = [], begin
    for i in range(begin, end):
        following = pieces[i + 1] if i + 1 < end else ""
        if i + 1 == end or i + 1 - start >= max_tokens or _ends_sentence(pieces[i], following):
            cuts.append((start, i + 1))
            start = i + 1
    merged: list[tuple[int, int]] = []
    for s, e in cuts:
        if merged and (e - s < min_tokens or merged[-1][1] - merged[-1][0] < min_tokens):
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


def sentence_spans(
    pieces: Sequence[str],
    values: np.ndarray,
    start: int,
    *,
    top: int = TOP_SPANS,
    min_tokens: int = MIN_SPAN,
    max_tokens: int = MAX_SPAN,
) -> list[Span]:
    """The `top` sentences of `pieces[start:]` with the highest mean of `values`, highest first: the
    response is cut into lines (after each token holding a newline), each line into sentences
    (`_cut_line`); lines shorter than `min_tokens` tokens ("```", a lone newline) are not ranked unless
    nothing else is."""
    segments, line = [], start
    for i in range(start, len(pieces)):
        if "\n" in pieces[i] or i + 1 == len(pieces):
            segments += _cut_line(pieces, line, i + 1, min_tokens, max_tokens)
            line = i + 1
    ranked = [(s, e) for s, e in segments if e - s >= min_tokens] or segments
    spans = [Span(s, e, float(np.mean(values[s:e]))) for s, e in ranked]
    return sorted(spans, key=lambda sp: (-sp.mean, sp.start))[:top]


def colour_scale(response_values: np.ndarray, centre: float) -> float:
    """The |value − centre| shown at full colour: the 95th percentile over the response (1.0 when every
    value is the centre)."""
    deviation = np.abs(np.asarray(response_values, dtype=np.float64) - centre)
    return float(np.quantile(deviation, SCALE_QUANTILE)) or float(deviation.max()) or 1.0


def token_pieces(tokenizer, ids: Sequence[int], context: int = 4) -> list[str]:
    """Each token's text, such that the pieces join into the decoded sequence. Decoding a token alone
    loses what depends on its neighbours (a SentencePiece word's leading space, the bytes of a character
    split over several tokens), so each is decoded after a few tokens of context; a token that ends
    inside a character gets "" and the character goes to the token that completes it."""
    ids = list(ids)

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces: list[str] = []
    done = 0  # ids[:done] have been given their text
    for i in range(len(ids)):
        first = max(0, done - context)
        before, text = decode(ids[first:done]), decode(ids[first : i + 1])
        if text.endswith("\ufffd") and i + 1 < len(ids) and i - done < 8:
            pieces.append("")  # a character that a later token completes
            continue
        pieces.append(text[len(before) :] if text.startswith(before) else decode(ids[done : i + 1]))
        done = i + 1
    return pieces


# ---- explanations ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraitExplanation:
    """One trait's projections on one sample, recomputed, beside what the run stored."""

    trait: str
    projections: np.ndarray  # [tokens] h_L · v̂ at every prompt and response token
    proj_response: float  # recomputed: mean of projections[response_start:]
    proj_prompt_last: float  # recomputed: projections[response_start - 1]
    stored: dict[str, float | None]  # the run's scores (SCORE_COLUMNS)
    spans: tuple[Span, ...]
    centre: float  # white in the shading: the value the run's metric subtracts
    centre_is: str  # "proj_prompt_last" | "proj_natural"
    half_range: float  # |value − centre| at full colour
    natural_projections: np.ndarray | None = None  # [natural tokens] (natural mode)
    proj_natural: float | None = None  # recomputed: their mean

    def diff(self, column: str) -> float | None:
        """Recomputed minus stored, for proj_response, proj_prompt_last or proj_natural."""
        stored = self.stored.get(column)
        mine = getattr(self, column)
        return None if stored is None or mine is None else mine - stored

    def normalised(self, values: np.ndarray) -> np.ndarray:
        """(value − centre) / half_range, clipped to [-1, 1]: the colour of each value."""
        return np.clip((np.asarray(values, dtype=np.float64) - self.centre) / self.half_range, -1.0, 1.0)


@dataclass(frozen=True)
class Explanation:
    """Why one sample scored as it did: its tokens and, per trait, their projections at one layer."""

    run_id: str
    sample_id: str
    source_row: int
    turn: int
    layer: int
    dtype: str
    mode: str
    tokens: tuple[str, ...]  # prompt + response, as scored (cut to max_tokens when truncated)
    response_start: int  # index of the first response token
    truncated: bool
    traits: dict[str, TraitExplanation]
    natural_tokens: tuple[str, ...] | None = None  # the stored natural answer, re-tokenised
    natural_tokens_stored: int | None = None  # how many tokens the model generated

    def view(self, trait: str) -> ExplanationView:
        """One trait's explanation as the terminal and the HTML pages show it (`ExplanationView`)."""
        t = self.traits[trait]
        k = self.response_start
        levels = t.normalised(t.projections)
        metric = "delta_p" if self.mode == "natural" else "delta_p_proxy"
        natural = None
        if self.natural_tokens is not None and t.natural_projections is not None:
            natural = NaturalView(
                self.natural_tokens,
                t.natural_projections,
                t.normalised(t.natural_projections),
                self.natural_tokens_stored,
                t.proj_natural,
                t.stored.get("proj_natural"),
                t.diff("proj_natural"),
            )
        return ExplanationView(
            explanation=self,
            trait=trait,
            metric=metric,
            stored={c: t.stored.get(c) for c in ("proj_response", "proj_prompt_last", metric)},
            recomputed={c: (getattr(t, c), t.diff(c)) for c in ("proj_response", "proj_prompt_last")},
            last_prompt_token=self.tokens[k - 1],
            prompt=(self.tokens[:k], t.projections[:k], levels[:k]),
            response=(self.tokens[k:], t.projections[k:], levels[k:]),
            scale=(t.centre, t.centre_is, t.half_range),
            centre_what="the last prompt token"
            if t.centre_is == "proj_prompt_last"
            else "the natural answer's mean",
            spans=tuple(
                SpanView(s.mean, s.start, s.end, "".join(self.tokens[s.start : s.end])) for s in t.spans
            ),
            natural=natural,
        )

    def to_json(self, trait: str) -> dict:
        """One trait's explanation as plain JSON values (NaN as null)."""
        t = self.traits[trait]
        out = {
            "run_id": self.run_id,
            "sample_id": self.sample_id,
            "source_row": self.source_row,
            "turn": self.turn,
            "trait": trait,
            "layer": self.layer,
            "dtype": self.dtype,
            "tokens": list(self.tokens),
            "projections": _floats(t.projections),
            "response_start": self.response_start,
            "truncated": self.truncated,
            **{k: _float(v) for k, v in t.stored.items()},
            "check": {
                "proj_response": _float(t.proj_response),
                "proj_prompt_last": _float(t.proj_prompt_last),
                "proj_response_diff": _float(t.diff("proj_response")),
                "proj_prompt_last_diff": _float(t.diff("proj_prompt_last")),
            },
            "spans": [
                {
                    "start": s.start,
                    "end": s.end,
                    "mean": s.mean,
                    "text": "".join(self.tokens[s.start : s.end]),
                }
                for s in t.spans
            ],
            "scale": {"centre": _float(t.centre), "centre_is": t.centre_is, "half_range": t.half_range},
        }
        if self.mode == "natural":
            out["natural"] = {
                "method": NATURAL_METHOD,
                "tokens": list(self.natural_tokens or ()),
                "tokens_stored": self.natural_tokens_stored,
                "projections": _floats(t.natural_projections) if t.natural_projections is not None else [],
                "proj_natural": _float(t.proj_natural),
                "proj_natural_stored": _float(t.stored.get("proj_natural")),
                "proj_natural_diff": _float(t.diff("proj_natural")),
            }
        return out


@dataclass(frozen=True)
class SpanView:
    mean: float
    start: int  # token indices into the sample's tokens (prompt + response)
    end: int
    text: str


@dataclass(frozen=True)
class NaturalView:
    """The stored natural answer, re-tokenised and read teacher-forced (natural mode)."""

    tokens: tuple[str, ...]
    values: np.ndarray
    levels: np.ndarray  # (value − centre) / half_range, clipped to [-1, 1]
    generated: int | None  # how many tokens the model generated
    proj_natural: float | None  # recomputed
    stored: float | None
    diff: float | None


@dataclass(frozen=True)
class ExplanationView:
    """One trait's explanation as every view shows it, computed once (`Explanation.view`): `render.py`
    draws it as terminal text, `report.py` as HTML. Tokens come with their projections and their colour
    levels; `prompt` and `response` are (tokens, values, levels)."""

    explanation: Explanation
    trait: str
    metric: str  # the run's headline score column
    stored: dict[str, float | None]  # proj_response, proj_prompt_last and the metric, as the run stored them
    recomputed: dict[str, tuple[float, float | None]]  # proj_response, proj_prompt_last: (value, − stored)
    last_prompt_token: str
    prompt: tuple[tuple[str, ...], np.ndarray, np.ndarray]
    response: tuple[tuple[str, ...], np.ndarray, np.ndarray]
    scale: tuple[float, str, float]  # (centre: white, the column it is, |value − centre| at full colour)
    centre_what: str  # the centre in words
    spans: tuple[SpanView, ...]
    natural: NaturalView | None  # None in proxy mode, or when no natural answer was stored


def _float(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _floats(values: np.ndarray) -> list[float | None]:
    return [_float(v) for v in np.asarray(values, dtype=np.float64).tolist()]


class Explainer:
    """The run's model and vectors for some traits, each group at its layer (`groups`: `{layer: traits}`),
    checked against the run and loaded once: one pass over a sample reads every layer.

    Refuses (DriftError) when the model's weights or a vector file's bytes are not the ones the run
    recorded; `model` points at the run's model where it is now (default: the spec the run recorded).
    """

    def __init__(
        self,
        run: Run,
        groups: Mapping[int, Sequence[str]],
        *,
        model: str | None = None,
        device: str = "auto",
    ):
        from screener.scoring import ScoreSettings
        from screener.vectors import unit_vectors
        from screener.work import Work

        self.run = run
        self.groups = {
            run.layer(layer): tuple(run.check_trait(t) for t in ts) for layer, ts in groups.items()
        }
        self.traits = tuple(dict.fromkeys(t for ts in self.groups.values() for t in ts))
        recorded = {k: run.settings.get(k) for k in ("vectors", "dtype", "max_tokens")}
        if missing := [k for k, v in recorded.items() if v is None]:
            raise UserError(
                f"run {run.run_id} does not record its {', '.join(missing)} (an older or synthetic screen): "
                "it cannot be re-scored as it was; screen the data again to explain it"
            )
        vectors = [self._check_vector(trait, recorded["vectors"]) for trait in self.traits]
        self.model_ref = self._check_model(model)
        self.work = Work.resolve(device, recorded["dtype"])
        self.dtype = self.work.dtype
        self.layers = tuple(sorted(self.groups))
        units = unit_vectors([v.tensor for v in vectors], self.layers, [v.path for v in vectors])
        settings = ScoreSettings(layers=self.layers, max_tokens=int(recorded["max_tokens"]))
        self.scorer = self.work.scorer(self.model_ref, units, settings)
        self.model, self.tokenizer = self.scorer.model, self.scorer.tokenizer

    def _check_vector(self, trait: str, recorded: dict):
        from screener.vectors import load_vector

        info = recorded.get(trait)
        if not info:
            raise UserError(f"run {self.run.run_id} records no vector file for {trait!r}")
        vec = load_vector(info["path"], trait)  # VectorError (exit 2) when it is gone
        if vec.sha256 != info["sha256"]:
            raise DriftError(
                f"{info['path']}: the {trait!r} vector file changed since the screen (sha256 "
                f"{vec.sha256[:12]} now, {info['sha256'][:12]} in run {self.run.run_id}); explaining with it "
                "would not reproduce the run's scores: restore the file, or screen again"
            )
        return vec

    def _check_model(self, model: str | None):
        from screener.models import resolve_model

        ref = resolve_model(model or self.run.model)
        if ref.sha256 != self.run.model_sha256:
            raise DriftError(
                f"model {ref.path}: its weights changed since the screen (sha256 {ref.sha256[:12]} now, "
                f"{self.run.model_sha256[:12]} in run {self.run.run_id}); explaining with other weights "
                "would not reproduce the run's scores: restore the model the run screened with (or pass "
                "--model where it is now), or screen again"
            )
        return ref

    def project(self, ids: list[int]) -> np.ndarray:
        """`[layers, tokens, traits]` projections of one sequence, alone (no padding), at `self.layers`
        and in `self.traits` order."""
        return self.scorer.project_tokens([ids])[0].double().cpu().numpy()

    def explain(self, sample: Sample, stored: Mapping[int, StoredSample]) -> dict[int, Explanation]:
        """The sample explained at each layer of `stored` (`{layer: the sample as stored_samples read it
        there}`), for the traits of that layer, from one pass."""
        toks = self.scorer.tokenize(sample)
        if isinstance(toks, Reject):
            raise QueryError(f"sample {sample.sample_id!r} cannot be scored now: {toks.reason}")
        some = next(iter(stored.values()))
        if (len(toks.prompt), len(toks.response)) != (some.prompt_tokens, some.response_tokens):
            raise DriftError(
                f"the tokenizer of {self.model_ref.path} gives sample {sample.sample_id!r} "
                f"{len(toks.prompt)} prompt and {len(toks.response)} response tokens, the screen had "
                f"{some.prompt_tokens} and {some.response_tokens}: the tokenizer changed since the screen"
            )
        k = len(toks.prompt)
        ids = toks.prompt + toks.response
        proj = self.project(ids)  # [layers, tokens, traits]
        tokens = token_pieces(self.tokenizer, ids)
        natural_proj, natural_tokens = None, None
        if self.run.mode == "natural" and some.natural_response is not None:
            natural_ids = self.tokenizer(some.natural_response, add_special_tokens=False)["input_ids"]
            natural_tokens = token_pieces(self.tokenizer, natural_ids)
            if natural_ids:
                natural_proj = self.project(toks.prompt + natural_ids)[:, k:]
        out = {}
        for layer, st in stored.items():
            at = self.layers.index(layer)
            traits = {}
            for trait in self.groups[layer]:
                i = self.traits.index(trait)
                values, scores = proj[at, :, i], st.scores[trait]
                nat = natural_proj[at, :, i] if natural_proj is not None else None
                natural_centre = self.run.mode == "natural" and _has(scores["proj_natural"])
                centre_is = "proj_natural" if natural_centre else "proj_prompt_last"
                centre = scores[centre_is] if _has(scores[centre_is]) else float(values[k - 1])
                traits[trait] = TraitExplanation(
                    trait=trait,
                    projections=values,
                    proj_response=float(values[k:].mean()),
                    proj_prompt_last=float(values[k - 1]),
                    stored=scores,
                    spans=tuple(sentence_spans(tokens, values, k)),
                    centre=centre,
                    centre_is=centre_is,
                    half_range=colour_scale(values[k:], centre),
                    natural_projections=nat,
                    proj_natural=float(nat.mean()) if nat is not None else None,
                )
            out[layer] = Explanation(
                run_id=self.run.run_id,
                sample_id=sample.sample_id,
                source_row=sample.source_row,
                turn=sample.turn,
                layer=layer,
                dtype=self.work.dtype_name,
                mode=self.run.mode,
                tokens=tuple(tokens),
                response_start=k,
                truncated=toks.truncated,
                traits=traits,
                natural_tokens=tuple(natural_tokens) if natural_tokens is not None else None,
                natural_tokens_stored=st.natural_tokens,
            )
        return out


def _has(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def explain_samples(
    run: Run,
    stored: Mapping[int, Sequence[StoredSample]],
    groups: Mapping[int, Sequence[str]],
    *,
    input_uri: str | None = None,
    model: str | None = None,
    device: str = "auto",
) -> dict[int, list[Explanation]]:
    """Explain stored samples at each layer (`stored`: `{layer: samples}` as `stored_samples` read them
    there) for the traits of that layer (`groups`: `{layer: traits}`), in order, with one model load and
    one read of the dataset for every layer: the input is checked first, then the model and vectors,
    before the dataset is read and the model loaded."""
    check_input(input_uri or run.dataset_uri)
    explainer = Explainer(run, {layer: groups[layer] for layer in stored}, model=model, device=device)
    unique = {s.sample_id: s for ss in stored.values() for s in ss}
    samples = read_back(run, list(unique.values()), input_uri)
    explained = {
        sid: explainer.explain(
            samples[sid], {layer: s for layer, ss in stored.items() for s in ss if s.sample_id == sid}
        )
        for sid in unique
    }
    return {layer: [explained[s.sample_id][layer] for s in ss] for layer, ss in stored.items()}


# ---- for the HTML report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportExplanations:
    """The shaded responses of the report's top samples: per trait, its top `k` explained (in rank order),
    or, when none could be computed (model or vectors gone or changed, input moved), why."""

    k: int
    by_trait: dict[str, list[Explanation]]
    error: str | None = None


def explain_report(
    run: Run,
    layer: int | None,
    top: dict[str, list[StoredSample]],
    *,
    k: int,
    input_uri: str | None = None,
    device: str = "auto",
) -> ReportExplanations:
    """Explain each trait's top samples at `layer`, else at the trait's own vector's layer
    (`Run.by_layer`), with one model load and one read of the dataset for every layer (a sample in
    several traits' tops once per layer). A failure the user can act on becomes the report's message
    instead of failing the whole report."""
    groups = run.by_layer(list(top), layer)
    layers = {t: at for at, traits in groups.items() for t in traits}
    stored = {
        at: list({s.sample_id: s for t in traits for s in top[t]}.values()) for at, traits in groups.items()
    }
    stored = {at: ss for at, ss in stored.items() if ss}
    if not stored:
        return ReportExplanations(k, {t: [] for t in top})
    try:
        explained = explain_samples(run, stored, groups, input_uri=input_uri, device=device)
    except ScreenerError as e:
        return ReportExplanations(k, {}, str(e))
    by_id = {at: {e.sample_id: e for e in es} for at, es in explained.items()}
    return ReportExplanations(
        k, {t: [by_id[layers[t]][s.sample_id] for s in top[t]] if top[t] else [] for t in top}
    )
