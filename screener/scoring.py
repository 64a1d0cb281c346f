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

from screener.records import Reject, Sample, Scored


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
class _Tokens:
    index: int  # position in the caller's list
    sample: Sample
    prompt: list[int]
    response: list[int]
    truncated: bool


class _StopForward(Exception):
    """Raised by the hook on the deepest layer needed: nothing after it is computed."""


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList, torch.nn.Module]:
    """(base model without LM head, its decoder blocks, its final norm) for common HF architectures."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    blocks = next((getattr(base, a) for a in ("layers", "h", "blocks") if hasattr(base, a)), None)
    norm = next((getattr(base, a) for a in ("norm", "ln_f", "final_layernorm") if hasattr(base, a)), None)
    if blocks is None or norm is None:
        raise TypeError(f"cannot find decoder blocks and final norm in {type(model).__name__}")
    return base, blocks, norm


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class LayerTap:
    """Hooks that project `hidden_states[L]` onto unit vectors, for every layer L in `units`.

    `units[L]` is an `[hidden, traits]` float32 matrix. Each forward call appends one
    `[batch, tokens, traits]` tensor per layer to `self.outputs[L]`.
    """

    def __init__(self, model: torch.nn.Module, units: dict[int, torch.Tensor], stop: bool):
        _, blocks, norm = decoder_parts(model)
        self.outputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in units}
        self._handles = []
        deepest = max(units)
        n = len(blocks)
        for layer, u in units.items():
            last = stop and layer == deepest and layer < n

            def keep(h: torch.Tensor, layer: int = layer, u: torch.Tensor = u, last: bool = last) -> None:
                self.outputs[layer].append(h.float() @ u)
                if last:
                    raise _StopForward

            if layer == 0:  # the input of block 1 is hidden_states[0], whatever the embedding does
                hook = blocks[0].register_forward_pre_hook(
                    lambda _m, args, kwargs, keep=keep: keep(args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True,
                )
            elif layer < n:
                hook = blocks[layer - 1].register_forward_hook(
                    lambda _m, _a, out, keep=keep: keep(_hidden(out))
                )
            else:  # transformers returns the final norm's output as hidden_states[num_layers]
                hook = norm.register_forward_hook(lambda _m, _a, out, keep=keep: keep(_hidden(out)))
            self._handles.append(hook)

    def take(self, layer: int) -> torch.Tensor:
        """All calls' projections for `layer`, concatenated along tokens, then forgotten."""
        out = torch.cat(self.outputs[layer], dim=1)
        self.outputs[layer] = []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> LayerTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def unit_vectors(
    vectors: Sequence[torch.Tensor], layers: Sequence[int], device: torch.device
) -> dict[int, torch.Tensor]:
    """`{L: [hidden, traits]}` float32 unit vectors from `[num_layers+1, hidden]` vector files."""
    units = {}
    for layer in layers:
        rows = torch.stack([v[layer].float() for v in vectors], dim=1)
        norms = rows.norm(dim=0, keepdim=True)
        if bool((norms == 0).any()):
            raise ValueError(f"a persona vector is zero at layer {layer}; it has no direction to project on")
        units[layer] = (rows / norms).to(device)
    return units


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
    """Scores batches of samples with one model and a set of persona vectors (one per trait)."""

    def __init__(self, model, tokenizer, vectors: Sequence[torch.Tensor], settings: ScoreSettings):
        if settings.mode not in ("proxy", "natural"):
            raise ValueError(f"mode must be 'proxy' or 'natural', not {settings.mode!r}")
        if settings.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {settings.padding_side!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = next(model.parameters()).device
        self.layers = tuple(settings.layers)
        self.units = unit_vectors(vectors, self.layers, self.device)
        self.n_traits = len(vectors)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = sorted({*(e for e in eos if e is not None), tokenizer.eos_token_id} - {None})
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

    def tokenize(self, sample: Sample, index: int = 0) -> _Tokens | Reject:
        try:
            text = self.tokenizer.apply_chat_template(
                sample.prompt, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # templates raise on e.g. non-alternating roles; that is the sample's fault
            return Reject(
                sample.source_row, sample.sample_id, f"prompt: chat template failed: {e}", sample.source_file
            )
        prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        response = self.tokenizer(sample.response, add_special_tokens=False)["input_ids"]
        if not response:
            return Reject(sample.source_row, sample.sample_id, "response: no tokens", sample.source_file)
        prompt, response, cut = truncate(prompt, response, self.settings.max_tokens)
        return _Tokens(index, sample, prompt, response, cut)

    # -- teacher-forced projections -----------------------------------------------------------------

    def _pad(self, seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[b, sl] = torch.tensor(s, dtype=torch.long)
            mask[b, sl] = 1
        # positions count real tokens only, so left padding does not shift them
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    @torch.inference_mode()
    def project(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced `(proj_response, proj_prompt_last)`, each `[batch, layers, traits]`."""
        side = self.settings.padding_side
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        ids, mask, positions = self._pad(seqs, side)
        width = ids.shape[1]
        starts = [width - len(s) if side == "left" else 0 for s in seqs]
        base, _, _ = decoder_parts(self.model)
        # Right padding needs no attention mask and no position ids: causal attention already keeps every
        # real token from seeing the padding after it, and real tokens sit at positions 0..n-1. Either one
        # makes transformers build a mask (position ids that stop counting at the padding read as packed
        # sequences), which costs SDPA's causal fast path: attention runs over the whole T x T square.
        masks = {"attention_mask": mask, "position_ids": positions} if side == "left" else {}
        with LayerTap(self.model, self.units, stop=True) as tap, self._compiled_blocks():
            with contextlib.suppress(_StopForward):
                base(input_ids=ids, use_cache=False, **masks)
            per_layer = [tap.take(layer) for layer in self.layers]  # each [B, T, K]
        proj = torch.stack(per_layer, dim=1)  # [B, L, T, K]
        # padded positions can hold NaN (fully masked attention rows), so select, never multiply by a mask
        resp = torch.zeros((len(seqs), width), dtype=torch.bool, device=proj.device)
        last = torch.empty(len(seqs), dtype=torch.long, device=proj.device)
        for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            resp[b, starts[b] + len(p) : starts[b] + len(p) + len(r)] = True
            last[b] = starts[b] + len(p) - 1
        counts = resp.sum(dim=1).to(proj.dtype)
        summed = proj.masked_fill(~resp[:, None, :, None], 0.0).sum(dim=2)
        proj_response = summed / counts[:, None, None]
        proj_prompt_last = proj[torch.arange(len(seqs), device=proj.device), :, last]
        return proj_response.double().cpu().numpy(), proj_prompt_last.double().cpu().numpy()

    # -- natural responses --------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_natural(self, prompts: list[list[int]], seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
        """Generate the model's own answer to each prompt, and its `[batch, layers, traits]` projections.

        Projections are taken by the hooks from the generation pass itself. The hidden state of a
        generated token is only computed when that token is fed back, so generation runs one step past
        `max_new_tokens`; the answer stops before its first end-of-turn token (which is not part of a
        response, as for dataset responses). An empty answer gets NaN.
        """
        g = self.settings.generation
        ids, mask, _ = self._pad(prompts, "left")  # generate needs the prompts to end together
        width = ids.shape[1]
        kwargs: dict = {"max_new_tokens": g.max_new_tokens + 1, "do_sample": g.temperature > 0}
        if g.temperature > 0:
            kwargs.update(temperature=g.temperature, top_p=g.top_p, top_k=0)
            torch.manual_seed(seed)
        with LayerTap(self.model, self.units, stop=False) as tap:
            seqs = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                **kwargs,
            )
            per_layer = [tap.take(layer) for layer in self.layers]  # each [B, width + G - 1, K]
        gen = seqs[:, width:].tolist()
        proj = torch.stack(per_layer, dim=1)
        out = np.full((len(prompts), len(self.layers), self.n_traits), np.nan)
        answers = []
        for b, tokens in enumerate(gen):
            n = next((i for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
            n = min(n, g.max_new_tokens)
            answers.append(tokens[:n])
            if n:
                out[b] = proj[b, :, width : width + n].mean(dim=1).double().cpu().numpy()
        return out, answers

    # -- the whole batch ------------------------------------------------------------------------------

    def score(self, samples: Sequence[Sample]) -> list[Scored | Reject]:
        """Score samples (any lengths, any order); results come back in the input order."""
        results: list[Scored | Reject | None] = [None] * len(samples)
        toks: list[_Tokens] = []
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

    def _add_natural(self, toks: list[_Tokens], results: list) -> None:
        st = self.settings
        budget = [len(t.prompt) + st.generation.max_new_tokens + 1 for t in toks]
        for batch in length_batches(budget, st.batch_tokens, min(st.max_batch_size, st.generate_batch_size)):
            items = [toks[i] for i in batch]
            # seed from the batch's contents, so sampling does not depend on which actor ran it
            seed = st.generation.seed + int(
                hashlib.sha256(items[0].sample.sample_id.encode()).hexdigest()[:8], 16
            )
            proj, answers = self.generate_natural([t.prompt for t in items], seed=seed)
            for k, t in enumerate(items):
                r: Scored = results[t.index]
                r.proj_natural = proj[k]
                r.natural_tokens = len(answers[k])
                r.natural_response = self.tokenizer.decode(answers[k], skip_special_tokens=True)
