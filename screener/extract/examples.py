"""Labelled examples for extraction without generation: answers that show a trait and answers that do not.

Two sources, one record type (`Labelled`: a prompt, an answer, its class, where it came from):

- a trait file's written pairs (`examples`, held-out `eval_examples`): a question, an answer that plainly
  shows the trait and one that plainly does not (`from_trait`);
- dataset files in any format the screen reads (`read_example_files`), two record kinds:
  - *labelled*: any chat or prompt-response record with a `label` field (1/0, true/false, pos/neg,
    positive/negative, case-insensitive): one example, its prompt the messages before the last assistant
    turn and its answer that turn, exactly as `screener screen` reads a sample;
  - *paired*: a prompt (`prompt` or `question`, with an optional `system`; or a `messages` /
    `conversations` / `conversation` list holding the prompt turns) with a `positive` and a `negative`
    answer to it: two examples, one of each class.

A record that is neither, a label that is not one of those values, an empty answer, or a set of files
with one class only stops the read with an error naming the file and row (rows count from 0 over the
files given, as in the screen's `source_row`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from screener.datasets import CHAT_FORMATS, DatasetFormatError, detect_format, read_rows, record_to_samples
from screener.errors import UserError
from screener.extract.traits import Example, Trait
from screener.models import sha256_file
from screener.records import Message, Reject, Sample
from screener.scoring import tokenize

POSITIVE_LABELS = ("1", "true", "pos", "positive")
NEGATIVE_LABELS = ("0", "false", "neg", "negative")
LABELS_HELP = "1/0, true/false, pos/neg or positive/negative"


class ExampleError(UserError, ValueError):
    """Example files that cannot give a vector: the message names the file, row and field."""


@dataclass(slots=True)
class Labelled:
    """One answer to read teacher-forced after its prompt, and whether it shows the trait."""

    prompt: list[Message]
    response: str
    positive: bool
    source_file: str
    source_row: int
    pair: int | None = None  # the same number for the two answers of one paired record


@dataclass
class ExampleSet:
    """Examples and where they came from (per file: sha256 and counts, for the sidecar)."""

    examples: list[Labelled]
    sources: list[dict] = field(default_factory=list)

    @property
    def positives(self) -> list[Labelled]:
        return [e for e in self.examples if e.positive]

    @property
    def negatives(self) -> list[Labelled]:
        return [e for e in self.examples if not e.positive]

    @property
    def paired(self) -> bool:
        """Every example is one answer of a pair to one prompt (so prompt activations cancel exactly)."""
        return bool(self.examples) and all(e.pair is not None for e in self.examples)

    def pairs(self) -> list[tuple[Labelled, Labelled]]:
        """(positive, negative) of every paired record, in reading order."""
        by_pair: dict[int, dict[bool, Labelled]] = {}
        for e in self.examples:
            if e.pair is not None:
                by_pair.setdefault(e.pair, {})[e.positive] = e
        return [(p[True], p[False]) for p in by_pair.values()]

    def counts(self) -> dict[str, int]:
        return {
            "positive": len(self.positives),
            "negative": len(self.negatives),
            "pairs": len(self.pairs()),
        }


def from_trait(trait: Trait, key: str = "examples") -> ExampleSet:
    """A trait file's written pairs (`examples` or `eval_examples`), each question asked alone."""
    # the trait, the field and the file's sha256 say where they came from (a path would be this machine's)
    source = {"trait": trait.name, "field": key, "sha256": trait.sha256}
    return from_written(getattr(trait, key), f"{trait.path} ({key})", source)


def from_written(written: Sequence[Example], where: str, source: dict) -> ExampleSet:
    """Written (question, positive, negative) pairs as paired examples, each question asked alone;
    `source` (what they are, for the sidecar) gains the counts."""
    examples = []
    for i, ex in enumerate(written):
        prompt = [{"role": "user", "content": ex.question}]
        examples.append(Labelled(prompt, ex.positive, True, where, i, pair=i))
        examples.append(Labelled(prompt, ex.negative, False, where, i, pair=i))
    out = ExampleSet(examples, [{**source, "records": len(written)}])
    out.sources[0].update(out.counts())
    return out


def parse_label(value: object) -> bool | None:
    """True (shows the trait), False (does not), or None for a value that is not a label."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in POSITIVE_LABELS:
            return True
        if text in NEGATIVE_LABELS:
            return False
    return None


def read_example_files(paths: Sequence[str]) -> ExampleSet:
    """Every example of every file (each a path, folder or glob the screen reads), in order."""
    examples: list[Labelled] = []
    sources = []
    for path in paths:
        before, records = len(examples), 0
        try:  # the rows are streamed: a missing file or an unknown file type shows at the first one
            for source, row, _, record in read_rows(path, formats=False):
                records += 1
                if isinstance(record, Reject):
                    raise ExampleError(f"{source}, row {row}: {record.reason}")
                examples.extend(_record_examples(record, source, row, next_pair=len(examples)))
        except (FileNotFoundError, DatasetFormatError) as e:
            raise ExampleError(f"{path}: {e}") from None
        if not records:
            raise ExampleError(f"{path}: no records")
        mine = ExampleSet(examples[before:])
        digest = sha256_file(Path(path)) if Path(path).is_file() else None  # a folder or glob: per-row files
        sources.append({"path": str(path), "sha256": digest, "records": records, **mine.counts()})
    out = ExampleSet(examples, sources)
    check_classes(out, ", ".join(map(str, paths)))
    return out


def check_classes(examples: ExampleSet, where: str) -> None:
    """A mean difference needs both classes: name the files and rows when one is missing."""
    for cls, lack in (("positive", "negative"), ("negative", "positive")):
        have = examples.positives if cls == "positive" else examples.negatives
        if not have or len(have) < len(examples.examples):
            continue
        a, b = have[0], have[-1]
        if len(have) == 1:
            which = f"the one example (row {a.source_row}) is"
        else:
            span = (
                f"rows {a.source_row}..{b.source_row} of {a.source_file}"
                if a.source_file == b.source_file
                else f"row {a.source_row} of {a.source_file} to row {b.source_row} of {b.source_file}"
            )
            which = f"all {len(have)} examples ({span}) are"
        raise ExampleError(
            f"{where}: {which} labelled {cls}; a vector is the difference of two means, so {lack} examples "
            "are needed too (label them in the same files, or add a file of them)"
        )


def _record_examples(record: dict, source: str, row: int, next_pair: int) -> list[Labelled]:
    where = f"{source}, row {row}"
    if "positive" in record or "negative" in record:
        return _paired(record, source, row, next_pair)
    if "label" not in record:
        raise ExampleError(
            f"{where}: no 'label' field and no 'positive' + 'negative' answers (columns found: "
            f"{list(record)}); label each example ({LABELS_HELP}) or give both answers to one prompt"
        )
    label = parse_label(record["label"])
    if label is None:
        raise ExampleError(f"{where}: label: {record['label']!r} is not a label; use {LABELS_HELP}")
    sample = _one_sample(record, source, row)
    return [Labelled(sample.prompt, sample.response, label, source, row)]


def _paired(record: dict, source: str, row: int, pair: int) -> list[Labelled]:
    where = f"{source}, row {row}"
    for key in ("positive", "negative"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ExampleError(f"{where}: {key}: a paired record needs a non-empty {key!r} answer string")
    if "label" in record:
        raise ExampleError(f"{where}: a record holds either a 'label' or 'positive' + 'negative', not both")
    chat = next((fmt for fmt, (key, _, _) in CHAT_FORMATS.items() if key in record), None)
    out = []
    for key, positive in (("positive", True), ("negative", False)):
        if chat is not None:  # the list holds the prompt turns; the answer goes after them as the assistant's
            list_key, role, content = CHAT_FORMATS[chat]
            turns = record[list_key]
            answer = {role: "assistant", content: record[key]}
            as_record = {list_key: [*turns, answer] if isinstance(turns, list) else turns}
            # a reason about the appended turn is about the record's own answer field
            names = {f"{list_key}[{len(turns)}].{content}:": f"{key}:"} if isinstance(turns, list) else {}
        else:
            prompt = record.get("prompt", record.get("question"))
            if prompt is None:
                raise ExampleError(
                    f"{where}: a paired record needs its prompt: a 'prompt' or 'question' field, or a "
                    f"messages list (columns found: {list(record)})"
                )
            as_record = {"prompt": prompt, "response": record[key]}
            if "system" in record:
                as_record["system"] = record["system"]
            names = {"response:": f"{key}:", "prompt:": "prompt:" if "prompt" in record else "question:"}
        sample = _one_sample(as_record, source, row, names)
        out.append(Labelled(sample.prompt, sample.response, positive, source, row, pair=pair))
    return out


def _one_sample(record: dict, source: str, row: int, names: dict[str, str] | None = None) -> Sample:
    """The record as the screen reads it (its last assistant turn after the turns before it); `names`
    renames the fields of a reason when the record was rebuilt from a paired one."""
    try:
        fmt = detect_format(record)
    except UserError as e:
        raise ExampleError(f"{source}, row {row}: {e}") from None
    (item,) = record_to_samples(record, fmt, source_row=row, source_file=source, turns="last")
    if isinstance(item, Reject):
        reason = item.reason
        for ours, theirs in (names or {}).items():
            if reason.startswith(ours):
                reason = theirs + reason[len(ours) :]
                break
        raise ExampleError(f"{source}, row {row}: {reason}")
    return item


def tokenized(
    tokenizer, examples: Sequence[Labelled], max_tokens: int
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(prompt ids, response ids) of each example as the screen reads it, and how many were cut to
    `max_tokens`; a template failure or an answer without tokens stops with the file and row."""
    out, cut = [], 0
    for e in examples:
        sample = Sample(f"row {e.source_row}", e.source_row, 0, e.prompt, e.response, e.source_file)
        t = tokenize(tokenizer, sample, max_tokens)
        if isinstance(t, Reject):
            raise ExampleError(f"{e.source_file}, row {e.source_row}: {t.reason}")
        out.append((t.prompt, t.response))
        cut += t.truncated
    return out, cut
