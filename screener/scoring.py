"""The math: projections of response activations onto persona vectors, in batches, with an early stop.

For each sample and layer L (the `hidden_states[L]` convention of records.py) and unit vector v̂:
    proj_response    = mean over response tokens of h_L · v̂
    proj_prompt_last = h_L[last prompt token] · v̂
    delta_p_proxy    = proj_response - proj_prompt_last          (computed in the store)
In natural mode the base model also answers the prompt itself; `proj_natural` is the mean of h_L · v̂ over
that answer's tokens, collected by hooks while it is generated (no second forward pass).

Hidden states are read with hooks on the decoder blocks, so the forward pass stops after the deepest
layer needed and never runs the LM head. Only `[batch, tokens, traits]` projections leave the hooks.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from screener.models import LayerTap, chat_ids, decoder_parts, generate, pad, pad_id, run_until_tapped
from screener.records import MODES, Reject, Sample, Scored


@dataclass(frozen=True)
class GenerationSettings:
    """How the natural response is generated (greedy unless temperature > 0)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class ScoreSettings:
    layers: tuple[int, ...]
    mode: str = "proxy"  # "proxy" | "natural"
    max_tokens: int = 2048  # prompt + response; longer samples are truncated and flagged
    batch_tokens: int = 16384  # padded tokens per forward batch
    max_batch_size: int = 64
    # HF generate's memory grows faster than its batch (measured on CPU, bf16, 64 new tokens: +0.5 GB at
    # 16 rows, +2.6 GB at 48) while throughput is flat past 16, so generation batches are capped apart
    generate_batch_size: int = 16
    padding_side: str = "right"  # results must not depend on it (tested)
    # torch.compile the decoder blocks of the teacher-forced pass: fuses the memory-bound norms, RoPE and
    # SiLU that take over half of a bf16 CPU forward (measured 1.2-1.6x), for a one-off compile per process
    compile: bool = False
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {self.padding_side!r}")

    @classmethod
    def for_device(cls, gpu: bool, **overrides) -> ScoreSettings:
        """Defaults sized for a GPU or a CPU; `None` overrides are ignored."""
        sized = (
            {"batch_tokens": 65536, "max_batch_size": 256, "generate_batch_size": 128}
            if gpu
            else {"batch_tokens": 8192, "max_batch_size": 64, "generate_batch_size": 16}
        )
        return cls(**{**sized, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass(slots=True)
class Tokens:
    """A sample's prompt and response ids as scored (cut to `max_tokens` when `truncated`)."""

    index: int  # position in the caller's list
    sample: Sample
    prompt: list[int]
    response: list[int]
    truncated: bool


class ProjectionTap(LayerTap):
    """A `LayerTap` that keeps `h · units[L]`: one `[batch, tokens, traits]` float32 tensor per forward
    call, where `units[L]` is an `[hidden, traits]` matrix of unit vectors."""

    def __init__(self, model: torch.nn.Module, units: dict[int, torch.Tensor], stop: bool):
        super().__init__(model, list(units), lambda layer, h: h.float() @ units[layer], stop)

    def take(self, layer: int) -> torch.Tensor:
        """All calls' projections for `layer`, concatenated along tokens (generation adds a step a call)."""
        return torch.cat(super().take(layer), dim=1)


def length_batches(lengths: Sequence[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size stays within `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # sorted ascending, so the newest member is the longest: padded size = len * count
        if current and (len(current) >= max_batch_size or lengths[i] * (len(current) + 1) > batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def truncate(prompt: list[int], response: list[int], max_tokens: int) -> tuple[list[int], list[int], bool]:
    """Fit prompt + response into `max_tokens`: cut the response's tail first, but keep at least a quarter
    of the budget for it; then cut the prompt's head (its end, the generation prompt, must stay)."""
    if len(prompt) + len(response) <= max_tokens:
        return prompt, response, False
    keep_response = min(len(response), max(max_tokens - len(prompt), max_tokens // 4))
    keep_prompt = max_tokens - keep_response
    return prompt[len(prompt) - keep_prompt :], response[:keep_response], True


class Scorer:
    """Scores batches of samples with one model and one unit vector per trait at each layer.

    `units` is `{layer: [hidden, traits]}` float32 unit vectors (`vectors.unit_vectors`), resolved once
    by the caller; the traits' order is the order of the score arrays' last axis.
    """

    def __init__(self, model, tokenizer, units: dict[int, torch.Tensor], settings: ScoreSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = next(model.parameters()).device
        self.layers = tuple(settings.layers)
        if missing := sorted(set(self.layers) - set(units)):
            raise ValueError(f"no unit vectors for layers {missing}")
        self.units = {layer: units[layer].float().to(self.device) for layer in self.layers}
        self.n_traits = self.units[self.layers[0]].shape[1]
        self.pad_id = pad_id(tokenizer)
        self._compiled: dict[int, Callable] = {}
        if settings.compile:
            _, blocks, _ = decoder_parts(model)
            run = min(max(self.layers), len(blocks))  # blocks after the early stop never run
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
        try:
            prompt = chat_ids(self.tokenizer, sample.prompt)
        except Exception as e:  # templates raise on e.g. non-alternating roles; that is the sample's fault
            return Reject(
                sample.source_row, sample.sample_id, f"prompt: chat template failed: {e}", sample.source_file
            )
        response = self.tokenizer(sample.response, add_special_tokens=False)["input_ids"]
        if not response:
            return Reject(sample.source_row, sample.sample_id, "response: no tokens", sample.source_file)
        prompt, response, cut = truncate(prompt, response, self.settings.max_tokens)
        return Tokens(index, sample, prompt, response, cut)

    # -- teacher-forced projections -----------------------------------------------------------------

    @torch.inference_mode()
    def project_tokens(self, seqs: list[list[int]]) -> torch.Tensor:
        """`[batch, layers, tokens, traits]` projections of every position of right- or left-padded `seqs`
        (padded positions hold garbage, possibly NaN), with the padding side of the settings."""
        side = self.settings.padding_side
        ids, mask, positions = pad(seqs, self.pad_id, side, self.device)
        # Right padding needs no attention mask and no position ids: causal attention already keeps every
        # real token from seeing the padding after it, and real tokens sit at positions 0..n-1. Either one
        # makes transformers build a mask (position ids that stop counting at the padding read as packed
        # sequences), which costs SDPA's causal fast path: attention runs over the whole T x T square.
        masks = {"attention_mask": mask, "position_ids": positions} if side == "left" else {}
        with ProjectionTap(self.model, self.units, stop=True) as tap, self._compiled_blocks():
            run_until_tapped(self.model, ids, **masks)
            per_layer = [tap.take(layer) for layer in self.layers]  # each [B, T, K]
        return torch.stack(per_layer, dim=1)

    def starts(self, seqs: list[list[int]]) -> list[int]:
        """Where each sequence begins in its padded row."""
        width = max(map(len, seqs))
        return [width - len(s) if self.settings.padding_side == "left" else 0 for s in seqs]

    def project(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced `(proj_response, proj_prompt_last)`, each `[batch, layers, traits]`."""
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        proj = self.project_tokens(seqs)  # [B, L, T, K]
        starts = self.starts(seqs)
        # padded positions can hold NaN (fully masked attention rows), so select, never multiply by a mask
        resp = torch.zeros((len(seqs), proj.shape[2]), dtype=torch.bool, device=proj.device)
        for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            resp[b, starts[b] + len(p) : starts[b] + len(p) + len(r)] = True
        counts = resp.sum(dim=1).to(proj.dtype)
        summed = proj.masked_fill(~resp[:, None, :, None], 0.0).sum(dim=2)
        proj_response = summed / counts[:, None, None]
        proj_prompt_last = self._at_last_prompt_token(proj, starts, [len(p) for p in prompts])
        return proj_response.double().cpu().numpy(), proj_prompt_last.double().cpu().numpy()

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
        for batch in length_batches([len(p) for p in prompts], st.batch_tokens, st.max_batch_size):
            seqs = [list(prompts[i]) for i in batch]
            proj = self.project_tokens(seqs)
            last = self._at_last_prompt_token(proj, self.starts(seqs), [len(s) for s in seqs])
            out[batch] = last.double().cpu().numpy()
        return out

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

    def score(self, samples: Sequence[Sample]) -> list[Scored | Reject]:
        """Score samples (any lengths, any order); results come back in the input order."""
        results: list[Scored | Reject | None] = [None] * len(samples)
        toks: list[Tokens] = []
        for i, s in enumerate(samples):
            t = self.tokenize(s, i)
            if isinstance(t, Reject):
                results[i] = t
            else:
                toks.append(t)
        st = self.settings
        lengths = [len(t.prompt) + len(t.response) for t in toks]
        for batch in length_batches(lengths, st.batch_tokens, st.max_batch_size):
            items = [toks[i] for i in batch]
            resp, last = self.project([t.prompt for t in items], [t.response for t in items])
            for k, t in enumerate(items):
                results[t.index] = Scored(
                    sample_id=t.sample.sample_id,
                    source_row=t.sample.source_row,
                    turn=t.sample.turn,
                    prompt_tokens=len(t.prompt),
                    response_tokens=len(t.response),
                    truncated=t.truncated,
                    proj_response=resp[k],
                    proj_prompt_last=last[k],
                    source_file=t.sample.source_file,
                )
        if st.mode == "natural":
            self._add_natural(toks, results)
        return results  # type: ignore[return-value]

    def natural(
        self, prompts: Sequence[list[int]], keys: Sequence[str]
    ) -> tuple[np.ndarray, list[list[int]]]:
        """The model's own answer to each prompt and its `[batch, layers, traits]` projections (NaN for an
        empty answer), in input order, generated in length-sorted batches. Each batch's sampling seed comes
        from the `keys` (ids) of its contents, so it does not depend on which actor ran it."""
        st = self.settings
        out = np.full((len(prompts), len(self.layers), self.n_traits), np.nan)
        answers: list[list[int]] = [[] for _ in prompts]
        budget = [len(p) + st.generation.max_new_tokens + 1 for p in prompts]
        for batch in length_batches(budget, st.batch_tokens, min(st.max_batch_size, st.generate_batch_size)):
            seed = st.generation.seed + int(hashlib.sha256(keys[batch[0]].encode()).hexdigest()[:8], 16)
            proj, got = self.generate_natural([list(prompts[i]) for i in batch], seed=seed)
            for k, i in enumerate(batch):
                out[i], answers[i] = proj[k], got[k]
        return out, answers

    def _add_natural(self, toks: list[Tokens], results: list) -> None:
        proj, answers = self.natural([t.prompt for t in toks], [t.sample.sample_id for t in toks])
        for k, t in enumerate(toks):
            r: Scored = results[t.index]
            r.proj_natural = proj[k]
            r.natural_tokens = len(answers[k])
            r.natural_response = self.tokenizer.decode(answers[k], skip_special_tokens=True)
