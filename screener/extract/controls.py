"""Style control sets: pairs of answers that differ in one nuisance (hedged vs direct, long vs short, ...)
and in no trait. A vector that ranks side `a` above side `b` in most pairs of a control reads that
nuisance, not its trait; the specificity report scores every vector on every control, and the layer rule
holds them near chance as it holds the other traits.

One JSON file per control set (format in screener/traits/controls/README.md):
`{"name", "description", "a", "b", "pairs": [{"question", "a", "b"}, ...]}`, where the top-level `a` and
`b` say what each side is (e.g. "direct", "hedged"). Built-in sets live in `screener/traits/controls/`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from screener.extract.traits import _NAME, BUILTIN_TRAITS_DIR, Example, TraitError

BUILTIN_CONTROLS_DIR = BUILTIN_TRAITS_DIR / "controls"


@dataclass(frozen=True)
class Control:
    name: str
    description: str
    a: str  # what side a is
    b: str
    pairs: tuple[Example, ...]  # positive = side a, negative = side b
    path: str
    sha256: str

    def describe(self) -> dict:
        """The sidecar's record of the set: what its sides are and which file version was read."""
        return {"a": self.a, "b": self.b, "pairs": len(self.pairs), "sha256": self.sha256}


def _text(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise TraitError(f"{where}: {key!r} must be a non-empty string")
    return value


def parse_control(data: object, path: Path, sha256: str = "") -> Control:
    """Validate a control file's contents; every error names the file and the field."""
    if not isinstance(data, dict):
        raise TraitError(f"{path}: expected a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise TraitError(f"{path}: 'name' must be a lower-case identifier, got {name!r}")
    description, a, b = (_text(data, key, str(path)) for key in ("description", "a", "b"))
    raw = data.get("pairs")
    if not isinstance(raw, list) or not raw:
        raise TraitError(f"{path}: 'pairs' must be a non-empty list of {{'question', 'a', 'b'}} objects")
    pairs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise TraitError(f"{path}: pairs[{i}] must be an object with 'question', 'a', 'b'")
        q, pa, pb = (_text(item, key, f"{path}: pairs[{i}]") for key in ("question", "a", "b"))
        if pa == pb:
            raise TraitError(f"{path}: pairs[{i}]: 'a' and 'b' are the same text")
        pairs.append(Example(q, pa, pb))
    if len({p.question for p in pairs}) != len(pairs):
        raise TraitError(f"{path}: 'pairs' repeats a question")
    return Control(name, description, a, b, tuple(pairs), str(path), sha256)


def load_control(path: str | Path) -> Control:
    path = Path(path)
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TraitError(f"{path}: not valid JSON ({e})") from None
    return parse_control(data, path, hashlib.sha256(raw).hexdigest())


def load_controls(folder: str | Path | None = None, none_ok: bool = False) -> dict[str, Control]:
    """`{name: Control}` for every `*.json` in `folder` (default: the built-in sets, none while that folder
    does not exist); with `none_ok`, "none" means no controls. A folder given that is not one is an
    error."""
    if none_ok and str(folder) == "none":
        return {}
    if folder is not None and not Path(folder).is_dir():
        raise TraitError(f"control sets: {folder} is not a folder")
    folder = Path(folder) if folder is not None else BUILTIN_CONTROLS_DIR
    out: dict[str, Control] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        control = load_control(path)
        if control.name in out:
            raise TraitError(
                f"{path}: control name {control.name!r} is also used by {out[control.name].path}"
            )
        out[control.name] = control
    return out
