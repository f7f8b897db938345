"""Shared fixtures: tiny corpora, a tiny model config, and running the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpt2scratch.config import GPTConfig

REPO = Path(__file__).resolve().parent.parent

# A model small enough to train to a low loss in seconds on a 2-core CPU (the vocabulary stays GPT-2's).
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)

# Flags that make `train` use a tiny model on a tiny corpus, fast and deterministic.
TINY_TRAIN_FLAGS = ["--preset", "tiny", "--n-embd", "32", "--block-size", "64", "-B", "4", "-T", "16", "--lr", "3e-3",
                    "--dtype", "float32", "--device", "cpu", "--no-sample"]  # fmt: skip

SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
    "All:\nWe know't, we know't.\n\nFirst Citizen:\nLet us kill him, and we'll have corn at our own price.\n"
)


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
