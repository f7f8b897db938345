"""Faster CPU inference: the Linear layers' weights reordered once into oneDNN's blocked layout.

Decoding multiplies a handful of rows (one token per sample) by every weight matrix, once per token. Given a plain
row-major weight, PyTorch's CPU kernels re-arrange it on every call, and that, not memory bandwidth, sets the pace
(the README's speed section has the measured figures).
Prepacking is what ``torch.compile`` does for frozen CPU models; here it is done directly, for inference only (the
packed layers have no backward). The ops are PyTorch's own (``torch.ops.mkldnn``); where they are missing, or do
not reproduce ``F.linear`` on a probe, the model is left as it was. In bf16 the MLP's GELU is also fused into the
packed ``c_fc`` (oneDNN applies it to the fp32 accumulator before rounding): one pass over the (B, T, 4C) activations
instead of two. In fp32 it stays apart, where oneDNN's GELU would move the last bits of today's outputs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2scratch.model import MLP

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """``nn.Linear`` for inference on a CPU, with its weight prepacked. ``weight`` stays (tied weights, dtype).
    With ``gelu``, the layer is followed by GELU's tanh approximation, fused into the packed op.

    Where the packed copy cannot serve, it is plain ``F.linear``: when a gradient is wanted, or when the weight
    was changed in place, cast or moved since it was packed (the copy is then packed anew if it can be).
    """

    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.batch_hint = batch_hint
        self.gelu = False
        self._pack()

    def _pack(self) -> None:
        weight = self.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.batch_hint)
        self.packed_from = _identity(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return self._plain(x)  # the packed op has no backward
        if self.packed_from != _identity(self.weight):
            if self.weight.device.type != "cpu" or self.weight.dtype != self.packed.dtype:
                return self._plain(x)
            self._pack()  # the weights were changed in place (load_state_dict, an optimizer step)
        rows = x.reshape(-1, self.in_features)
        post_op, algorithm = ("gelu", "tanh") if self.gelu else ("none", "")
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, post_op, [], algorithm)
        return out.view(*x.shape[:-1], self.out_features)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return F.gelu(out, approximate="tanh") if self.gelu else out


def _identity(weight: torch.Tensor) -> tuple:
    """What changes when a tensor is modified in place, cast or moved."""
    return weight._version, weight.data_ptr(), weight.dtype, weight.device


def pack_linears(model: nn.Module, batch_hint: int = 5) -> int:
    """Replace, in place, every ``nn.Linear`` of a CPU model in eval mode by a ``PackedLinear``; return how many.

    ``batch_hint`` is the number of rows the layers will mostly see (oneDNN picks its blocking for it). Returns 0,
    changing nothing, when packing is unavailable or inexact here.
    """
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not linears or model.training or not _supported(linears[0][1], batch_hint):
        return 0
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(linear, batch_hint))
    if linears[0][1].weight.dtype == torch.bfloat16:
        for mlp in model.modules():
            if isinstance(mlp, MLP) and isinstance(mlp.c_fc, PackedLinear) and mlp.gelu.approximate == "tanh":
                mlp.c_fc.gelu, mlp.gelu = True, nn.Identity()  # type: ignore[assignment]
    log.debug("prepacked %d linear layers for oneDNN", len(linears))
    return len(linears)


def _supported(linear: nn.Linear, batch_hint: int) -> bool:
    """Whether packed layers work here and agree with ``F.linear`` on a probe, to the dtype's rounding."""
    weight = linear.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        with torch.no_grad():
            x = torch.randn(batch_hint, linear.in_features, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, linear.bias, "none", [], "")
            want = F.linear(x.double(), weight.double(), None if linear.bias is None else linear.bias.double())
    except (RuntimeError, NotImplementedError) as err:
        log.debug("no prepacked linear layers: %s", err)
        return False
    tolerance = 1e-5 if weight.dtype == torch.float32 else 2e-2  # fp32 stays fp32; bf16 rounds its output
    error = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    return error <= tolerance
