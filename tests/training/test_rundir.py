"""A run's out dir: retention, discovery of the newest snapshot, the refusal to overwrite an earlier run, the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2scratch.errors import CheckpointError, OutDirError
from gpt2scratch.files import OutDirLock
from gpt2scratch.training.rundir import (
    FINAL_NAME,
    check_writable,
    latest_snapshot,
    list_snapshots,
    prune,
    refuse_to_overwrite,
    refuse_to_resume_over,
    remove_temporaries,
    snapshot_path,
)

# ---- retention and discovery ----


@pytest.mark.parametrize(("keep", "kept"), [(2, [10, 20]), (1, [20]), (0, [1, 2, 3, 10, 20]), (9, [1, 2, 3, 10, 20])])
def test_prune_keeps_the_newest(keep: int, kept: list[int], tmp_path: Path) -> None:
    for step in (1, 2, 3, 10, 20):  # 10 and 20 sort before 2 and 3 as text: the order must be numeric
        path = snapshot_path(tmp_path, step)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    others = [tmp_path / "snapshots" / ".snapshot_step_30.pt.tmp-1", tmp_path / "snapshots" / "notes.txt"]
    for path in others:
        path.write_bytes(b"x")
    prune(tmp_path, keep)
    assert [step for step, _ in list_snapshots(tmp_path)] == kept
    assert all(path.exists() for path in others)


def test_sharded_snapshots_are_listed_pruned_and_cleaned_up_like_files(tmp_path: Path) -> None:
    """Issue 13: a sharded snapshot is a directory; retention removes it whole (never a part left under its name),
    and the temporary directory of a snapshot killed mid-write is removed by the next run."""
    folder = tmp_path / "snapshots"
    for step in (2, 4):
        snapshot_path(tmp_path, step, sharded=True).mkdir(parents=True)
        (snapshot_path(tmp_path, step, sharded=True) / "__0_0.distcp").write_bytes(b"x")
    snapshot_path(tmp_path, 6).write_bytes(b"x")  # a single-file snapshot of the same run
    (folder / "snapshot_step_8").write_bytes(b"x")  # a file without .pt: neither kind
    writing = folder / ".snapshot_step_10.tmp-123"  # a snapshot being written when its run was killed
    writing.mkdir()
    (writing / "__0_0.distcp").write_bytes(b"x")
    assert [(s, p.name) for s, p in list_snapshots(tmp_path)] == [
        (2, "snapshot_step_2"),
        (4, "snapshot_step_4"),
        (6, "snapshot_step_6.pt"),
    ]
    with pytest.raises(OutDirError, match=r"holds a later point of this run \(snapshot_step_6\.pt\)"):
        refuse_to_resume_over(tmp_path, snapshot_path(tmp_path, 4, sharded=True), 4)
    prune(tmp_path, 2)
    assert [s for s, _ in list_snapshots(tmp_path)] == [4, 6]
    assert sorted(p.name for p in folder.iterdir()) == [
        ".snapshot_step_10.tmp-123",
        "snapshot_step_4",
        "snapshot_step_6.pt",
        "snapshot_step_8",
    ]
    remove_temporaries(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["snapshot_step_4", "snapshot_step_6.pt", "snapshot_step_8"]


def test_latest_snapshot_skips_a_corrupt_newest_snapshot(trained_snapshot: Path, tmp_path: Path) -> None:
    good = snapshot_path(tmp_path, 2)
    good.parent.mkdir()
    good.write_bytes(trained_snapshot.read_bytes())
    snapshot_path(tmp_path, 4).write_bytes(trained_snapshot.read_bytes()[:1000])  # cut short
    path, state = latest_snapshot(tmp_path)
    assert path == good and state["step"] == 2
    good.unlink()
    with pytest.raises(CheckpointError, match="no snapshot"):
        latest_snapshot(tmp_path)


@pytest.mark.parametrize("earlier", ["snapshots/snapshot_step_30.pt", FINAL_NAME])
def test_a_fresh_run_is_refused_where_an_earlier_one_left_files(earlier: str, tmp_path: Path) -> None:
    """Its retention would prune the earlier run's snapshots away, and its final model would replace theirs."""
    refuse_to_overwrite(tmp_path)  # an empty out dir is fine
    (tmp_path / earlier).parent.mkdir(exist_ok=True)
    (tmp_path / earlier).write_bytes(b"x")
    with pytest.raises(OutDirError, match="already holds an earlier run") as failure:
        refuse_to_overwrite(tmp_path)
    message = str(failure.value)
    assert Path(earlier).name in message
    if earlier == FINAL_NAME:  # issue 16, item 5: a finished run has no snapshot that --resume auto could take
        assert "--resume auto" not in message and f"--resume {tmp_path / FINAL_NAME}" in message
    else:
        assert "--resume auto" in message


def test_resume_auto_in_a_finished_run_points_at_its_final_model(tmp_path: Path) -> None:
    """Issue 16, item 5: the two refusals of a finished run no longer send the user back and forth."""
    (tmp_path / FINAL_NAME).write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no snapshot") as failure:
        latest_snapshot(tmp_path)
    assert f"--resume {tmp_path / FINAL_NAME} and a lower --target-loss" in str(failure.value)
    assert "start without --resume" not in str(failure.value)


def test_resume_auto_with_only_damaged_snapshots_says_which_and_what_to_do(tmp_path: Path) -> None:
    """The sweep: with a corrupt newest snapshot and no good one, --resume auto said "start without --resume",
    which the damaged snapshot then made a fresh run refuse, pointing back at --resume auto."""
    for step in (4, 6):
        snapshot_path(tmp_path, step).parent.mkdir(exist_ok=True)
        snapshot_path(tmp_path, step).write_bytes(b"cut short")
    with pytest.raises(CheckpointError, match="no snapshot") as failure:
        latest_snapshot(tmp_path)
    message = str(failure.value)
    assert "(snapshot_step_6.pt, snapshot_step_4.pt: damaged, see above)" in message, message
    assert "--resume PATH" in message and "another --out-dir" in message and "without --resume" not in message
    (tmp_path / FINAL_NAME).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=f"continue the finished run with --resume {tmp_path / FINAL_NAME}"):
        latest_snapshot(tmp_path)


@pytest.mark.parametrize("left", [["metrics.jsonl"], ["loss.png"], ["metrics.jsonl", "loss.png"]])
def test_a_fresh_run_is_refused_where_a_run_without_snapshots_left_its_metrics(left: list[str], tmp_path: Path) -> None:
    """The sweep: a fresh run over a directory holding only another run's metrics.jsonl replaced it."""
    (tmp_path / "metrics.jsonl").write_text("")  # an empty file holds nothing to lose
    refuse_to_overwrite(tmp_path)
    for name in left:
        (tmp_path / name).write_text('{"step": 1}\n')
    with pytest.raises(OutDirError, match=f"already holds {' and '.join(left)} of an earlier run") as failure:
        refuse_to_overwrite(tmp_path)
    assert "move" in str(failure.value) and "another --out-dir" in str(failure.value)
    if left == ["loss.png"]:
        refuse_to_overwrite(tmp_path, plot=False)  # --no-plot: this run does not draw one


@pytest.mark.parametrize(
    ("name", "kind"),
    [("snapshots", "file"), ("token_cache", "file"), ("final_model.pt", "dir"), ("metrics.jsonl", "dir")],
)
def test_a_name_the_run_writes_taken_by_another_kind_of_file_is_refused_at_once(
    name: str, kind: str, tmp_path: Path
) -> None:
    """The sweep: a file named snapshots was a FileExistsError at the first snapshot, after the first steps."""
    check_writable(tmp_path)
    (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_text("mine")
    wanted = "a regular file" if kind == "dir" else "a directory"
    with pytest.raises(OutDirError, match=rf"{name} is in the way: a run writes {wanted} there; move it away"):
        check_writable(tmp_path)


def make_run(folder: Path, steps: list[int], final: bool = False, metrics: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for step in steps:
        snapshot_path(folder, step).parent.mkdir(parents=True, exist_ok=True)
        snapshot_path(folder, step).write_bytes(b"x")
    if final:
        (folder / FINAL_NAME).write_bytes(b"x")
    if metrics:
        (folder / "metrics.jsonl").write_text('{"step": 1}\n')


def test_resuming_into_an_empty_out_dir_or_from_its_own_newest_snapshot_is_allowed(tmp_path: Path) -> None:
    refuse_to_resume_over(tmp_path / "empty", tmp_path / "elsewhere" / "snapshot_step_5.pt", 5)
    make_run(tmp_path, [10, 20])
    refuse_to_resume_over(tmp_path, snapshot_path(tmp_path, 20), 20)


@pytest.mark.parametrize(
    ("victim", "message"),
    [
        ({"steps": [10, 20, 30]}, "holds another run"),
        ({"steps": [], "final": True}, "holds another run"),
        ({"steps": [], "metrics": True}, "holds another run"),
    ],
)
def test_resuming_another_run_into_an_out_dir_in_use_is_refused(tmp_path: Path, victim: dict, message: str) -> None:
    """Issue 16, item 1: resuming base's snapshot into victim would cut victim's metrics and prune its snapshots."""
    make_run(tmp_path / "victim", **victim)
    with pytest.raises(OutDirError, match=message) as failure:
        refuse_to_resume_over(tmp_path / "victim", tmp_path / "base" / "snapshots" / "snapshot_step_5.pt", 5)
    assert "--resume auto" in str(failure.value) and "\n" not in str(failure.value)


@pytest.mark.parametrize(("steps", "final"), [([10, 20, 30], False), ([10], True)])
def test_resuming_an_older_point_of_the_same_run_in_place_is_refused(
    tmp_path: Path, steps: list[int], final: bool
) -> None:
    """Its newer snapshots would be pruned (they count as newer than every snapshot the resumed run writes)."""
    make_run(tmp_path, steps, final=final)
    with pytest.raises(OutDirError, match="holds a later point of this run"):
        refuse_to_resume_over(tmp_path, snapshot_path(tmp_path, 10), 10)


# ---- the out-dir lock ----


def test_second_lock_on_a_dir_fails_while_the_first_is_held(tmp_path: Path) -> None:
    first = OutDirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(OutDirError, match=rf"in use by a running training \(pid {os.getpid()}\)"):
            OutDirLock(tmp_path).acquire()
    finally:
        first.release()
    again = OutDirLock(tmp_path)
    again.acquire()
    again.release()


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from gpt2scratch.files import OutDirLock
OutDirLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(300)
"""


def test_lock_of_a_killed_process_does_not_block(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutDirError, match=rf"pid {holder.pid}\)"):
            OutDirLock(tmp_path).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(timeout=60) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    lock = OutDirLock(tmp_path)
    lock.acquire()  # the lock file is still there, with the dead pid in it, but the lock died with its holder
    lock.release()
