"""Persona vector files: float32 `[num_layers+1, hidden]` tensors saved with `torch.save`, not normalised,
indexed like `hidden_states` (row L = layer L, see records.py), with an optional JSON sidecar beside them
(`evil_response_avg_diff.pt` → `evil_response_avg_diff.json`) that says how they were made.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from screener.errors import UserError

BUILTIN_DIR = Path(__file__).parent / "data" / "vectors"
DEFAULT_METHOD = "response_avg"
LAYER_CONVENTION = (
    "hidden_states[L]: 0 = embeddings, L = output of decoder block L, num_layers = after final norm"
)


class VectorError(UserError, ValueError):
    """A vector file that is missing, malformed or made for another model."""


@dataclass(frozen=True)
class Vector:
    name: str  # the trait name used in the scores table
    path: str
    sha256: str
    tensor: torch.Tensor = field(repr=False)
    sidecar: dict = field(default_factory=dict, repr=False)

    @property
    def default_layer(self) -> int | None:
        """The sidecar's `chosen_layer`, if any; a VectorError naming the sidecar if it is not a layer
        number (read only when no --layer is given, so --layer overrides a bad one)."""
        layer = self.sidecar.get("chosen_layer")
        if layer is None:
            return None
        if isinstance(layer, bool) or not isinstance(layer, int | float) or layer != int(layer) or layer < 0:
            raise VectorError(
                f"{sidecar_path(self.path)}: chosen_layer {layer!r} is not a layer number; fix the sidecar "
                "or pass --layer"
            )
        return int(layer)

    def check_layer(self, layer: int, num_layers: int, model_name: str = "the model") -> None:
        """Refuse a sidecar's chosen layer the model does not have, naming the sidecar."""
        if not 0 <= layer <= num_layers:
            raise VectorError(
                f"{sidecar_path(self.path)}: chosen_layer {layer} is out of range: {model_name} has "
                f"hidden_states layers 0..{num_layers}; fix the sidecar or pass --layer"
            )


def unit_vectors(
    tensors: Sequence[torch.Tensor], layers: Sequence[int], names: Sequence[str] = ()
) -> dict[int, torch.Tensor]:
    """`{L: [hidden, traits]}` float32 unit vectors from `[num_layers+1, hidden]` vectors, one column each.

    Norms are taken in float64, so a vector's scale never changes a score: neither 1e30s (whose float32
    norm overflows) nor 1e-30s differ from the same direction at scale 1. Only an all-zero row has no
    direction. `names` (the files) name the culprit in that error.
    """
    units = {}
    for layer in layers:
        for i, t in enumerate(tensors):
            if not bool(t[layer].any()):
                who = f"{names[i]}: " if i < len(names) else ""
                raise VectorError(f"{who}a persona vector is zero at layer {layer}; it has no direction")
        rows = torch.stack([t[layer].double() for t in tensors], dim=1)
        units[layer] = (rows / rows.norm(dim=0, keepdim=True)).float()
    return units


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


# torch.save writes a zip archive; before torch 1.6 (or with _use_new_zipfile_serialization=False), a pickle
TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")


def load_vector(path: str | Path, name: str | None = None) -> Vector:
    """A vector file and its sidecar, checked: every problem is one VectorError naming the file. Loading
    goes through torch's weights-only unpickler, which runs no code from the file."""
    path = Path(path)
    if not path.is_file():
        raise VectorError(f"vector file not found: {path}")
    data = path.read_bytes()
    if not data.startswith(TORCH_SAVE_MAGIC):
        raise VectorError(f"{path}: not a torch.save file ({_what_it_is(data)})")
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VectorError(f"{path}: cannot be loaded as a tensor ({first})") from None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise VectorError(f"{path}: expected a [num_layers+1, hidden] tensor, got {shape}")
    if not tensor.is_floating_point():
        raise VectorError(f"{path}: expected a float tensor, got {str(tensor.dtype).removeprefix('torch.')}")
    if not torch.isfinite(tensor).all():
        raise VectorError(f"{path}: holds NaN or inf values")
    if not torch.isfinite(tensor.float()).all():
        raise VectorError(f"{path}: holds values beyond float32's range (|x| > 3.4e38)")
    sidecar = _read_sidecar(path)
    trait = name or str(sidecar.get("trait") or "") or path.stem.split("_")[0]
    return Vector(trait, str(path), hashlib.sha256(data).hexdigest(), tensor.float(), sidecar)


def _what_it_is(data: bytes) -> str:
    if not data:
        return "the file is empty"
    head = data[:40]
    text = head.decode("utf-8", "replace")
    if all(c.isprintable() or c.isspace() for c in text) and "\ufffd" not in text:
        return f"it begins with the text {text!r}"
    return f"it begins with the bytes {head[:8].hex(' ')}"


def _read_sidecar(path: Path) -> dict:
    """The JSON sidecar beside a vector file (empty if there is none); a VectorError naming it if it is
    not a JSON object."""
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        sidecar = json.loads(side.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise VectorError(
            f"{side}: the vector's sidecar is not valid JSON ({e}); fix it or remove it"
        ) from None
    if not isinstance(sidecar, dict):
        raise VectorError(f"{side}: the vector's sidecar is not a JSON object; fix it or remove it")
    return sidecar


def check_vector(vec: Vector, num_layers: int, hidden_size: int, model_name: str = "the model") -> None:
    """Refuse, before any work, a vector whose shape does not fit the model."""
    rows, hidden = vec.tensor.shape
    if hidden != hidden_size:
        raise VectorError(
            f"{vec.path}: hidden size {hidden} does not match {model_name} (hidden size {hidden_size}); "
            "vectors must be extracted from the model being screened"
        )
    if rows != num_layers + 1:
        raise VectorError(
            f"{vec.path}: {rows} rows, but {model_name} has {num_layers} layers, so its vectors need "
            f"{num_layers + 1} rows (one per hidden_states entry, embeddings included)"
        )


def save_vector(path: str | Path, tensor: torch.Tensor, sidecar: dict) -> Path:
    """Write a reference-compatible `.pt` file and its JSON sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: torch.save writes a view's whole storage, so a row of the pipeline's [3, L+1, H] tensor would
    # carry the other methods' vectors and triple the file
    torch.save(tensor.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format), path)
    sidecar = {"layer_convention": LAYER_CONVENTION, **sidecar}
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return path


def builtin_vector_path(model_name: str, trait: str, method: str = DEFAULT_METHOD) -> Path:
    return BUILTIN_DIR / model_name / f"{trait}_{method}_diff.pt"


def builtin_traits(model_name: str) -> list[str]:
    folder = BUILTIN_DIR / model_name
    suffix = f"_{DEFAULT_METHOD}_diff.pt"
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []


def resolve_vectors(traits: list[str], vector_args: list[str], model_name: str) -> list[Vector]:
    """Vectors from `--traits a,b` (built-ins for the model) and `--vector NAME=PATH` (any file)."""
    out: list[Vector] = []
    for trait in traits:
        path = builtin_vector_path(model_name, trait)
        if not path.is_file():
            have = ", ".join(builtin_traits(model_name)) or "none"
            raise VectorError(
                f"no built-in {trait!r} vector for {model_name} (built-ins: {have}); "
                f"extract one with `screener extract {trait} --model ...`, then pass --vector {trait}=PATH"
            )
        out.append(load_vector(path, trait))
    for arg in vector_args:
        name, sep, path = arg.partition("=")
        if not sep or not name or not path:
            raise VectorError(f"--vector takes NAME=PATH, got {arg!r}")
        out.append(load_vector(path, name))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise VectorError(f"trait names must be unique, got {names}")
    if not out:
        raise VectorError("no vectors: pass --traits NAME,... or --vector NAME=PATH")
    return out


# -- the vectors and layers a command asks for ------------------------------------------------------

DEFAULT_TRAITS = ("evil", "sycophantic", "hallucinating")


class ModelShape(Protocol):
    name: str
    num_layers: int
    hidden_size: int


def vectors_for(model: ModelShape, traits: Sequence[str], specs: Sequence[str]) -> list[Vector]:
    """The vectors of `--traits` (built-in for the model) and `--vector NAME=PATH`, each checked against
    the model; neither given: the default traits the model has built-in vectors for."""
    traits = list(traits) or ([] if specs else [t for t in DEFAULT_TRAITS if t in builtin_traits(model.name)])
    vectors = resolve_vectors(traits, list(specs), model.name)
    for v in vectors:
        check_vector(v, model.num_layers, model.hidden_size, model.name)
    return vectors


def default_layers(vectors: list[Vector], num_layers: int, model_name: str = "the model") -> list[int]:
    """Each vector's chosen layer (from its sidecar, checked against the model); else two thirds of the
    way up, as in the paper."""
    chosen = set()
    for v in vectors:
        if (layer := v.default_layer) is not None:
            v.check_layer(layer, num_layers, model_name)
            chosen.add(layer)
    return sorted(chosen) or [round(num_layers * 2 / 3)]


def layers_for(model: ModelShape, vectors: list[Vector], layers: Sequence[int]) -> tuple[int, ...]:
    """`--layer` when given (a bad sidecar layer is then never read), else the vectors' chosen layers."""
    if not layers:
        return tuple(default_layers(vectors, model.num_layers, model.name))
    if bad := sorted(layer for layer in set(layers) if not 0 <= layer <= model.num_layers):
        raise UserError(f"--layer {bad}: {model.name} has hidden_states layers 0..{model.num_layers}")
    return tuple(sorted(set(layers)))


def vectors_at(
    model: ModelShape, traits: Sequence[str], specs: Sequence[str], layers: Sequence[int]
) -> tuple[list[Vector], tuple[int, ...], dict[int, torch.Tensor]]:
    """What a command that projects asks for: the vectors (`vectors_for`), the layers they are read at
    (`layers_for`) and their unit vectors there (`unit_vectors`, traits in the vectors' order)."""
    vectors = vectors_for(model, traits, specs)
    at = layers_for(model, vectors, layers)
    return vectors, at, unit_vectors([v.tensor for v in vectors], at, [v.path for v in vectors])
