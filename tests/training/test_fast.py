"""training/fast.py and the padded head: what --compile auto and --pad-vocab auto choose and why, the fallback to
eager when compiling fails, and that a padded head computes exactly what the unpadded one does, so that runs and
their snapshots move freely between the two."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, metrics, tiny_config

from gpt2scratch.config import GPTConfig, TrainConfig
from gpt2scratch.model import GPT
from gpt2scratch.training import fast
from gpt2scratch.training.loop import train

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU; nothing runs on it here


def run_config(tmp_path: Path, out: str, *flags: str) -> TrainConfig:
    (tmp_path / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    return tiny_config("--input", str(tmp_path / "input.txt"), "--out-dir", str(tmp_path / out), "--target-loss",
                       "0", *flags)  # fmt: skip


# ---- what auto chooses ----


@pytest.mark.parametrize(
    ("flags", "device", "on", "why"),
    [
        ({}, CPU, False, "auto: eager on cpu"),
        ({"compile": "on"}, CPU, True, "--compile on"),
        ({}, CUDA, True, "auto: a CUDA run long enough"),
        ({"max_steps": 50}, CUDA, False, "auto: 50 steps do not repay the warm-up"),
        ({"max_steps": 200}, CUDA, True, "auto: a CUDA run long enough"),
        ({"compile": "off"}, CUDA, False, "--compile off"),
    ],
)
def test_compile_auto_is_on_for_long_cuda_runs_only(flags: dict, device: torch.device, on: bool, why: str) -> None:
    choice = fast.compile_choice(TrainConfig(**flags), device)
    assert choice.on is on and choice.why.startswith(why)


def test_compile_auto_leaves_fsdp_eager_where_a_failed_compile_could_not_fall_back() -> None:
    assert not fast.compile_choice(TrainConfig(), CUDA, sharded=True).on
    assert fast.compile_choice(TrainConfig(compile="on"), CUDA, sharded=True).on


def test_pad_vocab_auto_is_on_for_cuda_only() -> None:
    assert fast.pad_choice(TrainConfig(), CUDA).on and not fast.pad_choice(TrainConfig(), CPU).on
    assert fast.pad_choice(TrainConfig(pad_vocab="on"), CPU).on
    assert not fast.pad_choice(TrainConfig(pad_vocab="off"), CUDA).on
    assert fast.padded(50257) == 50304 and fast.padded(50304) == 50304 and fast.padded(1) == 64


def test_the_compile_flag_alone_is_on_and_old_settings_still_read(tmp_path: Path) -> None:
    assert tiny_config("--compile").compile == "on"
    assert tiny_config("--compile", "off").compile == "off"
    assert tiny_config().compile == "auto" and TrainConfig(compile=True).compile == "on"  # type: ignore[arg-type]
    assert TrainConfig(compile=False).compile == "off"  # type: ignore[arg-type]
    from gpt2scratch.config.runfile import check_settings

    assert check_settings({"compile": True, "pad_vocab": False}, TrainConfig, "f") == {"compile": "on",
                                                                                        "pad_vocab": "off"}  # fmt: skip


# ---- compiling, and falling back when it fails ----


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    def broken_compiler(module: torch.nn.Module):  # what torch.compile hands back where no C compiler exists
        def compiled(*args, **kwargs):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nlong detail ...")

        return compiled

    forward = fast.CompiledOrEager(Doubler(), compile=broken_compiler)
    with caplog.at_level(logging.WARNING, logger="gpt2scratch"):
        assert torch.equal(forward(torch.ones(3)), torch.full((3,), 2.0))
        assert torch.equal(forward(torch.ones(2)), torch.full((2,), 2.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["torch.compile failed (RuntimeError: InductorError: CppCompileError: C++ compile error); "
                        "training without it"]  # fmt: skip


def test_a_failure_after_the_first_call_is_the_step_s_own() -> None:
    calls = []

    def compiler(module: torch.nn.Module):
        def compiled(x: torch.Tensor) -> torch.Tensor:
            calls.append(x)
            if len(calls) > 1:
                raise RuntimeError("out of memory")
            return module(x)

        return compiled

    forward = fast.CompiledOrEager(Doubler(), compile=compiler)
    forward(torch.ones(1))
    with pytest.raises(RuntimeError, match="out of memory"):
        forward(torch.ones(1))


def test_training_falls_back_to_eager_when_compiling_fails(
    tmp_path: Path, in_process: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    train(run_config(tmp_path, "eager", "--max-steps", "3", "--snapshot-interval", "0"))

    def no_compiler(module: torch.nn.Module):
        return lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("no working C compiler"))

    monkeypatch.setattr(torch, "compile", no_compiler)
    train(run_config(tmp_path, "fallback", "--max-steps", "3", "--snapshot-interval", "0", "--compile", "on"))
    assert "torch.compile: on (--compile on)" in caplog.text
    assert "torch.compile failed (RuntimeError: no working C compiler); training without it" in caplog.text
    assert [r["loss"] for r in metrics(tmp_path / "fallback")] == [r["loss"] for r in metrics(tmp_path / "eager")]


@pytest.mark.slow
def test_compiled_training_equals_eager_to_rounding(tmp_path: Path, in_process: None) -> None:
    for name, switch in (("eager", "off"), ("compiled", "on")):
        train(run_config(tmp_path, name, "--max-steps", "4", "--snapshot-interval", "0", "--compile", switch))
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], abs=1e-4)


# ---- the padded head ----


def pair(seed: int = 0) -> tuple[GPT, GPT]:
    torch.manual_seed(seed)
    plain = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))  # GPT-2's vocabulary: 50,257
    padded = copy.deepcopy(plain)
    padded.pad_head(fast.padded(plain.config.vocab_size))
    return plain, padded


def test_a_padded_head_gives_the_same_logits_loss_and_gradients() -> None:
    plain, padded = pair()
    idx = torch.randint(0, 50257, (3, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 50257, (3, 16), generator=torch.Generator().manual_seed(2))
    for model in (plain, padded):
        _, loss = model(idx, targets, return_logits=False)
        loss.backward()
    logits_plain, loss_plain = plain(idx, targets)
    logits_padded, loss_padded = padded(idx, targets)
    assert logits_padded.shape == logits_plain.shape == (3, 16, 50257)
    torch.testing.assert_close(logits_padded, logits_plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss_padded, loss_plain, rtol=0, atol=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), padded.named_parameters(), strict=True):
        assert a.shape == b.shape, name  # the weights themselves are not padded
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert plain.state_dict().keys() == padded.state_dict().keys()
    assert padded.state_dict()["transformer.wte.weight"].shape == (50257, 32)


def test_a_padded_head_is_never_sampled_from() -> None:
    plain, padded = pair()
    idx = torch.tensor([[464, 3290]])
    out_plain = plain.generate(idx, 12, top_k=None, generator=torch.Generator().manual_seed(0))
    out_padded = padded.generate(idx, 12, top_k=None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out_plain, out_padded) and int(out_padded.max()) < 50257


def test_padded_and_unpadded_runs_resume_each_other(tmp_path: Path, in_process: None) -> None:
    flags = ["--max-steps", "6", "--snapshot-interval", "3", "--keep-snapshots", "0", "--dropout", "0.1"]
    train(run_config(tmp_path, "padded", *flags, "--pad-vocab", "on"))
    train(run_config(tmp_path, "plain", *flags, "--pad-vocab", "off"))
    padded, plain = metrics(tmp_path / "padded"), metrics(tmp_path / "plain")
    assert [r["loss"] for r in padded] == pytest.approx([r["loss"] for r in plain], abs=1e-5)
    snapshot = torch.load(tmp_path / "padded" / "snapshots" / "snapshot_step_3.pt", weights_only=True)
    assert snapshot["model_state_dict"]["transformer.wte.weight"].shape == (50257, 32)
    for source, switch, name in (("padded", "off", "a"), ("plain", "on", "b")):
        resume = str(tmp_path / source / "snapshots" / "snapshot_step_3.pt")
        train(dataclasses.replace(run_config(tmp_path, name, *flags, "--pad-vocab", switch), resume=resume))
        resumed = [r["loss"] for r in metrics(tmp_path / name)]
        assert resumed == pytest.approx([r["loss"] for r in metrics(tmp_path / source)[3:]], abs=1e-5)
