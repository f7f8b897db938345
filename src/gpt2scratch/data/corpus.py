"""Training data: find the input, tokenize it once into a cached uint16 file, and serve B x T batches from it.

``load_corpus`` is the whole path from the flags to the tokens a run trains on.

The token file is read through ``numpy.memmap``, so a corpus of many GB trains in bounded memory. Its name carries
the sha256 of the input, so an unchanged input is never tokenized twice and a changed one always is. Tokenizing
streams the text in chunks cut where GPT-2's pre-tokenizer would cut anyway, so the ids equal those of one call
over the whole text, with peak memory independent of the input's size and every core busy. JSON-lines and Parquet
files (data/documents.py) are read a document at a time, the documents joined with <|endoftext|>. A directory of token
shards (data/shards.py) is read as it is, without a cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gpt2scratch.config import TrainConfig
from gpt2scratch.config.commands import Progress
from gpt2scratch.data import documents
from gpt2scratch.data.builtin import builtin_text
from gpt2scratch.data.shards import ShardFiles, ShardLoader, ShardSet, find_shards, fingerprint
from gpt2scratch.distributed.world import World, barrier
from gpt2scratch.errors import DataError, UsageError
from gpt2scratch.tokenizer import NotUnicode, encode_in_order, encoder_pool

log = logging.getLogger(__name__)


def resolve_inputs(spec: str | None) -> list[Path]:
    """The text files named by ``--input``: a file, a directory of .txt files or a glob (default ``input.txt``)."""
    if spec is None:
        if not Path("input.txt").is_file():
            raise DataError(
                "no input.txt in this directory; give one with --input FILE|DIR|GLOB, "
                "or try the built-in corpus with --data shakespeare"
            )
        spec = "input.txt"
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"the directory {path} has no .txt files in it")
        return files
    if path.is_file():
        return [path]
    if path.exists():
        raise DataError(f"input {spec} is not a regular file (a FIFO, socket or device); give a text file")
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no file matches {spec!r}")
        return files
    raise DataError(f"input {spec} does not exist; give a text file, a directory of .txt files or a glob")


FILE_BOUNDARY = b"\x00<file boundary>\x00"  # hashed between files, so that moving bytes across files changes the hash


def content_hash(files: list[Path]) -> str:
    """sha256 over the files' contents, in order: the identity of a corpus. DataError if they hold no bytes."""
    digest, size = hashlib.sha256(), 0
    for path in files:
        size += _hash_file(path, digest)
        digest.update(FILE_BOUNDARY)
    if size == 0:
        raise DataError(f"the input ({', '.join(map(str, files[:3]))}) is empty")
    return digest.hexdigest()


def _hash_file(path: Path, digest: Any) -> int:
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
            size += len(block)
    return size


def input_hash(files: list[Path], content_sha256: str, text_field: str) -> str:
    """The identity of the tokens of ``files``: their ``content_hash``, and for JSON-lines or Parquet files also the
    field that holds the text (another field is another text)."""
    if all(documents.kind_of(p) in (None, documents.TEXT) for p in files):
        return content_sha256
    return hashlib.sha256(f"{content_sha256} {text_field}".encode()).hexdigest()


def tokenize_files(
    files: list[Path],
    out_path: Path,
    progress: Progress | None = None,
    expected_sha256: str | None = None,
    text_field: str = "text",
) -> int:
    """Tokenize ``files`` into a uint16 file at ``out_path`` (written atomically); return the token count.

    A text file is one document; a JSON-lines, Parquet or Arrow file holds one per line or row, in ``text_field``.
    Documents are joined with <|endoftext|> between them. Raises DataError for empty, binary or non-UTF-8 input, and,
    given ``expected_sha256`` (``content_hash`` of the files), if the bytes read were not those: the input changed
    while it was read, and nothing is written.
    """
    sizes = [p.stat().st_size for p in files]
    before = np.cumsum([0, *sizes]).tolist()  # bytes of the files before each, for the progress bar
    total = max(1, before[-1])  # (0 for files in /proc)
    digest = hashlib.sha256()
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    count = 0
    if progress is not None:
        progress(0, total)  # the bar's clock starts now, not at the first chunk
    try:
        # tiktoken releases the GIL while it encodes, so a thread per core keeps every core busy; encode_in_order
        # keeps at most two batches per thread in flight, which bounds memory whatever the input's size.
        with open(tmp, "wb") as out, encoder_pool(threads) as pool:
            for batch, ids, _ in encode_in_order(_joined(files, digest, text_field), pool, threads):
                ids.tofile(out)
                count += len(ids)
                if progress is not None:
                    progress(min(before[batch[-1].source] + batch[-1].position, total), total)
        if count == 0:
            raise DataError(f"the input ({', '.join(map(str, files[:3]))}) is empty")
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise DataError(
                f"the input ({files[0]}, ...) changed while it was being read; run again once it is written"
            )
        os.replace(tmp, out_path)
    except NotUnicode as err:
        assert isinstance(err.piece, documents.Piece)
        place = documents.where(_source(files[err.piece.source]), err.piece.item)
        raise DataError(f"{place} is not valid Unicode (it holds a lone surrogate such as \\ud800)") from None
    finally:
        tmp.unlink(missing_ok=True)
    return count


def _source(path: Path) -> documents.Source:
    return documents.Source(path, documents.kind_of(path) or documents.TEXT)


def _joined(files: list[Path], digest: Any, text_field: str) -> Iterator[documents.Piece]:
    """The pieces of ``files`` in order, with <|endoftext|> between documents (not before the first). Every byte
    of a text file read goes into ``digest``; a document file is hashed once its documents are read."""
    first = True
    for index, path in enumerate(files):
        source = _source(path)
        for piece in documents.read(source, index, text_field, digest=digest):
            yield piece._replace(starts=piece.starts and not first)
            first = False
        if source.kind != documents.TEXT:
            _hash_file(path, digest)
        digest.update(FILE_BOUNDARY)


def _cache_matches(token_path: Path, sha256: str) -> bool:
    """Whether ``token_path`` holds the tokens of the text whose sha256 is ``sha256``, as its record says (a token
    file without its record, from an older version or an interrupted write, is tokenized anew)."""
    try:
        record = json.loads(token_path.with_suffix(".json").read_text())
        return record["sha256"] == sha256 and token_path.stat().st_size == 2 * record["tokens"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return False


def _write_cache_record(token_path: Path, sha256: str, count: int) -> None:
    """``tokens-SHA.json`` beside the token file: what text it holds, written once the tokens are in place."""
    record = token_path.with_suffix(".json")
    tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"sha256": sha256, "tokens": count, "tokenizer": "gpt2"}) + "\n")
    os.replace(tmp, record)


def open_tokens(path: Path) -> np.ndarray:
    """The token file as a read-only memmap."""
    return np.memmap(path, dtype=np.uint16, mode="r")


@dataclass
class Corpus:
    """The training (and validation) tokens of a run, and where they came from."""

    train: np.ndarray | ShardSet  # one stream of tokens, or shards
    val: np.ndarray | ShardSet | None
    source: str  # what the user gave: paths or builtin:NAME
    sha256: str


def load_corpus(cfg: TrainConfig, cache: Path, world: World, progress: Progress | None) -> Corpus:
    """Tokenize the input into ``cache`` once (rank 0; the others wait), memmap it, and split off the validation
    tail; or open the shards it names. DataError for missing, empty or non-text input, or a validation tail shorter
    than one batch."""
    if cfg.data is None and (found := find_shards(cfg.input)) is not None:
        return shard_corpus(cfg, found)
    if cfg.shuffle_shards:
        raise UsageError("--shuffle-shards orders the shards of a directory of train_*.bin files; this input is text")
    if cfg.data is not None:
        text_path = cache / f"{cfg.data}.txt"
        if world.is_main:
            text = builtin_text(cfg.data)
            if not text_path.is_file() or text_path.read_text(encoding="utf-8") != text:
                cache.mkdir(parents=True, exist_ok=True)
                tmp = text_path.with_name(f".{text_path.name}.tmp-{os.getpid()}")
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, text_path)
        barrier(world)
        files, source = [text_path], f"builtin:{cfg.data}"
    else:
        files = resolve_inputs(cfg.input)
        source = ", ".join(str(p) for p in files[:5]) + (f" (+{len(files) - 5} more)" if len(files) > 5 else "")
    content = content_hash(files)
    sha = input_hash(files, content, cfg.text_field)
    token_path = cache / f"tokens-{sha[:20]}.u16"
    if world.is_main and not _cache_matches(token_path, sha):
        log.info("tokenizing %s ...", source)
        count = tokenize_files(files, token_path, progress, expected_sha256=content, text_field=cfg.text_field)
        _write_cache_record(token_path, sha, count)
        log.info("tokenized: %d tokens -> %s", count, token_path)
    barrier(world)
    tokens = open_tokens(token_path)
    if cfg.max_tokens is not None:
        tokens = tokens[: cfg.max_tokens]
    n_val = int(len(tokens) * cfg.val_fraction)
    train_tokens, val_tokens = tokens[: len(tokens) - n_val], (tokens[len(tokens) - n_val :] if n_val else None)
    if val_tokens is not None and len(val_tokens) < cfg.batch_size * cfg.seq_len + 1:
        raise DataError(f"--val-fraction {cfg.val_fraction} leaves {len(val_tokens)} tokens, less than one batch")
    return Corpus(train_tokens, val_tokens, source, sha)


def shard_corpus(cfg: TrainConfig, found: ShardFiles) -> Corpus:
    """The shards as they are, memory-mapped once their headers are checked, the training ones cut at --max-tokens.
    Their identity comes from the manifest beside them, or a cheap fingerprint (shards.fingerprint), never a full read.
    """
    if cfg.val_fraction:
        raise UsageError(
            "--val-fraction splits a text input; shards take their validation tokens from *val*.bin files "
            "(prepare --val-tokens N writes one)"
        )
    train = ShardSet.open(found.train)
    if cfg.max_tokens is not None:
        train = train.first(cfg.max_tokens)
    val = ShardSet.open(found.val) if found.val else None
    needed = cfg.batch_size * cfg.seq_len + 1
    if val is not None and max(len(t) for t in val.tokens) < needed:
        raise DataError(f"no validation shard ({found.val[0].name}, ...) holds one batch ({needed} tokens)")
    folder = found.train[0].parent
    source = f"{folder} ({len(found.train)} train and {len(found.val)} val shards)"
    log.info("training on %s: %d tokens%s", source, len(train), f", {len(val)} for validation" if val else "")
    return Corpus(train, val, source, fingerprint(found))


class Loader(Protocol):
    """What training reads batches from: TokenLoader (one stream of tokens) or ShardLoader (shards)."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...

    def state_problem(self, state: Any) -> tuple[str, str] | None: ...


def make_loader(
    tokens: np.ndarray | ShardSet, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
    shuffle_seed: int | None = None,
) -> Loader:  # fmt: skip
    """The loader of a stream of tokens or of shards (``shuffle_seed``: each epoch's order of the shards)."""
    if isinstance(tokens, ShardSet):
        return ShardLoader(tokens, batch_size, seq_len, rank, world_size, shuffle_seed)
    return TokenLoader(tokens, batch_size, seq_len, rank, world_size)


class TokenLoader:
    """Consecutive B x T windows of the token stream (targets shifted by one), wrapping to the start at the end.

    With several processes, rank r reads the r-th window of every group of ``world_size`` windows, so together
    they read what one process with a ``world_size`` times larger batch would. ``position`` is the whole state.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        self.tokens = tokens
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        needed = batch_size * seq_len * world_size + 1
        if len(tokens) < needed:
            raise DataError(
                f"the input has {len(tokens)} tokens, fewer than one batch needs ({needed} = B x T x processes + 1); "
                "give more text or lower -B/--batch-size and -T/--seq-len"
            )
        self.position = 0  # start of the group of windows the next batch comes from

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (B, T) int64."""
        B, T = self.B, self.T
        start = self.position + self.rank * B * T
        window = torch.from_numpy(self.tokens[start : start + B * T + 1].astype(np.int64))
        x = window[:-1].view(B, T)  # (B, T)
        y = window[1:].view(B, T)  # (B, T)
        self.position += B * T * self.world_size
        if self.position + B * T * self.world_size + 1 > len(self.tokens):
            self.position = 0
        return x, y

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
        if self.position + self.B * self.T * self.world_size + 1 > len(self.tokens):
            self.position = 0  # no room for a batch there (the batch shape changed): wrap, as next_batch would

    def state_problem(self, state: Any) -> tuple[str, str] | None:
        """(the field, what is wrong with it) if ``state`` is not a place in the tokens, else None."""
        position = state.get("position") if isinstance(state, dict) else None
        if type(position) is not int or not 0 <= position < len(self.tokens):
            return "loader position", f"is {position!r}, not a place in the input's {len(self.tokens)} tokens"
        return None
