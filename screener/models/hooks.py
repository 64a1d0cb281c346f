"""Reading a model's hidden states: its decoder blocks and final norm (`decoder_parts`), a block's output
(`block_output`, `with_block_output`), and hooks that read `hidden_states[L]` with an early stop
(`LayerTap`, `run_until_tapped`).

Layer convention (records.py): layer L is `hidden_states[L]` as transformers returns it: 0 is the input of
the first block, L in 1..n-1 the output of `layers[L-1]`, n the final norm's output.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence

import torch

from screener.models.loading import ModelError


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList, torch.nn.Module]:
    """(base model without LM head, its decoder blocks, its final norm) for common HF architectures."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    blocks = next((getattr(base, a) for a in ("layers", "h", "blocks") if hasattr(base, a)), None)
    norm = next((getattr(base, a) for a in ("norm", "ln_f", "final_layernorm") if hasattr(base, a)), None)
    if blocks is None or norm is None:
        raise ModelError(f"cannot find decoder blocks and a final norm in {type(model).__name__}")
    return base, blocks, norm


def block_output(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states of a decoder block's (or norm's) output, which some architectures wrap in a tuple."""
    return output[0] if isinstance(output, tuple) else output


def with_block_output(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    """`output` with its hidden states replaced by `hidden`, in the same wrapping (for hooks that edit)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class StopForward(Exception):
    """Raised by the hook on the deepest layer needed: nothing after it is computed."""


class LayerTap:
    """Hooks that read `hidden_states[L]` for every layer L in `layers`, as `keep(L, h)` of it.

    `keep` gets the `[batch, tokens, hidden]` states of one forward call at one layer and returns what
    to store (a projection, a masked mean...), so full hidden states never accumulate. Each call's
    result is appended to `self.outputs[L]`. With `stop`, the forward pass ends after the deepest layer
    (`run_until_tapped` catches that); hooks read block outputs raw, so cutting the model short never
    swaps in the final norm's output (the trap of `hidden_states[num_layers]`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Sequence[int],
        keep: Callable[[int, torch.Tensor], torch.Tensor],
        stop: bool = False,
    ):
        _, blocks, norm = decoder_parts(model)
        n = len(blocks)
        if bad := [layer for layer in layers if not 0 <= layer <= n]:
            raise ModelError(f"layers {bad} out of range: the model has hidden_states 0..{n}")
        self.outputs: dict[int, list] = {layer: [] for layer in layers}
        self._handles = []
        deepest = max(layers)
        # how many blocks a forward runs under this tap: a stop after block L-1 (or before block 0) runs L
        self.stops_after = deepest if stop and deepest < n else n
        for layer in layers:
            last = stop and layer == deepest and layer < n

            def read(h: torch.Tensor, layer: int = layer, last: bool = last) -> None:
                self.outputs[layer].append(keep(layer, h))
                if last:
                    raise StopForward

            if layer == 0:  # the input of block 1 is hidden_states[0], whatever the embedding does
                hook = blocks[0].register_forward_pre_hook(
                    lambda _m, args, kwargs, read=read: read(args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True,
                )
            elif layer < n:
                hook = blocks[layer - 1].register_forward_hook(
                    lambda _m, _a, out, read=read: read(block_output(out))
                )
            else:  # transformers returns the final norm's output as hidden_states[num_layers]
                hook = norm.register_forward_hook(lambda _m, _a, out, read=read: read(block_output(out)))
            self._handles.append(hook)

    def take(self, layer: int) -> list:
        """Every call's stored result for `layer`, in call order, then forgotten."""
        out, self.outputs[layer] = self.outputs[layer], []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> LayerTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def run_until_tapped(model: torch.nn.Module, ids: torch.Tensor, cache=None, **kwargs) -> None:
    """One forward pass of the decoder (no LM head; no cache, or reading and extending `cache`) that a
    `stop` tap may end early."""
    base, _, _ = decoder_parts(model)
    with contextlib.suppress(StopForward):
        if cache is None:
            base(input_ids=ids, use_cache=False, **kwargs)
        else:
            base(input_ids=ids, use_cache=True, **{cache_kw(base): cache}, **kwargs)


def cache_kw(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: `cache` since transformers 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
