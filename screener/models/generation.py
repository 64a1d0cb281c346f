"""Batched generation that cuts each answer at its first end-of-turn token: HF `generate` (`generate`), or
one prefill per prompt whose KV cache serves both a teacher-forced read and a decode loop that drops
finished rows (`prefill`, `read`, `decode`)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from screener.models.chat import eos_ids, pad, pad_id
from screener.models.hooks import StopForward, decoder_parts


@dataclass(frozen=True)
class Generated:
    """What `generate` produced: the prompts' padded width and each answer's ids, cut before its first
    end-of-turn token (which is not part of a response, as for dataset responses)."""

    width: int
    answers: list[list[int]]


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    extra_steps: int = 0,
) -> Generated:
    """Batched generation with left padding (greedy unless `temperature` > 0, then seeded sampling).

    `extra_steps` runs the model that many steps past `max_new_tokens` (answers stay cut at
    `max_new_tokens`): the hidden state of a generated token is only computed when it is fed back, so a
    tap that reads the answer's states needs one more step.
    """
    device = next(model.parameters()).device
    pad_token = pad_id(tokenizer)
    ids, mask, _ = pad(prompts, pad_token, "left", device)
    stops = eos_ids(model, tokenizer)
    kwargs: dict = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens + extra_steps,
        pad_token_id=pad_token,
        eos_token_id=stops,
        **kwargs,
    )
    width = ids.shape[1]
    answers = []
    for tokens in out[:, width:].tolist():
        n = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
        answers.append(tokens[: min(n, max_new_tokens)])
    return Generated(width, answers)


# -- one prefill, then a teacher-forced read and generation from its cache ----------------------------------


@dataclass
class Prefill:
    """Prompts run once through every block with a KV cache (left-padded, so generation appends at one
    width): the cache, its attention mask `[rows, slots]`, each row's next position, and the logits at
    each row's last prompt token. `read` and `decode` continue from it."""

    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor


def _cache_kw(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: `cache` since transformers 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def plain_cache(model) -> bool:
    """Whether the model's KV cache is one growing tensor a layer (no sliding window or linear attention):
    what `read` restores and `decode` selects rows of."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def prefill(model, prompts: Sequence[list[int]], pad_token: int) -> Prefill:
    """One forward of the left-padded `prompts` through every block, keeping the cache and the last logits."""
    device = next(model.parameters()).device
    ids, mask, positions = pad(prompts, pad_token, "left", device)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{_cache_kw(model): cache},
    )
    return Prefill(cache, mask, mask.sum(dim=1), out.logits[:, -1].float())


def read(model, state: Prefill, seqs: Sequence[list[int]], pad_token: int) -> None:
    """Teacher-force `seqs` (one a row, right-padded) after each row's cached prompt, for hooks to read
    (a stopping `LayerTap` ends it after its deepest layer); the cache is left as it was. The tensors of
    the cache's layers are only ever replaced by longer ones (`DynamicLayer.update` concatenates), so
    putting the old ones back undoes the read exactly, in the layers it reached and the ones it did not."""
    ids, mask, _ = pad(seqs, pad_token, "right", state.mask.device)
    positions = state.positions[:, None] + torch.arange(ids.shape[1], device=ids.device)[None]
    saved = [(layer.keys, layer.values) for layer in state.cache.layers]
    try:
        with contextlib.suppress(StopForward):
            base = decoder_parts(model)[0]
            base(
                input_ids=ids,
                attention_mask=torch.cat([state.mask, mask], dim=1),
                position_ids=positions,
                use_cache=True,
                **{_cache_kw(base): state.cache},
            )
    finally:
        for layer, (k, v) in zip(state.cache.layers, saved, strict=True):
            layer.keys, layer.values = k, v


def decode(
    model,
    state: Prefill,
    stops: Sequence[int],
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Generate from a prefill, one token a step for every row still going: each row's answer ends before
    its first token in `stops` or at `max_new_tokens`. A row leaves the batch (and its cache rows go) as
    soon as it ends, so no step computes a finished row.

    Every answer token is fed back once, the last one too: its hidden states are only computed then, and
    `on_step(rows)` is called after each such step with the original indices of the rows it ran, for hooks
    that read those states. `pick(logits)` turns `[rows, vocab]` logits into the next ids (greedy or
    sampled)."""
    rows = torch.arange(state.logits.shape[0], device=state.logits.device)
    answers: list[list[int]] = [[] for _ in range(len(rows))]
    stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=rows.device)
    cache, mask, positions, logits = state.cache, state.mask, state.positions, state.logits
    kw = _cache_kw(model)
    for _ in range(max_new_tokens):
        nxt = pick(logits)
        going = ~torch.isin(nxt, stop_ids)
        if not going.all():
            keep = going.nonzero().squeeze(1)
            if not len(keep):
                break
            cache.batch_select_indices(keep)
            rows, nxt, mask, positions = rows[keep], nxt[keep], mask[keep], positions[keep]
        for r, t in zip(rows.tolist(), nxt.tolist(), strict=True):
            answers[r].append(t)
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            use_cache=True,
            **{kw: cache},
        )
        if on_step is not None:
            on_step(rows)
        positions, logits = positions + 1, out.logits[:, -1].float()
    return answers


def picker(temperature: float, top_p: float, seed: int, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Greedy ids, or with `temperature` > 0 ids sampled (seeded) after HF's temperature and top-p warpers."""
    if temperature <= 0:
        return lambda logits: logits.argmax(dim=-1)
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
    gen = torch.Generator(device=device).manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        for w in warpers:
            logits = w(None, logits)
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)

    return pick
