"""What makes a training step fast on its device, decided once per run and said in the run's output: torch.compile
(``--compile auto``), the padded output head (``--pad-vocab auto``), snapshots that never hold up a GPU
(``--defer-snapshots auto``) and TF32 for fp32 matmuls on CUDA (the order in which attention kernels are tried is
device.py's, shared with decoding).

None of these changes what a run is (its identity, its files): compiled and eager steps, padded and unpadded heads,
compute the same losses to float rounding, so a run may resume with another choice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gpt2scratch.config import TrainConfig
from gpt2scratch.errors import first_line

log = logging.getLogger(__name__)

# Compiling costs ~30-60 s on a GPU before the first step and then saves about half of each step (an H100 at 124M
# went from 17.6% to 36.6% MFU): below a few hundred steps it does not pay for itself.
MIN_COMPILED_STEPS = 200
PAD_MULTIPLE = 64  # GPT-2's 50,257 rows padded to 50,304: tensor-core tiles and cuBLAS prefer multiples of 64


@dataclass(frozen=True)
class Choice:
    """An optimization's setting for this run, and the reason, for the run's output."""

    on: bool
    why: str

    def __str__(self) -> str:
        return f"{'on' if self.on else 'off'} ({self.why})"


@dataclass(frozen=True)
class Speed:
    """The run's choices, made once before its first step."""

    compile: Choice
    pad: Choice
    defer: Choice

    def __str__(self) -> str:
        return f"torch.compile: {self.compile}; padded vocabulary: {self.pad}; deferred snapshots: {self.defer}"

    @classmethod
    def plain(cls) -> Speed:
        """None of them: what a state built by hand (tests, the README's recipe) runs with."""
        off = Choice(False, "not chosen")
        return cls(off, off, off)


def choose(cfg: TrainConfig, device: torch.device, sharded: bool = False) -> Speed:
    """What ``cfg`` and the device call for (see each choice); ``sharded``: the run is under FSDP."""
    return Speed(compile_choice(cfg, device, sharded), pad_choice(cfg, device), defer_choice(cfg, device))


def compile_choice(cfg: TrainConfig, device: torch.device, sharded: bool = False) -> Choice:
    """Whether to torch.compile the model: --compile on/off as given; auto compiles CUDA runs of at least
    MIN_COMPILED_STEPS steps (or without --max-steps), never on CPUs or MPS (there eager keeps the seed's default
    run bit for bit, and its warm-up would dominate the short runs a CPU trains), nor under FSDP, whose blocks are
    compiled one by one before sharding, where a compiler that fails could not fall back to eager."""
    if cfg.compile != "auto":
        return Choice(cfg.compile == "on", f"--compile {cfg.compile}")
    if device.type != "cuda":
        return Choice(False, f"auto: eager on {device.type}; --compile on to compile anyway")
    if sharded:
        return Choice(False, "auto: eager under FSDP; --compile on compiles each block")
    if cfg.max_steps is not None and cfg.max_steps < MIN_COMPILED_STEPS:
        return Choice(False, f"auto: {cfg.max_steps} steps do not repay the warm-up; --compile on to compile anyway")
    return Choice(True, "auto: a CUDA run long enough to repay the ~30-60 s warm-up")


def pad_choice(cfg: TrainConfig, device: torch.device) -> Choice:
    """Whether to compute the output head over a vocabulary padded to a multiple of PAD_MULTIPLE."""
    if cfg.pad_vocab != "auto":
        return Choice(cfg.pad_vocab == "on", f"--pad-vocab {cfg.pad_vocab}")
    return Choice(device.type == "cuda", f"auto: {'on' if device.type == 'cuda' else 'off'} on {device.type}")


def defer_choice(cfg: TrainConfig, device: torch.device) -> Choice:
    """Whether a snapshot due during the previous one's write is deferred rather than waited for."""
    if cfg.defer_snapshots != "auto":
        return Choice(cfg.defer_snapshots == "on", f"--defer-snapshots {cfg.defer_snapshots}")
    return Choice(device.type == "cuda", f"auto: {'on' if device.type == 'cuda' else 'off'} on {device.type}")


def padded(vocab_size: int, multiple: int = PAD_MULTIPLE) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple``."""
    return -(-vocab_size // multiple) * multiple


def configure_cuda(device: torch.device) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (what autocast leaves in fp32, and every matmul of
    --dtype float32): fp32's range with a 10-bit mantissa, as PyTorch's own "high" precision."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


class CompiledOrEager:
    """A module's compiled forward, falling back to the module itself, with one warning line, if compiling fails
    (a missing C compiler, an unsupported operation): compiling happens on the first call, so only that call's
    failure means the compiler's; a later one is the step's own and is raised."""

    def __init__(self, module: torch.nn.Module, compile: Callable[[torch.nn.Module], Any] | None = None):
        self.module = module
        self.compiled: Any = (compile or torch.compile)(module)
        self.called = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.module(*args, **kwargs)
        if self.called:
            return self.compiled(*args, **kwargs)
        try:
            result = self.compiled(*args, **kwargs)
        except Exception as err:  # whatever the compiler raised: the step is retried eagerly
            log.warning("torch.compile failed (%s: %s); training without it", type(err).__name__, first_line(err))
            self.compiled = None
            return self.module(*args, **kwargs)
        self.called = True
        return result
