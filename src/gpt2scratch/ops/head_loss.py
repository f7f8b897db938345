"""The output head and the cross-entropy, computed together for training.

With autocast, ``F.cross_entropy(lm_head(x).float(), targets)`` holds the (N, V) logits in bf16, again in fp32, their
log-softmax in fp32 for backward, and, in backward, a zeroed fp32 gradient and its bf16 copy. At 124M with B=8, T=256
that is 2048 x 50257 values five times over, and streaming them costs a fifth of a CPU step. Here the logits are
computed once, in the compute dtype, and turned into the gradient of the loss in place, a slice of rows at a time,
in fp32, in a slice small enough to stay in the CPU's cache. Backward is then just the two matmuls of the head.
The loss and the gradients are the same as PyTorch's to rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

ROWS_PER_SLICE = 32  # 32 x 50257 fp32 values = 6.4 MB: fits a CPU's L3 cache


def head_loss(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1, vocab_size: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of the logits ``x @ weight.T`` against ``targets``, in fp32.

    ``x`` (..., C) and ``targets`` (...) are flattened to N rows; ``weight`` is (V, C), or (Vp, C) padded with rows
    past ``vocab_size`` whose logits do not count (``GPT.pad_head``). Under autocast the matmuls run in autocast's
    dtype, as ``nn.Linear`` would; targets equal to ``ignore_index`` do not count. Fused on CPUs in fp32 and bf16;
    elsewhere, and for a padded weight, this is the plain ``F.cross_entropy`` of the logits.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if vocab_size is not None and weight.size(0) > vocab_size:  # padded (a GPU's shape): the real columns only
        return F.cross_entropy((x @ weight.t())[:, :vocab_size].float(), targets, ignore_index=ignore_index)
    if x.device.type != "cpu" or x.dtype == torch.float16:
        # GPUs: slices of 32 rows would be thousands of small kernel launches. fp16: training scales the loss
        # (GradScaler) so that small gradients survive fp16, and a gradient stored in fp16 during forward, before
        # that scale is applied, would flush them to zero. Both take the plain path.
        return F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=ignore_index)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _HeadLoss.apply(x, weight, targets, ignore_index)
    with torch.no_grad():
        return _loss_and_gradient_(x @ weight.t(), targets, ignore_index, gradient=False)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> Any:
        logits = x @ weight.t()  # (N, V), the compute dtype; becomes d(loss)/d(logits) below
        loss = _loss_and_gradient_(logits, targets, ignore_index, gradient=True)
        ctx.save_for_backward(x, weight, logits)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> Any:
        x, weight, grad_logits = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_logits @ weight).mul_(grad_loss)  # (N, C)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.t() @ x).mul_(grad_loss)  # (V, C)
        return grad_x, grad_weight, None, None


def _loss_and_gradient_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, gradient: bool) -> torch.Tensor:
    """The mean cross-entropy of ``logits`` (N, V); with ``gradient``, overwrite them with its gradient.

    d(mean loss)/d(logits) = (softmax(logits) - one_hot(target)) / count for counted rows, 0 for ignored ones.
    """
    valid = targets != ignore_index  # (N,)
    count = valid.sum()
    safe_targets = targets.where(valid, 0)[:, None]  # (N, 1): any column for ignored rows; they are masked below
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.size(0), ROWS_PER_SLICE):
        rows = slice(start, start + ROWS_PER_SLICE)
        z = logits[rows].float()  # (r, V), fp32: bf16 loses too much in the log-sum-exp
        top = z.amax(dim=1, keepdim=True)  # (r, 1)
        target_logit = z.gather(1, safe_targets[rows])  # (r, 1)
        z.sub_(top).exp_()  # (r, V): exp(z - max), in place
        norm = z.sum(dim=1, keepdim=True)  # (r, 1)
        row_loss = (norm.log() + top - target_logit).squeeze(1)  # log-sum-exp minus the target's logit
        total += row_loss.masked_fill(~valid[rows], 0.0).sum()
        if gradient:
            z.div_(norm * count)  # softmax / count
            z.scatter_add_(1, safe_targets[rows], torch.full_like(target_logit, -1.0) / count)
            z.masked_fill_(~valid[rows, None], 0.0)
            logits[rows] = z
    return total / count
