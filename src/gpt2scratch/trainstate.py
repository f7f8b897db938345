"""The training state: everything a snapshot holds and a resume restores, written and read in one place.

``TrainState`` has the ``state_dict()`` / ``load_state_dict()`` protocol of ``torch.distributed.checkpoint.Stateful``
(and of every torch module and optimizer): the dict it returns is the checkpoint file, keys and all, and the same dict
read back puts a run exactly where it was: weights, optimizer moments, gradient scaler, data position, counters and
every rank's random number generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from . import __version__
from .checkpoint import FORMAT_VERSION, load_weights
from .config import TrainConfig
from .data import Corpus, TokenLoader
from .distributed import World, gather_objects
from .errors import CheckpointError
from .model import GPT

# What resume needs from a checkpoint (a final model written by an older version may lack some of it).
RESUMABLE = ("model_state_dict", "optimizer_state_dict", "step", "loss", "rng", "loader")


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


@dataclass
class TrainState:
    """A run in progress: the parts that change as it trains, and the facts a reader of its checkpoints wants."""

    cfg: TrainConfig
    model: GPT  # the plain module (never the DDP or compiled wrapper), so checkpoint keys are the model's own
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: TokenLoader
    corpus: Corpus
    world: World
    device: torch.device
    dtype: torch.dtype
    step: int = 0  # optimizer steps completed
    loss: float = float("nan")  # the loss of the last step, averaged over ranks
    started: float = field(default_factory=time.perf_counter)

    @property
    def tokens_per_step(self) -> int:
        cfg = self.cfg
        return cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world.size

    def state_dict(self, kind: str = "snapshot") -> dict[str, Any]:
        """The checkpoint of this step. Every rank must call it (it gathers every rank's RNG state, so that each
        continues its own dropout stream after a resume); rank 0 writes what it returns."""
        rngs = gather_objects(rng_state(self.device), self.world)
        return {
            "format_version": FORMAT_VERSION,
            "kind": kind,  # "snapshot" or "final"
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
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
            "gpt2scratch_version": __version__,
            "torch_version": str(torch.__version__),
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        """Put the run where ``state`` (a checkpoint as ``state_dict`` made it) left it; CheckpointError if it
        lacks what resuming needs."""
        missing = [key for key in RESUMABLE if key not in state]
        if missing:
            raise CheckpointError(
                f"{source} lacks {', '.join(missing)}, so training cannot resume from it; use --init-from to start "
                "from its weights instead"
            )
        load_weights(self.model, state["model_state_dict"], source)
        self.step, self.loss = int(state["step"]), float(state["loss"])
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        self.loader.load_state_dict(state["loader"])
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.world.size:
            set_rng_state(per_rank[self.world.rank], self.device)
        elif self.world.is_main:  # another number of processes: rank 0 continues the stream it had
            set_rng_state(state["rng"], self.device)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
