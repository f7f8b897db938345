"""Several processes under torchrun: set-up and the collectives the training loop uses (how the model is spread
over the ranks, DDP or FSDP, is distributed/parallelize.py's).

With one process every function here is a no-op, so ``python train.py`` and ``torchrun ... train.py`` run the same
code. Rank and world size travel as a ``World`` value, never a global.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2scratch.errors import UsageError
from gpt2scratch.signals import SIGNALS


@dataclass(frozen=True)
class World:
    """The processes of a run: this one's rank (global and on its node) and how many there are."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> World:
    """Rank and world size from torchrun's environment variables (one process when they are absent); UsageError,
    naming the variable, when they are malformed or incomplete."""
    size = _env_int("WORLD_SIZE", "1")
    if size <= 1:
        return World()
    rank, local_rank = _env_int("RANK", None, size), _env_int("LOCAL_RANK", "0", size)
    if not 0 <= rank < size or local_rank < 0:
        raise UsageError(f"RANK={rank} and LOCAL_RANK={local_rank} do not fit WORLD_SIZE={size}; start with torchrun")
    return World(rank, local_rank, size)


def _env_int(name: str, default: str | None, size: int = 1) -> int:
    value = os.environ.get(name, default)
    if value is None:
        raise UsageError(f"WORLD_SIZE={size} is set but {name} is not; start several processes with torchrun")
    try:
        return int(value)
    except ValueError:
        raise UsageError(
            f"{name}={value!r} in the environment is not a whole number; torchrun sets it: unset it, or use torchrun"
        ) from None


def init(world: World, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo elsewhere); return this rank's device."""
    if not world.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            _join_group("nccl" if device.type == "cuda" else "gloo", device)
        except (ValueError, RuntimeError) as err:  # torchrun's variables missing, or the others unreachable
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UsageError(
                f"could not join the other {world.size - 1} process(es) of this run ({reason[:150]}); "
                "start them together with torchrun --nproc_per_node=N"
            ) from None
    return device


def _join_group(backend: str, device: torch.device) -> None:
    """``dist.init_process_group`` on a thread of its own. torch's rendezvous waits for the others (up to 30
    minutes) inside C++, where no Python signal handler runs: waiting for that thread here instead keeps Ctrl-C and
    SIGTERM working, say for a rank whose MASTER_ADDR is wrong."""
    outcome: list[BaseException | None] = []

    def join() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # they go to the main thread, not into torch's retries
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
        try:
            dist.init_process_group(backend=backend)
            outcome.append(None)
        except BaseException as err:  # handed to the main thread
            outcome.append(err)

    thread = threading.Thread(target=join, name="rendezvous", daemon=True)  # a stop does not wait for it
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # a stop signal is handled between these waits
    if outcome[0] is not None:
        raise outcome[0]


def shutdown(world: World) -> None:
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of ``value`` over all ranks (the value itself with one process)."""
    if world.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.size
    return value


def gather_objects(obj: object, world: World) -> list[object]:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` with one process). Every rank must call it."""
    if not world.enabled:
        return [obj]
    gathered: list[object] = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered
