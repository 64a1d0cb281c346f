"""Token ids of chat prompts, as every code path builds them: the chat template with the generation prompt
(`chat_text`, `chat_ids`; a conversation's prompts tokenised once: `ConversationIds`), padding (`pad`,
`pad_id`) and the tokens that end a turn (`eos_ids`)."""

from __future__ import annotations

import bisect
import functools
import json
import re
from collections.abc import Callable, Sequence

import torch


def eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a turn: the generation config's eos ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return sorted({*(e for e in eos if e is not None), tokenizer.eos_token_id} - {None})


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt's token ids: the chat template of `messages` with `add_generation_prompt=True`."""
    return text_ids(tokenizer, chat_text(tokenizer, messages))


def text_ids(tokenizer, text: str) -> list[int]:
    """The ids of a template's text: the tokenizer without special tokens added (the template wrote them)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The chat template of `messages` with `add_generation_prompt=True`, as text (`chat_ids` tokenises it).

    Assistant `tool_calls` go to the template as they are when it renders them; a template that does
    not (it never mentions `tool_calls`) would drop them silently, so they are appended to the message's
    text as JSON instead. Tool messages (role "tool") go to the template either way: a template that
    cannot take them raises, and the sample is rejected with the template's message."""
    if not _renders_tool_calls(tokenizer):
        messages = [_calls_as_text(m) if m.get("tool_calls") else m for m in messages]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


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


def split_tokens(tokenizer) -> dict[str, int] | None:
    """The added tokens `{text: id}` of a fast tokenizer that cuts every occurrence of them out of a text
    first (leftmost-longest) and tokenises the pieces between them one by one, as `ConversationIds` relies
    on; None where that may not hold: a slow tokenizer, special tokens tokenised as text, or an added token
    that strips the whitespace beside it, matches whole words only or is matched in normalised text."""
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "split_special_tokens", False):
        return None
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    out = {}
    for i, t in added.items():
        content = getattr(t, "content", None)
        if not isinstance(content, str) or not content or content in out:
            return None
        if t.lstrip or t.rstrip or t.single_word or t.normalized:
            return None
        out[content] = i
    return out or None


def fast_ids(tokenizer) -> Callable[[str], list[int]]:
    """`text_ids`, the same ids, without the offsets the tokenizer's call tracks (a third of its time): the
    backend's `encode_batch_fast` of the one text (one text runs in the calling thread), where the backend
    is as the call leaves it (no truncation, no padding, special tokens not split); else `text_ids`."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    encode = getattr(backend, "encode_batch_fast", None)
    if (
        encode is None
        or backend.truncation is not None
        or backend.padding is not None
        or backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return functools.partial(text_ids, tokenizer)
    return lambda text: encode([text], add_special_tokens=False)[0].ids


class ConversationIds:
    """`text_ids` of a conversation's prompts, the same ids, tokenising the text they share once: each
    turn's prompt holds every message before it, so tokenising each apart costs the square of the turns.

    The longest prompt L is tokenised whole. A fast tokenizer cuts its added tokens (`split_tokens`) out of
    a text first, matching leftmost-longest, and tokenises each piece between them on its own. So for a
    prompt T that is a prefix of L, L's matches that end within T are T's matches too, and L's ids up to
    the last of them (ending at character e of T) are T's ids up to there. The rest of T, T[e:], is then
    tokenised after that added token's own text, and the token's id dropped from the front: a piece that
    follows an added token, as in T (a piece that starts a text can differ: Metaspace's
    `prepend_scheme="first"`).

    The matches are found with `re` (the longest alternative first: leftmost-longest) and checked against
    the added tokens' ids in L's ids, which must be theirs and no others (an added token's id from a
    piece, say of normalised text, fails the check; the unknown token's id, which a piece may give, is not
    counted, and a match of its text fails the check). A prompt that is not a prefix of L, a tokenizer
    without `split_tokens` or a failed check: each prompt tokenised alone. One per tokenizer and batch of
    samples: it keeps the ids of the rests it tokenised (mostly a generation prompt: "assistant\n")."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.encode = fast_ids(tokenizer)
        self.added = split_tokens(tokenizer)
        self.tails: dict[tuple[int, str], list[int] | None] = {}
        self.shared = 0  # prompts whose ids came (mostly) from a longer prompt's
        if self.added is not None:
            # at one place `re` takes the first alternative that matches: the longest first
            self.pattern = re.compile("|".join(map(re.escape, sorted(self.added, key=len, reverse=True))))
            self.unk = getattr(tokenizer, "unk_token_id", None)
            self.counted = frozenset(self.added.values()) - {self.unk}

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        if self.added is None or len(texts) < 2:
            return [self.encode(t) for t in texts]
        whole = max(texts, key=len)
        ids = self.encode(whole)
        matches = list(self.pattern.finditer(whole))
        matched = [self.added[m.group()] for m in matches]
        at = [k for k, i in enumerate(ids) if i in self.counted]
        if [ids[k] for k in at] != matched or self.unk in matched:
            return [self.encode(t) for t in texts]
        ends = [m.end() for m in matches]
        out = []
        for text in texts:
            n = bisect.bisect_right(ends, len(text)) if whole.startswith(text) else 0
            if n == 0 or text == whole:
                out.append(list(ids) if text == whole else self.encode(text))
                continue
            e, j = ends[n - 1], at[n - 1] + 1  # T[:e] ends with L's j-th id, an added token
            key = (ids[j - 1], text[e:])
            if key not in self.tails:
                got = self.encode(matches[n - 1].group() + text[e:])
                self.tails[key] = got[1:] if got[:1] == [ids[j - 1]] else None
            tail = self.tails[key]
            out.append(ids[:j] + tail if tail is not None else self.encode(text))
            self.shared += tail is not None
        return out
