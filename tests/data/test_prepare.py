"""``gpt2-scratch prepare``: the shards hold exactly tiktoken's ids of each document after an <|endoftext|>, cut at the
stated sizes, whatever the input format and the parallelism; a killed run finishes byte for byte as an uninterrupted
one; an out dir of other shards is refused; bad input is one line and loses nothing already written."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_TEXT, child_env, digest, skip_without, temporaries

from gpt2scratch.config.commands import PrepareConfig
from gpt2scratch.data import documents, shards
from gpt2scratch.data import prepare as prepare_module
from gpt2scratch.data.prepare import prepare
from gpt2scratch.errors import DataError, OutDirError, UsageError
from gpt2scratch.files import OutDirLock
from gpt2scratch.tokenizer import EOT_TOKEN, get_encoding

DOCS = [f"Document {i}: " + SAMPLE_TEXT[: 40 + 37 * i] for i in range(12)] + ["", "naïve café 日本語 <|endoftext|>"]


def expected_ids(texts: list[str]) -> list[int]:
    """What prepare must write: each document's gpt2 ids after an <|endoftext|>, one after another."""
    encode = get_encoding().encode_ordinary
    return [token for text in texts for token in [EOT_TOKEN, *encode(text)]]


def write_input(folder: Path, kind: str, texts: list[str]) -> Path:
    """``texts`` as a .jsonl, .jsonl.gz, .parquet file or a datasets.save_to_disk folder in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts))
    if kind == "jsonl":
        (folder / "docs.jsonl").write_text(lines, encoding="utf-8")
        return folder / "docs.jsonl"
    if kind == "jsonl.gz":
        with gzip.open(folder / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(lines)
        return folder / "docs.jsonl.gz"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"n": list(range(len(texts))), "text": texts}), folder / "d.parquet", row_group_size=5)
        return folder / "d.parquet"
    import datasets

    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(folder / "saved"), num_shards=2)
    return folder / "saved"


def shard_ids(out: Path) -> dict[str, list[int]]:
    """Every shard in ``out``, by name, read with numpy alone."""
    found = {}
    for path in sorted(out.glob("*.bin")):
        header = np.fromfile(path, dtype=np.int32, count=256)
        assert header[:2].tolist() == [20240520, 1]
        ids = np.fromfile(path, dtype=np.uint16, offset=1024)
        assert header[2] == len(ids)
        found[path.name] = ids.tolist()
    return found


def config(inputs: list[Path], out: Path, *flags: str) -> PrepareConfig:
    from gpt2scratch.cli.dispatch import build_parser
    from gpt2scratch.cli.flags import from_args

    args = build_parser().parse_args(["prepare", *map(str, inputs), "--out", str(out), *flags])
    return from_args(PrepareConfig, args)


KINDS = [
    "jsonl",
    "jsonl.gz",
    pytest.param("parquet", marks=skip_without("pyarrow")),
    pytest.param("datasets", marks=skip_without("datasets")),
]


@pytest.mark.parametrize("kind", KINDS)
def test_shards_hold_tiktokens_ids_after_endoftext_cut_at_the_sizes(tmp_path: Path, kind: str) -> None:
    source = write_input(tmp_path / "in", kind, DOCS)
    result = prepare(config([source], tmp_path / "out", "--shard-tokens", "300", "--val-tokens", "123"))
    ids = expected_ids(DOCS)
    found = shard_ids(tmp_path / "out")
    train = ids[123:]
    names = ["val_000000.bin"] + [f"train_{k:06d}.bin" for k in range((len(train) + 299) // 300)]
    assert sorted(found) == sorted(names)
    assert found["val_000000.bin"] == ids[:123]
    for k, name in enumerate(names[1:]):
        assert found[name] == train[300 * k : 300 * (k + 1)], name
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["documents"] == result.documents == len(DOCS)
    assert manifest["tokens"] == {"train": len(train), "val": 123} == {"train": result.train_tokens, "val": 123}
    assert [s["name"] for s in manifest["shards"]] == names
    for shard in manifest["shards"]:
        assert shard["sha256"] == digest(tmp_path / "out" / shard["name"])
        assert shard["tokens"] == len(found[shard["name"]])
    assert manifest["arguments"] == {"inputs": [str(source)], "text_field": "text", "shard_tokens": 300,
                                     "val_tokens": 123}  # fmt: skip
    assert manifest["tokenizer"] == "gpt2" and manifest["format"]["magic"] == 20240520
    assert temporaries(tmp_path / "out") == []


def test_several_inputs_and_text_files_in_order(tmp_path: Path) -> None:
    first = write_input(tmp_path / "a", "jsonl", DOCS[:5])
    (tmp_path / "b.txt").write_text(SAMPLE_TEXT * 2, encoding="utf-8")
    prepare(config([first, tmp_path / "b.txt"], tmp_path / "out", "--shard-tokens", "1000000"))
    assert shard_ids(tmp_path / "out")["train_000000.bin"] == expected_ids([*DOCS[:5], SAMPLE_TEXT * 2])


@pytest.mark.parametrize("parallel", ["threads", "processes"])
def test_threads_and_processes_write_the_same_bytes(tmp_path: Path, parallel: str) -> None:
    source = write_input(tmp_path / "in", "jsonl", DOCS * 20)
    flags = ["--shard-tokens", "700", "--val-tokens", "50", "--workers", "2"]
    prepare(config([source], tmp_path / "one", *flags, "--workers", "1", "--parallel", "threads"))
    prepare(config([source], tmp_path / parallel, *flags, "--parallel", parallel))
    assert tree_digests(tmp_path / parallel) == tree_digests(tmp_path / "one")


def tree_digests(folder: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def test_resuming_after_any_shard_writes_the_same_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shard boundary lies inside a document (or a text file's chunk): the kill -9 test below, in every place."""
    monkeypatch.setattr(documents, "CHUNK_CHARS", 64)
    source = write_input(tmp_path / "in", "jsonl.gz", DOCS)
    (tmp_path / "in" / "long.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    inputs = [source, tmp_path / "in" / "long.txt"]
    flags = ["--shard-tokens", "97", "--val-tokens", "31"]
    prepare(config(inputs, tmp_path / "whole", *flags))
    whole = tree_digests(tmp_path / "whole")
    manifest = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert any(s["end"]["token"] > 0 and s["end"]["source"] == 1 for s in manifest["shards"])  # inside the text
    for kept in range(len(manifest["shards"])):
        out = tmp_path / f"cut{kept}"
        out.mkdir()
        for shard in manifest["shards"][:kept]:
            (out / shard["name"]).write_bytes((tmp_path / "whole" / shard["name"]).read_bytes())
        cut = {**manifest, "complete": False, "shards": manifest["shards"][:kept]}
        (out / "manifest.json").write_text(json.dumps(cut))
        prepare(config(inputs, out, *flags))
        assert tree_digests(out) == whole, kept


def test_a_finished_prepare_is_not_redone(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in", "jsonl", DOCS)
    first = prepare(config([source], tmp_path / "out", "--shard-tokens", "300"))
    times = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("[!.]*")}
    again = prepare(config([source], tmp_path / "out", "--shard-tokens", "300"))
    assert again.already and not first.already and again.shards == first.shards
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("[!.]*")} == times


def test_an_out_dir_of_other_shards_is_refused_and_kept(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in", "jsonl", DOCS)
    prepare(config([source], tmp_path / "out", "--shard-tokens", "300"))
    before = tree_digests(tmp_path / "out")
    with pytest.raises(OutDirError, match=r"holds the shards of another prepare \(--shard-tokens 300, not 200\)"):
        prepare(config([source], tmp_path / "out", "--shard-tokens", "200"))
    with open(source, "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(OutDirError, match=r"its input files have changed since"):
        prepare(config([source], tmp_path / "out", "--shard-tokens", "300"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "train_000000.bin").write_bytes(b"someone else's")
    with pytest.raises(OutDirError, match=r"holds shards \(train_000000\.bin, \.\.\.\) but no manifest\.json"):
        prepare(config([source], tmp_path / "foreign"))
    assert tree_digests(tmp_path / "out") == before
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../elsewhere.bin"
    manifest["sources"][0]["bytes"] = source.stat().st_size  # the input as it is now
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OutDirError, match=r"manifest\.json is damaged or not prepare's; .* \(its shard 0 is '\.\./"):
        prepare(config([source], tmp_path / "damaged", "--shard-tokens", "300"))


def test_bad_input_midway_keeps_the_finished_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 100)  # the bad document in a batch of its own
    good = write_input(tmp_path / "in", "jsonl", DOCS)
    bad = tmp_path / "in" / "z.jsonl"
    bad.write_text(json.dumps({"text": "fine " * 40}) + '\n{"text": "\\ud800 alone"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"z\.jsonl line 2 is not valid Unicode \(it holds a lone surrogate") as err:
        prepare(config([good, bad], tmp_path / "out", "--shard-tokens", "300"))
    assert "\n" not in str(err.value)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    ids = expected_ids([*DOCS, "fine " * 40])
    assert not manifest["complete"] and len(manifest["shards"]) == len(ids) // 300 == 3
    found = shard_ids(tmp_path / "out")
    for k, shard in enumerate(manifest["shards"]):
        assert found[shard["name"]] == ids[300 * k : 300 * (k + 1)]
        assert shard["sha256"] == digest(tmp_path / "out" / shard["name"])
    assert temporaries(tmp_path / "out") == []


def test_nothing_to_train_on(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"the inputs \(.*empty\.jsonl\) hold no documents"):
        prepare(config([tmp_path / "empty.jsonl"], tmp_path / "out"))
    source = write_input(tmp_path / "in", "jsonl", DOCS)
    total = len(expected_ids(DOCS))
    with pytest.raises(DataError, match=rf"hold {total:,} tokens, no more than --val-tokens {total:,}"):
        prepare(config([source], tmp_path / "out2", "--val-tokens", str(total)))


def test_a_prepare_that_failed_before_its_first_shard_leaves_the_out_dir_free(tmp_path: Path) -> None:
    """Its manifest lists no shard: the command run again as corrected (here, --val-tokens lowered, then another
    input) starts afresh instead of being refused as another prepare's; shards beside such a manifest still are."""
    source = write_input(tmp_path / "in", "jsonl", DOCS)
    with pytest.raises(DataError, match=r"no more than --val-tokens 100,000"):
        prepare(config([source], tmp_path / "out", "--val-tokens", "100000"))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"] == []
    assert prepare(config([source], tmp_path / "out", "--val-tokens", "10")).val_tokens == 10
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{nope\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 2 is not valid JSON"):
        prepare(config([tmp_path / "bad.jsonl"], tmp_path / "out2"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert prepare(config([tmp_path / "bad.jsonl"], tmp_path / "out2")).documents == 2
    (tmp_path / "out3").mkdir()
    (tmp_path / "out3" / "train_000000.bin").write_bytes(b"someone else's")
    manifest = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    (tmp_path / "out3" / "manifest.json").write_text(json.dumps({**manifest, "complete": False, "shards": []}))
    with pytest.raises(OutDirError, match=r"holds shards \(train_000000\.bin, \.\.\.\) but no manifest\.json that"):
        prepare(config([source], tmp_path / "out3"))
    assert (tmp_path / "out3" / "train_000000.bin").read_bytes() == b"someone else's"


def test_progress_counts_documents_and_tokens(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in", "jsonl", DOCS)
    calls: list[tuple[int, int, str]] = []
    prepare(config([source], tmp_path / "out"), lambda done, total, note: calls.append((done, total, note)))
    size = source.stat().st_size
    assert calls[-1] == (size, size, f"{len(DOCS)} docs, {len(expected_ids(DOCS)):,} tokens")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard-tokens", "0"], r"--shard-tokens must be in \[1, 2147483647\], got 0"),
        (["--shard-tokens", str(2**31)], r"--shard-tokens must be in \[1, 2147483647\]"),
        (["--val-tokens", "-1"], r"--val-tokens must be in \[0, 2147483647\], got -1"),
        (["--workers", "0"], r"--workers must be a positive integer, got 0"),
        (["--text-field", ""], r"--text-field must not be empty"),
    ],
)
def test_flags_out_of_range(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        config([tmp_path / "a.jsonl"], tmp_path / "out", *flags)


def test_workers_far_beyond_the_cores_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    from gpt2scratch.data.prepare import WORKERS_PER_CORE, available_cores

    source = write_input(tmp_path, "jsonl", DOCS)
    too_many = WORKERS_PER_CORE * available_cores() + 1
    with pytest.raises(UsageError, match=rf"--workers {too_many} is more than {WORKERS_PER_CORE} per core"):
        prepare(config([source], tmp_path / "out", "--workers", str(too_many)))
    assert not (tmp_path / "out").exists()


# ---- kill -9, then the same command ----


def big_jsonl(path: Path) -> Path:
    """Half of Shakespeare (~2.5 MB) in documents of 3,000 characters: a second or more of work on one thread, of
    which the first two shards are a tenth."""
    from gpt2scratch.data.builtin import shakespeare_text

    text = shakespeare_text()[:2_500_000]
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, len(text), 3000):
            f.write(json.dumps({"text": text[start : start + 3000]}) + "\n")
    return path


@pytest.mark.slow
def test_killed_prepare_run_again_writes_what_an_uninterrupted_run_writes(tmp_path: Path) -> None:
    source = big_jsonl(tmp_path / "big.jsonl")
    flags = ["--shard-tokens", "50000", "--val-tokens", "12345", "--workers", "1", "--parallel", "threads"]
    command = [sys.executable, "-m", "gpt2scratch", "prepare", str(source), "--out", str(tmp_path / "killed"), *flags]
    env = child_env()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed" / "train_000000.bin").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert not manifest["complete"], "the kill came after the end: give the test a bigger input"
    assert manifest["shards"][0]["name"] == "val_000000.bin"  # (train_000000.bin too, unless killed just before)

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(manifest['shards'])} finished shard(s) kept" in again.stdout
    prepare(config([source], tmp_path / "whole", *flags))
    assert tree_digests(tmp_path / "killed") == tree_digests(tmp_path / "whole")
    assert len(tree_digests(tmp_path / "whole")) > 10
    assert temporaries(tmp_path / "killed") == []
    ids = shards.read_shard(tmp_path / "whole" / "val_000000.bin")
    assert ids[0] == EOT_TOKEN and len(ids) == 12345


def test_the_defaults_are_llm_cs(tmp_path: Path) -> None:
    cfg = config([tmp_path / "a.jsonl"], tmp_path / "out")
    assert dataclasses.asdict(cfg)["shard_tokens"] == 100_000_000 and cfg.parallel == "auto" and cfg.val_tokens == 0


def test_a_second_prepare_on_the_same_out_dir_is_refused(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in", "jsonl", DOCS)
    (tmp_path / "out").mkdir()
    running = OutDirLock(tmp_path / "out", "prepare", "--out")
    running.acquire()
    try:
        with pytest.raises(OutDirError, match=rf"in use by a running prepare \(pid {os.getpid()}\); .*another --out$"):
            prepare(config([source], tmp_path / "out"))
    finally:
        running.release()
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".gpt2scratch.lock"]
