"""Batched generation that cuts each answer at its first end-of-turn token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from screener.models.chat import eos_ids, pad, pad_id


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
