"""training/checkpoints.py: snapshots that keep up. With --defer-snapshots on, a snapshot that falls due while the
previous one is still being written is taken once that write ends, not waited for; the run says so once and then
the interval it achieved; a deferred snapshot resumes exactly; and kill -9 in the middle of a deferred write leaves
the earlier snapshots whole.

The writer is held here, not slowed: a patched write waits until the run reaches a given step, and from then on
every write is waited for before the next step, so the steps at which snapshots are taken do not depend on timing.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import ONE_THREAD, SAMPLE_TEXT, child_env, metrics, tiny_config

from gpt2scratch.checkpoint.format import CheckpointWriter, read_checkpoint
from gpt2scratch.training.loop import train
from gpt2scratch.training.metrics import MetricsLog

FLAGS = ["--target-loss", "0", "--snapshot-interval", "3", "--keep-snapshots", "0", "--dropout", "0.1"]


def hold_first_write_until(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The first snapshot's write stays in flight until the run has logged ``step``; from then on each write is
    waited for before the next step. (A step learns whether a write is in flight before it logs, so the snapshot
    deferred past ``step`` is taken at ``step + 1``.)"""
    release, writers = threading.Event(), []
    original_write, original_log = CheckpointWriter._write, MetricsLog.write

    def held_write(self: CheckpointWriter, path: Path, nbytes: int) -> None:
        writers.append(self)
        if not release.is_set():
            assert release.wait(120), "the run never reached the step that releases the write"
        original_write(self, path, nbytes)

    def logged(self: MetricsLog, record: dict) -> None:
        original_log(self, record)
        if record["step"] >= step:
            release.set()
            for writer in writers:
                if writer._thread is not None:
                    writer._thread.join(120)

    monkeypatch.setattr(CheckpointWriter, "_write", held_write)
    monkeypatch.setattr(MetricsLog, "write", logged)


def snapshot_steps(out: Path) -> list[int]:
    names = [p.name for p in (out / "snapshots").iterdir()]
    assert all(re.fullmatch(r"snapshot_step_\d+\.pt", name) for name in names), names  # no temporaries
    return sorted(int(name.split("_")[2].split(".")[0]) for name in names)


def make_config(tmp_path: Path, out: str, *flags: str):  # type: ignore[no-untyped-def]
    (tmp_path / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    return tiny_config("--input", str(tmp_path / "input.txt"), "--out-dir", str(tmp_path / out), *FLAGS, *flags)


def test_a_snapshot_due_during_a_write_is_deferred_not_waited_for(
    tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hold_first_write_until(monkeypatch, 7)  # the write of step 3 is in flight at steps 6 and 7
    train(make_config(tmp_path, "out", "--max-steps", "12", "--defer-snapshots", "on"))
    assert snapshot_steps(tmp_path / "out") == [3, 8, 9, 12]  # step 6's taken at 8; 12: the last step, as always
    assert [r["step"] for r in metrics(tmp_path / "out")] == list(range(1, 13))  # no step waited or was lost
    deferred = [m for m in caplog.messages if m.startswith("snapshot of step")]
    assert len(deferred) == 1  # said once
    assert deferred[0].startswith("snapshot of step 6 deferred: the previous one is still being written")
    assert "snapshots came every 3.0 steps on average, not every 3: 1 were deferred" in caplog.text
    assert "deferred snapshots: on (--defer-snapshots on)" in caplog.text
    assert read_checkpoint(tmp_path / "out" / "snapshots" / "snapshot_step_8.pt")["step"] == 8


def test_a_deferred_snapshot_resumes_exactly(tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch) -> None:
    hold_first_write_until(monkeypatch, 7)
    train(make_config(tmp_path, "out", "--max-steps", "12", "--defer-snapshots", "on"))
    monkeypatch.undo()
    deferred = tmp_path / "out" / "snapshots" / "snapshot_step_8.pt"
    train(make_config(tmp_path, "resumed", "--max-steps", "12", "--resume", str(deferred)))
    straight, resumed = metrics(tmp_path / "out"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [9, 10, 11, 12]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[8:]]  # dropout's RNG included


def test_off_snapshots_stay_at_multiples_of_the_interval(tmp_path: Path, in_process: None) -> None:
    train(make_config(tmp_path, "out", "--max-steps", "10", "--defer-snapshots", "off"))
    assert snapshot_steps(tmp_path / "out") == [3, 6, 9, 10]


CHILD = textwrap.dedent(
    """
    import os, sys, threading
    import gpt2scratch.checkpoint.format as fmt
    import gpt2scratch.training.metrics as metrics
    from gpt2scratch.cli import main

    release, writers = threading.Event(), []
    write, log = fmt.CheckpointWriter._write, metrics.MetricsLog.write

    def held_write(self, path, nbytes):
        writers.append(self)
        if len(writers) == 1:  # step 3's: in flight until step 7
            release.wait(300)
            return write(self, path, nbytes)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # the deferred one: part of it, then killed
        with open(tmp, "wb") as file:
            file.write(b"x" * 4096)
        print("WRITING", path.name, flush=True)
        threading.Event().wait(600)

    def logged(self, record):
        log(self, record)
        if record["step"] == 7:
            release.set()
            writers[0]._thread.join(300)

    fmt.CheckpointWriter._write = held_write
    metrics.MetricsLog.write = logged
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_kill_9_during_a_deferred_write_leaves_the_earlier_snapshots_whole(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    from conftest import TINY_TRAIN_FLAGS

    argv = ["train", *TINY_TRAIN_FLAGS, "--input", "input.txt", "--out-dir", "out", *FLAGS, "--max-steps", "12",
            "--defer-snapshots", "on"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], cwd=tmp_path, env=child_env(ONE_THREAD),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    try:
        while not any(line.startswith("WRITING") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
    assert "WRITING snapshot_step_8.pt\n" in lines
    folder = tmp_path / "out" / "snapshots"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["snapshot_step_3.pt"]
    assert read_checkpoint(folder / "snapshot_step_3.pt")["step"] == 3  # whole
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")]  # the killed write's temporary
    resumed = subprocess.run([sys.executable, "-m", "gpt2scratch", *argv, "--resume", "auto"], cwd=tmp_path,
                             env=child_env(ONE_THREAD), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "(step 3)" in resumed.stdout
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # the temporary is gone
