"""PEFT adapters (a LoRA) on top of a base model: `resolve_adapter` → `AdapterRef` (no weights), whose
`load` merges the adapter into the base's weights; `adapter_mismatches` checks it against the base from
the adapter file's header and the base's config alone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from screener.models.loading import ModelError, ModelRef, model_config, sha256_file

ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_adapter(spec: str) -> bool:
    """A folder holding a PEFT adapter (`adapter_config.json`) rather than a whole model."""
    return Path(spec, ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class AdapterRef:
    """A PEFT adapter folder (a LoRA, or another adapter that changes weights) applied to `base`.

    `load` loads the base and merges the adapter into its weights (`merge_and_unload`, in the load dtype),
    so what comes back is an ordinary model that every code path drives like any other.
    """

    spec: str  # as the user gave it
    path: str  # the adapter folder
    sha256: str  # of the adapter's weight file
    base: ModelRef
    peft_type: str  # "LORA", ...
    trained_on: str = ""  # the adapter config's `base_model_name_or_path`, as its trainer recorded it

    @property
    def name(self) -> str:
        return Path(self.path).resolve().name

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    @property
    def hidden_size(self) -> int:
        return self.base.hidden_size

    @property
    def source(self) -> str:
        return f"{Path(self.path).resolve()} (adapter) on {self.base.source or self.base.spec}"

    @property
    def tokenizer_path(self) -> str:
        """Where its tokenizer is: the adapter folder when it ships one, else the base's."""
        return self.path if any(Path(self.path, f).is_file() for f in _TOKENIZER_FILES) else self.base.path

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """The base model with the adapter merged in, and the base's tokenizer, for inference."""
        from peft import PeftModel

        if not Path(self.path, ADAPTER_CONFIG).is_file():
            raise ModelError(f"adapter folder not found on this node: {self.path}")
        int8 = dtype == torch.int8  # merged in fp32, then quantised: LoRA merges into float weights
        model, tok = self.base.load(device, torch.float32 if int8 else dtype)
        model = PeftModel.from_pretrained(model, self.path).merge_and_unload()
        model.eval().requires_grad_(False)
        if int8:
            from screener.models.int8 import quantize_int8

            quantize_int8(model)
        return model, tok


def _adapter_weights(folder: Path) -> Path:
    for name in _ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    have = ", ".join(_ADAPTER_WEIGHTS)
    raise ModelError(f"{folder} holds {ADAPTER_CONFIG} but no adapter weights ({have})")


def resolve_adapter(spec: str, base: ModelRef) -> AdapterRef:
    """A PEFT adapter folder on top of `base`, read without loading any weights."""
    from peft import PeftConfig

    folder = Path(spec)
    try:
        cfg = PeftConfig.from_pretrained(str(folder))
    except Exception as e:
        raise ModelError(f"{folder / ADAPTER_CONFIG}: not a PEFT adapter config ({e})") from e
    peft_type = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if cfg.is_prompt_learning or cfg.is_adaption_prompt:
        raise ModelError(
            f"{spec}: a {peft_type} adapter adds prompt tokens instead of changing weights, so it cannot "
            "be merged into the model; give a LoRA-style adapter or the fine-tuned model itself"
        )
    sha = sha256_file(_adapter_weights(folder))
    return AdapterRef(spec, str(folder), sha, base, peft_type, cfg.base_model_name_or_path or "")


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file (read from its header) or a torch file (memory-mapped)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def adapter_mismatches(adapter: AdapterRef) -> list[str]:
    """What in the adapter does not fit its base, one phrase each (empty when it fits): decoder layers or
    modules the base lacks, weight shapes that differ (a hidden size). Read from the adapter file's header
    and the base's config built on the meta device: no weights load."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(adapter.base.path))
    modules = dict(model.named_modules())
    n_layers = adapter.base.num_layers
    missing: list[str] = []
    deepest = -1
    shapes: list[str] = []
    for key, shape in _tensor_shapes(_adapter_weights(Path(adapter.path))).items():
        name = key.removeprefix("base_model.model.")
        for part, axis, attr in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
            if part not in name:
                continue
            target = name.split(part)[0]
            if m := re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", f".{target}."):
                deepest = max(deepest, int(m.group(1)))
            module = modules.get(target)
            if module is None:
                missing.append(target)
            elif hasattr(module, attr) and len(shape) == 2 and shape[axis] != getattr(module, attr):
                side = "inputs" if axis == 1 else "outputs"
                shapes.append(
                    f"{target} has {shape[axis]} {side} in the adapter, {getattr(module, attr)} in the base"
                )
    out = []
    if deepest >= n_layers:
        out.append(f"layer count: the adapter changes decoder layer {deepest + 1}, the base has {n_layers}")
    elif missing:
        more = f" (and {len(set(missing)) - 1} more)" if len(set(missing)) > 1 else ""
        out.append(f"architecture: the adapter changes {missing[0]}, which the base lacks{more}")
    if shapes:
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        out.append(f"hidden size: {shapes[0]}{more}")
    return out
