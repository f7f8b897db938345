"""What a training run starts from before its flags: a shipped recipe (``--recipe``), then ``--config``, a TOML file
of settings or a checkpoint whose run to repeat. The CLI lays the flags given on the command line over the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpt2scratch.config import TrainConfig
from gpt2scratch.config.runfile import NOT_IN_FILES, check_settings, read_settings, recipe_path
from gpt2scratch.errors import CheckpointError, UsageError

# A checkpoint's settings that a repeat of its run does not take: where that run wrote, and what it resumed.
NOT_REPEATED = ("out_dir", "resume", "allow_changed", *NOT_IN_FILES)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format


def from_files(flags: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``flags``' recipe and config file (the flags given, by field name), the config file's over
    the recipe's. UsageError or CheckpointError, in one line, for a file that cannot be used."""
    values: dict[str, Any] = {}
    for name in ("recipe", "config"):
        if flags.get(name) == "":  # an unset shell variable: not this directory, not "no file"
            raise UsageError(f"--{name} must not be empty")
    if flags.get("recipe") is not None:
        name = flags["recipe"]
        values.update(read_settings(recipe_path(name), TrainConfig, f"recipe {name}"))
    if flags.get("config") is not None:
        path = Path(flags["config"])
        values.update(repeat_settings(path) if is_checkpoint(path) else read_settings(path, TrainConfig))
    return values


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint of ours (a torch.save file or a sharded snapshot) rather than a TOML file."""
    from gpt2scratch.checkpoint.sharded import is_sharded_snapshot

    if is_sharded_snapshot(path):
        return True
    if not path.is_file():  # nor a FIFO, which would block here: read_settings says what it is
        return False
    try:
        with open(path, "rb") as file:
            return file.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    except OSError:
        return False  # read_settings says what is wrong with it


def repeat_settings(path: Path) -> dict[str, Any]:
    """The settings of the run that wrote the checkpoint ``path`` (its ``train_args``), less where it wrote and what
    it resumed, so that a run given them repeats it. Settings this version does not know are left out; with
    --batch-tokens the accumulation is left to follow from this run's number of processes."""
    from gpt2scratch.checkpoint.load import read_state

    args = read_state(path, weights=False).get("train_args")
    if not isinstance(args, dict):
        raise CheckpointError(f"{path} holds no training settings (train_args) to repeat")
    known = {name for name in TrainConfig.__dataclass_fields__ if name not in NOT_REPEATED}
    values = {key: value for key, value in args.items() if key in known and value is not None}
    if values.get("batch_tokens") is not None:
        values.pop("grad_accum", None)
    return check_settings(values, TrainConfig, f"the settings of {path}")
