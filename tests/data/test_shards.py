"""Token shards in llm.c's format: files written by an independent numpy writer read back exactly, bad headers are
one-line errors, the loader's windows through several shards (order, tails, epochs, shuffling, ranks, state), and the
cheap identity of a directory of shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import numpy_shard

from gpt2scratch.data import shards
from gpt2scratch.data.shards import ShardFiles, ShardLoader, ShardSet
from gpt2scratch.errors import DataError


def test_an_independently_written_shard_reads_back_exactly(tmp_path: Path) -> None:
    tokens = np.random.default_rng(0).integers(0, 50257, 1000).astype(np.uint16)
    read = shards.read_shard(numpy_shard(tmp_path / "fineweb_train_000001.bin", tokens))
    assert isinstance(read, np.memmap) and np.array_equal(read, tokens)


def test_our_writer_writes_what_a_numpy_reader_reads(tmp_path: Path) -> None:
    tokens = np.arange(300, dtype=np.uint16)
    for capacity in (300, 1000):  # full (sha256 while writing) and the last, partial one (sha256 read back)
        path = tmp_path / f"train_{capacity}.bin"
        writer = shards.ShardWriter(path, capacity)
        writer.write(tokens[:100])
        writer.write(tokens[100:])
        sha256 = writer.finish()
        raw = np.fromfile(path, dtype=np.int32, count=3)
        assert raw.tolist() == [20240520, 1, 300]
        assert np.array_equal(np.fromfile(path, dtype=np.uint16, offset=1024), tokens)
        assert sha256 == shards.file_sha256(path)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize(
    ("magic", "version", "count", "size_cut", "message"),
    [
        (12345, 1, None, 0, r"is not a token shard: its header starts with 12345, not llm\.c's magic 20240520"),
        (20240520, 2, None, 0, r"is a version-2 shard \(uint32 tokens of LLaMA 3's tokenizer\)"),
        (20240520, 1, 900, 0, r"is damaged: its header says 900 tokens \(2,824 bytes with the header\) but the file "),
        (20240520, 1, None, 11, r"is damaged: its header says 100 tokens"),
        (20240520, 1, None, 300, r"is not a token shard: 924 bytes, less than llm\.c's 1024-byte header"),
    ],
    ids=["magic", "version-2", "count-too-large", "truncated", "no-header"],
)
def test_bad_headers_are_one_line_data_errors(
    tmp_path: Path, magic: int, version: int, count: int | None, size_cut: int, message: str
) -> None:
    path = numpy_shard(tmp_path / "train_000000.bin", np.arange(100), magic, version, count)
    path.write_bytes(path.read_bytes()[: path.stat().st_size - size_cut])
    with pytest.raises(DataError, match=message) as failure:
        shards.read_shard(path)
    assert str(path) in str(failure.value) and "\n" not in str(failure.value)


def test_finding_shards_by_their_names(tmp_path: Path) -> None:
    for name in ("fineweb_train_000002.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin", "interval.bin"):
        numpy_shard(tmp_path / name, np.arange(10))
    (tmp_path / "notes.txt").write_text("x")
    found = shards.find_shards(str(tmp_path))
    assert found is not None
    assert [p.name for p in found.train] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [p.name for p in found.val] == ["fineweb_val_000000.bin"]
    assert shards.find_shards(str(tmp_path / "*train*.bin")) == ShardFiles(found.train, [])
    assert shards.find_shards(str(tmp_path / "notes.txt")) is None
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    (text_dir / "a.txt").write_text("x")
    assert shards.find_shards(str(text_dir)) is None


# ---- ShardLoader ----


def shard_set(*lengths: int) -> ShardSet:
    """Shards whose tokens are their global positions (shard k starts at 1000 * k), so windows show where they are."""
    tokens = [np.arange(1000 * k, 1000 * k + n, dtype=np.uint16) for k, n in enumerate(lengths)]
    return ShardSet([Path(f"train_{k:06d}.bin") for k in range(len(lengths))], tokens)


def starts(loader: ShardLoader, steps: int) -> list[int]:
    """The first token of each window read (the shard's base + the offset)."""
    return [int(loader.next_batch()[0][0, 0]) for _ in range(steps)]


def test_windows_run_through_the_shards_skipping_their_tails() -> None:
    # B x T = 8: a shard of 30 tokens holds windows at 0, 8, 16 (16 + 9 <= 30), not 24; one of 8 holds none.
    loader = ShardLoader(shard_set(30, 8, 17), batch_size=2, seq_len=4)
    x, y = loader.next_batch()
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert x.dtype == torch.int64
    assert starts(loader, 5) == [8, 16, 2000, 2008, 0]  # shard 1 is skipped; epoch 2 starts again at shard 0
    assert loader.state_dict() == {"shard": 0, "offset": 8, "epoch": 1}


def test_shuffled_epochs_are_seeded_and_differ() -> None:
    def epochs(seed: int) -> list[list[int]]:
        loader = ShardLoader(shard_set(*[9] * 6), batch_size=1, seq_len=8, shuffle_seed=seed)
        return [[s // 1000 for s in starts(loader, 6)] for _ in range(3)]

    first = epochs(7)
    assert first == epochs(7)
    assert all(sorted(order) == list(range(6)) for order in first)
    assert len({tuple(order) for order in first}) == 3
    assert epochs(8) != first


def test_two_ranks_read_what_one_rank_with_twice_the_batch_reads() -> None:
    sizes = (50, 33, 70)
    one = ShardLoader(shard_set(*sizes), batch_size=4, seq_len=4)
    ranks = [ShardLoader(shard_set(*sizes), batch_size=2, seq_len=4, rank=r, world_size=2) for r in range(2)]
    for _ in range(9):  # across shard boundaries and into the next epoch
        x, y = one.next_batch()
        parts = [rank.next_batch() for rank in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_state_dict_restores_the_place_exactly() -> None:
    loader = ShardLoader(shard_set(30, 30, 30), batch_size=2, seq_len=4, shuffle_seed=3)
    starts(loader, 7)
    saved = loader.state_dict()
    expected = starts(loader, 10)
    restored = ShardLoader(shard_set(30, 30, 30), batch_size=2, seq_len=4, shuffle_seed=3)
    restored.load_state_dict(saved)
    assert starts(restored, 10) == expected


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"position": 64}, ("loader shard", "is None, not one of the input's 2 shards")),
        ({"shard": 2, "offset": 0, "epoch": 0}, ("loader shard", "is 2, not one of the input's 2 shards")),
        (
            {"shard": 1, "offset": 40, "epoch": 0},
            ("loader offset", "is 40, not a place in train_000001.bin's 40 tokens"),
        ),
        ({"shard": 1, "offset": 8, "epoch": -1}, ("loader epoch", "is -1, not a whole number >= 0")),
        ({"shard": 1, "offset": 8, "epoch": 3}, None),
    ],
)
def test_state_problems_name_the_field(state: dict, message: tuple[str, str] | None) -> None:
    assert ShardLoader(shard_set(30, 40), batch_size=2, seq_len=4).state_problem(state) == message


def test_no_shard_long_enough_for_a_batch() -> None:
    with pytest.raises(DataError, match=r"no shard holds the 17 tokens one batch needs .*the longest has 16"):
        ShardLoader(shard_set(16, 10), batch_size=4, seq_len=4)


def test_a_token_beyond_gpt2s_vocabulary_is_a_data_error() -> None:
    big = ShardSet([Path("llama_train_000000.bin")], [np.full(20, 60000, dtype=np.uint16)])
    with pytest.raises(DataError, match=r"llama_train_000000\.bin holds token id 60000, beyond GPT-2's 50,257"):
        ShardLoader(big, batch_size=2, seq_len=4).next_batch()


def test_first_tokens_cut_across_shards() -> None:
    cut = shard_set(30, 30, 30).first(45)
    assert [len(t) for t in cut.tokens] == [30, 15] and len(cut) == 45


# ---- identity ----


def test_identity_from_the_manifest_or_a_fingerprint(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = [numpy_shard(tmp_path / f"train_{k:06d}.bin", rng.integers(0, 50257, 1_500_000)) for k in range(2)]
    files = ShardFiles(paths, [])
    fingerprint = shards.fingerprint(files)
    middle = bytearray(paths[1].read_bytes())
    middle[1024 + 2 * 700_000] ^= 1  # a byte outside the first and last MB: the fingerprint does not read it
    paths[1].write_bytes(bytes(middle))
    assert shards.fingerprint(files) == fingerprint
    end = bytearray(middle)
    end[-1] ^= 1
    paths[1].write_bytes(bytes(end))
    assert shards.fingerprint(files) != fingerprint

    listed = [{"name": p.name, "tokens": 1_500_000, "sha256": shards.file_sha256(p)} for p in paths]
    manifest = {"format": {"magic": 20240520}, "complete": True, "shards": listed}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    from_manifest = shards.fingerprint(files)
    listed[0]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert len({fingerprint, from_manifest, shards.fingerprint(files)}) == 3

    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(DataError, match=r"is still being prepared \(manifest\.json says it is unfinished\)"):
        shards.fingerprint(files)
    listed[1]["tokens"] = 10
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train_000001\.bin is not the shard that .*manifest\.json lists"):
        shards.fingerprint(files)


@pytest.mark.parametrize(
    "entry",
    [1, {"name": "train_000000.bin", "tokens": 10}, {"name": 7, "tokens": 10, "sha256": "0"},
     {"name": "train_000000.bin", "tokens": "10", "sha256": "0"}],
)  # fmt: skip
def test_a_manifest_listing_a_shard_malformed_is_a_data_error(tmp_path: Path, entry: object) -> None:
    """Once an internal error (a KeyError or TypeError in identity) when train --input read such a directory."""
    path = numpy_shard(tmp_path / "train_000000.bin", np.arange(10))
    manifest = {"format": {"magic": 20240520}, "complete": True, "shards": [entry]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json is damaged: it lists a shard as .*move the manifest away"):
        shards.fingerprint(ShardFiles([path], []))
