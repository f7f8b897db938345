"""Token shards in llm.c's format: writing them (``prepare``), finding and reading them, and batches across them.

A shard is a header of 256 little-endian int32 (the magic number 20240520, the version 1, the token count, then
zeros) followed by the tokens as uint16: the format of llm.c's data scripts, which build-nanogpt's and
modded-nanogpt's FineWeb shards also use. A directory of ``*train*.bin`` (and ``*val*.bin``) shards, ours or any
writer's, is a training input: each shard is read through ``numpy.memmap`` after its header is checked, so tens of GB
train in bounded memory. ``ShardLoader`` serves B x T batches through them in order, with its position as state.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2scratch.errors import DataError
from gpt2scratch.tokenizer import N_VOCAB

log = logging.getLogger(__name__)

MAGIC, VERSION = 20240520, 1
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
TOKEN = np.dtype("<u2")
MANIFEST_NAME = "manifest.json"
FINGERPRINT_BYTES = 1 << 20  # of each shard's start and end, hashed when no manifest gives its sha256


def header(count: int) -> bytes:
    values = np.zeros(HEADER_INTS, dtype="<i4")
    values[:3] = MAGIC, VERSION, count
    return values.tobytes()


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class ShardWriter:
    """A shard of at most ``capacity`` tokens being written, under a temporary name until ``finish`` renames it."""

    def __init__(self, path: Path, capacity: int):
        self.path, self.capacity, self.count = path, capacity, 0
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (open until finish or abort)
        self.file.write(header(0))  # the count is written at the end
        self.digest = hashlib.sha256(header(capacity))  # the file's sha256, if it fills up

    @property
    def room(self) -> int:
        return self.capacity - self.count

    def write(self, tokens: np.ndarray) -> None:
        assert tokens.dtype == TOKEN and len(tokens) <= self.room, (tokens.dtype, len(tokens), self.room)
        self.file.write(tokens.data)
        self.digest.update(tokens.data)
        self.count += len(tokens)

    def finish(self) -> str:
        """Write the count, fsync, rename into place; return the file's sha256."""
        self.file.seek(0)
        self.file.write(header(self.count))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        sha256 = self.digest.hexdigest() if self.count == self.capacity else file_sha256(self.tmp)
        os.replace(self.tmp, self.path)
        return sha256

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def read_shard(path: Path) -> np.ndarray:
    """The tokens of a shard, memory-mapped; DataError, naming the file, unless its header is llm.c's GPT-2 header
    and its token count agrees with its size."""
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path} is not a token shard: {size} bytes, less than llm.c's {HEADER_BYTES}-byte header")
    magic, version, count = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    if magic != MAGIC:
        raise DataError(f"{path} is not a token shard: its header starts with {magic}, not llm.c's magic {MAGIC}")
    if version != VERSION:
        detail = " (uint32 tokens of LLaMA 3's tokenizer)" if version == 2 else ""
        raise DataError(f"{path} is a version-{version} shard{detail}; GPT-2's shards are version 1 (uint16 tokens)")
    if count < 0 or HEADER_BYTES + 2 * count != size:
        raise DataError(
            f"{path} is damaged: its header says {count:,} tokens ({HEADER_BYTES + 2 * count:,} bytes with the "
            f"header) but the file has {size:,} bytes"
        )
    if count == 0:
        return np.empty(0, dtype=TOKEN)
    return np.memmap(path, dtype=TOKEN, mode="r", offset=HEADER_BYTES, shape=(count,))


def _split_of(path: Path) -> str | None:
    """ "train" or "val" by the words of a .bin file's name (train_000001.bin, fineweb_val_000000.bin), else None."""
    if path.suffix != ".bin":
        return None
    words = set(re.split(r"[^a-z0-9]+", path.stem.lower()))
    return "train" if "train" in words else "val" if "val" in words else None


@dataclass
class ShardFiles:
    """The shard files of a training input, in order."""

    train: list[Path]
    val: list[Path]


def find_shards(spec: str | None) -> ShardFiles | None:
    """The shards ``--input`` names: a directory holding ``*train*.bin`` files (with its ``*val*.bin`` files), a
    ``.bin`` file, or a glob of them; None when it names something else (text)."""
    if spec is None:
        return None
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _split_of(p))
        train = [p for p in files if _split_of(p) == "train"]
        val = [p for p in files if _split_of(p) == "val"]
        if val and not train:
            raise DataError(f"{path} holds validation shards ({val[0].name}) but no *train*.bin shards to train on")
        return ShardFiles(train, val) if train else None
    if path.is_file():
        return ShardFiles([path], []) if path.suffix == ".bin" else None
    matches = sorted(Path(p) for p in glob.glob(spec, recursive=True)) if glob.has_magic(spec) else []
    if matches and all(p.suffix == ".bin" and p.is_file() for p in matches):
        return ShardFiles(matches, [])
    return None


@dataclass
class ShardSet:
    """Shards read as one input: their paths and their tokens (memory-mapped)."""

    paths: list[Path]
    tokens: list[np.ndarray]

    @classmethod
    def open(cls, paths: list[Path]) -> ShardSet:
        return cls(list(paths), [read_shard(p) for p in paths])

    def __len__(self) -> int:
        return sum(len(t) for t in self.tokens)

    def first(self, count: int) -> ShardSet:
        """The first ``count`` tokens (--max-tokens)."""
        paths, tokens = [], []
        for path, shard in zip(self.paths, self.tokens, strict=True):
            if count <= 0:
                break
            paths.append(path)
            tokens.append(shard[:count])
            count -= len(shard)
        return ShardSet(paths, tokens)


def fingerprint(files: ShardFiles) -> str:
    """A sha256 that names these shards, without reading them whole: from the sha256 of each that the manifest
    beside them lists (prepare's; the file sizes must agree), else from each one's name, size, and first and last
    MB. DataError if the manifest says its prepare is unfinished or does not list a shard as it is."""
    digest = hashlib.sha256(b"gpt2scratch shards\n")
    paths = files.train + files.val
    manifest = read_manifest(paths[0].parent / MANIFEST_NAME)
    if manifest is not None and all(p.parent == paths[0].parent for p in paths):
        listed = {entry["name"]: entry for entry in manifest["shards"]}
        for path in paths:
            entry = listed.get(path.name)
            if entry is None or path.stat().st_size != HEADER_BYTES + 2 * entry["tokens"]:
                raise DataError(
                    f"{path} is not the shard that {path.parent / MANIFEST_NAME} lists; prepare the directory again, "
                    "or move the manifest away to train on the shards as they are"
                )
            digest.update(f"{path.name} {entry['sha256']}\n".encode())
        return digest.hexdigest()
    for path in paths:
        size = path.stat().st_size
        digest.update(f"{path.name} {size}\n".encode())
        with open(path, "rb") as f:
            digest.update(f.read(FINGERPRINT_BYTES))
            f.seek(max(0, size - FINGERPRINT_BYTES))
            digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest.json that ``prepare`` writes, or None where there is none or another tool's; DataError if it is
    ours and says its prepare is unfinished."""
    try:
        manifest = json.loads(path.read_text())
        ours = manifest["format"]["magic"] == MAGIC and isinstance(manifest["shards"], list)
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if not ours:
        return None
    if not manifest.get("complete"):
        raise DataError(
            f"{path.parent} is still being prepared ({path.name} says it is unfinished); run that prepare command "
            "again to finish it"
        )
    for entry in manifest["shards"]:
        if not (
            isinstance(entry, dict) and isinstance(entry.get("name"), str) and type(entry.get("tokens")) is int
            and isinstance(entry.get("sha256"), str)
        ):  # fmt: skip
            raise DataError(
                f"{path} is damaged: it lists a shard as {json.dumps(entry)[:80]}, not by its name, tokens and "
                "sha256; prepare the directory again, or move the manifest away to train on the shards as they are"
            )
    return manifest


class ShardLoader:
    """Consecutive B x T windows (targets shifted by one) through the shards in order, then again from the first: a
    new epoch, in its own order (seeded by ``shuffle_seed`` and the epoch) if one is given.

    A window never spans two shards: as in llm.c's DataLoader, a shard's tail too short for a whole group of windows
    (one per rank) is skipped, at most B x T x world_size tokens of each shard, and a shard shorter than one group is
    skipped whole. Rank r reads the r-th window of every group, so N processes with batch B read what one process
    with batch N x B reads. The state is the shard (its index among ``shards``), the offset in it and the epoch.
    """

    def __init__(
        self, shards: ShardSet, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
        shuffle_seed: int | None = None,
    ):  # fmt: skip
        self.shards, self.B, self.T = shards, batch_size, seq_len
        self.rank, self.group = rank, batch_size * seq_len * world_size  # tokens a step of all ranks reads
        self.shuffle_seed = shuffle_seed
        self.usable = [i for i, tokens in enumerate(shards.tokens) if len(tokens) >= self.group + 1]
        if not self.usable:
            longest = max((len(t) for t in shards.tokens), default=0)
            raise DataError(
                f"no shard holds the {self.group + 1} tokens one batch needs (B x T x processes + 1; the longest "
                f"has {longest}); lower -B/--batch-size or -T/--seq-len"
            )
        if len(self.usable) < len(shards.tokens):
            log.warning("%d shard(s) shorter than one batch are skipped", len(shards.tokens) - len(self.usable))
        self.epoch, self.order = 0, self._order(0)
        self.shard, self.offset = self.order[0], 0

    def _order(self, epoch: int) -> list[int]:
        if self.shuffle_seed is None:
            return list(self.usable)
        permutation = np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(self.usable))
        return [self.usable[i] for i in permutation]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (B, T) int64. DataError if the shard holds an id that is not GPT-2's."""
        B, T = self.B, self.T
        tokens = self.shards.tokens[self.shard]
        start = self.offset + self.rank * B * T
        window = torch.from_numpy(tokens[start : start + B * T + 1].astype(np.int64))
        if int(window.max()) >= N_VOCAB:  # another tokenizer's shard: fail here, not with an index error in the model
            raise DataError(
                f"{self.shards.paths[self.shard]} holds token id {int(window.max())}, beyond GPT-2's {N_VOCAB:,}; "
                "it is not a shard of GPT-2 tokens"
            )
        x = window[:-1].view(B, T)  # (B, T)
        y = window[1:].view(B, T)  # (B, T)
        self.offset += self.group
        if self.offset + self.group + 1 > len(tokens):
            self._next_shard()
        return x, y

    def _next_shard(self) -> None:
        place = self.order.index(self.shard) + 1
        if place == len(self.order):
            self.epoch += 1
            self.order, place = self._order(self.epoch), 0
        self.shard, self.offset = self.order[place], 0

    def state_dict(self) -> dict[str, int]:
        return {"shard": self.shard, "offset": self.offset, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.shard, self.offset, self.epoch = int(state["shard"]), int(state["offset"]), int(state["epoch"])
        self.order = self._order(self.epoch)
        if self.shard not in self.order:  # too short for a batch of this shape (--allow-changed batch_size)
            self.shard, self.offset = self.order[0], 0
        elif self.offset + self.group + 1 > len(self.shards.tokens[self.shard]):
            self._next_shard()  # no room for a batch there (the batch shape changed): on, as next_batch would go

    def state_problem(self, state: Any) -> tuple[str, str] | None:
        """(the field, what is wrong with it) if ``state`` is not a place in these shards, else None."""
        state = state if isinstance(state, dict) else {}
        shard, offset, epoch = state.get("shard"), state.get("offset"), state.get("epoch")
        count = len(self.shards.tokens)
        if type(shard) is not int or not 0 <= shard < count:
            return "loader shard", f"is {shard!r}, not one of the input's {count} shards"
        size = len(self.shards.tokens[shard])
        if type(offset) is not int or not 0 <= offset < size:
            return "loader offset", f"is {offset!r}, not a place in {self.shards.paths[shard].name}'s {size} tokens"
        if type(epoch) is not int or epoch < 0:
            return "loader epoch", f"is {epoch!r}, not a whole number >= 0"
        return None
