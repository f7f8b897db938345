"""Checkpoint files under real faults: atomic writes, unloadable and malicious files, retention, discovery, the lock.

Every fault is real: files cut in half, random bytes, pickles that would run a command, a file size limit set on
this process, a lock holder killed with SIGKILL. Nothing of the package is mocked.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import random
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, TINY, RunsCommand, digest, file_size_limit, temporaries

from gpt2scratch import device
from gpt2scratch.checkpoint.format import (
    FORMAT_VERSION,
    CheckpointWriter,
    all_finite,
    read_checkpoint,
)
from gpt2scratch.checkpoint.hf import config_to_hf
from gpt2scratch.checkpoint.load import model_from_checkpoint
from gpt2scratch.errors import CheckpointError, OutDirError, UsageError
from gpt2scratch.files import replace_atomically
from gpt2scratch.model import GPT
from gpt2scratch.training.rundir import list_snapshots, prune, snapshot_path


def save(state: dict, path: Path) -> None:
    """An atomic save in the foreground, as training writes its final model."""
    writer = CheckpointWriter()
    try:
        writer.submit(state, path, background=False, checksums=True)
    finally:
        writer.close()


def our_state(numel: int, fill: float = 1.0) -> dict:
    return {"format_version": FORMAT_VERSION, "model_state_dict": {"w": torch.full((numel,), fill)}, "config": {}}


@pytest.fixture(scope="module")
def snapshot(trained_snapshot: Path) -> Path:
    return trained_snapshot


# ---- atomic save ----


def test_save_only_ever_shows_complete_files_under_the_final_name(tmp_path: Path) -> None:
    path = tmp_path / "snapshots" / "snapshot_step_1.pt"
    save(our_state(1000, fill=1.0), path)
    old_size = path.stat().st_size
    new = our_state(8_000_000, fill=2.0)  # 32 MB: the write takes long enough to be watched
    saver = threading.Thread(target=save, args=(new, path))
    sizes, seen_temporaries = set(), set()
    saver.start()
    while saver.is_alive():
        sizes.add(path.stat().st_size)  # the final name always exists: the old file until the rename
        seen_temporaries.update(p.name for p in temporaries(tmp_path))
    saver.join()
    new_size = path.stat().st_size
    assert sizes <= {old_size, new_size}, "a partly written file appeared under the final name"
    assert seen_temporaries, "the write did not go through a temporary file"
    assert all(name.startswith(".snapshot_step_1.pt.tmp-") for name in seen_temporaries)
    assert not temporaries(tmp_path)
    assert torch.equal(read_checkpoint(path)["model_state_dict"]["w"], new["model_state_dict"]["w"])


def test_failed_write_leaves_the_old_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "final_model.pt"
    save(our_state(1000), path)
    before = digest(path)
    with file_size_limit(1 << 20), pytest.raises(OutDirError) as failure:
        save(our_state(2_000_000), path)  # 8 MB against a 1 MB limit
    message = str(failure.value)
    assert "\n" not in message
    assert "file size limit" in message and "intact" in message
    assert digest(path) == before
    assert read_checkpoint(path)["model_state_dict"]["w"].numel() == 1000
    assert not temporaries(tmp_path)


# ---- loading what is not a good checkpoint of ours ----


def _truncated(snapshot: Path, path: Path) -> None:
    data = snapshot.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _newer(snapshot: Path, path: Path) -> None:
    state = torch.load(snapshot, weights_only=True)
    torch.save({**state, "format_version": FORMAT_VERSION + 1}, path)


def _plain_state_dict(snapshot: Path, path: Path) -> None:
    torch.save(torch.load(snapshot, weights_only=True)["model_state_dict"], path)


def _other_trainer(snapshot: Path, path: Path) -> None:
    state = torch.load(snapshot, weights_only=True)
    torch.save({"epoch": 3, "model_state_dict": state["model_state_dict"], "config": state["config"]}, path)


BAD_FILES: dict[str, tuple[Callable[[Path, Path], object], str]] = {
    "missing": (lambda snapshot, path: None, "no checkpoint at"),
    "directory": (lambda snapshot, path: path.mkdir(), "is a directory"),
    "empty": (lambda snapshot, path: path.write_bytes(b""), "truncated or corrupt"),
    "truncated": (_truncated, "truncated or corrupt"),
    "plain-state-dict": (_plain_state_dict, "not a gpt2-scratch checkpoint"),
    "no-format-version": (_other_trainer, "no format_version"),
    "newer-format": (_newer, f"format {FORMAT_VERSION + 1}, newer"),
    "text-file": (lambda snapshot, path: path.write_text(SAMPLE_TEXT), "corrupt|not a"),
    "short-text-file": (lambda snapshot, path: path.write_text("hello world\n"), "corrupt|not a"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_load_rejects_bad_files_with_one_line(case: str, snapshot: Path, tmp_path: Path) -> None:
    make, expected = BAD_FILES[case]
    path = tmp_path / "model.pt"
    make(snapshot, path)
    with pytest.raises(CheckpointError, match=expected) as failure:
        read_checkpoint(path)
    assert "\n" not in str(failure.value)
    assert str(path) in str(failure.value)


def _load_outcomes(tmp_path: Path, blobs: dict[str, bytes]) -> dict[str, BaseException]:
    """What ``read_checkpoint`` raises for each blob."""
    outcomes = {}
    for name, data in blobs.items():
        path = tmp_path / name
        path.write_bytes(data)
        try:
            read_checkpoint(path)
        except Exception as err:
            outcomes[name] = err
        path.unlink()
    return outcomes


def _corrupt_blobs(snapshot: Path) -> dict[str, bytes]:
    """512 bytes of noise after every possible first byte, and the back half of a real snapshot."""
    blobs = {f"first-byte-{b}": bytes([b]) + random.Random(b).randbytes(511) for b in range(256)}
    data = snapshot.read_bytes()
    blobs["back-half"] = data[len(data) // 2 :]
    return blobs


def test_random_bytes_are_checkpoint_errors(snapshot: Path, tmp_path: Path) -> None:
    outcomes = _load_outcomes(tmp_path, _corrupt_blobs(snapshot))
    escaped = {name: f"{type(err).__name__}: {err}" for name, err in outcomes.items()}
    escaped = {name: why for name, why in escaped.items() if not why.startswith("CheckpointError")}
    print(f"corrupt files tried: {len(outcomes)}, not a CheckpointError: {len(escaped)}")
    assert not escaped, f"{len(escaped)} of {len(outcomes)} corrupt files escaped: {dict(list(escaped.items())[:4])}"


def test_random_bytes_are_called_corrupt_not_unsafe(snapshot: Path, tmp_path: Path) -> None:
    outcomes = _load_outcomes(tmp_path, _corrupt_blobs(snapshot))
    unsafe = [name for name, err in outcomes.items() if "could run code" in str(err)]
    assert not unsafe, f"{len(unsafe)} of {len(outcomes)} corrupt files are reported as code-running: {unsafe[:4]}"


MALICIOUS = {
    "torch-save-checkpoint": lambda cmd, path: torch.save(
        {"format_version": FORMAT_VERSION, "model_state_dict": RunsCommand(cmd), "config": {}}, path
    ),
    "torch-save-object": lambda cmd, path: torch.save(RunsCommand(cmd), path),
    "raw-pickle": lambda cmd, path: path.write_bytes(pickle.dumps(RunsCommand(cmd))),
}


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_malicious_pickle_is_refused_without_running(case: str, tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    MALICIOUS[case](f"touch {pwned}", path)
    # torch's safe unpickler stops a protocol-4 pickle at its first opcode (FRAME), before it names any function.
    with pytest.raises(CheckpointError, match=r"refused|corrupt") as failure:
        read_checkpoint(path)
    assert "\n" not in str(failure.value)
    assert not pwned.exists(), "loading the checkpoint ran its command"
    # The control: an unsafe load of the same file does run the command, so the refusal above mattered.
    with contextlib.suppress(Exception):
        pickle.loads(path.read_bytes()) if case == "raw-pickle" else torch.load(path, weights_only=False)
    assert pwned.exists()


def test_malicious_transformers_dir_is_refused_without_running(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    model_dir = tmp_path / "hf-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config_to_hf(TINY)))
    torch.save({"transformer.wte.weight": RunsCommand(f"touch {pwned}")}, model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused") as failure:
        GPT.from_pretrained(model_dir)
    assert "\n" not in str(failure.value)
    assert not pwned.exists(), "loading the transformers directory ran its command"


def test_tied_embedding_is_stored_once(snapshot: Path) -> None:
    """wte and lm_head are one matrix: saved twice, every checkpoint is larger and could disagree with itself."""
    weights = torch.load(snapshot, weights_only=True)["model_state_dict"]
    wte, head = weights["transformer.wte.weight"], weights["lm_head.weight"]
    shared = wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    assert shared, f"the tied embedding is saved twice: {2 * wte.numel():,} values for {wte.numel():,}"


# ---- the background writer ----


def test_snapshot_writer_writes_a_copy_in_the_background(tmp_path: Path) -> None:
    writer = CheckpointWriter(after_write=lambda: prune(tmp_path, keep=1))
    state = our_state(8_000_000, fill=1.0)
    first = snapshot_path(tmp_path, 1)
    writer.submit(state, first)
    assert any(t.name == "snapshot-writer" for t in threading.enumerate()), "submit waited for the disk"
    state["model_state_dict"]["w"].fill_(7.0)  # training goes on and changes the weights
    writer.wait()
    assert bool((read_checkpoint(first)["model_state_dict"]["w"] == 1.0).all()), "the file holds later weights"
    second = snapshot_path(tmp_path, 2)
    writer.submit(state, second)
    writer.wait()
    assert [path for _, path in list_snapshots(tmp_path)] == [second]  # keep=1 pruned the first
    assert bool((read_checkpoint(second)["model_state_dict"]["w"] == 7.0).all())


def test_snapshot_writer_reports_a_failed_write(tmp_path: Path) -> None:
    writer = CheckpointWriter()
    big = our_state(2_000_000)  # 8 MB
    with file_size_limit(1 << 20):
        writer.submit(big, snapshot_path(tmp_path, 1))  # returns: the write fails in the background
        with pytest.raises(OutDirError, match=r"could not write .*snapshot_step_1\.pt"):
            writer.wait()
        writer.submit(big, snapshot_path(tmp_path, 2))
        with pytest.raises(OutDirError, match=r"snapshot_step_2\.pt"):  # or raised by the next submit
            writer.submit(our_state(10), snapshot_path(tmp_path, 3))
    writer.wait()
    assert list_snapshots(tmp_path) == []
    assert not temporaries(tmp_path)
    writer.submit(our_state(10), snapshot_path(tmp_path, 4))  # the writer still works afterwards
    writer.wait()
    assert read_checkpoint(snapshot_path(tmp_path, 4))["format_version"] == FORMAT_VERSION


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm")
def test_snapshot_writer_falls_back_where_o_direct_is_refused() -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:  # tmpfs: no O_DIRECT
        writer = CheckpointWriter()
        writer.submit(our_state(300_000, fill=2.0), snapshot_path(Path(folder), 1))
        writer.close()
        loaded = read_checkpoint(snapshot_path(Path(folder), 1))
        assert bool((loaded["model_state_dict"]["w"] == 2.0).all())


def test_all_finite_catches_nan_and_inf_but_not_large_finite_weights() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    assert all_finite(model)
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # each weight finite; their sum overflows to inf
        assert all_finite(model)
        model[1].bias[3] = float("nan")
        assert not all_finite(model)
        model[1].bias[3] = float("-inf")
        assert not all_finite(model)


def test_a_raw_pickle_is_refused_without_torch_s_protocol_warning(tmp_path: Path) -> None:
    """The sweep: torch warned "Detected pickle protocol 4" (two lines on stderr) before our one-line refusal."""
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(RunsCommand(f"touch {tmp_path / 'pwned'}"), protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="refused to load"):
            read_checkpoint(path)
        assert not caught, [str(w.message) for w in caught]
        with contextlib.suppress(Exception):  # the control: torch.load itself warns on this file
            torch.load(path, weights_only=True)
    assert any("Detected pickle protocol" in str(w.message) for w in caught)
    assert not (tmp_path / "pwned").exists()


def checkpoint_of(config: dict, model: GPT) -> dict:
    return {"format_version": FORMAT_VERSION, "config": config, "model_state_dict": model.state_dict()}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"block_size": 10**12}, r"wpe\.weight has shape \(64, 32\), the config needs \(1000000000000, 32\)"),
        ({"n_embd": 2**20, "n_head": 1}, r"wte\.weight has shape \(50257, 32\), the config needs \(50257, 1048576\)"),
        ({"n_layer": 10**6}, r"missing \['transformer\.h\.2\.\*'\] \(the config has n_layer=1000000, the weights 2"),
    ],
    ids=["block_size", "n_embd", "n_layer"],
)
def test_a_config_that_its_weights_contradict_is_refused_before_the_model_is_built(change: dict, message: str) -> None:
    """The sweep: a damaged config's block_size was an allocation error of 128 TB, a huge n_layer hung generate
    and export while a million layers were built. Building either would fail or take hours: refused at once."""
    model = GPT(TINY)
    checkpoint = checkpoint_of({**TINY.to_dict(), **change}, model)
    with pytest.raises(CheckpointError, match=message):
        model_from_checkpoint(GPT, checkpoint, "ck.pt")


@pytest.mark.parametrize("config", [{"n_layer": "2"}, {1: 2}, {"colour": "red"}], ids=["text", "int-key", "unknown"])
def test_a_damaged_config_is_a_checkpoint_error(config: dict) -> None:
    with pytest.raises(CheckpointError, match=r"^ck\.pt is damaged: its "):
        model_from_checkpoint(GPT, checkpoint_of({**TINY.to_dict(), **config}, GPT(TINY)), "ck.pt")


def test_a_model_larger_than_the_free_memory_is_refused_before_it_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check as training's, with fp32 weights alone: generate, eval, export and --init-from load this way."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 2000000 kB\nMemAvailable: 10000 kB\n")  # 10 MB; the tiny model's weights are 6.5
    monkeypatch.setattr(device, "MEMINFO", meminfo)
    checkpoint = checkpoint_of(TINY.to_dict(), GPT(TINY))
    assert model_from_checkpoint(GPT, checkpoint, "ck.pt").config == TINY
    meminfo.write_text("MemTotal: 2000000 kB\nMemAvailable: 5000 kB\n")
    message = (
        r"of 1\.6M parameters needs at least 0\.01 GB to load \(fp32 weights\), more than the 0\.01 GB free; ck\.pt"
    )
    with pytest.raises(UsageError, match=message):
        model_from_checkpoint(GPT, checkpoint, "ck.pt")


def test_a_write_that_fails_in_any_way_leaves_no_temporary(tmp_path: Path) -> None:
    """The sweep: a failure other than an OSError (matplotlib's ValueError while drawing loss.png) left the
    temporary file behind; so would a stop signal."""

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise ValueError("cannot draw")

    with pytest.raises(ValueError, match="cannot draw"):
        replace_atomically(tmp_path / "p.png", 0, write)
    assert not list(tmp_path.iterdir())
