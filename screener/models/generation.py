"""Batched generation that cuts each answer at its first end-of-turn token: HF `generate` (`generate`), or
one prefill per prompt, which can read tokens after the prompt teacher-forced in the same pass, and whose
KV cache a decode loop writes in place while it drops finished rows (`prefill`, `merge`, `decode`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from screener.models.chat import eos_ids, pad, pad_id
from screener.models.hooks import (
    LayerTap,
    StopForward,
    block_output,
    cache_kw,
    decoder_parts,
    with_block_output,
)


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


class BufferedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers allocated once with room for the whole answer:
    each step writes its token in place instead of concatenating a copy of the whole cache (what
    `DynamicLayer.update` does every step, for every layer). `keys` / `values` are views of the filled part,
    so the masks transformers builds see a plain growing cache."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self._k, self._v, self.device, self.is_initialized = keys, values, keys.device, True
        self._view(length)

    def _view(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self._view(end)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._view(self.length)


@dataclass
class Prefill:
    """Prompts run once through every block, their caches left-aligned (each prompt ends in the same column,
    so generation appends one column for every row) in buffers with room for `room` more tokens: the cache,
    its attention mask buffer `[rows, slots]` with `width` columns filled, each row's next position, and the
    logits at each row's last prompt token. `decode` continues from it."""

    cache: DynamicCache
    mask: torch.Tensor
    width: int
    positions: torch.Tensor
    logits: torch.Tensor


def plain_cache(model) -> bool:
    """Whether the model's KV cache is one growing tensor a layer (no sliding window or linear attention):
    what `prefill` left-aligns and `decode` writes into and selects rows of."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


@contextlib.contextmanager
def _skipped(blocks: torch.nn.ModuleList, first: torch.Tensor, like: torch.Tensor | tuple) -> Iterator[None]:
    """Blocks `blocks` replaced for one forward: the first returns `first` (the last one's output, computed
    before), the others pass their input on, each wrapped as a block's output `like` is."""
    for i, block in enumerate(blocks):
        block.forward = (
            (lambda *_a, **_k: with_block_output(like, first))
            if i == 0
            else (lambda *a, **k: with_block_output(like, a[0] if a else k["hidden_states"]))
        )
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the class's forward again


def prefill(
    model,
    seqs: Sequence[list[int]],
    prompt_lengths: Sequence[int],
    pad_token: int,
    room: int,
    tap: Callable[[], LayerTap] | None = None,
) -> Prefill:
    """Each of `seqs` (a prompt, its first `prompt_lengths[b]` ids, then any tokens to read teacher-forced
    after it) run once, right-padded with no attention mask, so attention keeps SDPA's causal fast path and
    every position gets exactly the states a pass of its own would. The `LayerTap` that `tap()` opens
    reads that pass; where it stops early (after block S), blocks S.. then run over the prompts alone, from
    block S's output at their positions (blocks ..S are skipped: their cache is already there). The prompts'
    caches are then left-aligned into `BufferedLayer`s with `room` free slots."""
    device = next(model.parameters()).device
    base, blocks, norm = decoder_parts(model)
    kw, n = cache_kw(base), len(blocks)
    ids, _, _ = pad(seqs, pad_token, "right", device)
    lengths = torch.tensor(list(prompt_lengths), device=device)
    rows, width = torch.arange(len(seqs), device=device), int(lengths.max())
    cache, held = DynamicCache(config=model.config), {}
    opened = tap() if tap is not None else None
    split = opened.stops_after if opened is not None else n

    def keep(_m, _a, out) -> None:
        h = block_output(out)
        held["top"], held["like"] = (h[:, :width], out) if split < n else (h[rows, lengths - 1], None)

    # prepended: it must see block S's output before the tap's hook there ends the forward
    at = norm if split == n else blocks[split - 1]
    hook = at.register_forward_hook(keep, prepend=True) if split else None
    try:
        with contextlib.ExitStack() as stack:
            if opened is not None:
                stack.enter_context(opened)
            stack.enter_context(contextlib.suppress(StopForward))
            base(input_ids=ids, use_cache=True, **{kw: cache})
    finally:
        if hook is not None:
            hook.remove()
    if split < n:
        upper = DynamicCache(config=model.config)
        skip = _skipped(blocks[:split], held["top"], held["like"]) if split else contextlib.nullcontext()
        with skip:
            out = base(input_ids=ids[:, :width], use_cache=True, **{kw: upper})
        cache.layers[split:] = upper.layers[split:]
        final = out.last_hidden_state[rows, lengths - 1]
    else:
        final = held["top"]
    logits = model.get_output_embeddings()(final).float()
    # left-align: row b's prompt moves right by width - length[b]; the slots before it repeat its first
    # token's keys (masked, but finite: a masked NaN would still poison the attention's sum)
    shift = (torch.arange(width, device=device)[None] - (width - lengths)[:, None]).clamp(min=0)
    layers = []
    for layer in cache.layers:
        k, v = layer.keys[:, :, :width], layer.values[:, :, :width]
        index = shift[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        kb = k.new_empty((*k.shape[:2], width + room, k.shape[3]))
        vb = v.new_empty((*v.shape[:2], width + room, v.shape[3]))
        torch.gather(k, 2, index, out=kb[:, :, :width])
        torch.gather(v, 2, index.expand(-1, -1, -1, v.shape[3]), out=vb[:, :, :width])
        layers.append(BufferedLayer(kb, vb, width))
    cache.layers = layers
    mask = torch.zeros((len(seqs), width + room), dtype=torch.long, device=device)
    mask[:, :width] = torch.arange(width, device=device)[None] >= (width - lengths)[:, None]
    return Prefill(cache, mask, width, lengths.clone(), logits)


def merge(states: Sequence[Prefill]) -> Prefill:
    """Prefills of several passes as one decode batch, rows in order: each pass's cache and mask shifted
    right to the widest pass's width (left-aligned, as within a pass; the new slots before a row repeat its
    first column, masked but finite). A prefill pass is sized for a forward's activations, a decode batch
    for its cache: far more rows fit the second."""
    if len(states) == 1:
        return states[0]
    rooms = {s.mask.shape[1] - s.width for s in states}
    if len(rooms) != 1:
        raise ValueError(f"prefills with different room to merge: {sorted(rooms)}")
    room, width = rooms.pop(), max(s.width for s in states)
    starts = [0]
    for s in states:
        starts.append(starts[-1] + s.mask.shape[0])
    layers = []
    for i, first in enumerate(states[0].cache.layers):
        kb = first.keys.new_empty((starts[-1], first.keys.shape[1], width + room, first.keys.shape[3]))
        vb = first.values.new_empty((starts[-1], first.values.shape[1], width + room, first.values.shape[3]))
        for s, a, b in zip(states, starts, starts[1:], strict=False):
            layer, pad = s.cache.layers[i], width - s.width
            for buf, part in ((kb, layer.keys), (vb, layer.values)):
                buf[a:b, :, pad:width] = part
                buf[a:b, :, :pad] = part[:, :, :1]
        layers.append(BufferedLayer(kb, vb, width))
    cache = states[0].cache
    cache.layers = layers
    mask = states[0].mask.new_zeros((starts[-1], width + room))
    for s, a, b in zip(states, starts, starts[1:], strict=False):
        mask[a:b, width - s.width : width] = s.mask[:, : s.width]
    positions = torch.cat([s.positions for s in states])
    return Prefill(cache, mask, width, positions, torch.cat([s.logits for s in states]))


def decode(
    model,
    state: Prefill,
    stops: Sequence[int],
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Generate from a prefill (with room for `max_new_tokens`), one token a step for every row still
    going: each row's answer ends before its first token in `stops` or at `max_new_tokens`. A row leaves
    the batch (its cache rows go) as soon as it ends, so no step computes a finished row; the others' next
    token is written in place.

    Every answer token is fed back once, the last one too: its hidden states are only computed then, and
    `on_step(rows)` is called after each such step with the original indices of the rows it ran, for hooks
    that read those states. `pick(logits)` turns `[rows, vocab]` logits into the next ids (greedy or
    sampled)."""
    rows = torch.arange(state.logits.shape[0], device=state.logits.device)
    answers: list[list[int]] = [[] for _ in range(len(rows))]
    stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=rows.device)
    cache, mask, width, positions = state.cache, state.mask, state.width, state.positions
    logits = state.logits
    if width + max_new_tokens > mask.shape[1]:
        raise ValueError(f"the prefill has room for {mask.shape[1] - width} tokens, not {max_new_tokens}")
    kw = cache_kw(model)
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
        mask[:, width] = 1
        width += 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask[:, :width],
            position_ids=positions[:, None],
            use_cache=True,
            logits_to_keep=1,
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
