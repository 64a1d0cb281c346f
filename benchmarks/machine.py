"""What machine a benchmark ran on: every benchmark prints this first, so no figure is read without it.

CPUs differ between machines: some have native bf16 (AVX-512 bf16, AMX), others only AVX2, where bf16 is
emulated and hundreds of times slower than fp32 (`--dtype auto` picks fp32 there). Figures from one kind
say little about the other.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# An AVX-512 CPU limited to AVX2 kernels, to time what a CPU with AVX2 only does: ATen's own kernels
# (elementwise, attention), oneDNN, and MKL's matmuls (without the last, fp32 matmuls keep AVX-512 and run
# twice as fast as on an AVX2 machine). Run a benchmark under all three, e.g.
#   MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench.py
EMULATION = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return set()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def native_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def describe(device: torch.device | str = "cpu") -> dict:
    """The facts a reader needs to compare figures: CPU kind and features, threads, versions, GPU."""
    flags = cpu_flags()
    facts = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
        "amx": "amx_bf16" in flags,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if emulated := {k: os.environ[k] for k in EMULATION if k in os.environ}:
        facts["emulated_isa"] = " ".join(f"{k}={v}" for k, v in emulated.items())
    if str(device).startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return facts


def header(device: torch.device | str = "cpu") -> str:
    """One line: `machine: <cpu>, <cores> cores, <capability>, native bf16 yes/no, ...`."""
    f = describe(device)
    parts = [
        f"{f['cpu']}",
        f"{f['cores']} cores",
        f"ATen {f['capability']}",
        f"native bf16 {'yes' if f['native_bf16'] else 'no'}" + (" (AMX)" if f["amx"] else ""),
        f"torch {f['torch']} with {f['torch_threads']} threads",
    ]
    if "emulated_isa" in f:
        parts.append(f"emulating {f['emulated_isa']}")
    if "gpu" in f:
        parts.append(f"GPU {f['gpu']}")
    return "machine: " + ", ".join(parts)
