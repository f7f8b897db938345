"""The training loop, end to end: to a target loss, snapshots and their retention, the files a run writes, exact
resume, and the options that change how a step is computed (dtype, validation, gradient accumulation).

Runs go through ``python train.py`` as a user would, except where only the loop's numbers matter: those call
``gpt2scratch.training.loop.train`` in this process, which saves the start-up time of a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    ONE_THREAD,
    REPO,
    SAMPLE_TEXT,
    TINY_TRAIN_FLAGS,
    assert_one_line_error,
    metrics,
    numpy_shard,
    run_cli,
    run_main,
    tiny_config,
    train_py,
)

import gpt2scratch
from gpt2scratch.config import GPTConfig, TrainConfig
from gpt2scratch.config.commands import PrepareConfig
from gpt2scratch.data import corpus as data
from gpt2scratch.data import shards
from gpt2scratch.data.prepare import prepare
from gpt2scratch.device import cpu_has_bf16
from gpt2scratch.distributed.world import World
from gpt2scratch.errors import CheckpointError, OutDirError, UsageError
from gpt2scratch.model import GPT
from gpt2scratch.tokenizer import encode
from gpt2scratch.training.checkpoints import Checkpoints
from gpt2scratch.training.loop import check_before_training, train

TOKENS_PER_STEP = 4 * 16  # -B 4 -T 16 of TINY_TRAIN_FLAGS

SNAPSHOT_KEYS = {"model_state_dict", "optimizer_state_dict", "step", "loss", "config", "rng", "loader", "train_args"}
SNAPSHOT_KEYS |= {"format_version"}
FINAL_KEYS = {"model_state_dict", "optimizer_state_dict", "config", "step", "loss", "metadata"}
METADATA_KEYS = {"time", "tokens_seen", "wall_seconds", "target_loss", "input", "input_sha256", "device", "dtype"}
METADATA_KEYS |= {"gpt2scratch_version", "torch_version"}


def tiny_train_py(*flags: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python train.py`` with the tiny flags, then ``flags`` (later flags win), in ``cwd``."""
    return train_py(*TINY_TRAIN_FLAGS, *flags, cwd=cwd)


def config_here(tmp_path: Path, *flags: str) -> TrainConfig:
    """The TrainConfig of ``train.py`` with the tiny flags and ``flags``, reading ``tmp_path/input.txt``."""
    return tiny_config("--input", str(tmp_path / "input.txt"), "--out-dir", str(tmp_path / "out"), *flags)


def make_input(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    return folder


def snapshot_steps(out_dir: Path) -> list[int]:
    """Steps of the snapshots in ``out_dir``, asserting that the folder holds nothing else (no temporaries)."""
    names = [p.name for p in (out_dir / "snapshots").iterdir()]
    steps = sorted(int(m.group(1)) for name in names if (m := re.fullmatch(r"snapshot_step_(\d+)\.pt", name)))
    assert len(steps) == len(names), names
    return steps


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- a run to the target loss: exit code, snapshots, files, metrics, samples ----
# The tests of a section share one module-scoped run; they are all `slow` because whichever runs first pays for it.

TARGET = 1.0


@pytest.fixture(scope="module")
def to_target(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """``python train.py`` in a directory holding only input.txt, as the original README has it: a run to loss 1.0,
    snapshots every 10 steps keeping 2, with the samples printed at the end. The out dir is that directory."""
    cwd = make_input(tmp_path_factory.mktemp("to_target"))
    flags = [f for f in TINY_TRAIN_FLAGS if f not in ("--no-sample", "--no-plot")]
    extra = ["--target-loss", str(TARGET), "--snapshot-interval", "10", "--keep-snapshots", "2"]
    result = train_py(*flags, *extra, cwd=cwd)
    return result, cwd


@pytest.mark.slow
def test_reaches_the_target_and_prints_samples(to_target: tuple[subprocess.CompletedProcess, Path]) -> None:
    result, out = to_target
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    final = load(out / "final_model.pt")
    assert final["loss"] <= TARGET
    assert f"reached loss {final['loss']:.6f} <= 1 at step {final['step']}; final model: final_model.pt" in (
        result.stdout
    )
    assert "samples from final_model.pt" in result.stdout
    for i in range(1, 6):
        assert f"--- sample {i} ---\nHello, I'm a language model," in result.stdout


@pytest.mark.slow
def test_files_sit_beside_input_txt_as_in_the_original(to_target: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, out = to_target
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["final_model.pt", "input.txt", "loss.png", "metrics.jsonl", "snapshots", "token_cache"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".gpt2scratch.lock"]


def readme_resume_recipe() -> str:
    """The Python block of the README that starts with the original's ``torch.load('snapshots/...')``."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    [recipe] = [block for block in blocks if "torch.load('snapshots/snapshot_step_N.pt')" in block]
    return recipe


@pytest.mark.slow
def test_the_original_resume_recipe_works_as_written(to_target: tuple[subprocess.CompletedProcess, Path]) -> None:
    """The original README's recipe, run as a script beside the run's files: model and optimizer state both load."""
    _, out = to_target
    step = snapshot_steps(out)[-1]
    script = readme_resume_recipe().replace("snapshot_step_N.pt", f"snapshot_step_{step}.pt")
    check = (
        f"\nassert checkpoint['step'] == {step} and len(optimizer.state) == len(list(model.parameters()))"
        "\nprint('resumed', checkpoint['step'])\n"
    )
    (out / "resume.py").write_text(script + check)
    result = run_cli(script=str(out / "resume.py"), cwd=out, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"resumed {step}"


@pytest.mark.slow
def test_snapshots_every_10_steps_keeping_the_newest_2(to_target: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, out = to_target
    last = load(out / "final_model.pt")["step"]
    assert last > 20, "the run should be long enough to prune snapshots"
    # A snapshot at every multiple of 10 before the last step (at the last step the target was reached: no snapshot).
    assert snapshot_steps(out) == list(range(10, last, 10))[-2:]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_every_file_loads_with_weights_only(to_target: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, out = to_target
    for step in snapshot_steps(out):
        snapshot = load(out / "snapshots" / f"snapshot_step_{step}.pt")
        assert set(snapshot) >= SNAPSHOT_KEYS, SNAPSHOT_KEYS - set(snapshot)
        assert snapshot["step"] == step
        assert snapshot["loader"]["position"] % TOKENS_PER_STEP == 0
        assert snapshot["train_args"]["target_loss"] == TARGET
        assert isinstance(snapshot["rng"]["cpu"], torch.Tensor)
    final = load(out / "final_model.pt")
    assert set(final) >= FINAL_KEYS, FINAL_KEYS - set(final)
    assert type(final["config"]) is dict
    assert final["config"]["n_embd"] == 32 and final["config"]["block_size"] == 64
    assert all(type(v) in (int, float, bool) for v in final["config"].values())


@pytest.mark.slow
def test_final_model_metadata(to_target: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, out = to_target
    final = load(out / "final_model.pt")
    meta = final["metadata"]
    assert type(meta) is dict and set(meta) >= METADATA_KEYS, METADATA_KEYS - set(meta)
    assert meta["tokens_seen"] == final["step"] * TOKENS_PER_STEP
    assert meta["target_loss"] == TARGET
    assert meta["input"] == "input.txt"
    assert meta["input_sha256"] == data.content_hash([out / "input.txt"])
    assert meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["gpt2scratch_version"] == gpt2scratch.__version__
    assert meta["torch_version"] == torch.__version__
    assert meta["wall_seconds"] > 0 and meta["time"][:2] == "20"


@pytest.mark.slow
def test_metrics_one_line_per_step(to_target: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, out = to_target
    final = load(out / "final_model.pt")
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, final["step"] + 1))
    for record in records:
        assert {"step", "loss", "lr", "tokens_per_sec"} <= set(record)
        assert record["lr"] == pytest.approx(3e-3) and record["tokens_per_sec"] > 0
    assert records[-1]["loss"] == pytest.approx(final["loss"], abs=1e-6) and records[-1]["loss"] <= TARGET
    assert all(r["loss"] > TARGET for r in records[:-1])  # it stops at the first step at or below the target


# ---- a run stopped by --max-steps, resumed exactly, automatically, or into the wrong shape ----

RESUMABLE = ["--target-loss", "0", "--snapshot-interval", "10", "--keep-snapshots", "0"]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 steps that never reach the target, a snapshot every 10; returns the folder holding input.txt and out/."""
    cwd = make_input(tmp_path_factory.mktemp("run_a"))
    result = tiny_train_py(*RESUMABLE, "--max-steps", "30", "--out-dir", "out", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd


@pytest.mark.slow
def test_resume_continues_exactly(run_a: Path, tmp_path: Path) -> None:
    out_a, out_b = run_a / "out", tmp_path / "out_b"
    snapshot = out_a / "snapshots" / "snapshot_step_10.pt"
    result = tiny_train_py(
        *RESUMABLE, "--max-steps", "30", "--resume", str(snapshot), "--out-dir", str(out_b), cwd=run_a
    )
    assert result.returncode == 0, result.stderr
    assert f"resuming from {snapshot} (step 10)" in result.stdout

    def steps_and_losses(out: Path) -> list[tuple[int, float, float]]:
        return [(r["step"], r["loss"], r["lr"]) for r in metrics(out) if r["step"] > 10]

    assert [r["step"] for r in metrics(out_b)] == list(range(11, 31))
    assert steps_and_losses(out_b) == steps_and_losses(out_a)
    assert snapshot_steps(out_b) == [20, 30]
    a, b = load(out_a / "snapshots" / "snapshot_step_30.pt"), load(out_b / "snapshots" / "snapshot_step_30.pt")
    assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
    for name, weight in a["model_state_dict"].items():
        assert torch.equal(weight, b["model_state_dict"][name]), name
    for index, state in a["optimizer_state_dict"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer_state_dict"]["state"][index][key]), (index, key)
    assert a["loader"] == b["loader"] and a["loss"] == b["loss"] and b["step"] == 30


@pytest.fixture(scope="module")
def resumed_auto(run_a: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """A copy of run A's out dir, continued with --resume auto to --max-steps 33 (not a snapshot interval)."""
    out = tmp_path_factory.mktemp("auto") / "out"
    shutil.copytree(run_a / "out", out)
    result = tiny_train_py(*RESUMABLE, "--max-steps", "33", "--resume", "auto", "--out-dir", str(out), cwd=run_a)
    return result, out


@pytest.mark.slow
def test_resume_auto_picks_the_newest_snapshot(resumed_auto: tuple[subprocess.CompletedProcess, Path]) -> None:
    result, out = resumed_auto
    assert result.returncode == 0, result.stderr
    assert f"resuming from {out / 'snapshots' / 'snapshot_step_30.pt'} (step 30)" in result.stdout
    assert [r["step"] for r in metrics(out)] == list(range(1, 34))  # run A's 30 lines, then 31..33 appended


@pytest.mark.slow
def test_a_second_run_on_the_same_input_does_not_tokenize(
    run_a: Path, resumed_auto: tuple[subprocess.CompletedProcess, Path]
) -> None:
    result, out = resumed_auto
    assert "tokenizing" not in result.stdout
    [original] = (run_a / "out" / "token_cache").glob("*.u16")
    [cached] = (out / "token_cache").glob("*.u16")  # copied with its modification time
    assert cached.name == original.name and cached.stat().st_mtime_ns == original.stat().st_mtime_ns


@pytest.mark.slow
def test_max_steps_without_the_target_snapshots_the_last_step(
    resumed_auto: tuple[subprocess.CompletedProcess, Path],
) -> None:
    result, out = resumed_auto
    assert result.returncode == 0, result.stderr
    last = out / "snapshots" / "snapshot_step_33.pt"
    assert snapshot_steps(out) == [10, 20, 30, 33]
    assert not (out / "final_model.pt").exists()
    assert "stopped at --max-steps 33 with loss" in result.stdout
    assert f"above the target 0; last step saved as {last}" in result.stdout
    snapshot = load(last)
    assert snapshot["step"] == 33 and snapshot["loss"] == pytest.approx(metrics(out)[-1]["loss"], abs=1e-6)


@pytest.mark.slow
def test_resume_into_another_shape_is_one_line(run_a: Path, tmp_path: Path) -> None:
    snapshot = run_a / "out" / "snapshots" / "snapshot_step_10.pt"
    flags = ["--resume", str(snapshot), "--n-embd", "64", "--out-dir", str(tmp_path / "out")]
    result = tiny_train_py(*RESUMABLE, "--max-steps", "12", *flags, cwd=run_a)
    assert_one_line_error(result.returncode, result.stderr, 1, "n_embd=32", "n_embd=64")
    assert "Traceback" not in result.stdout
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# ---- dtype, validation, gradient accumulation (in this process) ----


@pytest.mark.slow
def test_dtype_auto_reaches_the_target(tmp_path: Path, in_process: None) -> None:
    make_input(tmp_path)
    cfg = config_here(tmp_path, "--dtype", "auto", "--target-loss", str(TARGET), "--snapshot-interval", "0")
    result = train(cfg)
    expected = torch.bfloat16 if cpu_has_bf16() else torch.float32
    assert result.dtype == expected
    assert result.reached_target and result.loss <= TARGET
    final = load(tmp_path / "out" / "final_model.pt")
    assert final["metadata"]["dtype"] == str(expected).removeprefix("torch.")
    assert final["model_state_dict"]["lm_head.weight"].dtype == torch.float32  # autocast: weights stay fp32


def test_resume_auto_without_snapshots(tmp_path: Path, in_process: None) -> None:
    make_input(tmp_path)
    with pytest.raises(CheckpointError, match="--resume auto: no snapshot") as err:
        train(config_here(tmp_path, "--resume", "auto"))
    assert "\n" not in str(err.value)


def test_val_loss_at_eval_intervals(tmp_path: Path, in_process: None, caplog: pytest.LogCaptureFixture) -> None:
    make_input(tmp_path)
    flags = ["--val-fraction", "0.25", "--eval-interval", "4", "--eval-batches", "2", "--max-steps", "9"]
    train(config_here(tmp_path, *flags, "--target-loss", "0", "--snapshot-interval", "0"))
    records = metrics(tmp_path / "out")
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert all(r["val_loss"] > 0 for r in records if "val_loss" in r)
    printed = [m for m in caplog.messages if "val loss" in m]
    assert len(printed) == 2 and printed[0].startswith("step      4") and printed[1].startswith("step      8")
    assert f"val loss {records[3]['val_loss']:.6f}" in printed[0]


def test_grad_accum_equals_a_larger_batch(tmp_path: Path, in_process: None) -> None:
    make_input(tmp_path)
    losses = []
    for name, flags in (("big", ["-B", "4"]), ("accum", ["-B", "2", "--grad-accum", "2"])):
        cfg = config_here(tmp_path, *flags, "--max-steps", "3", "--target-loss", "0", "--snapshot-interval", "0")
        train(dataclasses.replace(cfg, out_dir=str(tmp_path / name)))
        losses.append([r["loss"] for r in metrics(tmp_path / name)])
    big, accum = losses
    assert len(big) == len(accum) == 3
    assert accum == pytest.approx(big, abs=1e-5)


# ---- issue 16: a run knows what it is, and says what is wrong before its first step ----


def test_allowed_changes_resume_and_are_recorded(trained_snapshot: Path, tmp_path: Path, in_process: None) -> None:
    """Item 2: a new learning rate and batch size on purpose: trained on, the change kept in metrics and metadata."""
    make_input(tmp_path)
    flags = ["--resume", str(trained_snapshot), "-B", "2", "--lr", "1e-3", "--max-steps", "4", "--target-loss", "0"]
    train(config_here(tmp_path, *flags, "--allow-changed", "batch_size,lr", "--snapshot-interval", "0"))
    records = metrics(tmp_path / "out")
    assert [r["step"] for r in records] == [3, 4]
    assert records[0]["changed_on_resume"] == {"batch_size": [4, 2], "lr": [0.003, 0.001]}
    assert "changed_on_resume" not in records[1]
    last = load(tmp_path / "out" / "snapshots" / "snapshot_step_4.pt")
    assert last["metadata"]["changed_on_resume"] == [
        {"step": 2, "changed": {"batch_size": [4, 2], "lr": [0.003, 0.001]}}
    ]


def test_another_input_allowed_starts_at_its_beginning(
    trained_snapshot: Path, tmp_path: Path, in_process: None
) -> None:
    """Item 2: resuming onto a 3 KB text was an internal error (the saved position lay beyond its end)."""
    (tmp_path / "input.txt").write_text(SAMPLE_TEXT.upper()[:3000], encoding="utf-8")
    flags = ["--resume", str(trained_snapshot), "--max-steps", "3", "--target-loss", "0", "--snapshot-interval", "0"]
    result = train(config_here(tmp_path, *flags, "--allow-changed", "input"))
    assert result.step == 3
    assert list(metrics(tmp_path / "out")[0]["changed_on_resume"]) == ["input"]


def test_a_sample_prompt_longer_than_the_block_is_refused_before_training(tmp_path: Path, in_process: None) -> None:
    """Item 10: it was found only after training, with the model saved."""
    make_input(tmp_path)
    cfg = dataclasses.replace(config_here(tmp_path, "--max-steps", "2"), no_sample=False, sample_prompt="word " * 80)
    with pytest.raises(UsageError, match=r"the prompt is \d+ tokens, longer than the model's block size \(64\)"):
        train(cfg)
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "snapshots").exists()


def test_too_little_disk_for_one_checkpoint_is_found_before_training(tmp_path: Path) -> None:
    """Item 12: found only at the first snapshot; here a model whose checkpoint would exceed this disk's free space
    (on the meta device: shapes only, no memory)."""
    free = shutil.disk_usage(tmp_path).free
    width = 1024 * max(1, int((free / (3 * 4 * 12 * 4)) ** 0.5) // 1024 + 1)  # 12 C^2 weights a layer, 3 copies
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=4, n_head=8, n_embd=width, block_size=64))
    cfg = TrainConfig(out_dir=str(tmp_path), no_sample=True)
    with pytest.raises(OutDirError, match=r"not enough disk space .*; free some space or use another --out-dir$"):
        check_before_training(cfg, model)


@pytest.mark.parametrize(("keep", "hint"), [(1, False), (3, True), (0, True)])
def test_the_disk_space_hint_suggests_fewer_snapshots_only_where_that_helps(
    tmp_path: Path, keep: int, hint: bool
) -> None:
    """Item 12: with --keep-snapshots 1 the message still said to lower it."""
    snapshots = Checkpoints(tmp_path, keep, World())
    huge = {"format_version": 1, "model_state_dict": {"w": torch.empty(10**15, device="meta")}, "config": {}}
    with pytest.raises(OutDirError, match="not enough disk space") as failure:
        snapshots.writer.submit(huge, tmp_path / "snapshots" / "snapshot_step_1.pt")
    assert ("lower --keep-snapshots" in str(failure.value)) == hint
    snapshots.close()


def test_hellaswag_and_the_gradient_norm_are_in_the_metrics(tmp_path: Path, in_process: None) -> None:
    """Issue 11: multiple choice every --eval-interval steps beside the validation loss; the gradient norm and the
    tokens seen at every step."""
    make_input(tmp_path)
    question = {"ctx": "First Citizen: Before we proceed", "endings": ["any further", "the moon", "x"], "label": 0}
    (tmp_path / "q.jsonl").write_text(json.dumps(question) + "\n")
    flags = ["--hellaswag", str(tmp_path / "q.jsonl"), "--eval-interval", "3", "--val-fraction", "0.25"]
    train(config_here(tmp_path, *flags, "--max-steps", "6", "--target-loss", "0", "--snapshot-interval", "0"))
    records = metrics(tmp_path / "out")
    assert [r["step"] for r in records if "hellaswag_acc_norm" in r] == [3, 6]
    assert all(r["hellaswag_acc"] in (0.0, 1.0) and "val_loss" in r for r in records if "hellaswag_acc" in r)
    assert all(r["grad_norm"] > 0 for r in records)
    assert [r["tokens"] for r in records] == [TOKENS_PER_STEP * s for s in range(1, 7)]


# ---- issue 12: training on token shards ----


@pytest.mark.slow
def test_shards_written_by_another_tool_train(tmp_path: Path) -> None:
    ids = encode(SAMPLE_TEXT * 6)
    folder = tmp_path / "fineweb10B"
    folder.mkdir()
    numpy_shard(folder / "fineweb_train_000001.bin", ids[:400])
    numpy_shard(folder / "fineweb_train_000002.bin", ids[400:])
    numpy_shard(folder / "fineweb_val_000000.bin", ids[:100])
    flags = ["--input", str(folder), "--max-steps", "8", "--target-loss", "0", "--eval-interval", "4"]
    result = tiny_train_py(*flags, "--eval-batches", "1", "--snapshot-interval", "4", "--out-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = metrics(tmp_path / "out")
    assert [r["step"] for r in records] == list(range(1, 9)) and records[-1]["loss"] < records[0]["loss"]
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    # 400 tokens hold 6 windows of 64 (+1): steps 1-6 read the first shard, 7-8 the second
    assert load(tmp_path / "out" / "snapshots" / "snapshot_step_4.pt")["loader"] == {"shard": 0, "offset": 256,
                                                                                      "epoch": 0}  # fmt: skip
    last = load(tmp_path / "out" / "snapshots" / "snapshot_step_8.pt")
    assert last["loader"] == {"shard": 1, "offset": 128, "epoch": 0}
    assert last["metadata"]["input_sha256"] == shards.fingerprint(shards.find_shards(str(folder)))
    assert not (tmp_path / "out" / "token_cache").exists()


@pytest.fixture(scope="module")
def prepared_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six documents of ~110 tokens prepared into shards of 200 tokens: three hold 3 windows of B x T = 64 (+1) each,
    the last (60 tokens) none, so an epoch is 9 steps."""
    folder = tmp_path_factory.mktemp("prepared")
    (folder / "docs.jsonl").write_text((json.dumps({"text": SAMPLE_TEXT}) + "\n") * 6, encoding="utf-8")
    result = prepare(PrepareConfig(inputs=[str(folder / "docs.jsonl")], out=str(folder / "shards"), shard_tokens=200))
    assert [s["tokens"] for s in result.shards] == [200, 200, 200, 60]
    return folder / "shards"


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", [[], ["--shuffle-shards"]], ids=["in-order", "shuffled"])
def test_resume_on_shards_equals_the_run_never_stopped(
    prepared_shards: Path, tmp_path: Path, in_process: None, shuffle: list[str]
) -> None:
    """The snapshot of step 2 points at the last window of a shard; the run goes on across two shard boundaries and
    into the second epoch (shuffled: in a new order)."""
    flags = ["--input", str(prepared_shards), "--target-loss", "0", "--snapshot-interval", "1", "--keep-snapshots", "0"]
    straight = tmp_path / "straight"
    train(dataclasses.replace(tiny_config(*flags, *shuffle, "--max-steps", "11"), out_dir=str(straight)))
    snapshot = straight / "snapshots" / "snapshot_step_2.pt"
    saved = load(snapshot)["loader"]
    assert saved["offset"] == 128 and saved["epoch"] == 0  # the next window is the shard's last
    resumed = tmp_path / "resumed"
    cfg = tiny_config(*flags, *shuffle, "--max-steps", "11", "--resume", str(snapshot))
    train(dataclasses.replace(cfg, out_dir=str(resumed)))
    assert [(r["step"], r["loss"]) for r in metrics(resumed)] == [(r["step"], r["loss"]) for r in metrics(straight)[2:]]
    states = [load(straight / "snapshots" / f"snapshot_step_{k}.pt")["loader"] for k in range(1, 12)]
    assert [s["epoch"] for s in states] == [0] * 8 + [1] * 3
    assert len({s["shard"] for s in states}) == 3
    assert load(resumed / "snapshots" / "snapshot_step_11.pt")["loader"] == states[-1]


# ---- issue 23: the GPT-2 recipe's optimizer, a batch in tokens, schedules, samples and MFU during training ----

RECIPE_FLAGS = ["--adam-beta1", "0.9", "--adam-beta2", "0.95", "--adam-eps", "1e-8", "--weight-decay", "0.1",
                "--grad-clip", "1.0", "--lr-schedule", "cosine", "--warmup-steps", "5", "--min-lr", "3e-4",
                "--max-steps", "30", "--target-loss", "0", "--snapshot-interval", "0"]  # fmt: skip


def plain_pytorch_losses(cfg: TrainConfig, tokens: list[int], steps: int) -> list[float]:
    """The run ``cfg`` describes, as a plain PyTorch loop written here: torch.optim.AdamW (not fused) on the two
    groups (matrices decayed, the rest not), the cosine formula with its warm-up, clipping at 1.0, and consecutive
    B x T windows of ``tokens`` that start again from the beginning when the next would not fit."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config())
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=False, foreach=False)
    data, B, T, position, losses = torch.tensor(tokens), cfg.batch_size, cfg.seq_len, 0, []
    for step in range(steps):
        if step < 5:
            lr = cfg.lr * (step + 1) / 5
        else:
            lr = 3e-4 + 0.5 * (1 + math.cos(math.pi * (step - 5) / (30 - 5))) * (cfg.lr - 3e-4)
        for group in optimizer.param_groups:
            group["lr"] = lr
        window = data[position : position + B * T + 1]
        position = 0 if position + 2 * B * T + 1 > len(data) else position + B * T
        logits, _ = model(window[:-1].view(B, T))
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), window[1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_equals_a_plain_pytorch_loop_step_by_step(tmp_path: Path, in_process: None) -> None:
    make_input(tmp_path)
    cfg = config_here(tmp_path, *RECIPE_FLAGS)
    train(cfg)
    ours = [r["loss"] for r in metrics(tmp_path / "out")]
    plain = plain_pytorch_losses(cfg, encode(SAMPLE_TEXT * 3), 30)
    assert len(ours) == 30
    assert ours == pytest.approx(plain, abs=1e-5)
    assert ours[-1] < ours[0] - 1  # it learned: not two runs that both stood still


def test_batch_tokens_equals_the_explicit_grad_accum_run_loss_for_loss(tmp_path: Path, in_process: None) -> None:
    make_input(tmp_path)
    losses = {}
    for name, flags in (("tokens", ["--batch-tokens", "128"]), ("accum", ["--grad-accum", "4"])):
        cfg = config_here(tmp_path, "-B", "2", *flags, "--max-steps", "4", "--target-loss", "0",
                          "--snapshot-interval", "4")  # fmt: skip
        train(dataclasses.replace(cfg, out_dir=str(tmp_path / name)))
        losses[name] = [r["loss"] for r in metrics(tmp_path / name)]
        assert [r["tokens"] for r in metrics(tmp_path / name)] == [128, 256, 384, 512]
    assert losses["tokens"] == losses["accum"]
    saved = torch.load(tmp_path / "tokens" / "snapshots" / "snapshot_step_4.pt", weights_only=True)
    assert (saved["train_args"]["batch_tokens"], saved["train_args"]["grad_accum"]) == (128, 4)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (
            ["--batch-tokens", "100"],
            "--batch-tokens 100 is not a multiple of -B x -T = 64 tokens; nearest valid: 64 or 128",
        ),
        (["--batch-tokens", "32"], "nearest valid: 64"),
        (["--batch-tokens", "256", "--grad-accum", "3"], "not a multiple of -B x -T x --grad-accum = 192 tokens"),
        (
            ["--batch-tokens", "256", "--grad-accum", "2"],
            "--grad-accum 2 disagrees with --batch-tokens 256, which needs 4",
        ),
    ],
)
def test_a_batch_in_tokens_that_does_not_divide_is_one_line(tmp_path: Path, flags: list[str], fragment: str) -> None:
    make_input(tmp_path)
    code, _, err = run_main("train", *TINY_TRAIN_FLAGS, *flags, "--max-steps", "1", cwd=tmp_path)
    assert_one_line_error(code, err, 2, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt"]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "wsd"])
def test_each_schedule_s_rates_in_a_run_are_its_formula(schedule: str, tmp_path: Path, in_process: None) -> None:
    make_input(tmp_path)
    flags = ["--lr-schedule", schedule, "--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "3", "--max-steps", "12",
             "--decay-fraction", "0.5", "--target-loss", "0", "--snapshot-interval", "0"]  # fmt: skip
    train(config_here(tmp_path, *flags))
    rates = [r["lr"] for r in metrics(tmp_path / "out")]

    def formula(s: int) -> float:  # the rate of step s (0-based); a record's step is s + 1
        if s < 3:
            return 1e-3 * (s + 1) / 3
        done = (s - 3) / 9
        return {
            "constant": 1e-3,
            "cosine": 1e-4 + 0.5 * (1 + math.cos(math.pi * done)) * 9e-4,
            "linear": 1e-3 - 9e-4 * done,
            "wsd": 1e-3 if s < 6 else 1e-3 - 9e-4 * (s - 6) / 6,
        }[schedule]  # decay: the last 6 of 12

    assert rates == pytest.approx([formula(s) for s in range(12)], rel=1e-12)


def test_wsd_resumed_mid_decay_continues_the_same_rates(tmp_path: Path, in_process: None) -> None:
    make_input(tmp_path)
    flags = ["--lr-schedule", "wsd", "--warmup-steps", "2", "--max-steps", "16", "--decay-fraction", "0.5",
             "--min-lr", "0", "--target-loss", "0", "--snapshot-interval", "11", "--keep-snapshots", "0"]  # fmt: skip
    train(config_here(tmp_path, *flags))
    snapshot = tmp_path / "out" / "snapshots" / "snapshot_step_11.pt"  # three steps into the decay (from step 8)
    resumed = dataclasses.replace(config_here(tmp_path, *flags, "--resume", str(snapshot)), out_dir=str(tmp_path / "b"))
    train(resumed)
    straight = metrics(tmp_path / "out")
    again = metrics(tmp_path / "b")
    assert [r["step"] for r in again] == list(range(12, 17))
    assert [r["lr"] for r in again] == [r["lr"] for r in straight[11:]]
    assert [r["loss"] for r in again] == [r["loss"] for r in straight[11:]]
    assert straight[8]["lr"] == straight[2]["lr"] > straight[9]["lr"] > straight[15]["lr"] > 0  # decay from step 8


def test_samples_appear_at_the_intervals_and_change_nothing(
    tmp_path: Path, in_process: None, caplog: pytest.LogCaptureFixture
) -> None:
    make_input(tmp_path)
    flags = ["--max-steps", "7", "--target-loss", "0", "--snapshot-interval", "0", "--dropout", "0.1"]
    train(config_here(tmp_path, *flags, "--sample-interval", "3", "--sample-prompt", "First Citizen:"))
    records = metrics(tmp_path / "out")
    sampled = [r for r in records if "samples" in r]
    assert [r["step"] for r in sampled] == [3, 6]
    for record in sampled:
        assert len(record["samples"]) == 5 and all(s.startswith("First Citizen:") for s in record["samples"])
        assert f"samples at step {record['step']}:\n> {record['samples'][0]}" in caplog.text
    assert sampled[0]["samples"] != sampled[1]["samples"]  # from the model as it was at each step
    train(dataclasses.replace(config_here(tmp_path, *flags), out_dir=str(tmp_path / "plain")))
    assert [r["loss"] for r in metrics(tmp_path / "plain")] == [r["loss"] for r in records]  # dropout's RNG untouched


def test_mfu_is_logged_and_shown_with_a_peak(
    tmp_path: Path, in_process: None, caplog: pytest.LogCaptureFixture
) -> None:
    make_input(tmp_path)
    train(config_here(tmp_path, "--max-steps", "3", "--target-loss", "0", "--peak-flops", "1e12"))
    records = metrics(tmp_path / "out")
    tiny = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))  # TINY_TRAIN_FLAGS' shape
    counted = sum(p.numel() for p in tiny.parameters()) - 64 * 32  # the position embeddings are not multiplied
    per_token = 6 * counted + 12 * 2 * 32 * 16  # 6N + 12LCT, T = 16
    for record in records:
        assert record["mfu"] == pytest.approx(per_token * record["tokens_per_sec"] / 1e12, abs=1e-4, rel=1e-3)
    assert f"MFU {records[-1]['mfu']:.1%}" in caplog.text
    train(dataclasses.replace(config_here(tmp_path, "--max-steps", "1"), out_dir=str(tmp_path / "cpu")))
    assert "mfu" not in metrics(tmp_path / "cpu")[0]  # a CPU's peak is not known: no figure rather than a guess


def test_a_run_repeats_from_its_snapshot_s_settings(trained_snapshot: Path, tmp_path: Path, in_process: None) -> None:
    from gpt2scratch.cli.dispatch import build_parser, command_config

    args = build_parser().parse_args(["train", "--config", str(trained_snapshot), "--out-dir", str(tmp_path / "again")])
    _, cfg = command_config(args)
    original = torch.load(trained_snapshot, weights_only=True)["train_args"]
    assert {**cfg.to_dict(), "out_dir": None, "config": None} == {**original, "out_dir": None, "config": None}
    train(cfg)
    losses = [r["loss"] for r in metrics(tmp_path / "again")]
    assert len(losses) == 2 and losses == [r["loss"] for r in metrics(trained_snapshot.parent.parent)]
