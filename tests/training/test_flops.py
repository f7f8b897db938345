"""training/flops.py: FLOPs per token (6N + 12LCT), the peaks of known GPUs by name and dtype, and MFU."""

from __future__ import annotations

import pytest
import torch

from gpt2scratch.config import GPTConfig, preset
from gpt2scratch.model import GPT
from gpt2scratch.training.flops import counted_parameters, flops_per_token, mfu, peak_flops, peak_of


def test_n_is_the_parameters_without_the_position_embeddings() -> None:
    gpt2 = preset("gpt2")
    assert counted_parameters(gpt2) == 124_439_808 - 1024 * 768  # GPT-2 124M's published count, less wpe
    small = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=97)
    model = GPT(small)
    assert counted_parameters(small) == sum(p.numel() for p in model.parameters()) - 64 * 32


def test_flops_per_token_is_6n_plus_12lct() -> None:
    gpt2 = preset("gpt2")
    assert flops_per_token(gpt2, 1024) == 6 * 123_653_376 + 12 * 12 * 768 * 1024
    assert flops_per_token(gpt2, 32) - flops_per_token(gpt2, 16) == 12 * 12 * 768 * 16


@pytest.mark.parametrize(
    ("name", "kinds", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", ["bf16"], 989e12),
        ("NVIDIA H100 PCIe", ["bf16"], 756e12),
        ("NVIDIA H200", ["bf16"], 989e12),
        ("NVIDIA A100-SXM4-80GB", ["bf16"], 312e12),
        ("NVIDIA A100-SXM4-80GB", ["tf32", "fp32"], 156e12),
        ("NVIDIA A100-SXM4-80GB", ["fp32"], 19.5e12),
        ("NVIDIA A10G", ["bf16"], 70e12),
        ("NVIDIA A10", ["bf16"], 125e12),  # not the A100's: longer names are tried first
        ("NVIDIA L40S", ["bf16"], 362e12),
        ("NVIDIA L4", ["bf16"], 121e12),
        ("NVIDIA GeForce RTX 4090", ["bf16"], 165.2e12),
        ("Tesla V100-SXM2-16GB", ["bf16", "fp16"], 125e12),  # no bf16 there: fp16's peak
        ("Tesla T4", ["fp16"], 65e12),
        ("NVIDIA L40", ["bf16"], 181e12),  # not the L4's
        ("NVIDIA H100 NVL", ["bf16"], 835e12),
        ("NVIDIA GH200 480GB", ["bf16"], 989e12),
        ("NVIDIA RTX A1000", ["bf16"], None),  # not an A100
        ("NVIDIA RTX A4000", ["bf16"], None),  # not an A40
        ("NVIDIA T400", ["bf16"], None),  # not a T4
        ("NVIDIA GeForce GTX 1080", ["bf16"], None),
    ],
)
def test_peaks_by_device_name_and_kind(name: str, kinds: list[str], peak: float | None) -> None:
    assert peak_of(name, kinds) == peak


def test_no_peak_is_guessed_for_a_cpu() -> None:
    assert peak_flops(torch.device("cpu"), torch.float32) is None
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_mfu_is_the_share_of_the_peak() -> None:
    assert mfu(flops=1000, tokens_per_sec=500.0, peak=1e6) == pytest.approx(0.5)
