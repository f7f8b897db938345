"""Sharded snapshots: written by every rank into one directory, read back as the checkpoint file they stand for, into
the shards of any number of ranks, consolidated into one file, and never trusted to run code. Then, under torchrun:
a snapshot of 2 FSDP ranks resumes on one process and on 2 FSDP ranks, a one-process snapshot on 2 FSDP ranks, each
continuing the uninterrupted run; and a kill -9 of a rank in the middle of a sharded snapshot loses nothing.

The unit tests write snapshots in this process, from FSDP over a process group of one rank.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    FSDP_FLAGS,
    ONE_THREAD,
    SAMPLE_TEXT,
    TINY_TRAIN_FLAGS,
    RunsCommand,
    assert_close_losses,
    assert_close_weights,
    assert_one_line_error,
    assert_ran,
    child_env,
    digest,
    free_port,
    metrics,
    new_state,
    run_cli,
    take_steps,
    temporaries,
    torchrun,
    torchrun_command,
    train_py,
)

from gpt2scratch.checkpoint.format import read_checkpoint
from gpt2scratch.checkpoint.load import read_state
from gpt2scratch.checkpoint.sharded import (
    consolidate,
    load_into,
    read_metadata,
    read_sharded_snapshot,
    save_snapshot,
)
from gpt2scratch.distributed.parallelize import tied_names
from gpt2scratch.distributed.world import World
from gpt2scratch.errors import CheckpointError, UsageError
from gpt2scratch.model import GPT
from gpt2scratch.training.rundir import list_snapshots


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Two checkpoints' contents are equal: the same structure, types (tuples stay tuples) and tensors."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b or (a != a and b != b), where  # nan: the loss before the first step


def without_clock(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint without the two metadata fields that differ between two calls of state_dict."""
    metadata = {k: v for k, v in state["metadata"].items() if k not in ("time", "wall_seconds")}
    return {**state, "metadata": metadata}


@pytest.fixture(scope="module")
def snapshot(process_group: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list]:
    """A sharded snapshot of a 1-rank FSDP run at step 2, what it stands for as a file (its whole state then), and the
    losses of the 3 steps after it. Copy it, never change it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state = new_state(seed=0, sharded=True)
    take_steps(state, 2)
    path = tmp_path_factory.mktemp("sharded") / "snapshot_step_2"
    save_snapshot(state.state_dict(full=False), path, World(), tied_names(state.model))
    whole = copy.deepcopy(state.state_dict())  # its tensors may be the live ones (one rank)
    losses = take_steps(state, 3)
    torch.set_num_threads(threads)
    return path, whole, losses


def test_a_sharded_snapshot_reads_back_as_the_file_it_stands_for(snapshot: tuple) -> None:
    path, whole, _ = snapshot
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp"]
    read = read_sharded_snapshot(path)
    assert_same(without_clock(read), without_clock(whole))
    weights = read["model_state_dict"]
    assert weights["lm_head.weight"] is weights["transformer.wte.weight"]  # tied, and stored once:
    assert "model_state_dict/lm_head.weight" not in read_metadata(path).state_dict_metadata
    light = read_state(path, weights=False)  # what FSDP reads before its shards
    assert "model_state_dict" not in light and "optimizer_state_dict" not in light
    assert_same(without_clock(light), without_clock({k: v for k, v in whole.items() if not k.endswith("state_dict")}))


@pytest.mark.usefixtures("process_group", "one_thread")
def test_fsdp_and_one_process_resume_a_sharded_snapshot_exactly(snapshot: tuple) -> None:
    path, _, expected = snapshot
    sharded = new_state(seed=1, sharded=True)  # other weights, position and RNG: all must be replaced
    resume = {**read_state(path, weights=False), **load_into(path, sharded.model, sharded.optimizer)}
    sharded.load_state_dict(resume)
    assert sharded.step == 2 and take_steps(sharded, 3) == expected
    plain = new_state(seed=1)
    plain.load_state_dict(read_sharded_snapshot(path))
    assert take_steps(plain, 3) == pytest.approx(expected, abs=1e-6)


def test_consolidate_writes_one_file_that_loads_and_resumes(snapshot: tuple, tmp_path: Path) -> None:
    path, _, expected = snapshot
    out = tmp_path / "consolidated.pt"
    consolidate(path, out)
    assert_same(read_checkpoint(out), read_sharded_snapshot(path))
    assert torch.load(out, weights_only=True)["step"] == 2
    state = new_state(seed=1)
    state.load_state_dict(read_checkpoint(out))
    assert take_steps(state, 3) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(UsageError, match="is a file already; give --force"):
        consolidate(path, out)
    consolidate(path, out, force=True)
    result = run_cli("consolidate", str(path), str(tmp_path / "cli.pt"))
    assert result.returncode == 0 and "wrote" in result.stdout and "(step 2)" in result.stdout, result.stderr
    assert_same(read_checkpoint(tmp_path / "cli.pt"), read_checkpoint(out))


def test_consolidate_never_writes_inside_the_snapshot(snapshot: tuple, tmp_path: Path) -> None:
    """Not beside its shards (retention would delete the file with them), nor over them with --force, even through
    a link: once, consolidate replaced the snapshot's .metadata with the checkpoint file."""
    folder = tmp_path / "snapshot_step_2"
    shutil.copytree(snapshot[0], folder)
    (tmp_path / "link").symlink_to(folder)
    before = {p.name: digest(p) for p in folder.iterdir()}
    for output in (folder / "out.pt", folder / ".metadata", tmp_path / "link" / "__0_0.distcp"):
        with pytest.raises(UsageError, match=r"is inside the snapshot .*; write the checkpoint file elsewhere"):
            consolidate(folder, output, force=True)
    assert {p.name: digest(p) for p in folder.iterdir()} == before


def test_a_sharded_snapshot_is_a_model_source(snapshot: tuple) -> None:
    """generate, eval and export take it as they take a checkpoint file."""
    path, whole, _ = snapshot
    model = GPT.from_pretrained(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, whole["model_state_dict"][name]), name


def test_a_hostile_metadata_is_refused_in_one_line_and_never_runs(
    snapshot: tuple, text_file: Path, tmp_path: Path
) -> None:
    hostile = tmp_path / "snapshot_step_2"
    shutil.copytree(snapshot[0], hostile)
    read_sharded_snapshot(hostile)  # the control: the copy loads
    marker = tmp_path / "pwned"
    (hostile / ".metadata").write_bytes(pickle.dumps(RunsCommand(f"touch {marker}")))
    with pytest.raises(CheckpointError, match=r"refused to load .*: its \.metadata names posix\.system"):
        read_state(hostile)
    result = run_cli("consolidate", str(hostile), str(tmp_path / "out.pt"))
    assert_one_line_error(result.returncode, result.stderr, 1, "refused to load", "could run code")
    flags = [*TINY_TRAIN_FLAGS, "--input", str(text_file), "--out-dir", str(tmp_path / "run"), "--resume", str(hostile)]
    result = run_cli("train", *flags, env=ONE_THREAD)
    assert_one_line_error(result.returncode, result.stderr, 1, "refused to load", "could run code")
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def tamper(metadata: Any, folder: Path, case: str) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    first = next(iter(storage))
    if case == "outside":
        storage[first].relative_path = "../elsewhere.distcp"
    elif case == "not-a-tensor":
        entries["step"] = {"a": 1}
    elif case == "huge":
        key = next(k for k, v in entries.items() if isinstance(v, TensorStorageMetadata))
        entries[key].size = torch.Size([10**12])
    elif case == "transforms":
        storage[first].transform_descriptors = ["zstd"]
    elif case == "missing-shard":
        (folder / "__0_0.distcp").unlink()
    elif case == "foreign":
        del entries["state.json"]


TAMPERED = {
    "outside": "points at a file outside the snapshot ('../elsewhere.distcp')",
    "not-a-tensor": "lists 'step' as something other than a tensor",
    "huge": "bytes of tensors, more than its files hold",
    "transforms": "stores tensors through transforms",
    "missing-shard": "lacks its shard file __0_0.distcp",
    "foreign": "is a DCP checkpoint, but not a gpt2-scratch snapshot",
    "truncated-shard": "is damaged",
    "corrupt-metadata": "has a corrupt .metadata",
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_damaged_or_foreign_snapshot_is_one_line(case: str, snapshot: tuple, tmp_path: Path) -> None:
    folder = tmp_path / "snapshot_step_2"
    shutil.copytree(snapshot[0], folder)
    if case == "truncated-shard":
        shard = folder / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:-200])
    elif case == "corrupt-metadata":
        (folder / ".metadata").write_bytes((folder / ".metadata").read_bytes()[:100])
    else:
        with open(folder / ".metadata", "rb") as f:
            metadata = pickle.load(f)  # our own file: trusted, to tamper with
        tamper(metadata, folder, case)
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=re.escape(TAMPERED[case])) as failure:
        read_sharded_snapshot(folder)
    assert "\n" not in str(failure.value)


# ---- under torchrun: resharding resumes, and a kill -9 in the middle of a snapshot ----

RESUMES = {
    "sharded-2-ranks-on-1-process": ("fsdp/snapshots/snapshot_step_5", False),
    "sharded-2-ranks-on-2-fsdp-ranks": ("fsdp/snapshots/snapshot_step_5", True),
    "file-of-1-process-on-2-fsdp-ranks": ("one/snapshots/snapshot_step_5.pt", True),
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", list(RESUMES))
def test_a_resumed_run_continues_the_uninterrupted_one(case: str, fsdp_runs: Path, tmp_path: Path) -> None:
    """The same global batch (4 sequences a step) on another number of ranks: the losses of steps 6-10 and the
    weights at step 10 are those of the run never stopped."""
    source, fsdp = RESUMES[case]
    out = tmp_path / "out"
    flags = [*FSDP_FLAGS, "--resume", str(fsdp_runs / source), "--out-dir", str(out)]
    if fsdp:
        result = torchrun(*flags, "-B", "2", "--parallel", "fsdp", cwd=fsdp_runs)
    else:
        result = train_py(*flags, "-B", "4", cwd=fsdp_runs)
    assert_ran(result)
    assert f"resuming from {fsdp_runs / source} (step 5)" in result.stdout
    assert "resuming with changed batch_size, world_size" in result.stdout or case == "sharded-2-ranks-on-2-fsdp-ranks"
    one = fsdp_runs / "one"
    assert_close_losses(metrics(out), metrics(one)[5:])
    last = out / "snapshots" / ("snapshot_step_10" if fsdp else "snapshot_step_10.pt")
    assert_close_weights(last, one / "snapshots" / "snapshot_step_10.pt")


def rank_pid(launcher: int, rank: int) -> int | None:
    """The process id of ``rank`` among torchrun's workers (its children), from their environments."""
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environment:
                return int(child)
    return None


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_9_of_a_rank_during_a_sharded_snapshot_then_resume_auto(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    out = tmp_path / "out"
    flags = [*TINY_TRAIN_FLAGS, "-B", "2", "--parallel", "fsdp", "--target-loss", "0", "--snapshot-interval", "1",
             "--keep-snapshots", "3", "--out-dir", str(out)]  # fmt: skip
    env = child_env(ONE_THREAD)
    killed_mid_snapshot = False
    for attempt in range(3):  # a kill can land just after the rename: then that snapshot is complete, try again
        resume = ["--resume", "auto"] if attempt else []
        launcher_options = ["--nproc_per_node=2", f"--master_port={free_port()}"]
        command = torchrun_command(launcher_options, *flags, "--max-steps", "1000", *resume)
        run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            writing: list[Path] = []
            deadline = time.monotonic() + 240
            while not (list_snapshots(out) and writing) and time.monotonic() < deadline and run.poll() is None:
                writing = [p for p in (out / "snapshots").glob(".snapshot_step_*.tmp-*")] if list_snapshots(out) else []
                time.sleep(0.002)
            pid = rank_pid(run.pid, 1)
            assert writing and pid is not None, "no snapshot being written was seen"
            os.kill(pid, signal.SIGKILL)
            run.wait(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        step = int(re.search(r"snapshot_step_(\d+)", writing[0].name)[1])
        killed_mid_snapshot = not (out / "snapshots" / f"snapshot_step_{step}").exists()
        if killed_mid_snapshot:
            break
    assert killed_mid_snapshot, "every kill landed after a snapshot was complete"
    print(f"kill -9 of rank 1 while {writing[0].name} was being written (attempt {attempt + 1})")
    assert run.returncode != 0
    newest = list_snapshots(out)[-1][0]
    for _, path in list_snapshots(out):  # whatever is under a final name is complete
        assert read_state(path)["step"] == int(path.name.rsplit("_", 1)[1])
    result = torchrun(*flags, "--max-steps", str(newest + 2), "--resume", "auto", cwd=tmp_path)
    assert_ran(result)
    assert f"resuming from {out / 'snapshots' / f'snapshot_step_{newest}'} (step {newest})" in result.stdout
    assert read_state(out / "snapshots" / f"snapshot_step_{newest + 2}")["step"] == newest + 2
    assert not temporaries(out), temporaries(out)
