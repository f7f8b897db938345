"""Checkpoint files: what they are, how they are written (atomically, in the background) and read (safely).

A checkpoint is a plain dict of tensors and Python values (never pickled classes), so every load goes through
``torch.load(weights_only=True)``: a file crafted to run code when unpickled is refused, not executed. Writes go to a
hidden temporary file in the same directory, are fsync'ed and then renamed into place, so a crash never leaves a
half-written file under a final name. What a training checkpoint holds is ``TrainState.state_dict`` (training/state.py).
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, cast

import torch

from gpt2scratch.checkpoint.direct_io import AlignedBuffer
from gpt2scratch.checkpoint.staging import HostStaging
from gpt2scratch.config import GPTConfig
from gpt2scratch.errors import CheckpointError, ConfigError, OutDirError
from gpt2scratch.files import FREE_SPACE_HINT, check_free_space, replace_atomically, write_failure_reason

FORMAT_VERSION = 1


def state_nbytes(state: Any) -> int:
    """Bytes of tensor data in a nested checkpoint dict: a floor for its size on disk."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


@contextlib.contextmanager
def _crc32(enabled: bool) -> Iterator[None]:
    """torch.save's CRC-32 option, set for one save and put back afterwards."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(enabled)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def on_cpu(state: Any, copies: dict[tuple, torch.Tensor] | None = None) -> Any:
    """``state`` with its tensors on the CPU, as checkpoint files hold them; tensors sharing memory stay shared."""
    copies = {} if copies is None else copies
    if isinstance(state, torch.Tensor):
        if state.device.type == "cpu":
            return state
        key = (state.data_ptr(), state.dtype, tuple(state.shape), state.stride())
        if key not in copies:
            copies[key] = state.detach().to("cpu")
        return copies[key]
    if isinstance(state, dict):
        return {k: on_cpu(v, copies) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        moved = [on_cpu(v, copies) for v in state]
        return moved if isinstance(state, list) else tuple(moved)
    return state


def all_finite(model: torch.nn.Module | Iterable[torch.Tensor]) -> bool:
    """Whether no weight (of a module, or among tensors) is NaN or inf. Sums first: one pass, much cheaper than
    isfinite, and finite weights only sum to inf when they are astronomically large, in which case the exact check
    decides."""
    params = [p.detach() for p in (model.parameters() if isinstance(model, torch.nn.Module) else model)]
    if bool(torch.stack([p.sum() for p in params]).isfinite().all()):
        return True
    return all(bool(torch.isfinite(p).all()) for p in params)


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time, so training does not wait for the disk.

    ``submit`` takes what it needs of the state before returning (training may change the tensors afterwards): it
    serializes the state into a reused in-memory buffer, or, with ``stage_on_host`` (GPUs), only queues copies of
    its tensors into reused pinned host buffers and leaves the serialization to the writer's thread. If the previous
    write is still going it waits for it first, so two writes never race (``busy`` says whether one is going, for a
    caller that would rather not wait). A failed write is raised by the next ``submit`` or ``wait``.
    ``after_write`` runs on the writer's thread once a file is in place (retention).
    """

    def __init__(
        self,
        after_write: Callable[[], None] | None = None,
        space_hint: str = FREE_SPACE_HINT,
        stage_on_host: bool = False,
    ):
        self._after_write = after_write
        self._space_hint = space_hint  # what to do when the disk is too full, for the message
        self._thread: threading.Thread | None = None
        self._buffer = AlignedBuffer()
        self._staging = HostStaging() if stage_on_host else None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """Whether a write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, state: dict[str, Any], path: Path, background: bool = True, checksums: bool = False) -> None:
        """Take ``state`` now and write it to ``path`` (in the background unless ``background`` is False).

        ``checksums``: torch's CRC-32 of every record, worth its CPU time for a final model kept for long, not for
        periodic snapshots that are replaced within minutes.
        """
        self.wait()
        path.parent.mkdir(parents=True, exist_ok=True)
        nbytes = state_nbytes(state)
        check_free_space(path.parent, nbytes, self._space_hint)  # fail now, not ten steps later
        if background and self._staging is not None:
            staged, copied = self._staging.stage(state)
            work = functools.partial(self._serialize_and_write, staged, copied, path, nbytes)
        else:
            self._serialize(state, path, nbytes, checksums)
            work = functools.partial(self._write, path, nbytes)
        if not background:
            work()
            self.wait()
            return
        self._thread = threading.Thread(target=work, name="snapshot-writer", daemon=True)
        self._thread.start()

    def _serialize(self, state: dict[str, Any], path: Path, nbytes: int, checksums: bool = False) -> None:
        try:
            self._buffer.reset(nbytes + nbytes // 64 + (1 << 20))  # + the pickle and the zip records
            with _crc32(checksums):
                torch.save(on_cpu(state), cast("IO[bytes]", self._buffer))
        except (RuntimeError, MemoryError) as err:
            reason = write_failure_reason(err)
            raise OutDirError(f"could not serialize {path.name} in memory ({reason}); nothing was written") from err

    def _serialize_and_write(
        self, staged: dict[str, Any], copied: torch.cuda.Event | None, path: Path, nbytes: int
    ) -> None:
        try:
            if copied is not None:
                copied.synchronize()  # the host copies queued by submit are done
            self._serialize(staged, path, nbytes)
        except BaseException as err:  # handed to the training thread by wait()
            self._error = err
            return
        self._write(path, nbytes)

    def _write(self, path: Path, nbytes: int) -> None:
        try:
            replace_atomically(path, nbytes, self._buffer.write_to, self._space_hint)
            if self._after_write is not None:
                self._after_write()
        except BaseException as err:  # handed to the training thread by wait()
            self._error = err

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        """Wait for the last write and free the buffers."""
        try:
            self.wait()
        finally:
            self._buffer.release()
            if self._staging is not None:
                self._staging.release()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint of ours, loaded without running any code from it.

    Raises CheckpointError if the file is missing, truncated, corrupt, unsafe, foreign or of an unknown version.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():  # a FIFO would block the reader forever
        raise CheckpointError(f"{path} is not a regular file (a FIFO, socket or device), not a checkpoint")
    state = safe_load(path)
    check_format(state, path)
    return state


def check_format(state: Any, path: Path) -> None:
    """CheckpointError unless ``state`` is a checkpoint of ours, of a format this version reads."""
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise CheckpointError(f"{path} is not a gpt2-scratch checkpoint (no model_state_dict)")
    version = state.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path} is not a gpt2-scratch checkpoint (no format_version)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this gpt2-scratch reads ({FORMAT_VERSION}); upgrade"
        )
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path} has no model config; it is not a complete gpt2-scratch checkpoint")


def safe_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` on the CPU, its failures turned into one-line CheckpointErrors."""
    try:
        with warnings.catch_warnings():  # a raw pickle of protocol 3+ warns before it is refused: the refusal says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err) or _starts_like_a_pickle(path):  # real pickled objects: loading could run code
            raise CheckpointError(
                f"refused to load {path}: it contains Python objects other than tensors and plain values, "
                "which could run code; only load files you trust with other tools"
            ) from None
        raise CheckpointError(f"{path} is corrupt or not a checkpoint (torch's safe loader cannot read it)") from None
    except Exception as err:  # on garbage, torch's unpickler also raises IndexError, KeyError, TypeError, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {reason[:120]})") from None


def _starts_like_a_pickle(path: Path) -> bool:
    """Whether the file begins with a pickle's PROTO opcode (protocol 2 to 5), as random bytes almost never do."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``; CheckpointError naming the first missing, unexpected or mismatched tensor."""
    check_weights(model, state, source)
    model.load_state_dict(state)  # copies into the model's own dtype and device


def check_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming the first tensor of ``state`` that is missing, unexpected or of another shape than
    ``model``'s (under FSDP, the shapes of the whole tensors)."""
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{source} is damaged: its weights are not a dict of tensors")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match a GPT-2 of this config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[key].shape)}"
            )


def check_config_fits_weights(config: GPTConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError if the sizes that decide how much a model of ``config`` allocates (the embeddings' shapes,
    the number of layers) are not those of the weights: a damaged config must not build a model of a huge size.
    Other mismatches are named by ``load_weights``, on a model no larger than the weights."""
    if not isinstance(state, dict):
        return  # load_weights says what is wrong
    embeddings = {
        "transformer.wte.weight": (config.vocab_size, config.n_embd),
        "transformer.wpe.weight": (config.block_size, config.n_embd),
    }
    for key, shape in embeddings.items():
        tensor = state.get(key)
        if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}, the config needs {shape}")
    layers = {key.split(".")[2] for key in state if isinstance(key, str) and key.startswith("transformer.h.")}
    if config.n_layer > len(layers):
        raise CheckpointError(
            f"{source} does not match a GPT-2 of this config: missing ['transformer.h.{len(layers)}.*'] (the config "
            f"has n_layer={config.n_layer}, the weights {len(layers)} layers)"
        )


def checkpoint_config(checkpoint: dict[str, Any], source: str) -> GPTConfig:
    """The model config of a checkpoint of ours (as ``read_checkpoint`` returns it); CheckpointError if damaged."""
    try:
        return GPTConfig.from_dict(checkpoint["config"])
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{source} is damaged: its {err}") from None
