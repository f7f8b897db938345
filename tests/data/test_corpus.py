"""Training data: finding the input, tokenizing it in chunks (ids equal to one call over the whole text), the token
cache, and the B x T loader with its state."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT

from gpt2scratch.config import TrainConfig
from gpt2scratch.data import corpus as data
from gpt2scratch.data import documents
from gpt2scratch.data.shards import ShardLoader, ShardSet
from gpt2scratch.distributed.world import World
from gpt2scratch.errors import DataError, UsageError
from gpt2scratch.tokenizer import EOT_TOKEN, get_encoding

# Text that is hard to cut: Windows line ends, spaces before newlines, blank-line runs, non-Latin scripts, emoji,
# contractions right after a newline, a literal <|endoftext|> (plain text to the tokenizer) and a line longer than
# a whole chunk.
TRICKY_TEXT = (
    "Line one\r\nLine two   \nthree\t \n\n\n'tis four\n's five\nnaïve café — «quoted»\n"
    "日本語のテキスト\nПривет, мир!\n🙂🙃 emoji\u00a0nbsp\n \n  indented\n<|endoftext|>\nx" + "y" * 300 + "\n"
    "end\r\n\r\n"
)


def tokens_of(path: Path) -> list[int]:
    return data.open_tokens(path).tolist()


# ---- resolve_inputs ----


def test_resolve_a_file(text_file: Path) -> None:
    assert data.resolve_inputs(str(text_file)) == [text_file]


def test_resolve_a_directory_of_txt_files_including_nested(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ("b.txt", "a.txt", "sub/c.txt", "sub/deeper/d.txt"):
        (tmp_path / name).write_text("text\n")
    (tmp_path / "notes.md").write_text("not text for training\n")
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")
    found = data.resolve_inputs(str(tmp_path))
    assert found == [tmp_path / n for n in ("a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt")]


def test_resolve_a_glob(tmp_path: Path) -> None:
    for name in ("one.txt", "two.txt", "three.log"):
        (tmp_path / name).write_text("text\n")
    assert data.resolve_inputs(str(tmp_path / "*.txt")) == [tmp_path / "one.txt", tmp_path / "two.txt"]
    assert data.resolve_inputs(str(tmp_path / "t*")) == [tmp_path / "three.log", tmp_path / "two.txt"]


@pytest.mark.parametrize(
    ("make", "spec", "message"),
    [
        (lambda tmp: None, "missing.txt", "does not exist"),
        (lambda tmp: (tmp / "empty_dir").mkdir(), "empty_dir", "no .txt files"),
        (lambda tmp: (tmp / "only_md").mkdir() or (tmp / "only_md" / "a.md").write_text("x"), "only_md", "no .txt"),
        (lambda tmp: None, "*.nothing", "no file matches"),
        (lambda tmp: os.mkfifo(tmp / "pipe"), "pipe", "is not a regular file"),  # issue 16, item 12: not "missing"
    ],
    ids=["missing-file", "empty-dir", "dir-without-txt", "glob-without-match", "fifo"],
)
def test_resolve_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make, spec: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        data.resolve_inputs(spec)
    assert "\n" not in str(err.value)


def test_default_input_txt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        data.resolve_inputs(None)
    message = str(err.value)
    assert "input.txt" in message and "--input" in message and "--data shakespeare" in message
    assert "\n" not in message
    (tmp_path / "input.txt").write_text(SAMPLE_TEXT)
    assert data.resolve_inputs(None) == [Path("input.txt")]


# ---- tokenize_files ----


@pytest.mark.parametrize("chunk_chars", [7, 64, documents.CHUNK_CHARS])
def test_chunked_tokenizing_equals_one_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_chars: int) -> None:
    monkeypatch.setattr(documents, "CHUNK_CHARS", chunk_chars)
    text = (TRICKY_TEXT + SAMPLE_TEXT) * 5
    source = tmp_path / "in.txt"
    source.write_bytes(text.encode("utf-8"))  # bytes: no newline translation
    out = tmp_path / "cache" / "tokens.u16"
    count = data.tokenize_files([source], out)
    expected = get_encoding().encode_ordinary(text)
    assert count == len(expected)
    assert tokens_of(out) == expected
    assert [p.name for p in out.parent.iterdir()] == ["tokens.u16"]  # no temporary left behind


def test_several_files_are_joined_with_endoftext(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(documents, "CHUNK_CHARS", 64)
    texts = [SAMPLE_TEXT, TRICKY_TEXT, "last file, no newline at the end"]
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_bytes(text.encode("utf-8"))
    out = tmp_path / "tokens.u16"
    count = data.tokenize_files(files, out)
    encode = get_encoding().encode_ordinary
    expected = [*encode(texts[0]), EOT_TOKEN, *encode(texts[1]), EOT_TOKEN, *encode(texts[2])]
    assert count == len(expected)
    assert tokens_of(out) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"some text\x00\x01\x02 and a NUL\n", "binary"),
        ("caf\u00e9 in Latin-1\n".encode("latin-1"), "not UTF-8"),
    ],
    ids=["empty", "binary", "latin-1"],
)
def test_bad_input_is_a_one_line_data_error(tmp_path: Path, content: bytes, message: str) -> None:
    source = tmp_path / "in.txt"
    source.write_bytes(content)
    out = tmp_path / "cache" / "tokens.u16"
    with pytest.raises(DataError, match=message) as err:
        data.tokenize_files([source], out)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_non_utf8_message_gives_the_offset_in_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: the offset is ``UnicodeDecodeError.start``, which counts from the start of the text decoder's current
    buffer (about 8 KB), not of the file; past the first buffer the message names the wrong byte."""
    monkeypatch.setattr(documents, "CHUNK_CHARS", 64)
    good = b"line of text\n" * 2000  # 26,000 bytes: several decoder buffers
    source = tmp_path / "in.txt"
    source.write_bytes(good + b"\xff\n")
    with pytest.raises(DataError, match=rf"bad byte at offset {len(good)}\)"):
        data.tokenize_files([source], tmp_path / "tokens.u16")


def test_bad_second_file_fails_without_a_partial_cache(tmp_path: Path) -> None:
    good, bad = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_text(SAMPLE_TEXT)
    bad.write_bytes(b"\xff\xfe\x00binary")
    out = tmp_path / "tokens.u16"
    with pytest.raises(DataError, match=re.escape(str(bad))):
        data.tokenize_files([good, bad], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


# ---- the token cache, through the command line ----


def test_cache_tokenizes_once_and_again_for_changed_input(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Through the function the CLI calls; training/test_loop.py checks that a second ``train.py`` run does not
    tokenize."""
    source = tmp_path / "input.txt"
    source.write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    caplog.set_level(logging.INFO, logger="gpt2scratch")
    cfg = TrainConfig(input=str(source), batch_size=4, seq_len=16)
    cache = tmp_path / "out" / "token_cache"

    def prepare() -> tuple[data.Corpus, bool]:
        caplog.clear()
        corpus = data.load_corpus(cfg, cache, World(), None)
        return corpus, any(m.startswith("tokenizing") for m in caplog.messages)

    corpus, tokenized = prepare()
    [first] = cache.glob("tokens-*.u16")
    assert tokenized and first.name == f"tokens-{corpus.sha256[:20]}.u16"
    mtime = first.stat().st_mtime_ns
    corpus, tokenized = prepare()
    assert not tokenized
    assert list(cache.glob("tokens-*.u16")) == [first] and first.stat().st_mtime_ns == mtime

    source.write_text(SAMPLE_TEXT * 3 + "One more line.\n", encoding="utf-8")
    changed, tokenized = prepare()
    assert tokenized and changed.sha256 != corpus.sha256
    caches = sorted(cache.glob("tokens-*.u16"))
    assert len(caches) == 2 and first in caches
    [second] = [p for p in caches if p != first]
    assert second.name == f"tokens-{changed.sha256[:20]}.u16"
    assert len(tokens_of(second)) == len(changed.train) > len(tokens_of(first)) == len(corpus.train)


# ---- issue 16: the hash is of the bytes tokenized; odd files; text without newlines ----


def test_input_that_changed_after_hashing_is_not_cached(tmp_path: Path) -> None:
    """Item 3: the cache is named by a hash; the tokens must be of exactly those bytes, or nothing is written."""
    source = tmp_path / "in.txt"
    source.write_text(SAMPLE_TEXT, encoding="utf-8")
    sha = data.content_hash([source])
    source.write_text(SAMPLE_TEXT.replace("Citizen", "Senator"), encoding="utf-8")  # rewritten meanwhile
    out = tmp_path / "cache" / f"tokens-{sha[:20]}.u16"
    with pytest.raises(DataError, match="changed while it was being read"):
        data.tokenize_files([source], out, expected_sha256=sha)
    assert not out.exists() and not list(out.parent.iterdir())
    assert data.tokenize_files([source], out, expected_sha256=data.content_hash([source])) > 0


def test_a_cache_file_without_a_matching_record_is_tokenized_anew(tmp_path: Path) -> None:
    """Item 3: a token file under the right name whose record is missing or of another text is not trusted."""
    source = tmp_path / "input.txt"
    source.write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    cfg = TrainConfig(input=str(source), batch_size=4, seq_len=16)
    cache = tmp_path / "token_cache"
    sha = data.content_hash([source])
    stale = cache / f"tokens-{sha[:20]}.u16"
    cache.mkdir()
    np.arange(500, dtype=np.uint16).tofile(stale)  # the tokens of some other text
    expected = get_encoding().encode_ordinary(SAMPLE_TEXT * 3)
    assert data.load_corpus(cfg, cache, World(), None).train.tolist() == expected
    record = stale.with_suffix(".json")
    assert f'"sha256": "{sha}"' in record.read_text()
    record.write_text(record.read_text().replace(sha, "0" * 64))  # a record of another text
    np.arange(500, dtype=np.uint16).tofile(stale)
    assert data.load_corpus(cfg, cache, World(), None).train.tolist() == expected


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs /proc")
def test_a_file_whose_size_reads_as_zero_is_not_called_empty(tmp_path: Path) -> None:
    """Item 12: files in /proc report 0 bytes but hold text."""
    assert data.tokenize_files([Path("/proc/cpuinfo")], tmp_path / "tokens.u16") > 0


def test_text_without_newlines_is_cut_at_spaces_with_the_same_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 12: one enormous line was held whole in memory; now it is cut where a space starts a piece."""
    monkeypatch.setattr(documents, "CHUNK_CHARS", 64)
    text = ("It is  a truth, universally acknowledged 42 times: naïve!  Ok?? " * 40).replace("\n", "")
    source = tmp_path / "line.txt"
    source.write_text(text, encoding="utf-8")
    import hashlib

    chunks = list(documents.text_chunks(source, hashlib.sha256()))
    assert len(chunks) > 10 and max(map(len, chunks)) <= 3 * 64
    assert data.tokenize_files([source], tmp_path / "t.u16") == len(get_encoding().encode_ordinary(text))
    assert tokens_of(tmp_path / "t.u16") == get_encoding().encode_ordinary(text)


def test_progress_starts_at_zero_before_the_first_chunk(tmp_path: Path) -> None:
    """Item 12: the bar's rate was measured from its first update, after the first chunk (TB/s)."""
    source = tmp_path / "in.txt"
    source.write_text(SAMPLE_TEXT, encoding="utf-8")
    calls: list[tuple[int, int]] = []
    data.tokenize_files([source], tmp_path / "t.u16", lambda done, total: calls.append((done, total)))
    size = source.stat().st_size
    assert calls[0] == (0, size) and calls[-1] == (size, size)


# ---- TokenLoader ----


def test_loader_windows_are_consecutive_and_shifted() -> None:
    tokens = np.arange(20, dtype=np.uint16)
    loader = data.TokenLoader(tokens, batch_size=2, seq_len=3)
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert torch.equal(y, x + 1)
    x, y = loader.next_batch()
    assert x.tolist() == [[6, 7, 8], [9, 10, 11]] and torch.equal(y, x + 1)


def test_loader_wraps_to_the_start() -> None:
    tokens = np.arange(20, dtype=np.uint16)  # room for 3 batches of 2 x 3 (+1 target) before the end
    loader = data.TokenLoader(tokens, batch_size=2, seq_len=3)
    starts = [int(loader.next_batch()[0][0, 0]) for _ in range(7)]
    assert starts == [0, 6, 12, 0, 6, 12, 0]


def test_two_ranks_read_what_one_rank_with_twice_the_batch_reads() -> None:
    tokens = np.random.default_rng(0).integers(0, 50257, size=203).astype(np.uint16)
    single = data.TokenLoader(tokens, batch_size=4, seq_len=5)
    ranks = [data.TokenLoader(tokens, batch_size=2, seq_len=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(25):  # several wraps
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_loader_state_dict_restores_the_position() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    loader = data.TokenLoader(tokens, batch_size=2, seq_len=4)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(5)]
    restored = data.TokenLoader(tokens, batch_size=2, seq_len=4)
    restored.load_state_dict(state)
    for want, got in zip(expected, (restored.next_batch() for _ in range(5)), strict=True):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_too_short_data_is_a_data_error() -> None:
    with pytest.raises(DataError, match="fewer than one batch") as err:
        data.TokenLoader(np.arange(12, dtype=np.uint16), batch_size=2, seq_len=6)
    assert "\n" not in str(err.value)
    data.TokenLoader(np.arange(13, dtype=np.uint16), batch_size=2, seq_len=6)  # exactly enough
    data.TokenLoader(np.arange(12, dtype=np.uint16), batch_size=2, seq_len=3)  # one process: 7 tokens are enough
    with pytest.raises(DataError, match="processes"):  # two: 2 x 3 x 2 + 1 = 13 are needed
        data.TokenLoader(np.arange(12, dtype=np.uint16), batch_size=2, seq_len=3, rank=1, world_size=2)


# ---- issue 12: JSON lines and Parquet files as --input; directories of shards ----


def test_a_jsonl_input_is_its_documents_joined_with_endoftext(tmp_path: Path) -> None:
    texts = [SAMPLE_TEXT, "", TRICKY_TEXT, "last"]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t, "title": t[:9]}) + "\n" for t in texts), encoding="utf-8")
    cache = tmp_path / "cache"
    corpus = data.load_corpus(TrainConfig(input=str(source), batch_size=2, seq_len=8), cache, World(), None)
    encode = get_encoding().encode_ordinary
    expected = encode(texts[0])
    for text in texts[1:]:
        expected += [EOT_TOKEN, *encode(text)]
    assert corpus.train.tolist() == expected
    titles = data.load_corpus(TrainConfig(input=str(source), text_field="title"), cache, World(), None)
    assert titles.sha256 != corpus.sha256  # another field is another text, cached apart
    assert titles.train.tolist() == [t for i, x in enumerate(texts) for t in ([EOT_TOKEN] * (i > 0) + encode(x[:9]))]


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_a_parquet_input_and_its_errors(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [SAMPLE_TEXT, "two"]}), tmp_path / "d.parquet")
    corpus = data.load_corpus(TrainConfig(input=str(tmp_path / "d.parquet")), tmp_path / "c", World(), None)
    assert corpus.train.tolist() == [*get_encoding().encode_ordinary(SAMPLE_TEXT), EOT_TOKEN, 11545]
    with pytest.raises(DataError, match=r"d\.parquet has no column 'body' \(its columns: text\)"):
        data.load_corpus(TrainConfig(input=str(tmp_path / "d.parquet"), text_field="body"), tmp_path, World(), None)


def shards_dir(folder: Path, train: list[int], val: list[int] | None = None) -> Path:
    """A directory of shards written with numpy alone: train_000000.bin (and val_000000.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, tokens in (("train_000000.bin", train), ("val_000000.bin", val)):
        if tokens is not None:
            header = np.zeros(256, dtype=np.int32)
            header[:3] = 20240520, 1, len(tokens)
            (folder / name).write_bytes(header.tobytes() + np.array(tokens, dtype=np.uint16).tobytes())
    return folder


def test_a_directory_of_shards_is_read_as_it_is(tmp_path: Path) -> None:
    folder = shards_dir(tmp_path / "shards", list(range(100)), list(range(50, 90)))
    cfg = TrainConfig(input=str(folder), batch_size=2, seq_len=8, max_tokens=70)
    corpus = data.load_corpus(cfg, tmp_path / "cache", World(), None)
    assert isinstance(corpus.train, ShardSet) and isinstance(corpus.val, ShardSet)
    assert corpus.train.tokens[0].tolist() == list(range(70)) and corpus.val.tokens[0].tolist() == list(range(50, 90))
    assert not (tmp_path / "cache").exists()  # nothing tokenized, nothing cached
    assert isinstance(data.make_loader(corpus.train, 2, 8), ShardLoader)


@pytest.mark.parametrize(
    ("flags", "error", "message"),
    [
        ({"val_fraction": 0.1}, UsageError, r"--val-fraction splits a text input; shards take their validation"),
        ({"seq_len": 32}, DataError, r"no validation shard \(val_000000\.bin, \.\.\.\) holds one batch \(65 tokens\)"),
    ],
)
def test_shard_inputs_refuse_what_does_not_apply(tmp_path: Path, flags: dict, error: type, message: str) -> None:
    folder = shards_dir(tmp_path / "shards", list(range(100)), list(range(40)))
    with pytest.raises(error, match=message):
        cfg = TrainConfig(input=str(folder), **{"batch_size": 2, "seq_len": 8, **flags})
        data.load_corpus(cfg, tmp_path, World(), None)


def test_shuffle_shards_on_a_text_input_is_refused(text_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--shuffle-shards orders the shards of a directory"):
        data.load_corpus(TrainConfig(input=str(text_file), shuffle_shards=True), tmp_path, World(), None)
