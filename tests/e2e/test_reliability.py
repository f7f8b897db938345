"""Real faults on real tiny training runs through the CLI: kill -9, SIGINT/SIGTERM, NaN weights, a file size limit,
and a second run on a locked out dir. After every fault each file under a final name must load, and the run must
continue from where it stopped.
"""

from __future__ import annotations

import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SAMPLE_TEXT, TINY_TRAIN_FLAGS, child_env, digest, run_cli, temporaries

from gpt2scratch.checkpoint.format import FORMAT_VERSION, read_checkpoint
from gpt2scratch.training.rundir import FINAL_NAME, list_snapshots, snapshot_path

KILL_POINTS = 6
STEP_LINE = re.compile(r"^step\s+(\d+) \|", re.MULTILINE)


class Run:
    """``gpt2-scratch train ARGS`` in its own process, as a user starts it; its output is collected line by line."""

    def __init__(self, *args: str, cwd: Path, preexec_fn: Callable[[], Any] | None = None):
        env = child_env({"OMP_NUM_THREADS": "2"})
        command = [sys.executable, "-m", "gpt2scratch", "train", *args]
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, text=True, preexec_fn=preexec_fn,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def steps(self) -> list[int]:
        return [int(step) for step in STEP_LINE.findall(self.stdout)]

    def wait_until(self, condition: Callable[[], object], what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{what}: never happened (exit {self.proc.returncode})\n{self.stdout}\n{self.stderr}")
            time.sleep(0.02)

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 120) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.stop()
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=10)


def train_flags(out: Path, text: Path, *extra: str) -> list[str]:
    return [*TINY_TRAIN_FLAGS, "--input", str(text), "--out-dir", str(out), "--snapshot-interval", "2",
            "--keep-snapshots", "2", *extra]  # fmt: skip


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_files_load(out: Path) -> int:
    """Every file under a final name (snapshots, final model) loads with weights_only=True, is ours and is finite;
    anything else in snapshots/ is a hidden temporary. Returns the newest snapshot's step (0 if none)."""
    folder = out / "snapshots"
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    assert all(re.fullmatch(r"snapshot_step_\d+\.pt|\..+\.tmp-\d+", name) for name in names), names
    paths = [folder / name for name in names if not name.startswith(".")]
    paths += [out / FINAL_NAME] if (out / FINAL_NAME).exists() else []
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["format_version"] == FORMAT_VERSION and read_checkpoint(path)["step"] == state["step"]
        assert all(bool(torch.isfinite(t).all()) for t in state["model_state_dict"].values()), path
    return max((step for step, _ in list_snapshots(out)), default=0)


def assert_resumed_from(stdout: str, step: int) -> None:
    assert re.search(rf"^resuming from \S+ \(step {step}\)$", stdout, re.MULTILINE), stdout
    assert STEP_LINE.findall(stdout)[:1] == [str(step + 1)], stdout


@pytest.fixture(scope="module")
def trained(trained_snapshot: Path) -> Path:
    """The out dir of a 2-step tiny run: snapshots/snapshot_step_2.pt and the token cache."""
    return trained_snapshot.parent.parent


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_auto(tmp_path: Path, text_file: Path) -> None:
    rng = random.Random(20241124)
    out = tmp_path / "out"
    survived, mid_write, newest = 0, 0, 0
    for point in range(KILL_POINTS):
        resume = ["--resume", "auto"] if point else []
        run = Run(*train_flags(out, text_file, "--target-loss", "0", *resume), cwd=tmp_path)
        try:
            run.wait_until(run.steps, "the first step")
            if point == 0:  # --resume auto needs a snapshot to resume from
                run.wait_until(lambda: list_snapshots(out), "the first snapshot")
            time.sleep(rng.uniform(0.3, 1.5))  # some steps on: into the training and the snapshot writes
            run.send(signal.SIGKILL)
            assert run.finish() == -signal.SIGKILL
        finally:
            run.stop()
        if point:
            assert_resumed_from(run.stdout, newest)
        newest = assert_files_load(out)
        mid_write += bool(temporaries(out))
        survived += 1
    target = float(read_checkpoint(snapshot_path(out, newest))["loss"]) + 1.0
    last = run_cli("train", *train_flags(out, text_file, "--resume", "auto", "--target-loss", str(target)),
                   cwd=tmp_path)  # fmt: skip
    print(f"kill -9 points survived: {survived} of {KILL_POINTS} ({mid_write} in the middle of a snapshot write); "
          f"resumed last from step {newest}")  # fmt: skip
    assert last.returncode == 0, last.stderr
    assert_resumed_from(last.stdout, newest)
    final = read_checkpoint(out / FINAL_NAME)
    assert final["kind"] == "final" and final["loss"] <= target and final["step"] > newest
    assert_files_load(out)
    assert not temporaries(out), "stale temporaries were not cleaned up by the next run"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "run_resume"),
    [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGHUP, False)],  # HUP: the terminal was closed
    ids=["INT", "TERM", "HUP"],
)
def test_signal_stops_with_a_snapshot_and_a_resume_command(
    sig: int, run_resume: bool, tmp_path: Path, text_file: Path
) -> None:
    out = tmp_path / "out"
    run = Run(*train_flags(out, text_file, "--max-steps", "1000", "--target-loss", "0"), cwd=tmp_path)
    run.wait_until(lambda: list_snapshots(out), "the first snapshot")
    run.send(sig)
    assert run.finish(timeout=60) == 130
    assert "Traceback" not in run.stdout + run.stderr
    lines = stderr_lines(run.stderr)
    assert len(lines) == 1, run.stderr
    stopped = re.fullmatch(r"training stopped; snapshot: (\S+); resume with: (.+)", lines[0])
    assert stopped, lines[0]
    snapshot, command = Path(stopped[1]), shlex.split(stopped[2])
    step = read_checkpoint(snapshot)["step"]
    assert step == run.steps()[-1], "the snapshot is not of the step the run stopped at"
    assert_files_load(out)
    assert command[:2] == ["gpt2-scratch", "train"]
    assert command[command.index("--resume") + 1] == str(snapshot)
    if not run_resume:  # the printed command is the same for both signals: run it once, for SIGINT
        return
    args = command[2:]
    args[args.index("--max-steps") + 1] = str(step + 2)
    resumed = run_cli("train", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_resumed_from(resumed.stdout, step)
    assert read_checkpoint(snapshot_path(out, step + 2))["step"] == step + 2


def half_written(path: Path, size: int) -> bool:
    """Whether the temporary file ``path`` holds half of ``size`` bytes, or is already renamed into place."""
    try:
        return path.stat().st_size >= size // 2
    except FileNotFoundError:
        return path.with_name(path.name[1:].split(".tmp-")[0]).exists()


@pytest.mark.slow
def test_second_sigint_exits_at_once(tmp_path: Path, text_file: Path) -> None:
    out = tmp_path / "out"
    # A wider model (a ~100 MB snapshot, ~0.4 s to write) and a snapshot every step: the step the run stops at is
    # still being written when the second SIGINT comes.
    flags = train_flags(out, text_file, "--n-embd", "128", "--snapshot-interval", "1", "--max-steps", "1000",
                        "--target-loss", "0")  # fmt: skip
    run = Run(*flags, cwd=tmp_path)
    run.wait_until(lambda: list_snapshots(out), "the first snapshot")
    run.send(signal.SIGINT)
    run.wait_until(lambda: "SIGINT received" in run.stdout, "the first SIGINT handled")
    after = run.stdout.index("SIGINT received")
    run.wait_until(lambda: STEP_LINE.search(run.stdout, after), "the step the run stops at")
    stop_step = int(STEP_LINE.search(run.stdout, after)[1])
    size = list_snapshots(out)[0][1].stat().st_size
    writing = out / "snapshots" / f".snapshot_step_{stop_step}.pt.tmp-{run.proc.pid}"
    run.wait_until(lambda: half_written(writing, size), "the last snapshot half written")
    sent = time.monotonic()
    run.send(signal.SIGINT)
    code = run.finish(timeout=60)
    took = time.monotonic() - sent
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    # "interrupted" is the CLI's KeyboardInterrupt line: the stop handler was gone, and the exit raced the writer
    # thread (seen: "terminate called without an active exception", exit -6; a segfault, exit -11).
    assert code == 130 and "interrupted" not in run.stderr, f"exit {code} after the second SIGINT: {run.stderr!r}"
    assert took < 5, f"the second SIGINT took {took:.1f} s to stop the run"
    assert_files_load(out)
    assert not temporaries(out), "the exit at once left the snapshot it was writing as a temporary file"


def _poison(snapshot: Path, path: Path, keys: tuple[str, ...], index: tuple[int, ...]) -> None:
    """A copy of ``snapshot`` with inf at ``index`` of each of ``keys``."""
    state = torch.load(snapshot, map_location="cpu", weights_only=True)
    for key in keys:
        state["model_state_dict"][key][index] = float("inf")
    torch.save(state, path)


def test_resume_into_nan_loss_stops_without_writing(trained: Path, tmp_path: Path, text_file: Path) -> None:
    bad = tmp_path / "bad.pt"
    tied = ("transformer.wte.weight", "lm_head.weight")  # one matrix, stored under both names
    _poison(snapshot_path(trained, 2), bad, tied, (0, 0))
    out = tmp_path / "out"
    result = run_cli("train", *train_flags(out, text_file, "--resume", str(bad), "--max-steps", "10",
                                           "--target-loss", "0"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and re.search(r"loss became \S+ at step [34]\b", lines[0]), result.stderr
    assert not (out / FINAL_NAME).exists()
    assert_files_load(out)  # nothing, or only finite snapshots


def test_non_finite_weights_are_never_saved(trained: Path, tmp_path: Path, text_file: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    previous = snapshot_path(out, 2)
    _poison(
        previous, previous, ("transformer.wpe.weight",), (60,)
    )  # -T 16 never reads position 60: the loss stays finite
    before = digest(previous)
    result = run_cli("train", *train_flags(out, text_file, "--resume", "auto", "--max-steps", "10",
                                           "--target-loss", "0"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and "NaN/inf at step 4" in lines[0], result.stderr
    assert STEP_LINE.findall(result.stdout) == ["3", "4"], "the loss should have stayed finite"
    assert [path for _, path in list_snapshots(out)] == [previous]
    assert digest(previous) == before
    assert not (out / FINAL_NAME).exists()
    assert not temporaries(out)


def _file_size_limit_4mb() -> None:
    """In the child: writes past 4 MB fail with EFBIG (a snapshot is ~26 MB; the token cache a few KB)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_failed_snapshot_write_is_one_line_and_keeps_the_previous(trained: Path, tmp_path: Path,
                                                                   text_file: Path) -> None:  # fmt: skip
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    previous = snapshot_path(out, 2)
    before = digest(previous)
    run = Run(*train_flags(out, text_file, "--resume", "auto", "--max-steps", "8", "--target-loss", "0"),
              cwd=tmp_path, preexec_fn=_file_size_limit_4mb)  # fmt: skip
    assert run.finish() == 1
    assert "Traceback" not in run.stdout + run.stderr
    lines = stderr_lines(run.stderr)
    assert len(lines) == 1, run.stderr
    assert re.fullmatch(r"error: could not write \S+snapshot_step_4\.pt: .+; the previous files are intact", lines[0])
    assert digest(previous) == before
    assert [path for _, path in list_snapshots(out)] == [previous]
    assert_files_load(out)
    assert not temporaries(out)


def test_stop_during_a_failing_snapshot_write_names_no_missing_file(trained: Path, tmp_path: Path,
                                                                     text_file: Path) -> None:  # fmt: skip
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    run = Run(*train_flags(out, text_file, "--resume", "auto", "--max-steps", "1000", "--target-loss", "0"),
              cwd=tmp_path, preexec_fn=_file_size_limit_4mb)  # fmt: skip
    run.wait_until(lambda: 3 in run.steps(), "step 3")
    run.send(signal.SIGINT)  # lands in step 4, whose snapshot write (in the background) fails
    code = run.finish()
    assert "Traceback" not in run.stdout + run.stderr
    lines = stderr_lines(run.stderr)
    assert len(lines) == 1, run.stderr
    named = re.search(r"snapshot: (\S+); resume with", lines[0])
    assert named is None or Path(named[1]).is_file(), (
        f"exit {code}, told to resume from a file never written: {lines[0]}"
    )
    assert code in (1, 130)
    assert_files_load(out)
    assert not temporaries(out)


@pytest.mark.slow
def test_second_run_on_a_locked_out_dir_is_refused(tmp_path: Path, text_file: Path) -> None:
    out = tmp_path / "out"
    first = Run(*train_flags(out, text_file, "--max-steps", "1000", "--target-loss", "0"), cwd=tmp_path)
    try:
        first.wait_until(lambda: list_snapshots(out), "the first snapshot")
        second = run_cli("train", *train_flags(out, text_file, "--max-steps", "4"), cwd=tmp_path)
        assert first.proc.poll() is None
    finally:
        first.stop()  # kill -9
    assert first.proc.returncode == -signal.SIGKILL
    assert second.returncode == 1
    lines = stderr_lines(second.stderr)
    assert len(lines) == 1 and f"in use by a running training (pid {first.proc.pid})" in lines[0], second.stderr
    newest = assert_files_load(out)
    third = run_cli("train", *train_flags(out, text_file, "--resume", "auto", "--max-steps", str(newest + 1)),
                    cwd=tmp_path)  # fmt: skip
    assert third.returncode == 0, third.stderr
    assert_resumed_from(third.stdout, newest)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_while_tokenizing_stops_cleanly_without_temporaries(sig: int, tmp_path: Path) -> None:
    """Issue 16, item 9: a stop while the input is tokenized leaves one line, the signal's exit code and no
    temporary file; a temporary left by a killed run is removed by the next run."""
    big = tmp_path / "big.txt"
    big.write_text(SAMPLE_TEXT * 60_000, encoding="utf-8")  # ~40 MB: several seconds of tokenizing
    out = tmp_path / "out"
    (out / "token_cache").mkdir(parents=True)
    stale = out / "token_cache" / ".tokens-0123456789abcdef0123.u16.tmp-999999"  # from a run killed before
    stale.write_bytes(b"x" * 100)
    run = Run(*train_flags(out, big, "--max-steps", "1"), cwd=tmp_path)
    run.wait_until(lambda: "tokenizing" in run.stdout, "tokenizing")
    time.sleep(0.5)
    run.send(sig)
    assert run.finish(timeout=60) == 128 + sig
    lines = [line for line in stderr_lines(run.stderr) if not line.startswith("tokenizing:")]  # the progress bar
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith(f"error: stopped by {signal.Signals(sig).name} while preparing the run"), lines[0]
    assert not temporaries(out), temporaries(out)
    assert not list((out / "token_cache").glob("tokens-*")), "a partial token file was left under a final name"


@pytest.mark.slow
def test_a_second_sigint_while_tokenizing_leaves_no_temporary_and_its_own_line(tmp_path: Path) -> None:
    """The sweep: a double Ctrl-C while tokenizing could leave token_cache/.tokens-*.tmp-PID, and the error line
    was glued to the progress bar's. The second signal comes while the first one's stop is unwinding (the thread
    pool finishing its chunks), or during the exit at once; either way: exit 130, nothing left, lines apart."""
    big = tmp_path / "big.txt"
    big.write_text(SAMPLE_TEXT * 60_000, encoding="utf-8")  # ~40 MB: the progress bar shows
    out = tmp_path / "out"
    run = Run(*train_flags(out, big, "--max-steps", "1"), cwd=tmp_path)
    run.wait_until(lambda: "tokenizing:" in run.stderr, "the progress bar")
    time.sleep(0.3)
    run.send(signal.SIGINT)
    time.sleep(0.05)
    run.send(signal.SIGINT)
    assert run.finish(timeout=60) == 130
    errors = [line for line in re.split(r"[\r\n]", run.stderr) if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr
    assert not temporaries(out), temporaries(out)
    assert not list((out / "token_cache").glob("tokens-*")), "a partial token file was left under a final name"
