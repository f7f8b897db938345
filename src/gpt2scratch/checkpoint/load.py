"""The one loader: a model from any source a user can name (a published GPT-2, a transformers directory, a checkpoint
of ours: a final model or a snapshot, as a file or a sharded directory), and the state a checkpoint holds.

Generic over the model's class, as transformers' ``from_pretrained(cls, ...)`` is: ``GPT.from_pretrained`` calls
``load_model(cls, source)``, so this module needs the model only to type it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from gpt2scratch.checkpoint.format import check_config_fits_weights, checkpoint_config, load_weights, read_checkpoint
from gpt2scratch.checkpoint.hf import HUB_NAMES, download, read_hf_dir
from gpt2scratch.checkpoint.sharded import is_sharded_snapshot, read_sharded_snapshot
from gpt2scratch.config import GPTConfig
from gpt2scratch.device import check_model_fits
from gpt2scratch.errors import CheckpointError

if TYPE_CHECKING:
    from gpt2scratch.model import GPT

Model = TypeVar("Model", bound="GPT")


def read_state(path: str | Path, weights: bool = True) -> dict[str, Any]:
    """What a checkpoint file or a sharded snapshot holds, in the layout of a checkpoint file. ``weights`` False
    leaves a sharded snapshot's model and optimizer states unread (FSDP reads them shard by shard with
    ``load_into``). CheckpointError if it is missing, damaged, foreign or unsafe."""
    path = Path(path)
    return read_sharded_snapshot(path, weights) if is_sharded_snapshot(path) else read_checkpoint(path)


def load_model(cls: type[Model], source: str | os.PathLike[str]) -> Model:
    """A ``cls`` (fp32, on the CPU) from ``gpt2[-medium|-large|-xl]`` (through huggingface_hub), a transformers
    model directory, or a checkpoint of ours (a file or a sharded snapshot). Raises CheckpointError (or ConfigError
    for unsupported configs)."""
    path = Path(source)
    if is_sharded_snapshot(path) or (path.exists() and not path.is_dir()):
        return model_from_checkpoint(cls, read_state(path), str(path))
    if path.is_dir():
        return build_model(cls, *read_hf_dir(path), str(path))
    if str(source) in HUB_NAMES:
        folder = download(str(source))
        return build_model(cls, *read_hf_dir(folder), str(folder))
    raise CheckpointError(f"{source} is neither a file, a directory nor a published model ({', '.join(HUB_NAMES)})")


def model_from_checkpoint(cls: type[Model], checkpoint: dict[str, Any], source: str) -> Model:
    """The model a checkpoint of ours holds (as ``read_state`` returns it)."""
    return build_model(cls, checkpoint_config(checkpoint, source), checkpoint["model_state_dict"], source)


def build_model(cls: type[Model], config: GPTConfig, state: dict[str, torch.Tensor], source: str) -> Model:
    """A ``cls`` of ``config`` holding the weights ``state`` (fp32, on the CPU). A config that the weights
    contradict, or a model too large for the memory free, is refused before the model is allocated."""
    check_config_fits_weights(config, state, source)
    check_model_fits(config, torch.device("cpu"), 4, "to load (fp32 weights)", f"{source} cannot be loaded here")
    model = cls(config)
    load_weights(model, state, source)
    return model
