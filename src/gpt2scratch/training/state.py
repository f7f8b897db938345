"""The training state: everything a snapshot holds and a resume restores, written and read in one place.

``TrainState`` has the ``state_dict()`` / ``load_state_dict()`` protocol of ``torch.distributed.checkpoint.Stateful``
(and of every torch module and optimizer): the dict it returns is the checkpoint file, keys and all, and the same dict
read back puts a run exactly where it was: weights, optimizer moments, gradient scaler, data position, counters and
every rank's random number generator.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from gpt2scratch import __version__
from gpt2scratch.checkpoint.format import FORMAT_VERSION
from gpt2scratch.config import TrainConfig
from gpt2scratch.data.corpus import Corpus, Loader
from gpt2scratch.distributed import parallelize as parallel
from gpt2scratch.distributed.world import World, gather_objects
from gpt2scratch.errors import CheckpointError, UsageError
from gpt2scratch.model import GPT
from gpt2scratch.training.fast import Speed

# What resume needs from a checkpoint (a final model written by an older version may lack some of it).
RESUMABLE = ("model_state_dict", "optimizer_state_dict", "step", "loss", "rng", "loader")

# What makes a run the same run, with the flag that sets each: resuming with one of them changed is refused unless
# --allow-changed names it. The model's shape is not here: weights of another shape cannot be loaded at all. Nor
# are --max-steps and --target-loss: how long to go on is what a resume decides.
IDENTITY = {
    "input": "--input/--data",
    "max_tokens": "--max-tokens",
    "val_fraction": "--val-fraction",
    "batch_size": "-B/--batch-size",
    "seq_len": "-T/--seq-len",
    "grad_accum": "--grad-accum",
    "lr": "--lr",
    "min_lr": "--min-lr",
    "lr_schedule": "--lr-schedule",
    "warmup_steps": "--warmup-steps",
    "decay_fraction": "--decay-fraction",
    "weight_decay": "--weight-decay",
    "adam_beta1": "--adam-beta1",
    "adam_beta2": "--adam-beta2",
    "adam_eps": "--adam-eps",
    "grad_clip": "--grad-clip",
    "dropout": "--dropout",
    "seed": "--seed",
    "shuffle_shards": "--shuffle-shards",
    "world_size": "the number of processes",
}


# How a step's batch is split: rows per micro-batch, micro-batches, processes. Changed together so that their product
# (the sequences one step trains on) stays the same, they make the same run on another number of processes (what a
# resharding resume does), so such a change needs no --allow-changed; it is still recorded.
BATCH_SPLIT = ("batch_size", "grad_accum", "world_size")


# What versions before these settings existed trained with: their checkpoints' train_args lack them.
FIXED_BEFORE = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8}


def run_identity(args: dict[str, Any], input_sha256: str | None, world_size: int | None) -> dict[str, Any]:
    """The identity of a run from its flags (``TrainConfig.to_dict()``, or a checkpoint's ``train_args``), the
    sha256 of its input and its number of processes. Values a checkpoint does not record are None (not compared),
    but for the settings that were fixed before they could be set; --decay-fraction counts only under wsd."""
    values = {name: args.get(name) for name in IDENTITY}
    if args:
        values.update({name: value for name, value in FIXED_BEFORE.items() if name not in args})
    if args.get("lr_schedule") != "wsd":
        values["decay_fraction"] = None
    values.update(input=input_sha256, world_size=world_size)
    return values


def identity_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """{name: [the checkpoint's value, this run's]} for every identity field that differs (and both record)."""
    return {
        name: [saved[name], current[name]]
        for name in IDENTITY
        if saved.get(name) is not None and current.get(name) is not None and saved[name] != current[name]
    }


def same_batch_split(saved: dict[str, Any], current: dict[str, Any]) -> set[str]:
    """The fields of BATCH_SPLIT in which two identities differ while the product of all three is the same: the same
    global batch over another split. Empty when a product is unknown or the products differ."""

    def product(values: dict[str, Any]) -> int | None:
        factors = [values.get(name) for name in BATCH_SPLIT]
        return math.prod(factors) if all(type(f) is int for f in factors) else None  # type: ignore[arg-type]

    if product(saved) is None or product(saved) != product(current):
        return set()
    return {name for name in BATCH_SPLIT if saved[name] != current[name]}


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random number generators: the CPU's and, on CUDA, every GPU's."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def allowed_changes(cfg: TrainConfig) -> set[str]:
    """The identity fields that --allow-changed names; UsageError for an unknown name or without --resume."""
    if cfg.allow_changed is None:
        return set()
    if cfg.resume is None:
        raise UsageError("--allow-changed applies to a resumed run; add --resume auto or --resume PATH")
    names = {name.strip() for name in cfg.allow_changed.split(",") if name.strip()}
    unknown = sorted(names - set(IDENTITY))
    if unknown:
        raise UsageError(f"--allow-changed: unknown field(s) {', '.join(unknown)}; choose from {', '.join(IDENTITY)}")
    return names


def check_identity(
    cfg: TrainConfig,
    checkpoint: dict[str, Any],
    path: Path | None,
    world: World,
    input_sha256: str | None,
    allowed: set[str],
) -> dict[str, list[Any]]:
    """The identity fields in which this run differs from the checkpoint's; UsageError naming each that
    --allow-changed does not allow (nor BATCH_SPLIT's rule). ``input_sha256`` None: the input is not compared (not
    hashed yet)."""
    metadata, args = checkpoint.get("metadata"), checkpoint.get("train_args")
    metadata = metadata if isinstance(metadata, dict) else {}
    args = args if isinstance(args, dict) else {}
    saved = run_identity(args, metadata.get("input_sha256"), metadata.get("world_size"))
    current = run_identity(cfg.to_dict(), input_sha256, world.size)
    changes = identity_changes(saved, current)
    refused = [name for name in changes if name not in allowed | same_batch_split(saved, current)]
    if refused:

        def describe(name: str) -> str:
            old, new = changes[name]
            if name == "input":
                return f"{IDENTITY[name]} gives another text (sha256 {new[:12]}, the checkpoint's {old[:12]})"
            return f"{IDENTITY[name]} {new!r}, the checkpoint's {old!r}"

        differences = "; ".join(describe(name) for name in refused)
        raise UsageError(
            f"this run differs from the one that wrote {path}: {differences}; give the same flags, or "
            f"--allow-changed {','.join(refused)} to change them on purpose"
        )
    return changes


@dataclass
class TrainState:
    """A run in progress: the parts that change as it trains, and the facts a reader of its checkpoints wants."""

    cfg: TrainConfig
    model: GPT  # the plain module (never the DDP or compiled wrapper), so checkpoint keys are the model's own
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: Loader
    corpus: Corpus
    world: World
    device: torch.device
    dtype: torch.dtype
    step: int = 0  # optimizer steps completed
    loss: float = float("nan")  # the loss of the last step, averaged over ranks
    changes: list[dict[str, Any]] = field(default_factory=list)  # identity changes allowed at resumes, with steps
    speed: Speed = field(default_factory=Speed.plain)  # compile, padding, deferral: training/fast.py chooses
    started: float = field(default_factory=time.perf_counter)

    @property
    def tokens_per_step(self) -> int:
        cfg = self.cfg
        return cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world.size

    def state_dict(self, kind: str = "snapshot", full: bool = True) -> dict[str, Any]:
        """The checkpoint of this step. Every rank must call it (it gathers every rank's RNG state, so that each
        continues its own dropout stream after a resume); rank 0 writes what it returns. Under FSDP, ``full`` gathers
        the weights and optimizer state whole onto rank 0, and ``full`` False gives each rank's shards, keyed by
        parameter name, for a sharded snapshot (distributed/parallelize.py); elsewhere both are the module's and
        optimizer's own."""
        rngs = gather_objects(rng_state(self.device), self.world)
        return {
            "format_version": FORMAT_VERSION,
            "kind": kind,  # "snapshot" or "final"
            "model_state_dict": parallel.model_state_dict(self.model, full),
            "optimizer_state_dict": parallel.optimizer_state_dict(self.model, self.optimizer, full),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "config": self.model.config.to_dict(),
            "step": self.step,
            "loss": self.loss,
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "loader": self.loader.state_dict(),
            "train_args": self.cfg.to_dict(),
            "metadata": self.metadata(),
        }

    def metadata(self) -> dict[str, Any]:
        """What a reader of the file wants to know; resume does not read it."""
        return {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tokens_seen": self.step * self.tokens_per_step,
            "wall_seconds": round(time.perf_counter() - self.started, 3),
            "target_loss": self.cfg.target_loss,
            "input": self.corpus.source,
            "input_sha256": self.corpus.sha256,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "world_size": self.world.size,
            "changed_on_resume": self.changes,
            "gpt2scratch_version": __version__,
            "torch_version": str(torch.__version__),
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        """Put the run where ``state`` (a checkpoint as ``state_dict`` made it) left it; CheckpointError, naming
        the field, if it lacks what resuming needs or a field is malformed."""
        check_resumable(state, source, self.loader)
        parallel.load_model_state_dict(self.model, state["model_state_dict"], source)
        self.step, self.loss = state["step"], float(state["loss"])
        metadata = state.get("metadata")
        changes = metadata.get("changed_on_resume") if isinstance(metadata, dict) else None
        self.changes = list(changes) if isinstance(changes, list) else []
        check_optimizer_state(state["optimizer_state_dict"], self.optimizer, self.step, source)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        with _as_checkpoint_error(source, "optimizer_state_dict", "does not fit this model's optimizer"):
            parallel.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer_state_dict"])
        for group, own in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(own)  # the moments are the checkpoint's; the settings this run's (checked by the identity)
        self.loader.load_state_dict(state["loader"])
        per_rank = state.get("rng_per_rank")
        with _as_checkpoint_error(source, "rng", "is not a random generator state"):
            if isinstance(per_rank, list) and len(per_rank) == self.world.size:
                set_rng_state(per_rank[self.world.rank], self.device)
            elif self.world.is_main:  # another number of processes: rank 0 continues the stream it had
                set_rng_state(state["rng"], self.device)
        if state.get("scaler"):
            with _as_checkpoint_error(source, "scaler", "is not a gradient scaler state"):
                self.scaler.load_state_dict(state["scaler"])


def check_resumable(state: dict[str, Any], source: str, loader: Loader) -> None:
    """CheckpointError naming the first field that resuming needs and ``state`` lacks or holds malformed."""
    missing = [key for key in RESUMABLE if key not in state]
    if missing:
        raise CheckpointError(
            f"{source} lacks {', '.join(missing)}, so training cannot resume from it; use --init-from to start "
            "from its weights instead"
        )

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{source} is damaged: its {field} {why}; resume from another snapshot")

    step, loss = state["step"], state["loss"]
    if type(step) is not int or step < 0:
        raise bad("step", f"is {step!r}, not a whole number >= 0")
    if type(loss) not in (int, float) or not (math.isfinite(loss) or step == 0):  # no step yet: no loss
        raise bad("loss", f"is {loss!r}, not a finite number")
    problem = loader.state_problem(state["loader"])  # the loader knows its own state: a position, or a shard's
    if problem is not None:
        raise bad(*problem)
    optimizer = state["optimizer_state_dict"]
    if not isinstance(optimizer, dict) or not optimizer.get("param_groups") or "state" not in optimizer:
        raise bad("optimizer_state_dict", "holds no optimizer state")
    if not isinstance(state["rng"], dict) or not isinstance(state["rng"].get("cpu"), torch.Tensor):
        raise bad("rng", "is not a random generator state")


def check_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer, step: int, source: str) -> None:
    """CheckpointError unless ``saved`` (an AdamW ``state_dict``, as ``check_resumable`` let through) has the groups
    and parameters of ``optimizer``, and each parameter's moments are floating tensors of that parameter's shape
    with a step count in [0, ``step``]. torch's ``load_state_dict`` checks only the groups' sizes: moments of
    another shape would be handed to the fused kernel (a smaller one crashes the process)."""

    def unfit(why: str) -> CheckpointError:
        return CheckpointError(
            f"{source} is damaged: its optimizer_state_dict does not fit this model's optimizer ({why}); resume "
            "from another snapshot"
        )

    groups = saved["param_groups"]
    lists = isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    if lists and any(isinstance(name, str) for group in groups for name in group["params"]):
        try:  # a sharded snapshot's state, keyed by parameter name: numbered as the groups list the names
            saved = parallel.by_index(saved)
        except (KeyError, TypeError, AttributeError):
            raise unfit("its state names parameters that none of its groups lists") from None
    groups, moments = saved["param_groups"], saved["state"]
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        count = len(groups) if isinstance(groups, list) else repr(groups)
        raise unfit(f"{count} parameter groups, not {len(optimizer.param_groups)}")
    pairs: list[tuple[Any, torch.Tensor, set[str]]] = []  # (the saved id, the parameter, the state it must have)
    for index, (group, own) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or not all(type(i) is int for i in ids) or len(ids) != len(own["params"]):
            raise unfit(f"parameter group {index} does not list {len(own['params'])} parameter ids")
        keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if own.get("amsgrad") else set())
        pairs += [(i, param, keys) for i, param in zip(ids, own["params"], strict=True)]
    if not isinstance(moments, dict) or set(moments) - {i for i, _, _ in pairs}:
        raise unfit("it holds state for parameters that none of its groups lists")
    for i, param, keys in pairs:
        moment = moments.get(i)
        if moment is None or moment == {}:
            continue  # a parameter that never had a gradient: AdamW creates its state at its first step
        if not isinstance(moment, dict) or set(moment) != keys:
            raise unfit(f"parameter {i} has the state {_describe(moment)}, not {', '.join(sorted(keys))}")
        for name in sorted(keys - {"step"}):
            tensor = moment[name]
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.shape != param.shape:
                raise unfit(f"parameter {i}'s {name} is {_describe(tensor)}, the parameter is {tuple(param.shape)}")
        count = moment["step"]
        valid = isinstance(count, torch.Tensor) and count.numel() == 1 and bool(torch.isfinite(count).all())
        if not valid or not 0 <= float(count) <= step:
            raise unfit(f"parameter {i}'s step is {_describe(count)}, not a count of steps in [0, {step}]")


def _describe(value: Any) -> str:
    """A short description of a malformed value, for a one-line message."""
    if isinstance(value, torch.Tensor):
        shown = f", value {value.item():g}" if value.numel() == 1 and not value.is_complex() else ""
        return f"a tensor ({str(value.dtype).removeprefix('torch.')}, shape {tuple(value.shape)}{shown})"
    if isinstance(value, dict):
        return "{" + ", ".join(sorted(map(str, value))[:4]) + "}"
    return repr(value)[:40]


@contextlib.contextmanager
def _as_checkpoint_error(source: str, field: str, why: str) -> Iterator[None]:
    """torch's own errors while restoring ``field`` (its load_state_dict checks shapes and types) as one line."""
    try:
        yield
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
        detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise CheckpointError(f"{source} is damaged: its {field} {why} ({detail})") from None
