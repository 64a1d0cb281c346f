"""Row formats → samples: a parsed record becomes one Sample per scored assistant turn, or Rejects whose
reason names the field. OpenAI `messages`, ShareGPT `conversations`, LMSYS `conversation`, and `prompt` +
`response` (or `answer`); a file's format is detected from its first record (`detect_format`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from screener.datasets.base import DatasetFormatError, canonical_json, content_hash
from screener.records import Message, Reject, Sample

CHAT_FORMATS = {  # format → (list field, role key, content key)
    "openai": ("messages", "role", "content"),
    "sharegpt": ("conversations", "from", "value"),
    "lmsys": ("conversation", "role", "content"),
}
SUPPORTED = (
    "openai (messages), sharegpt (conversations), lmsys (conversation), "
    "prompt_response (prompt + response or answer)"
)
# The role names seen in the wild (lower-cased) → the roles a chat template knows. "tool" is a tool's
# result (OpenAI `tool`, legacy `function`, Llama 3 `ipython`, ShareGPT-style `observation`).
ROLES = (
    {"system": "system", "developer": "system", "user": "user", "human": "user"}
    | dict.fromkeys(("assistant", "gpt", "chatgpt", "bard", "bing"), "assistant")
    | dict.fromkeys(("tool", "function", "ipython", "observation"), "tool")
)
# OpenAI content parts whose "text" is text (chat completions, and the Responses API's two kinds); other
# parts (image_url, input_audio, file...) are left out of the text the model sees.
TEXT_PARTS = ("text", "input_text", "output_text")
TOOL_KEYS = ("tool_call_id", "name")  # kept on a tool message, for templates that render them


def detect_format(record: dict) -> str:
    """The row format of a record, from its columns: "openai", "sharegpt", "lmsys" or "prompt_response"."""
    for fmt, (list_key, _, _) in CHAT_FORMATS.items():
        if list_key in record:
            return fmt
    if "prompt" in record and ("response" in record or "answer" in record):
        return "prompt_response"
    raise DatasetFormatError(f"unknown row format; columns found: {list(record)}; supported: {SUPPORTED}")


def record_to_samples(
    record: dict, fmt: str, *, source_row: int, source_file: str, turns: str, record_id: str | None = None
) -> list[Sample | Reject]:
    """One Sample per scored assistant turn (the last one, or all), or Rejects that name the field.

    An assistant turn with tool calls and no text has nothing to score: it is a Reject of kind
    "skipped", and the record's other turns are scored as usual. Every sample id is `record_id` (the
    record's own, by default), suffixed `#<turn>` when several turns of it are scored."""
    record_id = record_id if record_id is not None else own_id(record)
    if fmt == "prompt_response":
        parsed = _parse_prompt_response(record)
    elif fmt in CHAT_FORMATS:
        parsed = _parse_chat(record, *CHAT_FORMATS[fmt])
    else:
        raise ValueError(f"unknown format {fmt!r}; supported: {SUPPORTED}")
    if isinstance(parsed, str):
        return [Reject(source_row, record_id, parsed, source_file)]
    messages, paths = parsed
    if (invalid := _invalid_text(record, messages, paths)) is not None:  # the record alone is rejected
        return [Reject(source_row, record_id, invalid, source_file)]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    scored = list(enumerate(assistant))
    out: list[Sample | Reject] = []
    # Under --turns all a record with several assistant turns gives `id#turn` (0-based); a record with one
    # keeps its plain id, as under --turns last, so single-turn data has the same ids either way.
    several = turns == "all" and len(assistant) > 1
    for turn, k in scored if turns == "all" else scored[-1:]:
        sample_id = f"{record_id}#{turn}" if several else record_id
        prompt, response = messages[:k], messages[k]["content"]
        if not response.strip() and messages[k].get("tool_calls"):
            reason = f"{paths[k].rpartition('.')[0]}: tool calls only, no text to score"
            out.append(Reject(source_row, sample_id, reason, source_file, kind="skipped"))
        elif not response.strip():
            out.append(Reject(source_row, sample_id, f"{paths[k]}: empty response", source_file))
        elif not any(m["role"] in ("user", "system") for m in prompt):
            reason = f"{paths[k]}: empty prompt (no user or system message before this turn)"
            out.append(Reject(source_row, sample_id, reason, source_file))
        else:
            out.append(Sample(sample_id, source_row, turn, prompt, response, source_file))
    return out


def _parse_chat(
    record: dict, list_key: str, role_key: str, content_key: str
) -> tuple[list[Message], list[str]] | str:
    """Normalised messages and each one's content field path, or the reason the record is unusable.

    Content may be a string or a list of OpenAI content parts (their text parts are joined with "\n",
    other parts left out). An assistant message may carry `tool_calls` (then its content may be null), a
    tool message `tool_call_id` and `name`: they are kept for the chat template to render."""
    if list_key not in record:
        return f"{list_key}: missing (columns found: {list(record)})"
    if not isinstance(record[list_key], list):
        return f"{list_key}: not a list"
    messages, paths = [], []
    for i, message in enumerate(record[list_key]):
        where = f"{list_key}[{i}]"
        if not isinstance(message, dict):
            return f"{where}: not an object"
        # None counts as missing: parquet and `datasets` fill absent struct fields with null.
        role, content = message.get(role_key), message.get(content_key)
        if role is None:
            return f"{where}: missing {role_key}"
        if not isinstance(role, str):
            return f"{where}.{role_key}: not a string"
        if role.lower() not in ROLES:
            return f"{where}.{role_key}: unknown role {role!r}"
        role = ROLES[role.lower()]
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls is not None and not isinstance(calls, list):
            return f"{where}.tool_calls: not a list"
        if content is None and calls:
            content = ""  # a turn that only calls tools
        elif content is None:
            return f"{where}: missing {content_key}"
        elif isinstance(content, list):
            content = _content_parts(content, f"{where}.{content_key}")
            if content is None:
                return f"{where}.{content_key}: not a string or a list of content parts"
            if isinstance(content, _Invalid):
                return content.reason
        elif not isinstance(content, str):
            return f"{where}.{content_key}: not a string"
        normalised: Message = {"role": role, "content": content}
        if calls:
            normalised["tool_calls"] = calls
        if role == "tool":
            normalised |= {k: message[k] for k in TOOL_KEYS if isinstance(message.get(k), str)}
        messages.append(normalised)
        paths.append(f"{where}.{content_key}")
    if not any(m["role"] == "assistant" for m in messages):
        return f"{list_key}: no assistant turn"
    return messages, paths


@dataclass(slots=True)
class _Invalid:
    reason: str


def _content_parts(parts: list, path: str) -> str | _Invalid | None:
    """The text of OpenAI content parts, joined with "\n"; None when `parts` are not content parts."""
    if not all(isinstance(part, dict) and isinstance(part.get("type"), str) for part in parts):
        return None
    texts = []
    for j, part in enumerate(parts):
        if part["type"] in TEXT_PARTS:
            if not isinstance(part.get("text"), str):
                return _Invalid(f"{path}[{j}].text: not a string")
            texts.append(part["text"])
    return "\n".join(texts)


def _parse_prompt_response(record: dict) -> tuple[list[Message], list[str]] | str:
    """[system?, user: prompt, assistant: response] from string columns, or the reason it is unusable."""
    response_key = "answer" if "answer" in record and "response" not in record else "response"
    messages, paths = [], []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            return "system: not a string"
        if system.strip():  # CSV and parquet give "" or null for "no system prompt"
            messages.append({"role": "system", "content": system})
            paths.append("system")
    for key, role in (("prompt", "user"), (response_key, "assistant")):
        value = record.get(key)
        if value is None:
            return f"{key}: missing"
        if not isinstance(value, str):
            return f"{key}: not a string"
        messages.append({"role": role, "content": value})
        paths.append(key)
    if not record["prompt"].strip():
        return "prompt: empty prompt"
    return messages, paths


def own_id(record: dict) -> str:
    """The record's own id, else a hash of its content: stable across runs, and the same for a reject.
    An id that is not valid Unicode (the record is rejected for it) is replaced by the hash too: every
    id must be storable."""
    found = _id_field(record)
    if found is not None and _lone_surrogate(found[1]) is None:
        return found[1]
    return content_hash(canonical_json(record))


def _id_field(record: dict) -> tuple[str, str] | None:
    for key in ("id", "conversation_id"):
        value = record.get(key)
        if value is not None and str(value).strip():
            return key, str(value)
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(text: str) -> str | None:
    """Where a string is not valid Unicode (JSON can carry a lone surrogate, `"\\ud800"`, that no UTF-8
    output can hold), as a phrase for a reason; None when it is valid."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return f"invalid Unicode (a lone surrogate, U+{ord(found.group()):04X}, at character {found.start()})"


def _invalid_text(record: dict, messages: list[Message], paths: list[str]) -> str | None:
    """The reason a record holds text that is not valid Unicode, naming the field; None when it is valid."""
    found = _id_field(record)
    plain = all(len(m) == 2 for m in messages)  # role and content only: no tool calls or tool keys
    if (
        plain
        and _SURROGATE.search("".join([found[1] if found else "", *(m["content"] for m in messages)])) is None
    ):
        return None  # one search over all of its text, the common case; else find the field
    if found is not None and (where := _lone_surrogate(found[1])):
        return f"{found[0]}: {where}"
    for message, path in zip(messages, paths, strict=True):
        if where := _lone_surrogate(message["content"]):
            return f"{path}: {where}"
        message_path = path.rpartition(".")[0]
        for key in TOOL_KEYS:
            if isinstance(message.get(key), str) and (where := _lone_surrogate(message[key])):
                return f"{message_path}.{key}: {where}"
        calls = message.get("tool_calls")
        if calls and (where := _lone_surrogate(json.dumps(calls, ensure_ascii=False, default=str))):
            return f"{message_path}.tool_calls: {where}"
    return None
