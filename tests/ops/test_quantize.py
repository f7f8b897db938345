"""Weight-only int8 inference (ops/quantize.py): the arithmetic of one layer, and the quality of a trained model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from gpt2scratch.config import GPTConfig
from gpt2scratch.data.builtin import shakespeare_text
from gpt2scratch.errors import UsageError
from gpt2scratch.inference.load import for_inference
from gpt2scratch.model import GPT
from gpt2scratch.ops.quantize import Int8Linear, quantize_int8
from gpt2scratch.tokenizer import encode

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def test_int8_layer_is_the_linear_of_its_rounded_weight() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear(linear, torch.float32)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() == 127  # each row uses the full range
    rounded = layer.dequantized()
    # Per output channel, the rounding error is at most half a step: max|W[n]| / 254.
    steps = linear.weight.abs().amax(dim=1, keepdim=True) / 254
    assert bool(((rounded - linear.weight).abs() <= steps * (1 + 1e-5)).all())
    x = torch.randn(5, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, rounded, linear.bias), atol=1e-5, rtol=1e-5)
        bf16 = Int8Linear(linear, torch.bfloat16)(x.bfloat16())
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - F.linear(x, rounded, linear.bias)).abs().max() <= 2e-2 * F.linear(x, rounded).abs().max()


def test_bad_uses_are_usage_errors() -> None:
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=24, block_size=8, vocab_size=64)).eval()
    with pytest.raises(UsageError, match="multiples of 16; this model has \\[24\\]"):
        quantize_int8(copy.deepcopy(model), torch.float32)  # the kernel would add wrong sums for K = 24
    with pytest.raises(UsageError, match="bfloat16 or float32"):
        quantize_int8(model.double(), torch.float64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model (n_embd 64) trained for 60 steps on Shakespeare: its next-token distributions are no longer
    flat, so that rounding its weights could visibly change them."""
    from gpt2scratch.training.loop import train

    out = tmp_path_factory.mktemp("int8")
    flags = ["--data", "shakespeare", "--n-embd", "64", "--out-dir", str(out), "--max-steps", "60", "-B", "8"]
    return train(tiny_config(*flags, "--target-loss", "0", "--snapshot-interval", "0")).model_path


def loss(model: GPT, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy over windows of 64 tokens of ``ids``."""
    windows = ids[: len(ids) // 65 * 65].view(-1, 65)
    with torch.no_grad():
        _, value = model(windows[:, :-1], windows[:, 1:])
    assert value is not None
    return float(value)


def test_int8_keeps_the_quality_of_bf16(trained: Path) -> None:
    """Perplexity within 1% of the bf16 model's, and greedy continuations that mostly agree with bf16's."""
    bf16 = for_inference(GPT.from_pretrained(trained), CPU, torch.bfloat16)
    int8 = for_inference(GPT.from_pretrained(trained), CPU, torch.bfloat16, quantize="int8")
    assert isinstance(int8.lm_head, Int8Linear) and all(
        isinstance(b.mlp.c_fc, Int8Linear) and isinstance(b.attn.c_attn, Int8Linear) for b in int8.transformer.h
    )
    text = torch.tensor(encode(shakespeare_text()[-30_000:]))  # 64-token windows from the end of the corpus
    loss_bf16, loss_int8 = loss(bf16, text), loss(int8, text)
    assert loss_bf16 < 8.0  # trained: well below log(50257) = 10.8
    assert abs(loss_int8 - loss_bf16) < 0.01  # perplexity exp(loss) within 1%
    prompts = text[:160].view(10, 16)
    greedy_bf16 = bf16.generate(prompts, 32, temperature=0)[:, 16:]
    greedy_int8 = int8.generate(prompts, 32, temperature=0)[:, 16:]
    agree = float((greedy_bf16 == greedy_int8).float().mean())
    assert agree >= 0.8  # most tokens agree (measured: all 320 of them, losses 7.257 and 7.255)
