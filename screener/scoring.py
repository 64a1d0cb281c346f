"""The math: projections of response activations onto persona vectors, in batches, with an early stop.

For each sample and layer L (the `hidden_states[L]` convention of records.py) and unit vector v̂:
    proj_response    = mean over response tokens of h_L · v̂
    proj_prompt_last = h_L[last prompt token] · v̂
    delta_p_proxy    = proj_response - proj_prompt_last          (computed in the store)
In natural mode the base model also answers the prompt itself; `proj_natural` is the mean of h_L · v̂ over
that answer's tokens, collected by hooks while it is generated (no second forward pass). Each prompt is
run once (`shared_prefill`, the default), with a KV cache: the dataset's response is read teacher-forced in
that pass (up to the deepest layer needed) and the answer is generated from its cache.

Hidden states are read with hooks on the decoder blocks, so the forward pass stops after the deepest
layer needed and never runs the LM head. Only `[batch, tokens, traits]` projections leave the hooks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from screener.choices import EXTRACT_METHODS, check_max_tokens, checked
from screener.models import (
    MIN_SHARED,
    ConversationIds,
    LayerTap,
    SharedPrefix,
    can_share,
    chat_text,
    common_prefix,
    decode,
    decoder_parts,
    eos_ids,
    generate,
    merge,
    pad,
    pad_id,
    picker,
    plain_cache,
    prefill,
    prefix_attention,
    run_until_tapped,
    text_ids,
    weight_dtype,
)
from screener.records import MODES, Reject, Sample, Scored
from screener.tuning import (
    CPU_GENERATE_ROWS,
    CPU_TOKENS,
    GPU_GENERATE_ROWS,
    GPU_TOKENS,
    Stopwatch,
    Tuner,
    machine_key,
)


@dataclass(frozen=True)
class GenerationSettings:
    """How the natural response is generated (greedy unless temperature > 0)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


# what `Scorer.means` reads per layer, in this order (extraction's methods)
MEANS = EXTRACT_METHODS


@dataclass(frozen=True)
class ScoreSettings:
    layers: tuple[int, ...]
    mode: str = "proxy"  # "proxy" | "natural"
    max_tokens: int = 2048  # prompt + response; longer samples are truncated and flagged
    # padded tokens per forward batch; None: chosen from the run's first batches (tuning.py)
    batch_tokens: int | None = 16384
    max_batch_size: int = 64
    # HF generate's memory grows faster than its batch (measured on CPU, bf16, 64 new tokens: +0.5 GB at
    # 16 rows, +2.6 GB at 48), so generation batches are sized apart; None: tuned like batch_tokens
    generate_batch_size: int | None = 16
    padding_side: str = "right"  # results must not depend on it (tested)
    # score a conversation's turns from one teacher-forced pass where their token ids allow it (exact);
    # False re-reads the conversation once per turn (the reference the one-pass path is tested against)
    share_passes: bool = True
    # torch.compile the decoder blocks of the teacher-forced pass: it fuses the memory-bound norms, RoPE
    # and SiLU of a forward, for a one-off compile per process (what it gains: benchmarks/bench.py)
    compile: bool = False
    # natural mode: each prompt is run once with a KV cache that serves the dataset response's read and the
    # generation (exact against False, tested); False reads prompt + response in passes of their own, then
    # lets HF `generate` re-read each prompt. On a 2-core CPU (benchmarks/RESULTS.md, "Natural ΔP") the
    # shared path was 8% faster in fp32 and 12% slower in bf16 on a quiet machine (2.8x faster in bf16 on a
    # loaded one). Models whose cache is not plain never take the shared path
    shared_prefill: bool = True
    # a right-padded teacher-forced batch whose rows share a prompt prefix (a template's system prompt) runs
    # it once and only the rows' tokens after it (models/prefix.py; exact against False, tested). Taken
    # where the model's attention is transformers' SDPA with a plain cache, and not with `compile`
    share_prefix: bool = True
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {self.padding_side!r}")
        # the command line's rule (choices.MIN_MAX_TOKENS): `truncate` then keeps response tokens, and a
        # mean over none (NaN) is never a score
        checked("--max-tokens", check_max_tokens, self.max_tokens)

    @classmethod
    def for_device(cls, gpu: bool, tuned: bool = True, **overrides) -> ScoreSettings:
        """Settings on a GPU or a CPU: batch sizes tuned on the device unless given, or with `tuned=False`
        fixed (a paired measurement must batch both models alike: padding and batch shape change the
        kernels' rounding); `None` overrides are ignored."""
        sized = {
            "batch_tokens": None if tuned else (65536 if gpu else 4096),
            "generate_batch_size": None if tuned else (64 if gpu else 16),
            "max_batch_size": 256 if gpu else 64,
        }
        return cls(**{**sized, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass(slots=True)
class Tokens:
    """A sample's prompt and response ids as scored (cut to `max_tokens` when `truncated`)."""

    index: int  # position in the caller's list
    sample: Sample
    prompt: list[int]
    response: list[int]
    truncated: bool


@dataclass(slots=True)
class Pass:
    """One teacher-forced sequence and the samples read from it: each sample's prompt + response ids are a
    prefix of `ids`, so causal attention gives its positions exactly the states a pass of its own would."""

    ids: list[int]
    reads: list[Tokens]


@dataclass(frozen=True)
class Prepared:
    """A batch of samples made ready for the model on the CPU (`Scorer.prepare`): the rejects found by
    tokenising, in input order (None where a sample was tokenised), the tokens, and the passes (None in
    natural mode from one prefill, which reads every turn on its own)."""

    n: int  # samples
    results: list
    toks: list[Tokens]
    plan: PassPlan | None


@dataclass(frozen=True)
class PassPlan:
    """The passes for a batch of samples, and how each conversation was covered (for the summary)."""

    passes: list[Pass]
    paths: dict[tuple[str, int], str]  # conversation (source_file, source_row) -> ONE_PASS | PER_TURN...


ONE_PASS = "one pass"  # every scored turn of the conversation read from a single pass
PER_TURN = "per turn"  # the chat template rewrites earlier turns: each turn has its own pass
WINDOWS = "windows"  # prefix-stable, but turns past --max-tokens are cut, so they get passes of their own


def _is_prefix(short: list[int], long: list[int]) -> bool:
    return len(short) <= len(long) and long[: len(short)] == short


def plan_passes(toks: Sequence[Tokens], share: bool = True) -> PassPlan:
    """Group samples into teacher-forced passes.

    Turns of one conversation (same source file and row) share a pass when a turn's prompt + response ids
    are a prefix of a later turn's: with causal attention that pass holds, exactly, every such turn's
    response tokens and last prompt token. Templates that rewrite earlier turns (strip reasoning, insert
    dates, move the system prompt) fail the comparison and fall back to a pass per turn; turns cut to
    `max_tokens` (their prompt loses its head) are never a prefix of another turn, so each keeps its own
    window, exactly as per-turn scoring reads it.
    """
    if not share:
        return PassPlan([Pass(t.prompt + t.response, [t]) for t in toks], {})
    conversations: dict[tuple[str, int], list[Tokens]] = {}
    for t in toks:
        conversations.setdefault((t.sample.source_file, t.sample.source_row), []).append(t)
    passes, paths = [], {}
    for key, turns in conversations.items():
        remaining = sorted(turns, key=lambda t: len(t.prompt) + len(t.response), reverse=True)
        n_before = len(passes)
        while remaining:
            seq = remaining[0].prompt + remaining[0].response
            covered = [t for t in remaining if _is_prefix(t.prompt + t.response, seq)]
            passes.append(Pass(seq, covered))
            remaining = [t for t in remaining if not any(t is c for c in covered)]
        if len(turns) > 1:
            whole = [t for t in sorted(turns, key=lambda t: t.sample.turn) if not t.truncated]
            stable = all(_is_prefix(a.prompt + a.response, b.prompt) for a, b in itertools.pairwise(whole))
            paths[key] = ONE_PASS if len(passes) - n_before == 1 else WINDOWS if stable else PER_TURN
    return PassPlan(passes, paths)


class ProjectionTap(LayerTap):
    """A `LayerTap` that keeps `h · units[L]`: one `[batch, tokens, traits]` float32 tensor per forward
    call, where `units[L]` is an `[hidden, traits]` matrix of unit vectors."""

    def __init__(self, model: torch.nn.Module, units: dict[int, torch.Tensor], stop: bool):
        super().__init__(model, list(units), lambda layer, h: h.float() @ units[layer], stop)

    def take(self, layer: int) -> torch.Tensor:
        """All calls' projections for `layer`, concatenated along tokens (generation adds a step a call)."""
        return torch.cat(super().take(layer), dim=1)


# the golden ratio's fractional part: successive multiples spread evenly over [0, 1)
_GOLDEN = 0.6180339887498949
# a natural-mode decode batch caches up to this many teacher-forced budgets of tokens (each row's prompt and
# its answer's room; its response is read in the prefill's passes and not kept): the budget is tuned for a
# forward's speed (512 tokens on a 2-core CPU), and a decode batch of that size would hold two or three
# rows, each step then reading all the weights for two or three tokens
CACHE_PASSES = 8


def _passes(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive runs of indices whose padded size (longest x count) fits `budget`, one index at least."""
    out: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if out and max(longest, n) * (len(out[-1]) + 1) <= budget:
            out[-1].append(i)
            longest = max(longest, n)
        else:
            out.append([i])
            longest = n
    return out


def truncate(prompt: list[int], response: list[int], max_tokens: int) -> tuple[list[int], list[int], bool]:
    """Fit prompt + response into `max_tokens`: cut the response's tail first, but keep at least a quarter
    of the budget for it; then cut the prompt's head (its end, the generation prompt, must stay)."""
    if len(prompt) + len(response) <= max_tokens:
        return prompt, response, False
    keep_response = min(len(response), max(max_tokens - len(prompt), max_tokens // 4))
    keep_prompt = max_tokens - keep_response
    return prompt[len(prompt) - keep_prompt :], response[:keep_response], True


# A message longer than this many characters per token of --max-tokens (plus a margin) is cut before it is
# tokenised; the bound grows while the piece holds too few tokens (text of long tokens: runs of spaces).
CHARS_PER_TOKEN = 8
CUT_MARGIN = 64  # tokens kept past the budget, so the tokens near a cut (which may differ) are never kept


def cut_text(tokenizer, text: str, max_tokens: int, keep: str) -> str:
    """`text`, or its head (`keep="head"`) or tail (`"tail"`) as far as it holds more than `max_tokens` +
    `CUT_MARGIN` tokens: truncation keeps at most `max_tokens` tokens from that end, so the ids it keeps are
    the whole text's, while a 30 MB message is never tokenised whole (~150 bytes of memory per byte)."""
    limit = CHARS_PER_TOKEN * (max_tokens + CUT_MARGIN)
    while len(text) > limit:
        piece = text[:limit] if keep == "head" else text[-limit:]
        if len(tokenizer(piece, add_special_tokens=False)["input_ids"]) > max_tokens + CUT_MARGIN:
            return piece
        limit *= 4
    return text


def tokenize(tokenizer, sample: Sample, max_tokens: int, index: int = 0) -> Tokens | Reject:
    """A sample's ids as the screen reads them: the prompt's chat template with the generation prompt, then
    the response's own tokens (no end-of-turn token), cut to `max_tokens` by `truncate`. A message far
    longer than `max_tokens` is first cut in characters (`cut_text`): the response keeps its head, each
    prompt message its tail, which is what truncation keeps of them, so the ids are the same."""
    text = _prompt_text(tokenizer, sample, max_tokens, {})
    if isinstance(text, Reject):
        return text
    try:
        prompt = text_ids(tokenizer, text)
    except Exception as e:
        return _template_failed(sample, e)
    return _with_response(
        tokenizer, sample, prompt, max_tokens, index, functools.partial(text_ids, tokenizer)
    )


def tokenize_all(tokenizer, samples: Sequence[Sample], max_tokens: int) -> list[Tokens | Reject]:
    """`tokenize` of every sample (its index: its place in `samples`), the same ids, with the prompts of a
    conversation's turns (same source file and row) tokenised together (`ConversationIds`): each turn's prompt
    holds all the messages before it, so tokenising each apart costs the square of the turns."""
    conversation_ids = ConversationIds(tokenizer)
    cuts: dict[str, str] = {}
    texts = [_prompt_text(tokenizer, s, max_tokens, cuts) for s in samples]
    conversations: dict[tuple[str, int], list[int]] = {}
    for i, (s, text) in enumerate(zip(samples, texts, strict=True)):
        if isinstance(text, str):
            conversations.setdefault((s.source_file, s.source_row), []).append(i)
    prompts: dict[int, list[int] | Reject] = {}
    for turns in conversations.values():
        try:
            got = conversation_ids([texts[i] for i in turns])  # type: ignore[misc]
        except Exception:  # each prompt apart, so the one that fails is the one rejected, as `tokenize` does
            got = []
            for i in turns:
                try:
                    got.append(text_ids(tokenizer, texts[i]))  # type: ignore[arg-type]
                except Exception as e:
                    got.append(_template_failed(samples[i], e))
        prompts.update(zip(turns, got, strict=True))
    out: list[Tokens | Reject] = []
    for i, (s, text) in enumerate(zip(samples, texts, strict=True)):
        prompt = text if isinstance(text, Reject) else prompts[i]
        if not isinstance(prompt, Reject):
            prompt = _with_response(tokenizer, s, prompt, max_tokens, i, conversation_ids.encode)
        out.append(prompt)
    return out


def _template_failed(sample: Sample, e: Exception) -> Reject:
    # templates raise on e.g. non-alternating roles; that is the sample's fault
    reason = f"prompt: chat template failed: {e}"
    return Reject(sample.source_row, sample.sample_id, reason, sample.source_file)


def _prompt_text(tokenizer, sample: Sample, max_tokens: int, cuts: dict[str, str]) -> str | Reject:
    """The prompt's chat template (`chat_text`), each message cut to its tail first (`cut_text`; `cuts`
    remembers the long messages' cuts, which every later turn's prompt repeats)."""
    messages = []
    for m in sample.prompt:
        content = m.get("content")
        if isinstance(content, str) and len(content) > CHARS_PER_TOKEN * (max_tokens + CUT_MARGIN):
            if content not in cuts:
                cuts[content] = cut_text(tokenizer, content, max_tokens, "tail")
            cut = cuts[content]
        else:
            cut = content
        messages.append(m if cut is content else m | {"content": cut})
    try:
        return chat_text(tokenizer, messages)
    except Exception as e:
        return _template_failed(sample, e)


def _with_response(
    tokenizer,
    sample: Sample,
    prompt: list[int],
    max_tokens: int,
    index: int,
    encode: Callable[[str], list[int]],
) -> Tokens | Reject:
    """The sample's `Tokens` from its prompt ids: the response's ids (`encode`: `text_ids` or the same ids
    faster; the response's head cut first: `cut_text`), then `truncate`; a reject when either has no token."""
    response = encode(cut_text(tokenizer, sample.response, max_tokens, "head"))
    if not response:
        return Reject(sample.source_row, sample.sample_id, "response: no tokens", sample.source_file)
    if not prompt:
        return Reject(sample.source_row, sample.sample_id, "prompt: no tokens", sample.source_file)
    prompt, response, cut = truncate(prompt, response, max_tokens)
    return Tokens(index, sample, prompt, response, cut)


class Scorer:
    """The one teacher-forced reader: scores batches of samples with one model and one unit vector per
    trait at each layer, and reads the mean activations that extraction turns into vectors (`means`).

    `units` is `{layer: [hidden, traits]}` float32 unit vectors (`vectors.unit_vectors`), resolved once
    by the caller; the traits' order is the order of the score arrays' last axis. `None` (extraction):
    no projections, only `means`.
    """

    def __init__(self, model, tokenizer, units: dict[int, torch.Tensor] | None, settings: ScoreSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = next(model.parameters()).device
        self.layers = tuple(settings.layers)
        if units is not None and (missing := sorted(set(self.layers) - set(units))):
            raise ValueError(f"no unit vectors for layers {missing}")
        self.units = {layer: units[layer].float().to(self.device) for layer in self.layers} if units else {}
        self.n_traits = self.units[self.layers[0]].shape[1] if self.units else 0
        self.pad_id = pad_id(tokenizer)
        _, blocks, _ = decoder_parts(model)
        run = min(max(self.layers), len(blocks))  # blocks after the early stop never run
        # useful work of a teacher-forced pass, to time batches by: 2 FLOPs a parameter a token in the blocks
        # that run, plus causal attention's 2·T²·hidden a block (scores and values, half the square each)
        self.flops_per_token = 2 * sum(p.numel() for b in blocks[:run] for p in b.parameters())
        self.attention_flops = 2 * run * model.config.hidden_size
        model_key = f"{type(model).__name__} h{model.config.hidden_size}"
        share = settings.share_prefix and not settings.compile and can_share(model)
        self.prefix = SharedPrefix(model) if share else None
        # a shared prefix makes wide batches cheaper (more rows share it), so it has batch sizes of its own
        # (a size tuned without it stayed at 512 tokens, where most rows of a chat slice run alone)
        key = machine_key(self.device, weight_dtype(model), f"{model_key} x{run}{' prefix' if share else ''}")
        gpu = self.device.type == "cuda"
        self.batch_tuner = Tuner(
            key, "batch_tokens", GPU_TOKENS if gpu else CPU_TOKENS, settings.batch_tokens
        )
        rows = GPU_GENERATE_ROWS if gpu else CPU_GENERATE_ROWS
        # decoding runs every block whatever layers are read, so the rows tuned at one layer serve all (a
        # small screen never finishes tuning them: benchmarks/RESULTS.md, "what the decode time was made of")
        gen_key = machine_key(self.device, weight_dtype(model), f"{model_key} x{len(blocks)}")
        self.generate_tuner = Tuner(gen_key, "generate_batch_size", rows, settings.generate_batch_size)
        # seconds inside model batches (teacher-forced "forward", "generate"), so a run can tell its fixed
        # overhead (start-up, reading, writing) from its model work
        self.seconds: Counter[str] = Counter()
        self._compiled: dict[int, Callable] = {}
        self.shared_prefill = settings.shared_prefill and plain_cache(model)
        self.tokenizer_lock = threading.Lock()  # `prepare` may run in a thread beside the model work
        self.stops = eos_ids(model, tokenizer)
        if settings.compile:
            # the forward only, so the hooks (and their early stop) stay outside the compiled graph
            self._compiled = {i: torch.compile(blocks[i].forward, dynamic=True) for i in range(run)}

    @contextlib.contextmanager
    def _compiled_blocks(self) -> Iterator[None]:
        """Swap in the compiled block forwards for one teacher-forced pass (generate stays eager)."""
        if not self._compiled:
            yield
            return
        _, blocks, _ = decoder_parts(self.model)
        for i, fn in self._compiled.items():
            blocks[i].forward = fn
        try:
            yield
        finally:
            for i in self._compiled:
                del blocks[i].forward  # the class's forward again

    # -- tokenisation -------------------------------------------------------------------------------

    def tokenize(self, sample: Sample, index: int = 0) -> Tokens | Reject:
        return tokenize(self.tokenizer, sample, self.settings.max_tokens, index)

    # -- teacher-forced projections -----------------------------------------------------------------

    def _teacher_forced(self, tap: LayerTap, seqs: list[list[int]], read_from: int = 0) -> int:
        """One padded forward of `seqs` (the settings' padding side) for `tap` to read, up to its deepest
        layer. Where the rows share a prefix and no position before `read_from` is read, the prefix runs
        once (`SharedPrefix`) and `tap` sees only the positions after it: returns how many it lacks."""
        side = self.settings.padding_side
        shared = self._shared(seqs, read_from, tap) if side == "right" else 0
        if shared:
            assert self.prefix is not None
            cache = self.prefix.cache(seqs[0][:shared], tap.stops_after, len(seqs))
            for read in tap.outputs.values():  # what `tap` read of a prefix run just now: not the batch's
                read.clear()
            ids, _, _ = pad([s[shared:] for s in seqs], self.pad_id, side, self.device)
            # right padding again: no mask, the cached keys first (models/prefix.py)
            with prefix_attention(self.model):
                run_until_tapped(self.model, ids, cache=cache)
            return shared
        ids, mask, positions = pad(seqs, self.pad_id, side, self.device)
        # Right padding needs no attention mask and no position ids: causal attention already keeps every
        # real token from seeing the padding after it, and real tokens sit at positions 0..n-1. Either one
        # makes transformers build a mask (position ids that stop counting at the padding read as packed
        # sequences), which costs SDPA's causal fast path: attention runs over the whole T x T square.
        masks = {"attention_mask": mask, "position_ids": positions} if side == "left" else {}
        with self._compiled_blocks():
            run_until_tapped(self.model, ids, **masks)
        return 0

    def _shared(self, seqs: list[list[int]], read_from: int, tap: LayerTap) -> int:
        """How many leading tokens of `seqs` to run once: their common prefix, up to `read_from`, where it
        is long enough to pay (`MIN_SHARED`) and the tap runs a block at least."""
        if self.prefix is None or len(seqs) < 2 or read_from < MIN_SHARED or tap.stops_after == 0:
            return 0
        shared = min(common_prefix(seqs), read_from)
        return shared if shared >= MIN_SHARED else 0

    @torch.inference_mode()
    def project_tokens(self, seqs: list[list[int]], read_from: int = 0) -> torch.Tensor:
        """`[batch, layers, tokens, traits]` projections of every position of right- or left-padded `seqs`
        (padded positions hold garbage, possibly NaN), with the padding side of the settings. Positions
        before `read_from` (of every row) may hold zeros instead: a prefix the rows share runs once."""
        with ProjectionTap(self.model, self.units, stop=True) as tap:
            shared = self._teacher_forced(tap, seqs, read_from)
            per_layer = [tap.take(layer) for layer in self.layers]  # each [B, T - shared, K]
        proj = torch.stack(per_layer, dim=1)
        if shared:
            proj = torch.cat([proj.new_zeros((*proj.shape[:2], shared, proj.shape[3])), proj], dim=2)
        return proj

    def starts(self, seqs: list[list[int]]) -> list[int]:
        """Where each sequence begins in its padded row."""
        width = max(map(len, seqs))
        return [width - len(s) if self.settings.padding_side == "left" else 0 for s in seqs]

    def project(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced `(proj_response, proj_prompt_last)`, each `[batch, layers, traits]`."""
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        spans = [[(len(p), len(r))] for p, r in zip(prompts, responses, strict=True)]
        resp, last = self.project_spans(seqs, spans)
        return np.stack([x[0] for x in resp]), np.stack([x[0] for x in last])

    def project_spans(
        self, seqs: list[list[int]], spans: list[list[tuple[int, int]]]
    ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
        """Read several (prompt length, response length) spans from each teacher-forced sequence: per
        sequence and span, `proj_response` (the mean over the span's response tokens) and
        `proj_prompt_last` (the token before them), each `[layers, traits]`."""
        read_from = min(n_prompt for sp in spans for n_prompt, _ in sp) - 1  # the first last-prompt token
        return self._read_spans(self.project_tokens(seqs, read_from), self.starts(seqs), spans)

    @staticmethod
    def _read_spans(
        proj: torch.Tensor, starts: list[int], spans: list[list[tuple[int, int]]]
    ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
        """`project_spans` from the `[B, L, T, K]` projections of padded sequences starting at `starts`."""
        width = proj.shape[2]
        # one row per span; padded positions can hold NaN (fully masked attention rows), so select,
        # never multiply by a mask
        rows = [b for b, sp in enumerate(spans) for _ in sp]
        resp = torch.zeros((len(rows), width), dtype=torch.bool, device=proj.device)
        last = torch.empty(len(rows), dtype=torch.long, device=proj.device)
        k = 0
        for b, sp in enumerate(spans):
            for n_prompt, n_response in sp:
                resp[k, starts[b] + n_prompt : starts[b] + n_prompt + n_response] = True
                last[k] = starts[b] + n_prompt - 1
                k += 1
        row_index = torch.tensor(rows, device=proj.device)
        per_row = proj[row_index]  # [R, L, T, K]
        counts = resp.sum(dim=1).to(proj.dtype)
        summed = per_row.masked_fill(~resp[:, None, :, None], 0.0).sum(dim=2)
        proj_response = (summed / counts[:, None, None]).double().cpu().numpy()
        proj_prompt_last = (
            per_row[torch.arange(len(rows), device=proj.device), :, last].double().cpu().numpy()
        )
        out_resp, out_last, k = [], [], 0
        for sp in spans:
            out_resp.append(list(proj_response[k : k + len(sp)]))
            out_last.append(list(proj_prompt_last[k : k + len(sp)]))
            k += len(sp)
        return out_resp, out_last

    @staticmethod
    def _at_last_prompt_token(
        proj: torch.Tensor, starts: list[int], prompt_lengths: list[int]
    ) -> torch.Tensor:
        """`[batch, layers, traits]`: `project_tokens`' projections at each sample's last prompt token."""
        last = torch.tensor(
            [s + n - 1 for s, n in zip(starts, prompt_lengths, strict=True)], device=proj.device
        )
        return proj[torch.arange(len(starts), device=proj.device), :, last]

    def project_prompts(self, prompts: Sequence[list[int]]) -> np.ndarray:
        """`proj_prompt_last` of prompts alone, `[batch, layers, traits]` in input order: the screen's code
        path (`project_tokens`, then the last prompt token), in length-sorted batches within the budget."""
        st = self.settings
        out = np.empty((len(prompts), len(self.layers), self.n_traits))
        for batch in self._batches(
            [len(p) for p in prompts], lambda: (self.batch_tuner.size(), st.max_batch_size), self.batch_tuner
        ):
            seqs = [list(prompts[i]) for i in batch]
            proj = self.project_tokens(seqs, min(map(len, seqs)) - 1)
            last = self._at_last_prompt_token(proj, self.starts(seqs), [len(s) for s in seqs])
            out[batch] = last.double().cpu().numpy()
        return out

    # -- mean activations (extraction) -----------------------------------------------------------------

    @torch.inference_mode()
    def means(self, prompts: Sequence[list[int]], responses: Sequence[list[int]]) -> torch.Tensor:
        """`[reads, 3, layers, hidden]` float32 on the CPU, in input order: for each (prompt, response)
        read and each layer of the settings, the mean of `hidden_states[L]` over the response tokens, the
        mean over the prompt tokens, and the state at the last prompt token (`MEANS`), read teacher-forced
        in length-sorted batches within the settings' token budget, as `score` batches."""
        st = self.settings
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
        out: list[torch.Tensor | None] = [None] * len(lengths)
        for batch in self._batches(
            lengths, lambda: (self.batch_tuner.size(), st.max_batch_size), self.batch_tuner
        ):
            budget = self.batch_tuner.size()
            with Stopwatch(self.device) as watch:
                acts = self._means_batch([prompts[i] for i in batch], [responses[i] for i in batch])
            work = sum(
                self.flops_per_token * lengths[i] + self.attention_flops * lengths[i] ** 2 for i in batch
            )
            self.batch_tuner.record(budget, work, watch.seconds)
            self.seconds["forward"] += watch.seconds
            for i, a in zip(batch, acts, strict=True):
                out[i] = a
        if not out:
            return torch.zeros((0, len(MEANS), len(self.layers), self.model.config.hidden_size))
        return torch.stack(out)  # type: ignore[arg-type]

    def _means_batch(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        starts, width = self.starts(seqs), max(map(len, seqs))
        response_w = torch.zeros((len(seqs), width), device=self.device)
        prompt_w = torch.zeros((len(seqs), width), device=self.device)
        for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            response_w[b, starts[b] + len(p) : starts[b] + len(p) + len(r)] = 1.0 / len(r)
            prompt_w[b, starts[b] : starts[b] + len(p)] = 1.0 / len(p)
        last = torch.tensor(
            [s + len(p) - 1 for s, p in zip(starts, prompts, strict=True)], device=self.device
        )
        rows = torch.arange(len(seqs), device=self.device)
        # left padding masks its positions, whose states can then be NaN: zero them, never weight them by 0
        real = (response_w + prompt_w > 0)[:, :, None] if self.settings.padding_side == "left" else None

        def reduce(_layer: int, h: torch.Tensor) -> torch.Tensor:
            h = h.float() if real is None else h.float().masked_fill(~real, 0.0)
            return torch.stack(
                [
                    torch.einsum("bt,bth->bh", response_w, h),
                    torch.einsum("bt,bth->bh", prompt_w, h),
                    h[rows, last],
                ],
                dim=1,
            )

        with LayerTap(self.model, self.layers, reduce, stop=True) as tap:
            self._teacher_forced(tap, seqs)
            per_layer = [tap.take(layer)[0] for layer in self.layers]  # each [B, 3, H]
        return torch.stack(per_layer, dim=2).cpu()

    # -- natural responses --------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_natural(self, prompts: list[list[int]], seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
        """Generate the model's own answer to each prompt, and its `[batch, layers, traits]` projections.

        Projections are taken by the hooks from the generation pass itself (no second forward pass), so
        generation runs one step past `max_new_tokens`. An empty answer gets NaN.
        """
        g = self.settings.generation
        with ProjectionTap(self.model, self.units, stop=False) as tap:
            out = generate(
                self.model,
                self.tokenizer,
                prompts,
                g.max_new_tokens,
                temperature=g.temperature,
                top_p=g.top_p,
                seed=seed,
                extra_steps=1,
            )
            proj = torch.stack([tap.take(layer) for layer in self.layers], dim=1)  # [B, L, width+G-1, K]
        result = np.full((len(prompts), len(self.layers), self.n_traits), np.nan)
        for b, answer in enumerate(out.answers):
            if answer:
                span = proj[b, :, out.width : out.width + len(answer)]
                result[b] = span.mean(dim=1).double().cpu().numpy()
        return result, out.answers

    # -- the whole batch ------------------------------------------------------------------------------

    def runtime(self) -> dict:
        """How the work is being done (not what it computes): the batch sizes and how they were chosen."""
        out = {"batch_tokens": self.batch_tuner.describe()}
        if self.settings.mode == "natural":
            out["generate_batch_size"] = self.generate_tuner.describe()
        return out

    @staticmethod
    def _batches(
        lengths: Sequence[int], limits: Callable[[], tuple[int, int]], tuner: Tuner | None = None
    ) -> Iterator[list[int]]:
        """Indices in batches of similar length, each within the (padded tokens, rows) limits that
        `limits()` gives at that moment: a tuner learns from the batches before, so consume lazily.
        Shortest first; while `tuner` is tuning, each matched pair of batches starts at the next place of
        a low-discrepancy sequence over the length order, so the sizes it compares see short and long
        samples alike, and both batches of a pair see the same."""
        remaining = sorted(range(len(lengths)), key=lengths.__getitem__)
        places, start = 0, 0
        while remaining:
            if tuner is None or tuner.done:
                start = 0
            elif not tuner.pairing:
                start = int((places * _GOLDEN) % 1.0 * len(remaining))
                places += 1
            start = min(start, len(remaining) - 1)
            (budget, max_rows), batch = limits(), [remaining.pop(start)]
            # ascending from `start`, so the newest member is the longest: padded size = length x count
            while (
                start < len(remaining)
                and len(batch) < max_rows
                and lengths[remaining[start]] * (len(batch) + 1) <= budget
            ):
                batch.append(remaining.pop(start))
            yield batch

    def prepare(self, samples: Sequence[Sample]) -> Prepared:
        """The CPU side of `score` before any model work: every sample tokenised (chat template, cut to
        `max_tokens`) and the teacher-forced passes planned. A pure function of the samples, so it may run
        in another thread while the model scores the batch before (`tokenizer_lock` keeps the tokenizer to
        one thread at a time)."""
        with self.tokenizer_lock:
            results: list[Scored | Reject | None] = [None] * len(samples)
            toks: list[Tokens] = []
            for i, t in enumerate(tokenize_all(self.tokenizer, samples, self.settings.max_tokens)):
                if isinstance(t, Reject):
                    results[i] = t
                else:
                    toks.append(t)
        st = self.settings
        natural_prefill = st.mode == "natural" and self.shared_prefill
        plan = None if natural_prefill else plan_passes(toks, st.share_passes)
        return Prepared(len(samples), results, toks, plan)

    def score(
        self,
        samples: Sequence[Sample],
        report: Callable[[int], None] | None = None,
        prepared: Prepared | None = None,
    ) -> list[Scored | Reject]:
        """Score samples (any lengths, any order); results come back in the input order. The turns of a
        conversation share teacher-forced passes where their token ids allow (`plan_passes`). `report(n)`
        is called as each batch's n samples are done. `prepared`: `prepare(samples)`, done beforehand."""
        prepared = prepared if prepared is not None else self.prepare(samples)
        if prepared.n != len(samples):
            raise ValueError(f"prepared for {prepared.n} samples, given {len(samples)}")
        results, toks, plan = list(prepared.results), prepared.toks, prepared.plan
        st = self.settings
        if plan is None:
            self._score_natural(toks, results, report)
            return results  # type: ignore[return-value]
        lengths = [len(p.ids) for p in plan.passes]
        for batch in self._batches(
            lengths, lambda: (self.batch_tuner.size(), st.max_batch_size), self.batch_tuner
        ):
            passes = [plan.passes[i] for i in batch]
            spans = [[(len(t.prompt), len(t.response)) for t in p.reads] for p in passes]
            budget = self.batch_tuner.size()
            with Stopwatch(self.device) as watch:
                resp, last = self.project_spans([p.ids for p in passes], spans)
            work = sum(
                self.flops_per_token * len(p.ids) + self.attention_flops * len(p.ids) ** 2 for p in passes
            )
            self.batch_tuner.record(budget, work, watch.seconds)
            self.seconds["forward"] += watch.seconds
            for p, p_resp, p_last in zip(passes, resp, last, strict=True):
                for t, r, lp in zip(p.reads, p_resp, p_last, strict=True):
                    path = plan.paths.get((t.sample.source_file, t.sample.source_row))
                    results[t.index] = self._result(t, r, lp, path)
            if report is not None and st.mode == "proxy":
                report(sum(len(p.reads) for p in passes))
        if st.mode == "natural":
            self._add_natural(toks, results, report)
        return results  # type: ignore[return-value]

    def natural(
        self,
        prompts: Sequence[list[int]],
        keys: Sequence[str],
        report: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, list[list[int]]]:
        """The model's own answer to each prompt and its `[batch, layers, traits]` projections (NaN for an
        empty answer), in input order, generated in length-sorted batches of tuned rows. Each batch's
        sampling seed comes from the `keys` (ids) of its contents, so it does not depend on which actor
        ran it."""
        st = self.settings
        out = np.full((len(prompts), len(self.layers), self.n_traits), np.nan)
        answers: list[list[int]] = [[] for _ in prompts]
        # the rows are what is tuned: HF generate's memory and speed depend on them, not on a token budget
        for batch in self._batches(
            [len(p) for p in prompts],
            lambda: (1 << 62, min(st.max_batch_size, self.generate_tuner.size())),
            self.generate_tuner,
        ):
            seed, size = self._seed(keys[batch[0]]), self.generate_tuner.size()
            with Stopwatch(self.device) as watch:
                if self.shared_prefill:
                    _, _, proj, got = self._prefilled([list(prompts[i]) for i in batch], None, seed)
                else:
                    proj, got = self.generate_natural([list(prompts[i]) for i in batch], seed=seed)
            self.generate_tuner.record(size, sum(map(len, got)) + len(batch), watch.seconds)
            if not self.shared_prefill:  # `_prefilled` times its parts itself
                self.seconds["generate"] += watch.seconds
            for k, i in enumerate(batch):
                out[i], answers[i] = proj[k], got[k]
            if report is not None:
                report(len(batch))
        return out, answers

    def _add_natural(self, toks: list[Tokens], results: list, report: Callable[[int], None] | None) -> None:
        proj, answers = self.natural([t.prompt for t in toks], [t.sample.sample_id for t in toks], report)
        for k, t in enumerate(toks):
            self._with_natural(results[t.index], proj[k], answers[k])

    def _with_natural(self, r: Scored | Reject, proj: np.ndarray, answer: list[int]) -> None:
        if isinstance(r, Scored):
            r.proj_natural = proj
            r.natural_tokens = len(answer)
            with self.tokenizer_lock:
                r.natural_response = self.tokenizer.decode(answer, skip_special_tokens=True)

    @staticmethod
    def _result(t: Tokens, resp: np.ndarray, last: np.ndarray, path: str | None) -> Scored | Reject:
        """A read's `Scored`, or a reject when its projections are not finite."""
        if not (np.isfinite(resp).all() and np.isfinite(last).all()):
            return Reject(
                t.sample.source_row,
                t.sample.sample_id,
                "projection is not finite (the activations overflowed the dtype)",
                t.sample.source_file,
            )
        return Scored(
            sample_id=t.sample.sample_id,
            source_row=t.sample.source_row,
            turn=t.sample.turn,
            prompt_tokens=len(t.prompt),
            response_tokens=len(t.response),
            truncated=t.truncated,
            proj_response=resp,
            proj_prompt_last=last,
            source_file=t.sample.source_file,
            extra={"path": path} if path else {},
        )

    # -- natural mode from one prefill per prompt ------------------------------------------------------

    def _seed(self, key: str) -> int:
        """A batch's sampling seed, from the id of its first member (not from which actor ran it)."""
        return self.settings.generation.seed + int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)

    def _natural_limits(self) -> tuple[int, int]:
        """(cached tokens, rows) of a decode batch: the rows tuned for generation, their prompts and the
        answers' room within `CACHE_PASSES` teacher-forced budgets (its largest candidate until it is
        chosen). The batch is prefilled in passes of one budget each (`_prefilled`): a pass holds a
        forward's activations over prompt + response, the decode batch only the prompts' key/value cache, so
        more rows fit the second."""
        rows = min(self.settings.max_batch_size, self.generate_tuner.size())
        return self._pass_tokens() * CACHE_PASSES, rows

    def _pass_tokens(self) -> int:
        tuner = self.batch_tuner
        return tuner.size() if tuner.done else max(tuner.candidates)

    def _score_natural(self, toks: list[Tokens], results: list, report: Callable[[int], None] | None) -> None:
        """Natural mode, one prefill per prompt: each batch's prompts are run once, their responses read
        teacher-forced from the cache and their answers generated from it (`_prefilled`). Every turn has a
        prompt of its own to answer, so turns are read per turn, never from a shared pass."""
        # what a row holds in the decode cache: its prompt and the answer's room (the response is read in
        # the prefill's passes, which `_prefilled` sizes by prompt + response): counting the response too
        # split 16 bench prompts into decode batches of 8, 5, 2 and 1 rows, and a 1-row batch costs nearly
        # the steps of an 8-row one (benchmarks/RESULTS.md, "Natural ΔP", 2026-12-03)
        room = self.settings.generation.max_new_tokens
        lengths = [len(t.prompt) + room for t in toks]
        for batch in self._batches(lengths, self._natural_limits, self.generate_tuner):
            ts = [toks[i] for i in batch]
            size = self.generate_tuner.size()
            with Stopwatch(self.device) as watch:
                last, resp, natural, answers = self._prefilled(
                    [t.prompt for t in ts], [t.response for t in ts], self._seed(ts[0].sample.sample_id)
                )
            self.generate_tuner.record(size, sum(map(len, answers)) + len(batch), watch.seconds)
            for k, t in enumerate(ts):
                results[t.index] = self._result(t, resp[k], last[k], None)
                self._with_natural(results[t.index], natural[k], answers[k])
            if report is not None:
                report(len(batch))

    @torch.inference_mode()
    def _prefilled(
        self, prompts: list[list[int]], responses: list[list[int]] | None, seed: int
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray, list[list[int]]]:
        """One decode batch, prefilled in passes of one teacher-forced budget (merged for the decoding):
        `proj_prompt_last` and `proj_response` of `responses` (both None without them), read teacher-forced
        in the prefill's own pass (prompt + response, right-padded, up to the deepest layer needed), and the
        natural answers' projections, each `[batch, layers, traits]` (NaN for an empty answer), and the
        answers' ids. Times the prefill with the read ("prefill") and
        the decoding ("generate") apart."""
        units, layers, g = self.units, self.layers, self.settings.generation
        taps: list[ProjectionTap] = []

        def tap() -> ProjectionTap:
            taps.append(ProjectionTap(self.model, units, stop=True))
            return taps[0]

        last = resp = None
        with Stopwatch(self.device) as watch:
            seqs = prompts if responses is None else [p + r for p, r in zip(prompts, responses, strict=True)]
            states, lasts, resps = [], [], []
            for part in _passes([len(x) for x in seqs], self._pass_tokens()):
                taps.clear()
                states.append(
                    prefill(
                        self.model,
                        [seqs[i] for i in part],
                        [len(prompts[i]) for i in part],
                        self.pad_id,
                        g.max_new_tokens,
                        None if responses is None else tap,
                    )
                )
                if responses is not None:
                    proj = torch.stack([taps[0].take(layer) for layer in layers], dim=1)  # [B, L, T, K]
                    spans = [[(len(prompts[i]), len(responses[i]))] for i in part]
                    got_resp, got_last = self._read_spans(proj, [0] * len(part), spans)
                    resps += [x[0] for x in got_resp]
                    lasts += [x[0] for x in got_last]
            state = merge(states)
            if responses is not None:
                resp, last = np.stack(resps), np.stack(lasts)
        self.seconds["prefill"] += watch.seconds

        def at_last(layer: int, h: torch.Tensor) -> torch.Tensor:
            return h[:, -1].float() @ units[layer]

        sums = torch.zeros((len(prompts), len(layers), self.n_traits), device=self.device)
        with Stopwatch(self.device) as watch, LayerTap(self.model, layers, at_last) as answer_tap:

            def add(rows: torch.Tensor) -> None:
                sums[rows] += torch.stack([answer_tap.take(layer)[0] for layer in layers], dim=1)

            answers = decode(self.model, state, self.stops, g.max_new_tokens, self._pick(seed), add)
        self.seconds["generate"] += watch.seconds
        counts = torch.tensor([len(a) for a in answers], device=self.device, dtype=sums.dtype)
        natural = (sums / counts[:, None, None]).double().cpu().numpy()
        natural[(counts == 0).cpu().numpy()] = np.nan
        return last, resp, natural, answers

    def _pick(self, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
        g = self.settings.generation
        return picker(g.temperature, g.top_p, seed, self.device)
