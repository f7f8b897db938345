"""Weight-only int8 inference: every Linear layer's weight stored as int8 with one scale per output channel.

W (N, K) is replaced by q = round(W / s) in [-127, 127] with s = max|W[n, :]| / 127 for each output row n, and
x W^T by (x q^T) * s, computed by PyTorch's ``_weight_int8pack_mm``, which reads the int8 weight and multiplies in
the activations' dtype (bf16 here): half the bytes of a bf16 weight per token, the point at batch 1, where a decoding
step is the weight read. The kernel's work grows with the rows, so at batch 5 and more bf16 (ops/prepack.py) is faster.
The token embedding stays in the activation dtype (a lookup reads a few rows of it); the output head, which shares it
in training, gets its own int8 copy. torchao's int8 weight-only config does the same arithmetic but, in eager mode,
turns the whole weight back into bf16 at every call; here the int8 kernel is called directly.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from gpt2scratch.errors import UsageError

log = logging.getLogger(__name__)

K_MULTIPLE = 16  # _weight_int8pack_mm's CPU kernel needs K to be a multiple of 16 (other K: wrong sums, crashes)


class Int8Linear(nn.Module):
    """``nn.Linear`` for inference with an int8 weight (N, K) and per-output-channel scales (N,); activations and
    outputs in ``dtype``. No backward."""

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,)
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        out = torch._weight_int8pack_mm(rows, self.qweight, self.scale)  # (M, N) in x's dtype
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, (N, K) in its dtype (for tests and comparisons)."""
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]


def quantize_int8(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace, in place, every ``nn.Linear`` of a CPU model by an ``Int8Linear`` computing in ``dtype``; return
    how many. UsageError where the int8 kernel cannot serve (not a CPU, an input width not a multiple of 16)."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UsageError(f"--quantize int8 runs on the CPU only, not on {device.type}; use --device cpu")
    if dtype not in (torch.bfloat16, torch.float32):
        raise UsageError(f"--quantize int8 computes in bfloat16 or float32, not {str(dtype).removeprefix('torch.')}")
    odd = sorted({m.in_features for _, m in linears if m.in_features % K_MULTIPLE})
    if odd:
        raise UsageError(f"--quantize int8 needs layer widths that are multiples of {K_MULTIPLE}; this model has {odd}")
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear, dtype))
    log.debug("quantized %d linear layers to int8", len(linears))
    return len(linears)
