"""How model work runs, resolved once on the driver: the device, the dtype and the work per worker call.

Screen, shift, explain and extract all turn the user's `--device` / `--dtype` ("auto" included) into a
`Work` here, carry it in their plan to the workers as is, and load models and scorers through it, so a
setting means the same in every command and a worker never resolves "auto" differently from its driver.
The scorer's batch sizes for the device come from `Work.score_settings` (`ScoreSettings.for_device`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from screener.models import AdapterRef, ModelRef, pick_device, pick_dtype
from screener.scoring import Scorer, ScoreSettings

# samples (or prompts, or reads) per worker call: a GPU needs many in flight between calls; on a CPU,
# fewer keep the progress and the commits coming
CPU_CHUNK, GPU_CHUNK = 64, 512


@dataclass(frozen=True)
class Work:
    """A resolved device and dtype, and what follows from them."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto", here: bool = True) -> Work:
        """`--device` and `--dtype` as the user gave them (names, or "auto"); `here`: the model runs on
        this machine (no Ray cluster), so a CUDA device must exist here (`pick_device`)."""
        dev = pick_device(device, here)
        return cls(dev, pick_dtype(dtype, dev))

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def chunk_size(self, given: int | None = None) -> int:
        """Items per worker call: `given`, else the device's default."""
        return given or (GPU_CHUNK if self.gpu else CPU_CHUNK)

    def score_settings(self, *, tuned: bool = True, **overrides) -> ScoreSettings:
        """The scorer's settings on this device (`ScoreSettings.for_device`)."""
        return ScoreSettings.for_device(self.gpu, tuned=tuned, **overrides)

    def load(self, model: ModelRef | AdapterRef):
        """The model (an adapter merged into its base) and tokenizer, on this device in this dtype."""
        return model.load(self.device, self.dtype)

    def scorer(
        self, model: ModelRef | AdapterRef, units: dict[int, torch.Tensor] | None, settings: ScoreSettings
    ) -> Scorer:
        """The model loaded (`load`) behind a `Scorer`: what every worker stage runs."""
        return Scorer(*self.load(model), units, settings)

    def describe(self) -> dict[str, str]:
        """What "auto" became, for a record of the work (a sidecar, a run's settings)."""
        return {"resolved_device": str(self.device), "resolved_dtype": self.dtype_name}
