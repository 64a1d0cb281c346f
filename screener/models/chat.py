"""Token ids of chat prompts, as every code path builds them: the chat template with the generation prompt
(`chat_ids`), padding (`pad`, `pad_id`) and the tokens that end a turn (`eos_ids`)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch


def eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a turn: the generation config's eos ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return sorted({*(e for e in eos if e is not None), tokenizer.eos_token_id} - {None})


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt's token ids: the chat template of `messages` with `add_generation_prompt=True`.

    Assistant `tool_calls` go to the template as they are when it renders them; a template that does
    not (it never mentions `tool_calls`) would drop them silently, so they are appended to the message's
    text as JSON instead. Tool messages (role "tool") go to the template either way: a template that
    cannot take them raises, and the sample is rejected with the template's message."""
    if not _renders_tool_calls(tokenizer):
        messages = [_calls_as_text(m) if m.get("tool_calls") else m for m in messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _renders_tool_calls(tokenizer) -> bool:
    template = tokenizer.chat_template
    return "tool_calls" in (" ".join(template.values()) if isinstance(template, dict) else template or "")


def _calls_as_text(message: dict) -> dict:
    calls = [
        json.dumps(c.get("function", c) if isinstance(c, dict) else c, ensure_ascii=False)
        for c in message["tool_calls"]
    ]
    content = "\n".join([message["content"], *calls] if message["content"] else calls)
    return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": content}


def pad(
    seqs: Sequence[Sequence[int]], pad_token: int, side: str = "right", device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(ids, attention_mask, position_ids)`, each `[batch, width]`; positions count real tokens only,
    so left padding does not shift them."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_token, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[b, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[b, sl] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)
