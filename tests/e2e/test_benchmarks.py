"""benchmarks/gpu.py --quick: the GPU benchmark's every row, on a tiny model on the CPU, so that the script a GPU
session runs by hand still runs (its figures here mean nothing)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ONE_THREAD, REPO, child_env


@pytest.mark.slow
def test_the_gpu_benchmark_runs_quick_on_the_cpu() -> None:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--quick"], capture_output=True,
                            text=True, timeout=600, env=child_env(ONE_THREAD), cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for row in ("gpt2-scratch, defaults", "gpt2-scratch, --compile off", "gpt2-scratch, --pad-vocab off",
                "build-nanogpt-style model, compiled", "transformers GPT2LMHeadModel, compiled"):  # fmt: skip
        assert f"| {row} |" in out, out
    assert "snapshots every 10 steps (defaults):" in out and "of training time" in out
    assert out.count("new tokens |") == 4  # bf16 and fp32, batch 1 and 5
