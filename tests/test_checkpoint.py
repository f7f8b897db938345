"""Checkpoint files under real faults: atomic writes, unloadable and malicious files, retention, discovery, the lock.

Every fault is real: files cut in half, random bytes, pickles that would run a command, a file size limit set on
this process, a lock holder killed with SIGKILL. Nothing of the package is mocked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, TINY, TINY_TRAIN_FLAGS

from gpt2scratch import checkpoint
from gpt2scratch.checkpoint import FORMAT_VERSION, OutDirLock, SnapshotWriter
from gpt2scratch.cli import build_parser
from gpt2scratch.config import TrainConfig
from gpt2scratch.convert import config_to_hf, load_hf_dir
from gpt2scratch.errors import CheckpointError, OutDirError
from gpt2scratch.train import train


def train_tiny(out_dir: Path, *flags: str) -> Path:
    """Train the tiny model for 2 steps in this process, from the CLI's own flags and parser; return the snapshot.

    A real checkpoint to cut, corrupt or resume from, without the start-up of a subprocess.
    """
    text = out_dir.parent / "input.txt"
    if not text.is_file():
        text.write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    argv = ["train", *TINY_TRAIN_FLAGS, "--input", str(text), "--out-dir", str(out_dir), "--target-loss", "0",
            "--max-steps", "2", "--snapshot-interval", "2", *flags]  # fmt: skip
    args = build_parser().parse_args(argv)
    return train(TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})).model_path


_TRAINED: list[Path] = []


def trained_snapshot(factory: pytest.TempPathFactory) -> Path:
    """The snapshot of one 2-step tiny run per test session, shared by the test modules: copy it, never change it."""
    if not _TRAINED:
        _TRAINED.append(train_tiny(factory.mktemp("trained") / "out"))
    return _TRAINED[0]


def save(state: dict, path: Path) -> None:
    """An atomic save in the foreground, as training writes its final model."""
    writer = SnapshotWriter(path.parent, keep=0)
    try:
        writer.submit(state, path, background=False, checksums=True)
    finally:
        writer.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temporaries(folder: Path) -> list[Path]:
    """Our temporary files (``.NAME.tmp-PID``) anywhere under ``folder``."""
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """RLIMIT_FSIZE on this process with SIGXFSZ ignored: a write past ``nbytes`` fails with EFBIG, as on a quota.

    Only the soft limit moves, so it can be lifted again afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def our_state(numel: int, fill: float = 1.0) -> dict:
    return {"format_version": FORMAT_VERSION, "model_state_dict": {"w": torch.full((numel,), fill)}, "config": {}}


class RunsCommand:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_snapshot(tmp_path_factory)


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
    assert torch.equal(checkpoint.load(path)["model_state_dict"]["w"], new["model_state_dict"]["w"])


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
    assert checkpoint.load(path)["model_state_dict"]["w"].numel() == 1000
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
        checkpoint.load(path)
    assert "\n" not in str(failure.value)
    assert str(path) in str(failure.value)


def _load_outcomes(tmp_path: Path, blobs: dict[str, bytes]) -> dict[str, BaseException]:
    """What ``checkpoint.load`` raises for each blob."""
    outcomes = {}
    for name, data in blobs.items():
        path = tmp_path / name
        path.write_bytes(data)
        try:
            checkpoint.load(path)
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
        checkpoint.load(path)
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
        load_hf_dir(model_dir)
    assert "\n" not in str(failure.value)
    assert not pwned.exists(), "loading the transformers directory ran its command"


def test_tied_embedding_is_stored_once(snapshot: Path) -> None:
    """wte and lm_head are one matrix: saved twice, every checkpoint is larger and could disagree with itself."""
    weights = torch.load(snapshot, weights_only=True)["model_state_dict"]
    wte, head = weights["transformer.wte.weight"], weights["lm_head.weight"]
    shared = wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    assert shared, f"the tied embedding is saved twice: {2 * wte.numel():,} values for {wte.numel():,}"


# ---- retention and discovery ----


@pytest.mark.parametrize(("keep", "kept"), [(2, [10, 20]), (1, [20]), (0, [1, 2, 3, 10, 20]), (9, [1, 2, 3, 10, 20])])
def test_prune_keeps_the_newest(keep: int, kept: list[int], tmp_path: Path) -> None:
    for step in (1, 2, 3, 10, 20):  # 10 and 20 sort before 2 and 3 as text: the order must be numeric
        path = checkpoint.snapshot_path(tmp_path, step)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    others = [tmp_path / "snapshots" / ".snapshot_step_30.pt.tmp-1", tmp_path / "snapshots" / "notes.txt"]
    for path in others:
        path.write_bytes(b"x")
    checkpoint.prune(tmp_path, keep)
    assert [step for step, _ in checkpoint.list_snapshots(tmp_path)] == kept
    assert all(path.exists() for path in others)


def test_find_latest_skips_a_corrupt_newest_snapshot(snapshot: Path, tmp_path: Path) -> None:
    good = checkpoint.snapshot_path(tmp_path, 2)
    good.parent.mkdir()
    good.write_bytes(snapshot.read_bytes())
    _truncated(snapshot, checkpoint.snapshot_path(tmp_path, 4))
    assert checkpoint.find_latest(tmp_path) == good
    good.unlink()
    with pytest.raises(CheckpointError, match="no snapshot"):
        checkpoint.find_latest(tmp_path)


# ---- the background writer ----


def test_snapshot_writer_writes_a_copy_in_the_background(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path, keep=1)
    state = our_state(8_000_000, fill=1.0)
    first = checkpoint.snapshot_path(tmp_path, 1)
    writer.submit(state, first)
    assert any(t.name == "snapshot-writer" for t in threading.enumerate()), "submit waited for the disk"
    state["model_state_dict"]["w"].fill_(7.0)  # training goes on and changes the weights
    writer.wait()
    assert bool((checkpoint.load(first)["model_state_dict"]["w"] == 1.0).all()), "the file holds later weights"
    second = checkpoint.snapshot_path(tmp_path, 2)
    writer.submit(state, second)
    writer.wait()
    assert [path for _, path in checkpoint.list_snapshots(tmp_path)] == [second]  # keep=1 pruned the first
    assert bool((checkpoint.load(second)["model_state_dict"]["w"] == 7.0).all())


def test_snapshot_writer_reports_a_failed_write(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path, keep=0)
    big = our_state(2_000_000)  # 8 MB
    with file_size_limit(1 << 20):
        writer.submit(big, checkpoint.snapshot_path(tmp_path, 1))  # returns: the write fails in the background
        with pytest.raises(OutDirError, match=r"could not write .*snapshot_step_1\.pt"):
            writer.wait()
        writer.submit(big, checkpoint.snapshot_path(tmp_path, 2))
        with pytest.raises(OutDirError, match=r"snapshot_step_2\.pt"):  # or raised by the next submit
            writer.submit(our_state(10), checkpoint.snapshot_path(tmp_path, 3))
    writer.wait()
    assert checkpoint.list_snapshots(tmp_path) == []
    assert not temporaries(tmp_path)
    writer.submit(our_state(10), checkpoint.snapshot_path(tmp_path, 4))  # the writer still works afterwards
    writer.wait()
    assert checkpoint.load(checkpoint.snapshot_path(tmp_path, 4))["format_version"] == FORMAT_VERSION


# ---- the out-dir lock ----


def test_second_lock_on_a_dir_fails_while_the_first_is_held(tmp_path: Path) -> None:
    first = OutDirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(OutDirError, match=rf"in use by a running training \(pid {os.getpid()}\)"):
            OutDirLock(tmp_path).acquire()
    finally:
        first.release()
    again = OutDirLock(tmp_path)
    again.acquire()
    again.release()


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from gpt2scratch.checkpoint import OutDirLock
OutDirLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(300)
"""


def test_lock_of_a_killed_process_does_not_block(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutDirError, match=rf"pid {holder.pid}\)"):
            OutDirLock(tmp_path).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(timeout=60) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    lock = OutDirLock(tmp_path)
    lock.acquire()  # the lock file is still there, with the dead pid in it, but the lock died with its holder
    lock.release()


@pytest.mark.parametrize("capacity", [1, 1 << 26])  # a buffer far too small grows; a large one is reused
def test_serialized_snapshot_loads_like_torch_save(tmp_path: Path, capacity: int) -> None:
    state = our_state(1_000_003, fill=1.5)  # not a multiple of the 4096-byte block: the padding must go
    buffer = checkpoint.SerializedState()
    for round_ in range(2):
        buffer.fill(state, capacity)
        path = tmp_path / f"snapshot_{round_}.pt"
        buffer.write_file(path)
        assert path.stat().st_size == buffer.size
        loaded = checkpoint.load(path)
        assert torch.equal(loaded["model_state_dict"]["w"], state["model_state_dict"]["w"])
        assert loaded["format_version"] == FORMAT_VERSION
        state["model_state_dict"]["w"].add_(1.0)
    buffer.release()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm")
def test_snapshot_writer_falls_back_where_o_direct_is_refused() -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:  # tmpfs: no O_DIRECT
        writer = SnapshotWriter(Path(folder), keep=1)
        writer.submit(our_state(300_000, fill=2.0), checkpoint.snapshot_path(Path(folder), 1))
        writer.close()
        loaded = checkpoint.load(checkpoint.snapshot_path(Path(folder), 1))
        assert bool((loaded["model_state_dict"]["w"] == 2.0).all())
