"""Sharded snapshots (--parallel fsdp): a directory into which every rank writes its shards through
torch.distributed.checkpoint (DCP), which any number of processes can read back, and which never runs code.

``snapshots/snapshot_step_N/`` holds DCP's ``.metadata`` (which piece of which tensor is where) and one
``__R_0.distcp`` file per rank. Its contents are ``TrainState.state_dict()``, whole: each tensor under its path in that
dict (``model_state_dict/transformer.h.0.attn.c_attn.weight``, ``optimizer_state_dict/state/NAME/exp_avg``,
``rng_per_rank/1/cpu``), a tied weight once, and every other value as JSON in the uint8 tensor ``state.json``, where
``{"__tensor__": KEY}`` stands for a tensor. No Python object is pickled into it.

Reading is safe where DCP alone is not: torch 2.13 reads ``.metadata`` with a plain ``pickle.load`` and loads
non-tensor items with ``torch.load(weights_only=False)``. Here ``.metadata`` is read by an unpickler that admits only
DCP's metadata classes and plain values, checked (tensors only, shard files inside the directory, no more data than
the files hold) and handed to DCP by a reader of ours; a non-tensor item is refused.

Writing is atomic at the directory level: every rank writes into ``.snapshot_step_N.tmp-PID``, and rank 0 renames it
once all have finished (a barrier), so a crash leaves only complete snapshots under final names.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from gpt2scratch.checkpoint.format import CheckpointWriter, check_format, state_nbytes
from gpt2scratch.distributed.parallelize import by_index, model_state_dict, optimizer_state_dict, tied_names
from gpt2scratch.distributed.world import World, barrier, gather_objects
from gpt2scratch.errors import CheckpointError, OutDirError, UsageError
from gpt2scratch.files import FREE_SPACE_HINT, check_free_space, fsync_dir, write_failure_reason

METADATA_NAME = ".metadata"
PLAIN_KEY = "state.json"  # every value that is not a tensor, as JSON bytes
WEIGHTS = ("model_state_dict", "optimizer_state_dict")  # what FSDP reads shard by shard (load_into)
_TENSOR, _TUPLE = "__tensor__", "__tuple__"


def is_sharded_snapshot(path: Path) -> bool:
    """Whether ``path`` is a sharded snapshot (a directory holding DCP's metadata)."""
    return path.is_dir() and (path / METADATA_NAME).is_file()


# ---- writing ----


def save_snapshot(
    state: dict[str, Any],
    path: Path,
    world: World,
    tied: dict[str, str],
    after_write: Callable[[], None] | None = None,
    space_hint: str = FREE_SPACE_HINT,
) -> None:
    """Write ``state`` (every rank's ``TrainState.state_dict(full=False)``) as the sharded snapshot ``path``; every
    rank calls this, and returns once the snapshot is in place. The values that are not tensors are rank 0's (its
    clock, its data position), as in a single-file snapshot. ``tied``: the model's tied weight names, stored once.
    ``after_write`` runs on rank 0 once the snapshot is in place (retention). OutDirError if it cannot be written.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    tensors, skeleton = split(state, _model_aliases(tied))
    problem = None
    if world.is_main:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            check_free_space(path.parent, state_nbytes(tensors), space_hint)  # whole tensors: every rank's shards
        except OutDirError as err:
            problem = str(err)
        except OSError as err:
            problem = f"could not write {path}: {write_failure_reason(err)}"
    ours: tuple[bytes, int, str | None] = (json.dumps(skeleton).encode(), os.getpid(), problem)
    plain, pid, problem = cast("tuple[bytes, int, str | None]", gather_objects(ours, world)[0])
    if problem is not None:  # every rank stops: none is left waiting for the others inside DCP
        raise OutDirError(problem)
    tensors[PLAIN_KEY] = torch.frombuffer(bytearray(plain), dtype=torch.uint8)
    tmp = path.with_name(f".{path.name}.tmp-{pid}")
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    except (CheckpointException, OSError, RuntimeError) as err:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OutDirError(f"could not write {path}: {_reason(err)}; the previous snapshots are intact") from err
    barrier(world)  # every rank's files are written and fsync'ed before the name says the snapshot is complete
    if world.is_main:
        fsync_dir(tmp)
        if path.exists():  # this step written again (the last step of a resumed run, say)
            remove_snapshot(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if after_write is not None:
            after_write()


def remove_snapshot(path: Path) -> None:
    """Delete a sharded snapshot: renamed to a temporary name first, so that a crash midway leaves a temporary (which
    the next run removes), never a part of a snapshot under its final name."""
    doomed = path.with_name(f".{path.name}.old.tmp-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def split(state: Any, aliases: dict[str, str]) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of the nested ``state`` by key (their path, parts joined by "/"), and ``state`` for JSON: each
    tensor replaced by ``{"__tensor__": key}``, each tuple by ``{"__tuple__": [...]}``. ``aliases`` {path: other
    path}: a tensor that is also at the other path (a tied weight), stored once, under that one."""
    tensors: dict[str, torch.Tensor] = {}

    def plain(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = aliases.get(path, path)
            tensors.setdefault(key, value)
            return {_TENSOR: key}
        if isinstance(value, dict):
            assert all(isinstance(k, str) and "/" not in k and not k.startswith("__") for k in value), path
            return {k: plain(v, f"{path}/{k}" if path else k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [plain(v, f"{path}/{i}") for i, v in enumerate(value)]
            return items if isinstance(value, list) else {_TUPLE: items}
        assert value is None or isinstance(value, (bool, int, float, str)), f"{path} holds a {type(value).__name__}"
        return value

    return tensors, plain(state, "")


def join(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``split``: KeyError or TypeError if ``skeleton`` names a tensor not in ``tensors``."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        if set(skeleton) == {_TUPLE}:
            return tuple(join(v, tensors) for v in skeleton[_TUPLE])
        return {k: join(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join(v, tensors) for v in skeleton]
    return skeleton


def _model_aliases(tied: dict[str, str]) -> dict[str, str]:
    """The model's tied weight names (``parallel.tied_names``) as paths for ``split``."""
    return {f"model_state_dict/{alias}": f"model_state_dict/{name}" for alias, name in tied.items()}


def _tensor_keys(skeleton: Any) -> set[str]:
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return {skeleton[_TENSOR]} if isinstance(skeleton[_TENSOR], str) else set()
        return set().union(*(_tensor_keys(v) for v in skeleton.values()))
    if isinstance(skeleton, list):
        return set().union(*(_tensor_keys(v) for v in skeleton))
    return set()


# ---- reading ----


def read_sharded_snapshot(path: Path, weights: bool = True) -> dict[str, Any]:
    """A sharded snapshot as the dict a checkpoint file holds: whole tensors on the CPU, the optimizer state keyed by
    index, so one process, DDP, ``consolidate``, ``generate`` and ``export`` read it as they read a file. Needs no
    process group. ``weights`` False: without model_state_dict and optimizer_state_dict. CheckpointError if it is
    missing, damaged, foreign or unsafe."""
    metadata = read_metadata(path)
    skeleton = _read_plain(path, metadata)
    if not weights:
        skeleton = {k: v for k, v in skeleton.items() if k not in WEIGHTS}
    entries = metadata.state_dict_metadata
    keys = _tensor_keys(skeleton)
    missing = sorted(keys - set(entries))
    if missing:
        raise _damaged(path, f"lacks the tensor {missing[0]}")
    tensors = {key: torch.empty(entries[key].size, dtype=entries[key].properties.dtype) for key in keys}
    _load(tensors, path, metadata, collective=False)
    try:
        state = join(skeleton, tensors)
        if weights:
            state["optimizer_state_dict"] = by_index(state["optimizer_state_dict"])
    except (KeyError, TypeError, AttributeError) as err:
        raise _damaged(path, f"holds a malformed {PLAIN_KEY} ({type(err).__name__}: {err})") from None
    return state


def load_into(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """A sharded snapshot's model and optimizer states, read straight into this rank's shards of the FSDP ``model``
    and ``optimizer`` (from the saved shards of any number of ranks: DCP reads the overlapping parts). Every rank
    calls it. Returns the two entries for ``TrainState.load_state_dict``; CheckpointError if they do not fit."""
    metadata = read_metadata(path)
    skeleton = _read_plain(path, metadata)
    target = {
        "model_state_dict": model_state_dict(model, full=False),
        "optimizer_state_dict": optimizer_state_dict(model, optimizer, full=False),
    }
    tensors, _ = split(target, _model_aliases(tied_names(model)))
    for key, tensor in tensors.items():
        entry = metadata.state_dict_metadata.get(key)
        if entry is None:
            raise CheckpointError(f"{path} does not fit this model and optimizer: it lacks {key}")
        if tuple(entry.size) != tuple(tensor.shape):
            shapes = f"{tuple(entry.size)}, this model needs {tuple(tensor.shape)}"
            raise CheckpointError(f"{path}: {key} has shape {shapes}")
    _load(tensors, path, metadata, collective=True)
    try:  # the saved hyperparameters, as optimizer.load_state_dict restores them
        target["optimizer_state_dict"]["param_groups"] = join(skeleton["optimizer_state_dict"]["param_groups"], {})
    except (KeyError, TypeError) as err:
        raise _damaged(path, f"holds a malformed {PLAIN_KEY} ({type(err).__name__}: {err})") from None
    return target


def consolidate(snapshot: Path, output: Path, force: bool = False) -> dict[str, Any]:
    """Write the sharded snapshot ``snapshot`` as the single checkpoint file ``output`` (atomically, with checksums);
    return what it holds. UsageError if ``output`` exists (without ``force``) or is a directory."""
    if snapshot.resolve() in output.resolve().parents:  # (through links too) retention would delete it with them
        raise UsageError(f"{output} is inside the snapshot {snapshot}; write the checkpoint file elsewhere")
    if output.is_dir() or (output.exists() and not force):
        what = "a directory" if output.is_dir() else "a file already; give --force to replace it"
        raise UsageError(f"{output} is {what}")
    if not is_sharded_snapshot(snapshot):
        raise CheckpointError(f"{snapshot} is not a sharded snapshot (a directory holding {METADATA_NAME})")
    state = read_sharded_snapshot(snapshot)
    writer = CheckpointWriter()
    try:
        writer.submit(state, output, background=False, checksums=True)
    finally:
        writer.close()
    return state


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is damaged: it {why}; resume from another snapshot")


def _reason(err: BaseException) -> str:
    """The first failure inside DCP's exception (which collects every rank's), as a short reason."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        err = next(iter(failures.values()))
        err = err[0] if isinstance(err, tuple) else err
    return write_failure_reason(err)[:200]


def _read_plain(path: Path, metadata: Any) -> dict[str, Any]:
    """The snapshot's values that are not tensors (JSON), checked as ``read_checkpoint`` checks a file's."""
    entry = metadata.state_dict_metadata[PLAIN_KEY]
    if entry.properties.dtype != torch.uint8 or len(entry.size) != 1:
        raise _damaged(path, f"holds a {PLAIN_KEY} that is not bytes")
    raw = torch.empty(entry.size, dtype=torch.uint8)
    _load({PLAIN_KEY: raw}, path, metadata, collective=False)
    try:
        skeleton = json.loads(raw.numpy().tobytes())
    except ValueError:
        raise _damaged(path, f"holds a {PLAIN_KEY} that is not JSON") from None
    check_format(skeleton, path)
    return skeleton


def _load(tensors: dict[str, torch.Tensor], path: Path, metadata: Any, collective: bool) -> None:
    """DCP fills ``tensors`` (whole, or shards) from the snapshot, through the checked ``metadata``; ``collective``:
    every rank of the process group reads together (DTensor shards), else this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader, planner = _safe_dcp()
    try:
        with warnings.catch_warnings():  # that one process reads alone is the intent: no warning about it
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=reader(path, metadata), planner=planner(), no_dist=not collective)
    except CheckpointError:
        raise
    except (CheckpointException, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise _damaged(path, f"cannot be read ({_reason(err)})") from None


@functools.cache
def _safe_dcp() -> tuple[type, type]:
    """DCP's file reader, given the metadata we checked instead of unpickling ``.metadata`` itself, and its load
    planner, refusing items that are not tensors (DCP would ``torch.load`` them with ``weights_only=False``).
    Made on first use: importing DCP takes seconds."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    class CheckedReader(FileSystemReader):
        def __init__(self, path: Path, metadata: Any):
            super().__init__(path)
            self.checked = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return self.checked

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise CheckpointError(f"refused to load {read_item.dest_index.fqn}: a pickled object, not a tensor")

    return CheckedReader, TensorsOnly


# ---- the metadata, read without running code ----

_ALLOWED = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
    "_MEM_FORMAT_ENCODING",
)} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("pathlib", "PosixPath"),
      ("torch.serialization", "_get_layout")}  # fmt: skip


class _Forbidden(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch dtypes and plain values; any other global (a function to call, a class
    to build) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Forbidden(f"{module}.{name}")


def read_metadata(path: Path) -> Any:
    """DCP's ``Metadata`` of the snapshot ``path``, unpickled without running code and checked: tensors only (never
    a pickled item), shard files inside the directory, and no more tensor data than those files hold.
    CheckpointError otherwise, naming what is wrong."""
    file = path / METADATA_NAME
    if not file.is_file():
        raise CheckpointError(f"{path} is not a sharded snapshot (no {METADATA_NAME} in it)")
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _Forbidden as err:
        raise CheckpointError(
            f"refused to load {path}: its {METADATA_NAME} names {err}, not DCP's metadata, and unpickling it could run "
            "code; only load snapshots you trust with other tools"
        ) from None
    except Exception as err:  # on garbage, pickle raises UnpicklingError, EOFError, ValueError, KeyError, ...
        raise _damaged(path, f"has a corrupt {METADATA_NAME} ({type(err).__name__})") from None
    _check_metadata(metadata, path)
    return metadata


def _check_metadata(metadata: Any, path: Path) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise _damaged(path, f"has a {METADATA_NAME} that is not DCP's metadata")
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if PLAIN_KEY not in entries:
        raise CheckpointError(f"{path} is a DCP checkpoint, but not a gpt2-scratch snapshot (no {PLAIN_KEY})")
    nbytes = 0
    for key, entry in entries.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise _damaged(path, f"lists {key!r} as something other than a tensor; gpt2-scratch writes tensors only")
        size, dtype = entry.size, entry.properties.dtype
        if not (isinstance(size, torch.Size) and all(n >= 0 for n in size) and isinstance(dtype, torch.dtype)):
            raise _damaged(path, f"describes {key!r} with a malformed size or dtype")
        nbytes += size.numel() * dtype.itemsize
    if not isinstance(storage, dict):
        raise _damaged(path, f"has a {METADATA_NAME} without a storage map")
    files = set()
    for index, info in storage.items():
        if not (isinstance(index, MetadataIndex) and isinstance(info, _StorageInfo)):
            raise _damaged(path, f"has a malformed storage entry in {METADATA_NAME}")
        name = info.relative_path
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise _damaged(path, f"points at a file outside the snapshot ({name!r})")
        if info.transform_descriptors:
            raise _damaged(path, "stores tensors through transforms gpt2-scratch never writes")
        files.add(name)
    absent = sorted(name for name in files if not (path / name).is_file())
    if absent:
        raise _damaged(path, f"lacks its shard file {absent[0]}")
    on_disk = sum((path / name).stat().st_size for name in files)
    if nbytes > on_disk:
        raise _damaged(path, f"describes {nbytes} bytes of tensors, more than its files hold ({on_disk})")
