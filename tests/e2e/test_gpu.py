"""On a CUDA GPU (``pytest -m gpu``; skipped elsewhere): the choices training/fast.py makes there and what they
must not change. Flash attention in training, TF32, the padded head, compiled steps, staged and deferred snapshots
that resume exactly, and the static KV cache with its CUDA graph decoding what the slot engine decodes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, metrics, tiny_config

from gpt2scratch.config import GPTConfig, TrainConfig
from gpt2scratch.device import attention_kernels
from gpt2scratch.inference.engine import generate
from gpt2scratch.inference.static_cache import StaticDecoder
from gpt2scratch.model import GPT
from gpt2scratch.training import fast
from gpt2scratch.training.flops import peak_flops
from gpt2scratch.training.loop import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
SMALL = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=256)


def cuda_config(tmp_path: Path, out: str, *flags: str) -> TrainConfig:
    """The tiny flags on CUDA (later flags win), reading ``tmp_path/input.txt``."""
    (tmp_path / "input.txt").write_text(SAMPLE_TEXT * 20, encoding="utf-8")
    return tiny_config("--input", str(tmp_path / "input.txt"), "--out-dir", str(tmp_path / out), "--target-loss", "0",
                       "--device", "cuda", *flags)  # fmt: skip


def test_training_attention_runs_flash_in_bf16() -> None:
    model = GPT(SMALL).to(CUDA)
    x = torch.randint(0, 50257, (4, 256), device=CUDA)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        with torch.autocast("cuda", dtype=torch.bfloat16), attention_kernels(CUDA):
            _, loss = model(x, x, return_logits=False)
        loss.backward()
        torch.cuda.synchronize()
    kernels = [event.name.lower() for event in profile.events()]
    assert any("flash" in name for name in kernels), sorted(set(kernels))[:40]
    assert not any("cudnn" in name and "attention" in name for name in kernels)


def test_a_cuda_run_uses_tf32_a_padded_head_and_logs_mfu_on_a_known_gpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpt2scratch")
    train(cuda_config(tmp_path, "out", "--max-steps", "3", "--dtype", "bfloat16"))
    assert torch.get_float32_matmul_precision() == "high"
    assert "padded vocabulary: on (auto: on on cuda)" in caplog.text
    assert "deferred snapshots: on (auto: on on cuda)" in caplog.text
    snapshot = torch.load(tmp_path / "out" / "snapshots" / "snapshot_step_3.pt", weights_only=True)
    assert snapshot["model_state_dict"]["transformer.wte.weight"].shape[0] == 50257  # never the padded rows
    if peak_flops(CUDA, torch.bfloat16) is not None:
        assert all(0 < r["mfu"] < 1 for r in metrics(tmp_path / "out"))


def test_padded_and_compiled_steps_compute_what_plain_eager_ones_do(tmp_path: Path) -> None:
    flags = ["--max-steps", "4", "--dtype", "float32", "--snapshot-interval", "0"]
    train(cuda_config(tmp_path, "plain", *flags, "--pad-vocab", "off", "--compile", "off"))
    train(cuda_config(tmp_path, "fast", *flags, "--pad-vocab", "on", "--compile", "on"))
    plain, quick = metrics(tmp_path / "plain"), metrics(tmp_path / "fast")
    assert [r["loss"] for r in quick] == pytest.approx([r["loss"] for r in plain], abs=2e-3)  # TF32 on both


def test_staged_snapshots_resume_exactly_on_cuda(tmp_path: Path) -> None:
    flags = ["--max-steps", "6", "--snapshot-interval", "3", "--keep-snapshots", "0", "--dropout", "0.1"]
    train(cuda_config(tmp_path, "straight", *flags))
    [first] = [p for p in (tmp_path / "straight" / "snapshots").iterdir() if p.name == "snapshot_step_3.pt"]
    train(cuda_config(tmp_path, "resumed", *flags, "--resume", str(first)))
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[3:]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 5])
def test_the_cuda_graph_decodes_what_the_slot_engine_decodes(dtype: torch.dtype, batch: int) -> None:
    torch.manual_seed(0)
    model = GPT(SMALL).to(CUDA, dtype).eval()
    idx = torch.randint(0, 50257, (batch, 7), device=CUDA)
    static = generate(model, idx, 300, temperature=0, static=True)  # past the block: slides and captures again
    slots = generate(model, idx, 300, temperature=0, static=False)
    agree = (static == slots).float().mean().item()
    assert agree > (0.999 if dtype == torch.float32 else 0.9)  # bf16: near-ties may go either way, then diverge
    decoder = StaticDecoder(model, batch, 64, graphs=True)
    decoder.prefill(idx)
    decoder.step(idx[:, -1])
    assert decoder._graph is not None  # captured, not fallen back


def test_compile_auto_chooses_on_for_a_long_cuda_run() -> None:
    assert fast.compile_choice(TrainConfig(), CUDA).on and not fast.compile_choice(TrainConfig(max_steps=10), CUDA).on
