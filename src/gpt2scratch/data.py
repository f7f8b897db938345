"""Training data: find the input text, tokenize it once into a cached uint16 file, and serve B x T batches from it.

``prepare_corpus`` is the whole path from the flags to the tokens a run trains on.

The token file is read through ``numpy.memmap``, so a corpus of many GB trains in bounded memory. Its name carries
the sha256 of the input, so an unchanged input is never tokenized twice and a changed one always is. Tokenizing
streams the text in chunks cut where GPT-2's pre-tokenizer would cut anyway, so the ids equal those of one call
over the whole text, with peak memory independent of the input's size and every core busy.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .config import TrainConfig
from .corpus import builtin_text
from .distributed import World, barrier
from .errors import DataError
from .tokenizer import EOT_TOKEN, get_encoding

log = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 22  # ~4 MB of text per chunk handed to the tokenizer

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


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
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
                size += len(block)
        digest.update(FILE_BOUNDARY)
    if size == 0:
        raise DataError(f"the input ({', '.join(map(str, files[:3]))}) is empty")
    return digest.hexdigest()


def _text_chunks(path: Path, digest: Any) -> Iterator[str]:
    """The file's text in pieces of about CHUNK_CHARS, cut only where GPT-2's pre-tokenizer always cuts; every byte
    read also goes into ``digest``, so the hash is of exactly the text tokenized. DataError if it is not text."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_CHARS)
            digest.update(block)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                bad = offset - pending + err.start
                raise DataError(f"{path} is not UTF-8 text (bad byte at offset {bad}); convert it to UTF-8") from None
            offset += len(block)
            if "\x00" in text:
                raise DataError(f"{path} looks like a binary file (it contains NUL bytes); give a text file")
            if not block:
                break
            cut = _last_safe_cut(text, len(text) - CHUNK_CHARS // 2)
            if cut is None:
                carry = text  # no safe cut yet: keep reading
            else:
                yield text[:cut]
                carry = text[cut:]
    if carry:
        yield carry


def _last_safe_cut(text: str, lowest: int) -> int | None:
    """A position at or after ``lowest`` where GPT-2's pre-tokenizer always ends a piece, or None: just after the
    last newline with non-space characters on both sides, else (text without such newlines, which would otherwise be
    held whole in memory) just before the last single space between two non-space characters, where the piece on
    the left ends and the one on the right starts with that space (`` ?\\p{L}+``, `` ?\\p{N}+`` or punctuation)."""
    for mark, after in (("\n", 1), (" ", 0)):
        end = len(text) - 1  # a mark at the very end has an unknown right neighbour
        while (pos := text.rfind(mark, max(1, lowest), end)) > 0:
            if not text[pos - 1].isspace() and not text[pos + 1].isspace():
                return pos + after
            end = pos
    return None


def tokenize_files(
    files: list[Path], out_path: Path, progress: Progress | None = None, expected_sha256: str | None = None
) -> int:
    """Tokenize ``files`` into a uint16 file at ``out_path`` (written atomically); return the token count.

    Files are joined with <|endoftext|> between them. Raises DataError for empty, binary or non-UTF-8 input, and,
    given ``expected_sha256`` (``content_hash`` of the files), if the bytes read were not those: the input changed
    while it was read, and nothing is written.
    """
    total = max(1, sum(p.stat().st_size for p in files))  # for the progress bar only (0 for files in /proc)
    digest = hashlib.sha256()
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    encoding = get_encoding()
    count = done = 0
    pending: deque[tuple[Future[np.ndarray], int]] = deque()  # chunks being encoded, in order, with their sizes

    def write_oldest(out: BinaryIO) -> None:
        nonlocal count, done
        future, size = pending.popleft()
        ids = future.result()
        ids.astype(np.uint16).tofile(out)  # GPT-2's 50,257 ids fit in 16 bits
        count += len(ids)
        done += size
        if progress is not None:
            progress(min(done, total), total)

    if progress is not None:
        progress(0, total)  # the bar's clock starts now, not at the first chunk
    try:
        # tiktoken releases the GIL while it encodes, so a thread per core keeps every core busy; at most two chunks
        # per core are in flight, which bounds memory whatever the input's size.
        with open(tmp, "wb") as out, ThreadPoolExecutor(threads) as pool:
            for index, path in enumerate(files):
                if index > 0:
                    while pending:
                        write_oldest(out)
                    np.array([EOT_TOKEN], dtype=np.uint16).tofile(out)
                    count += 1
                for chunk in _text_chunks(path, digest):
                    if len(pending) >= 2 * threads:
                        write_oldest(out)
                    future = pool.submit(encoding.encode_to_numpy, chunk, disallowed_special=())
                    pending.append((future, len(chunk.encode("utf-8"))))
                digest.update(FILE_BOUNDARY)
            while pending:
                write_oldest(out)
        if count == 0:
            raise DataError(f"the input ({', '.join(map(str, files[:3]))}) is empty")
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise DataError(
                f"the input ({files[0]}, ...) changed while it was being read; run again once it is written"
            )
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def _cache_matches(token_path: Path, sha256: str) -> bool:
    """Whether ``token_path`` holds the tokens of the text whose sha256 is ``sha256``, as its record says (a token
    file without its record, from an older version or an interrupted write, is tokenized anew)."""
    try:
        record = json.loads(token_path.with_suffix(".json").read_text())
        return record["sha256"] == sha256 and token_path.stat().st_size == 2 * record["tokens"]
    except (OSError, ValueError, KeyError, TypeError):
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

    train: np.ndarray
    val: np.ndarray | None
    source: str  # what the user gave: paths or builtin:NAME
    sha256: str


def prepare_corpus(cfg: TrainConfig, cache: Path, world: World, progress: Progress | None) -> Corpus:
    """Tokenize the input into ``cache`` once (rank 0; the others wait), memmap it, and split off the validation
    tail. DataError for missing, empty or non-text input, or a validation tail shorter than one batch."""
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
    sha = content_hash(files)
    token_path = cache / f"tokens-{sha[:20]}.u16"
    if world.is_main and not _cache_matches(token_path, sha):
        log.info("tokenizing %s ...", source)
        count = tokenize_files(files, token_path, progress, expected_sha256=sha)
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
