"""How much arithmetic a run does, and what share of the device's peak it reaches: model FLOPs utilization (MFU).

A token costs ``6 N + 12 L C T`` FLOPs in training (the PaLM paper's appendix B): 6 per parameter for the forward
and backward matrix products, and attention's two products over the ``T`` tokens before it in each of ``L`` layers
of width ``C``. ``N`` leaves out the position embeddings, which are added, not multiplied; the token embedding counts
once, as the output head it is tied to. MFU is those FLOPs times tokens per second over the device's dense peak.
"""

from __future__ import annotations

import re

import torch

from gpt2scratch.config import GPTConfig
from gpt2scratch.model import GPT
from gpt2scratch.training.state import TrainState

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets: tensor cores in bf16/fp16 with fp32 accumulation,
# TF32, and plain fp32. The first entry whose key is a whole word of the device's name wins ("L4" is not "L40", nor
# "A100" "RTX A1000"), so longer names come first.
PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("GH200", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),
    ("H200", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),
    ("H100 NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),  # SXM
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("A40", {"bf16": 149.7e12, "tf32": 74.8e12, "fp32": 37.4e12}),
    ("A10G", {"bf16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),  # AWS's variant; NVIDIA publishes no sheet for it
    ("A10", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("RTX 4090", {"bf16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    ("RTX 3090", {"bf16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
)


def counted_parameters(config: GPTConfig) -> int:
    """``N`` of the formula: the model's parameters (the tied embedding once) less the position embeddings."""
    with torch.device("meta"):  # the shapes alone: nothing is allocated
        model = GPT(config)
    return sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()


def flops_per_token(config: GPTConfig, seq_len: int) -> int:
    """Training FLOPs per token of a model of shape ``config`` on sequences of ``seq_len`` tokens."""
    return 6 * counted_parameters(config) + 12 * config.n_layer * config.n_embd * seq_len


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The dense peak FLOP/s of a CUDA device of a known name, for training in ``dtype``; None when unknown (CPUs,
    MPS, other GPUs: give --peak-flops)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if dtype in (torch.bfloat16, torch.float16):
        kinds = ["bf16", "fp16"] if dtype == torch.bfloat16 else ["fp16", "bf16"]
    else:  # float32: on tensor cores only when TF32 is allowed
        kinds = ["fp32"] if torch.get_float32_matmul_precision() == "highest" else ["tf32", "fp32"]
    return peak_of(name, kinds)


def peak_of(name: str, kinds: list[str]) -> float | None:
    """The first of ``kinds`` that PEAKS knows for a device called ``name``."""
    for key, peaks in PEAKS:
        if re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", name):
            return next((peaks[kind] for kind in kinds if kind in peaks), None)
    return None


def mfu(flops: int, tokens_per_sec: float, peak: float) -> float:
    """Model FLOPs utilization, a fraction of ``peak``."""
    return flops * tokens_per_sec / peak


class Utilization:
    """The ``mfu`` of a step's record, where the device's peak is known (--peak-flops or a GPU of PEAKS)."""

    def __init__(self, state: TrainState):
        peak = state.cfg.peak_flops or peak_flops(state.device, state.dtype)
        self.peak = None if peak is None else peak * state.world.size  # tokens/s are over every process
        self.flops = flops_per_token(state.model.config, state.cfg.seq_len)

    def of(self, tokens_per_sec: float) -> dict[str, float]:
        return {} if self.peak is None else {"mfu": round(mfu(self.flops, tokens_per_sec, self.peak), 4)}
