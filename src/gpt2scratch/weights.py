"""A model from any source a user can name: a published GPT-2, a transformers directory, or a checkpoint of ours (a
file, or a sharded snapshot's directory)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import model_from_checkpoint, read_checkpoint
from .convert import HUB_NAMES, download, model_from_hf_dir
from .errors import CheckpointError
from .model import GPT
from .sharded import is_snapshot, read_snapshot


def load_model(source: str | Path) -> GPT:
    """A GPT (fp32, on the CPU) from ``gpt2[-medium|-large|-xl]`` (through huggingface_hub), a transformers model
    directory, or a checkpoint of ours (a file or a sharded snapshot). Raises CheckpointError (or ConfigError for
    unsupported configs)."""
    path = Path(source)
    if is_snapshot(path):
        return model_from_checkpoint(read_snapshot(path), str(path))
    if path.is_dir():
        return model_from_hf_dir(path)
    if path.exists():
        return model_from_checkpoint(read_checkpoint(path), str(path))
    if str(source) in HUB_NAMES:
        return model_from_hf_dir(download(str(source)))
    raise CheckpointError(f"{source} is neither a file, a directory nor a published model ({', '.join(HUB_NAMES)})")
