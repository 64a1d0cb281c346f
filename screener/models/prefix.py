"""A batch's shared prompt prefix (a chat template's system prompt, say) run once instead of once a row.

Every row of a right-padded teacher-forced batch that starts with the same `p` tokens has the same keys,
values and hidden states at those positions (causal attention: nothing after them reaches them). So the
prefix is run once at batch 1 with a KV cache (`SharedPrefix.cache`, kept while the next batch shares it),
and the batch runs only its rows' tokens after it, its attention reading the cached keys first.

Reading a cache with more keys than queries normally makes transformers build an explicit mask, and SDPA
with a mask loses its causal fast path (1.35x slower on long samples, benchmarks/README.md): more than a
system prompt's share of the tokens saves. Here the attention of that one forward is `prefix_sdpa`: it
front-pads the queries with `p` zero rows, so queries and keys are equally long and the plain causal call
serves (the padded rows' outputs are dropped; they cost the attention of p rows, not the blocks' matmuls).
No mask is built for that forward (the implementation's name is not one transformers makes masks for),
which is right only for right padding with no attention mask, the only way `Scorer` uses it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from screener.models.generation import plain_cache
from screener.models.hooks import LayerTap, StopForward, cache_kw, decoder_parts

ATTENTION = "screener_prefix_sdpa"
# fewer shared tokens than this are not worth the extra batch-1 pass and the cache's copies
MIN_SHARED = 16


def prefix_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kw):
    """SDPA where the keys start with a cached prefix the queries lack (`[B, H, q, D]` against `[B, H, k,
    D]`, k > q, no mask): causal attention over k positions, keeping the last q rows."""
    q, k = query.shape[2], key.shape[2]
    if attention_mask is not None or q >= k:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    padded = torch.cat([query.new_zeros((*query.shape[:2], k - q, query.shape[3])), query], dim=2)
    out, weights = sdpa_attention_forward(module, padded, key, value, None, **kw)
    return out[:, k - q :], weights  # out is [B, k, H, D]


AttentionInterface.register(ATTENTION, prefix_sdpa)


def can_share(model) -> bool:
    """Whether `model` runs its attention through transformers' SDPA interface with a plain KV cache, so
    that `prefix_attention` reaches it and a cached prefix is one tensor a layer."""
    config = model.config
    return (
        getattr(config, "_attn_implementation", None) == "sdpa"
        and bool(getattr(model, "_can_set_attn_implementation", lambda: False)())
        and plain_cache(model)
    )


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """The length of the longest prefix all of `seqs` share."""
    first, n = seqs[0], min(map(len, seqs))
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


@contextlib.contextmanager
def prefix_attention(model) -> Iterator[None]:
    """`prefix_sdpa` (and no mask creation) for the forwards inside, then the model's own attention again."""
    config = model.config
    own = config._attn_implementation_internal
    config._attn_implementation_internal = ATTENTION  # the plain attribute: no sub-config walk a forward
    try:
        yield
    finally:
        config._attn_implementation_internal = own


class SharedPrefix:
    """The KV cache of the last prefix run (its ids and the blocks it went through), so that consecutive
    batches with the same system prompt run it once between them."""

    def __init__(self, model) -> None:
        self.model = model
        self._key: tuple | None = None
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def cache(self, ids: list[int], blocks: int, rows: int) -> DynamicCache:
        """A cache holding `ids`' keys and values in the first `blocks` blocks, for `rows` rows (views of one
        row: a forward's `update` concatenates, so the kept tensors are never written)."""
        key = (tuple(ids), blocks)
        if key != self._key:
            self._layers, self._key = self._run(ids, blocks), key
        cache = DynamicCache(config=self.model.config)
        for layer, (k, v) in zip(cache.layers, self._layers, strict=False):
            layer.lazy_initialization(k, v)
            layer.keys = k.expand(rows, -1, -1, -1)
            layer.values = v.expand(rows, -1, -1, -1)
        return cache

    def _run(self, ids: list[int], blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        base, all_blocks, _ = decoder_parts(self.model)
        device = next(self.model.parameters()).device
        cache = DynamicCache(config=self.model.config)
        tensor = torch.tensor([ids], device=device)
        # stop after the blocks the batch will run: the cache of deeper ones would never be read
        deep = blocks < len(all_blocks)
        stop = LayerTap(self.model, [blocks], lambda _l, _h: None, stop=True) if deep else None
        with stop or contextlib.nullcontext(), contextlib.suppress(StopForward):
            base(input_ids=tensor, use_cache=True, **{cache_kw(base): cache})
        return [(layer.keys, layer.values) for layer in cache.layers[:blocks]]
