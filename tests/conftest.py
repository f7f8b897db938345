"""The one home of shared test helpers and fixtures: tiny corpora and configs, running the real CLI, a session-wide
trained snapshot, reading metrics, one-line error checks, a file size limit, and a malicious pickle."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpt2scratch.config import GPTConfig, TrainConfig

REPO = Path(__file__).resolve().parent.parent

# A model small enough to train to a low loss in seconds on a 2-core CPU (the vocabulary stays GPT-2's).
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)

# Flags that make `train` use a tiny model on a tiny corpus, fast and deterministic.
TINY_TRAIN_FLAGS = ["--preset", "tiny", "--n-embd", "32", "--block-size", "64", "-B", "4", "-T", "16", "--lr", "3e-3",
                    "--dtype", "float32", "--device", "cpu", "--no-sample", "--no-plot"]  # fmt: skip

SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
    "All:\nWe know't, we know't.\n\nFirst Citizen:\nLet us kill him, and we'll have corn at our own price.\n"
)


# One thread per CLI run: the test machine has two cores shared with other work, and a second OpenMP thread that waits
# for a busy core makes a tiny model's step several times slower. Runs compared with each other use the same count.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run many small ops, several times faster on one thread than on two of a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small UTF-8 text file (about 500 tokens)."""
    path = tmp_path / "input.txt"
    path.write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
            script: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``gpt2-scratch ARGS`` (or ``python SCRIPT ARGS``) as a user would; capture its output."""
    command = [sys.executable, script, *args] if script else [sys.executable, "-m", "gpt2scratch", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def skip_without(module: str) -> pytest.MarkDecorator:
    """Skip a test when an optional package is not installed."""
    import importlib.util

    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs {module}")


def tiny_config(*flags: str) -> TrainConfig:
    """The TrainConfig that ``gpt2-scratch train`` builds from the tiny flags and then ``flags`` (later flags win)."""
    from gpt2scratch.cli import build_parser, from_args

    return from_args(TrainConfig, build_parser().parse_args(["train", *TINY_TRAIN_FLAGS, *flags]))


@pytest.fixture(scope="session")
def trained_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last snapshot (step 2) of one 2-step tiny run, trained in this process once per session and shared by the
    test modules: copy it, never change it. Its out dir is ``trained_snapshot.parent.parent``."""
    import torch

    from gpt2scratch.train import train

    folder = tmp_path_factory.mktemp("trained")
    (folder / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    flags = ["--input", str(folder / "input.txt"), "--out-dir", str(folder / "out"), "--target-loss", "0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config(*flags, "--max-steps", "2", "--snapshot-interval", "2")
        return train(dataclasses.replace(cfg, no_plot=False)).model_path  # its loss.png is checked in test_plot.py
    finally:
        torch.set_num_threads(threads)


def metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The records of ``OUT/metrics.jsonl``, one per step."""
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(code: int, err: str, expected_code: int, *fragments: str) -> None:
    """A user's mistake: exit code ``expected_code`` and one line ``error: ...`` holding every fragment, no
    traceback, and not an ``internal error`` (a bug of ours)."""
    assert code == expected_code, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err


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


class RunsCommand:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))
