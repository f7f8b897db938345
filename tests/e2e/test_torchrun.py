"""Data-parallel training under torchrun (2 processes, gloo on the CPU) computes what one process computes with the
combined batch, writes its files once, and resumes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed
from conftest import (  # one thread per rank
    ONE_THREAD,
    SAMPLE_TEXT,
    TINY_TRAIN_FLAGS,
    assert_close_losses,
    assert_close_weights,
    assert_ran,
    child_env,
    metrics,
    torchrun,
    train_py,
)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed"),
]

# Identical runs but for the split of the batch: 2 ranks x B=2 against 1 process x B=4.
# TINY_TRAIN_FLAGS compute in float32, so the two agree to rounding.
FLAGS = [*TINY_TRAIN_FLAGS, "--target-loss", "0", "--snapshot-interval", "5", "--keep-snapshots", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process to step 8; two ranks to step 5; two ranks resumed from their step-5 snapshot to step 8."""
    cwd = tmp_path_factory.mktemp("distributed")
    (cwd / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    one = train_py(*FLAGS, "-B", "4", "--max-steps", "8", "--out-dir", "one", cwd=cwd)
    two = torchrun(*FLAGS, "-B", "2", "--max-steps", "5", "--out-dir", "two", cwd=cwd)
    snapshot = str(cwd / "two" / "snapshots" / "snapshot_step_5.pt")
    resumed = torchrun(*FLAGS, "-B", "2", "--max-steps", "8", "--resume", snapshot, "--out-dir", "resumed", cwd=cwd)
    return {"cwd": cwd, "one": one, "two": two, "resumed": resumed}


def test_runs_succeed(runs: dict[str, Any]) -> None:
    for name in ("one", "two", "resumed"):
        result = runs[name]
        assert result.returncode == 0, f"{name}: {result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        assert "Traceback" not in result.stderr


def test_two_ranks_compute_what_one_process_computes(runs: dict[str, Any]) -> None:
    cwd = runs["cwd"]
    assert_close_losses(metrics(cwd / "two"), metrics(cwd / "one")[:5])
    assert_close_weights(
        cwd / "two" / "snapshots" / "snapshot_step_5.pt", cwd / "one" / "snapshots" / "snapshot_step_5.pt"
    )


def test_only_rank_0_writes(runs: dict[str, Any]) -> None:
    cwd, result = runs["cwd"], runs["two"]
    assert [r["step"] for r in metrics(cwd / "two")] == [1, 2, 3, 4, 5]  # one line per step, not one per rank
    assert sorted(p.name for p in (cwd / "two" / "snapshots").iterdir()) == ["snapshot_step_5.pt"]
    assert sorted(p.name for p in (cwd / "two").iterdir() if not p.name.startswith(".")) == [
        "metrics.jsonl",
        "snapshots",
        "token_cache",
    ]
    assert len(list((cwd / "two" / "token_cache").glob("tokens-*.u16"))) == 1
    assert result.stdout.count("step      3 |") == 1  # progress lines from rank 0 only
    assert result.stdout.count("stopped at --max-steps 5") == 1
    snapshot = torch.load(cwd / "two" / "snapshots" / "snapshot_step_5.pt", weights_only=True)
    assert snapshot["metadata"]["world_size"] == 2
    assert snapshot["metadata"]["tokens_seen"] == 5 * 2 * 2 * 16  # steps x ranks x B x T


def test_resume_under_torchrun(runs: dict[str, Any]) -> None:
    cwd, result = runs["cwd"], runs["resumed"]
    assert "resuming from" in result.stdout and "(step 5)" in result.stdout
    assert_close_losses(metrics(cwd / "resumed"), metrics(cwd / "one")[5:])
    assert_close_weights(
        cwd / "resumed" / "snapshots" / "snapshot_step_8.pt", cwd / "one" / "snapshots" / "snapshot_step_8.pt"
    )


@pytest.fixture(scope="module")
def dropout_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ranks with dropout: straight to step 4, and resumed from the step-2 snapshot to step 4."""
    cwd = tmp_path_factory.mktemp("dropout")
    (cwd / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    flags = [*FLAGS, "-B", "2", "--dropout", "0.2", "--snapshot-interval", "2", "--max-steps", "4"]
    straight = torchrun(*flags, "--out-dir", "straight", cwd=cwd)
    assert straight.returncode == 0, straight.stderr[-4000:]
    snapshot = cwd / "straight" / "snapshots" / "snapshot_step_2.pt"
    resumed = torchrun(*flags, "--resume", str(snapshot), "--out-dir", "resumed", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return cwd


def test_resume_with_dropout_under_torchrun_is_exact(dropout_runs: Path) -> None:
    """Bug: a snapshot holds rank 0's RNG state only, and only rank 0 restores it; every other rank restarts from
    ``seed + rank``, so after a resume its dropout masks repeat those of step 1 and the losses leave the straight
    run's (one process resumes exactly: see training/test_loop.py::test_resume_continues_exactly)."""
    straight, resumed = metrics(dropout_runs / "straight"), metrics(dropout_runs / "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[2:]]


def test_a_rank_waiting_for_a_master_that_never_answers_stops_on_sigterm(tmp_path: Path) -> None:
    """The sweep: with a wrong MASTER_ADDR/PORT, a rank waited in torch's rendezvous (30 minutes, in C++), where
    SIGTERM did nothing but make torch print a C++ stack; now it stops in one line with 128 + 15. The master here
    accepts the connection and never answers, so the rank is known to be waiting when the signal is sent."""
    (tmp_path / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    with socket.socket() as master:
        master.bind(("127.0.0.1", 0))
        master.listen()
        master.settimeout(120)
        env = child_env({**ONE_THREAD, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(master.getsockname()[1])})  # fmt: skip
        command = [sys.executable, "-m", "gpt2scratch", "train", *FLAGS, "--max-steps", "2"]
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        try:
            connection, _ = master.accept()  # the rank is in the rendezvous now
            with connection:
                time.sleep(1)
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM and err == "error: stopped by SIGTERM\n", err
    assert time.monotonic() - sent < 15


@pytest.fixture(scope="module")
def shard_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of 200 tokens (3 windows of 64 + 1 each, then a tail skipped): one process with -B 4 and two ranks
    with -B 2, 8 steps each, across two shard boundaries."""
    from gpt2scratch.config.commands import PrepareConfig
    from gpt2scratch.data.prepare import prepare

    cwd = tmp_path_factory.mktemp("shards")
    (cwd / "docs.jsonl").write_text((json.dumps({"text": SAMPLE_TEXT}) + "\n") * 6, encoding="utf-8")
    prepare(PrepareConfig(inputs=[str(cwd / "docs.jsonl")], out=str(cwd / "shards"), shard_tokens=200))
    flags = [*FLAGS, "--input", "shards", "--max-steps", "8"]
    one = train_py(*flags, "-B", "4", "--out-dir", "one", cwd=cwd)
    two = torchrun(*flags, "-B", "2", "--out-dir", "two", cwd=cwd)
    assert_ran(one)
    assert_ran(two)
    return cwd


def test_two_ranks_on_shards_compute_what_one_process_computes(shard_runs: Path) -> None:
    one, two = shard_runs / "one", shard_runs / "two"
    assert_close_losses(metrics(two), metrics(one))
    assert_close_weights(two / "snapshots" / "snapshot_step_5.pt", one / "snapshots" / "snapshot_step_5.pt")
    last = [torch.load(run / "snapshots" / "snapshot_step_5.pt", weights_only=True)["loader"] for run in (one, two)]
    assert last[0] == last[1] == {"shard": 1, "offset": 128, "epoch": 0}


@pytest.fixture(scope="module")
def batch_tokens_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """--batch-tokens 128 at -B 2 -T 16: one process to step 6 (4 micro-batches a step); two ranks to step 3 (2 each),
    and that snapshot resumed on one process to step 6 with the same flags."""
    cwd = tmp_path_factory.mktemp("batch_tokens")
    (cwd / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    flags = [*FLAGS, "-B", "2", "--batch-tokens", "128", "--snapshot-interval", "3"]
    assert_ran(train_py(*flags, "--max-steps", "6", "--out-dir", "one", cwd=cwd))
    assert_ran(torchrun(*flags, "--max-steps", "3", "--out-dir", "two", cwd=cwd))
    snapshot = cwd / "two" / "snapshots" / "snapshot_step_3.pt"
    assert_ran(train_py(*flags, "--max-steps", "6", "--resume", str(snapshot), "--out-dir", "resumed", cwd=cwd))
    return cwd


def test_the_same_batch_tokens_on_two_processes_is_the_one_process_run(batch_tokens_runs: Path) -> None:
    cwd = batch_tokens_runs
    one, two = metrics(cwd / "one"), metrics(cwd / "two")
    assert_close_losses(two, one[:3])
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one[:3]] == [128, 256, 384]
    saved = torch.load(cwd / "two" / "snapshots" / "snapshot_step_3.pt", weights_only=True)
    assert (saved["train_args"]["grad_accum"], saved["metadata"]["world_size"]) == (2, 2)


def test_a_two_process_batch_tokens_run_resumes_on_one_as_the_same_run(batch_tokens_runs: Path) -> None:
    cwd = batch_tokens_runs
    resumed = metrics(cwd / "resumed")
    assert_close_losses(resumed, metrics(cwd / "one")[3:])
    assert resumed[0]["changed_on_resume"] == {"grad_accum": [2, 4], "world_size": [2, 1]}  # recorded, not refused
