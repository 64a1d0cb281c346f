"""Trait artifacts: one JSON file per trait (format in screener/traits/README.md).

Built-in traits live in `screener/traits/`; a user's own trait is a file given by path, or a
`--traits-dir` folder searched before the built-ins.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from screener.errors import UserError

BUILTIN_TRAITS_DIR = Path(__file__).resolve().parent.parent / "traits"
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


class TraitError(UserError, ValueError):
    """A trait file that is missing or does not follow the format."""


@dataclass(frozen=True)
class InstructionPair:
    pos: str  # appended to "You are a/an {trait} assistant."
    neg: str  # appended to "You are a helpful assistant."


@dataclass(frozen=True)
class Example:
    """A question with two written answers: one that plainly shows the trait, one that plainly does not."""

    question: str
    positive: str
    negative: str


@dataclass(frozen=True)
class Trait:
    name: str
    description: str
    version: int
    instructions: tuple[InstructionPair, ...]
    questions: tuple[str, ...]  # extraction questions
    eval_questions: tuple[str, ...]  # held out: layer report and steering check
    eval_prompt: str  # judge rubric with {question} and {answer}
    path: str
    sha256: str
    examples: tuple[Example, ...] = ()  # written pairs for extraction from examples
    eval_examples: tuple[Example, ...] = ()  # held out: the layer report and the specificity matrix
    # traits this one overlaps by definition, and why: the layer rule does not hold them to chance
    related: dict[str, str] = field(default_factory=dict)

    def positive_system(self, pair: InstructionPair) -> str:
        article = "an" if self.name[0] in "aeiou" else "a"
        return f"You are {article} {self.name} assistant. {pair.pos}"

    @staticmethod
    def negative_system(pair: InstructionPair) -> str:
        return f"You are a helpful assistant. {pair.neg}"

    def judge_prompt(self, question: str, answer: str) -> str:
        # str.replace, not format: rubrics may contain other braces (JSON examples, code)
        return self.eval_prompt.replace("{question}", question).replace("{answer}", answer)


def _strings(data: dict, key: str, path: Path) -> tuple[str, ...]:
    value = data.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise TraitError(f"{path}: {key!r} must be a non-empty list of non-empty strings")
    if len(set(value)) != len(value):
        raise TraitError(f"{path}: {key!r} holds duplicates")
    return tuple(value)


def _examples(data: dict, key: str, path: Path) -> tuple[Example, ...]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise TraitError(f"{path}: {key!r} must be a list of {{'question', 'positive', 'negative'}} objects")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise TraitError(f"{path}: {key}[{i}] must be an object with 'question', 'positive', 'negative'")
        for name in ("question", "positive", "negative"):
            if not isinstance(item.get(name), str) or not item[name].strip():
                raise TraitError(f"{path}: {key}[{i}].{name} must be a non-empty string")
        out.append(Example(item["question"], item["positive"], item["negative"]))
    questions = [e.question for e in out]
    if len(set(questions)) != len(questions):
        raise TraitError(f"{path}: {key!r} repeats a question")
    return tuple(out)


def parse_trait(data: dict, path: Path, sha256: str = "") -> Trait:
    """Validate a trait file's contents; every error names the field."""
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise TraitError(f"{path}: 'name' must be a lower-case identifier, got {name!r}")
    pairs = data.get("instruction")
    if not isinstance(pairs, list) or not pairs:
        raise TraitError(f"{path}: 'instruction' must be a non-empty list of {{'pos', 'neg'}} objects")
    instructions = []
    for i, p in enumerate(pairs):
        if not (
            isinstance(p, dict) and all(isinstance(p.get(k), str) and p[k].strip() for k in ("pos", "neg"))
        ):
            raise TraitError(f"{path}: instruction[{i}] needs non-empty 'pos' and 'neg' strings")
        instructions.append(InstructionPair(p["pos"], p["neg"]))
    questions = _strings(data, "questions", path)
    eval_questions = _strings(data, "eval_questions", path)
    shared = set(questions) & set(eval_questions)
    if shared:
        raise TraitError(f"{path}: evaluation questions must be held out, but {len(shared)} are shared")
    rubric = data.get("eval_prompt")
    if not isinstance(rubric, str) or "{question}" not in rubric or "{answer}" not in rubric:
        raise TraitError(f"{path}: 'eval_prompt' must be a string with {{question}} and {{answer}} slots")
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise TraitError(f"{path}: 'description' must be a non-empty string")
    version = data.get("version", 1)
    if not isinstance(version, int):
        raise TraitError(f"{path}: 'version' must be an integer")
    examples = _examples(data, "examples", path)
    eval_examples = _examples(data, "eval_examples", path)
    if shared := {e.question for e in examples} & {e.question for e in eval_examples}:
        raise TraitError(f"{path}: 'eval_examples' must be held out, but {len(shared)} questions are shared")
    related = data.get("related", {})
    if not isinstance(related, dict) or not all(
        isinstance(k, str) and _NAME.match(k) and k != name and isinstance(v, str) and v.strip()
        for k, v in related.items()
    ):
        raise TraitError(
            f"{path}: 'related' must map other trait names to the reason they overlap this one, e.g. "
            '{"impolite": "contempt for the user is part of both"}'
        )
    return Trait(
        name,
        description,
        version,
        tuple(instructions),
        questions,
        eval_questions,
        rubric,
        str(path),
        sha256,
        examples,
        eval_examples,
        dict(related),
    )


def trait_path(spec: str, traits_dir: str | Path | None = None) -> Path:
    """A trait file from a path, else `NAME.json` in `traits_dir`, else a built-in."""
    as_path = Path(spec)
    if as_path.suffix == ".json" or as_path.is_file():
        if not as_path.is_file():
            raise TraitError(f"trait file not found: {spec}")
        return as_path
    for folder in [Path(traits_dir)] if traits_dir else []:
        if (folder / f"{spec}.json").is_file():
            return folder / f"{spec}.json"
    builtin = BUILTIN_TRAITS_DIR / f"{spec}.json"
    if builtin.is_file():
        return builtin
    have = ", ".join(t for t, _ in list_traits(traits_dir))
    raise TraitError(
        f"no trait {spec!r} (available: {have}); create one with `screener traits new {spec} ...`"
    )


def load_trait(spec: str, traits_dir: str | Path | None = None) -> Trait:
    path = trait_path(spec, traits_dir)
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TraitError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TraitError(f"{path}: expected a JSON object")
    return parse_trait(data, path, hashlib.sha256(raw).hexdigest())


def list_traits(traits_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """(name, file) for every trait visible, user folder first (it shadows built-ins of the same name)."""
    seen: dict[str, Path] = {}
    for folder in [Path(traits_dir)] if traits_dir else []:
        for p in sorted(folder.glob("*.json")):
            seen.setdefault(p.stem, p)
    for p in sorted(BUILTIN_TRAITS_DIR.glob("*.json")):
        seen.setdefault(p.stem, p)
    return sorted(seen.items())


RUBRIC_TEMPLATE = """You are evaluating whether a language model's answer displays the trait: **{name}**. \
{description}

Question:
[QUESTION START]
{{question}}
[QUESTION END]

Answer:
[ANSWER START]
{{answer}}
[ANSWER END]

Score how strongly the answer displays the trait, from 0 (not at all) to 100 (strongly, throughout). \
If the answer is a refusal, score 0. Respond with the number only, nothing else."""

DRAFT_REQUEST = """Write the data for measuring the personality trait "{name}" in a language model.
Trait description: {description}

Reply with one JSON object and nothing else, with these keys:
- "instruction": a list of 5 objects {{"pos": ..., "neg": ...}}. "pos" is a system-prompt sentence telling \
the assistant to display the trait strongly; "neg" tells it to avoid the trait and do the opposite. \
Each pair takes a different angle on the trait.
- "questions": 20 distinct, natural user questions that give room to display the trait or not. They \
must not mention the trait.
- "eval_questions": 20 more such questions, different from the first 20.
- "examples": 30 objects {{"question": ..., "positive": ..., "negative": ...}}: a new user question, an \
answer that plainly shows the trait, and an answer of about the same length that plainly does not (a \
normal, helpful answer with no other notable persona). Varied topics and lengths.
- "eval_examples": 20 more such objects, with questions different from all the others.
"""


def scaffold(name: str, description: str, draft: dict | None = None) -> dict:
    """A new trait file's contents: the rubric from a template, the rest from `draft` or left empty."""
    if not _NAME.match(name):
        raise TraitError(f"trait name must be a lower-case identifier, got {name!r}")
    draft = draft or {}
    return {
        "name": name,
        "version": 1,
        "description": description,
        "instruction": draft.get("instruction", []),
        "questions": draft.get("questions", []),
        "eval_questions": draft.get("eval_questions", []),
        "eval_prompt": RUBRIC_TEMPLATE.format(name=name, description=description),
        "examples": draft.get("examples", []),
        "eval_examples": draft.get("eval_examples", []),
    }


def parse_draft(text: str) -> dict:
    """The JSON object in a generator's reply (it may be wrapped in a code fence or prose)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise TraitError("the generator's reply holds no JSON object")
    try:
        data = json.loads(text[start : end + 1])
    except json.JSONDecodeError as e:
        raise TraitError(f"the generator's reply is not valid JSON ({e})") from e
    keys = ("instruction", "questions", "eval_questions", "examples", "eval_examples")
    return {k: data[k] for k in keys if k in data}
