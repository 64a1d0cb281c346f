"""`--dtype int8` on a CPU: the decoder blocks' linear layers as dynamic int8 matmuls, activations fp32.

Each weight matrix is quantised once at load, symmetric per output channel; each linear layer's input is
quantised as it comes, symmetric per token (its row's absolute maximum maps to 127); the product is
`torch._int_mm` (int8 x int8 -> exact int32, oneDNN on x86) rescaled to fp32. That is the scheme of
torchao's `Int8DynamicActivationInt8WeightConfig`, without its eager-mode overhead on CPUs; the deprecated
`torch.ao.quantization.quantize_dynamic` quantises each input per tensor, which the model's outlier tokens
make far less faithful (benchmarks/RESULTS.md has the figures). Embeddings, norms, attention and the LM
head stay fp32, so everything the hooks read is fp32.
"""

from __future__ import annotations

import torch

from screener.models.hooks import decoder_parts

INT8 = torch.int8  # the dtype `pick_dtype` resolves `--dtype int8` to: fp32 activations, int8 linear layers


class Int8Linear(torch.nn.Module):
    """A frozen `nn.Linear` whose matmul runs in int8 (dynamic per-token inputs, per-channel weights)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        # [in, out], contiguous: `_int_mm`'s fast layout; a parameter, so that parameter counts (the
        # scorer's FLOPs) see it like the weight it replaces
        self.weight_t = torch.nn.Parameter(q.t().contiguous(), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        step = rows.abs().amax(dim=1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny).div_(127)
        q = (rows / step).round_().clamp_(-127, 127).to(torch.int8)
        y = torch._int_mm(q, self.weight_t).float().mul_(step).mul_(self.scale)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every `nn.Linear` inside the decoder blocks of an fp32 CPU model for an `Int8Linear`, in place."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 linear layers run on a CPU only")
    _, blocks, _ = decoder_parts(model)
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    return model


def is_int8(model: torch.nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def weight_dtype(model: torch.nn.Module) -> torch.dtype:
    """What the model computes in, by `pick_dtype`'s names: `INT8` for a quantised model, else its
    parameters' dtype (a tuned batch size is kept per dtype)."""
    return INT8 if is_int8(model) else next(model.parameters()).dtype
