"""The fused head + cross-entropy of training (ops/head_loss.py) against PyTorch's unfused path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2scratch import GPT, GPTConfig
from gpt2scratch.ops import head_loss as loss
from gpt2scratch.ops.head_loss import head_loss


def reference(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = F.linear(x, w)
    return F.cross_entropy(logits.float().view(-1, w.size(0)), t.view(-1), ignore_index=-1)


def run(fn, x0: torch.Tensor, w0: torch.Tensor, t: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        value = fn(x, w, t) if fn is head_loss else None
    if value is None:
        value = reference(x, w, t, dtype)
    (value * scale).backward()
    return value.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows_per_slice", [3, 32])  # slices that do and do not divide the rows
def test_loss_and_gradients_match_pytorch(dtype: torch.dtype, tol: float, rows_per_slice: int, monkeypatch) -> None:
    monkeypatch.setattr(loss, "ROWS_PER_SLICE", rows_per_slice)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 37, 48, generator=g)  # (B, T, C)
    w0 = torch.randn(300, 48, generator=g) * 0.5  # (V, C)
    t = torch.randint(0, 300, (2, 37), generator=g)
    t[0, ::5] = -1  # ignored positions
    ours = run(head_loss, x0, w0, t, dtype, scale=0.25)
    ref = run(reference, x0, w0, t, dtype, scale=0.25)
    assert torch.allclose(ours[0], ref[0], rtol=1e-6 if dtype == torch.float32 else 1e-3)
    for mine, theirs in zip(ours[1:], ref[1:], strict=True):
        assert mine.dtype == theirs.dtype == torch.float32
        assert (mine - theirs).abs().max() <= tol * theirs.abs().max()
    assert ours[1][0, ::5].abs().max() == 0  # ignored positions get no gradient


def test_without_grad_gives_the_loss_alone() -> None:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(10, 16, generator=g), torch.randn(50, 16, generator=g)
    t = torch.randint(0, 50, (10,), generator=g)
    with torch.no_grad():
        value = head_loss(x, w, t)
    assert torch.allclose(value, F.cross_entropy(x @ w.t(), t), rtol=1e-6)


def test_model_loss_without_logits_equals_the_plain_loss() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100))
    idx = torch.randint(0, 100, (3, 16))
    logits, plain = model(idx, idx)
    none, fused = model(idx, idx, return_logits=False)
    assert logits is not None and none is None
    assert torch.allclose(plain, fused, rtol=1e-6)
    plain.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fused.backward()
    for want, got in zip(expected, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(want, got, rtol=1e-4, atol=1e-7)


def test_float16_scaled_gradients_survive() -> None:
    """fp16 with a GradScaler: gradients scaled by 65536 must match fp32 ones, the tiny ones included (the fused
    path would compute them in fp16 before the scale is undone, and flush those of unlikely tokens to zero)."""
    g = torch.Generator().manual_seed(2)
    x0, w0 = torch.randn(64, 16, generator=g).half(), torch.randn(3000, 16, generator=g).half()
    t = torch.randint(0, 3000, (64,), generator=g)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    (head_loss(x, w, t) * 65536.0).backward()  # what a GradScaler does
    x32, w32 = x0.float().requires_grad_(), w0.float().requires_grad_()
    (F.cross_entropy(x32 @ w32.t(), t) * 65536.0).backward()
    assert w.grad is not None and w32.grad is not None
    assert w.grad.dtype == torch.float16
    assert (w.grad.float() - w32.grad).abs().max() <= 1e-2 * w32.grad.abs().max()
    assert w.grad.abs().min() > 0  # tiny gradients of unlikely tokens were not flushed to zero
