"""Typed configuration: the model's shape and presets, and one dataclass per command (the CLI's flags)."""

from gpt2scratch.config.commands import (
    ConsolidateConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    ModelSource,
    PlotConfig,
    PrepareConfig,
    SamplingConfig,
    ServeConfig,
)
from gpt2scratch.config.fields import INFERENCE_DTYPES, QUANTIZE, TRAIN_DTYPES
from gpt2scratch.config.model import PRESETS, GPTConfig, preset
from gpt2scratch.config.train import MAX_SEED, TrainConfig

__all__ = [
    "INFERENCE_DTYPES",
    "MAX_SEED",
    "PRESETS",
    "QUANTIZE",
    "TRAIN_DTYPES",
    "ConsolidateConfig",
    "EvalConfig",
    "ExportConfig",
    "GPTConfig",
    "GenerateConfig",
    "ModelSource",
    "PlotConfig",
    "PrepareConfig",
    "SamplingConfig",
    "ServeConfig",
    "TrainConfig",
    "preset",
]
