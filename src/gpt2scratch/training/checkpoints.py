"""Where a run's checkpoints are written: its snapshots (in the background, never of non-finite weights, pruned to
--keep-snapshots) and its final model."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from gpt2scratch.checkpoint import sharded
from gpt2scratch.checkpoint.format import CheckpointWriter, all_finite
from gpt2scratch.distributed import parallelize as parallel
from gpt2scratch.distributed.world import World
from gpt2scratch.errors import TrainingDiverged
from gpt2scratch.training import rundir
from gpt2scratch.training.state import TrainState

log = logging.getLogger(__name__)


class Checkpoints:
    """The run's checkpoints, its snapshots and its final model. Snapshots are written by rank 0 in the
    background, one at a time, never of non-finite weights; with ``sharded`` (FSDP), they are directories written
    by every rank (checkpoint/sharded.py), before ``save`` returns.

    With ``defer``, a snapshot that falls due while the previous one is still being written is deferred, not waited
    for: it is taken at the first step after that write has finished (``due``), and the run says so once, then, at
    its end, the interval it achieved. Without, it waits for the write, so snapshots stay at exact multiples of the
    interval. On a GPU (``stage_on_host``) a snapshot costs the training thread only the queuing of
    copies into pinned host buffers; the rest happens on the writer's thread.

    Every rank calls ``save`` (building the state gathers every rank's RNG state).
    """

    def __init__(
        self, out_dir: Path, keep: int, world: World, sharded: bool = False, interval: int = 0,
        stage_on_host: bool = False, defer: bool = False,
    ):  # fmt: skip
        self.out_dir, self.world, self.sharded, self.interval = out_dir, world, sharded, interval
        self.defer = defer
        self.hint = "free some space" + (", lower --keep-snapshots" if keep != 1 else "") + " or use another --out-dir"
        self.prune = functools.partial(rundir.prune, out_dir, keep)
        self.writer = CheckpointWriter(self.prune, space_hint=self.hint, stage_on_host=stage_on_host)
        self.last: Path | None = None  # the newest snapshot written by this run
        self.deferred_since: int | None = None  # the step whose snapshot is waiting for the writer
        self.taken: list[int] = []  # the steps of the periodic snapshots this run took
        self.deferrals = 0

    @classmethod
    def of_run(cls, state: TrainState, sharded: bool) -> Checkpoints:
        """The checkpoints of the run ``state`` is at: its out dir, retention, interval and deferral; on a GPU the
        state is staged in pinned host buffers."""
        cfg = state.cfg
        return cls(Path(cfg.out_dir), cfg.keep_snapshots, state.world, sharded, cfg.snapshot_interval,
                   stage_on_host=state.device.type == "cuda", defer=state.speed.defer.on)  # fmt: skip

    @property
    def writing(self) -> bool:
        """Whether this rank is writing a snapshot that a due one would be deferred for (rank 0 only: the others
        never write; and never without ``defer``, where the next snapshot waits for the write instead)."""
        return self.defer and self.writer.busy

    def due(self, state: TrainState, writing: bool) -> None:
        """The periodic snapshot after a step: taken at every --snapshot-interval steps, deferred while a write is
        in flight (``writing``: rank 0's ``writing``, which every rank must agree on, as they all take part)."""
        if not self.interval or (state.step % self.interval and self.deferred_since is None):
            return
        if writing:
            if self.deferred_since is None:
                self.deferred_since = state.step
                self.deferrals += 1
                if self.deferrals == 1 and self.world.is_main:
                    log.info(
                        "snapshot of step %d deferred: the previous one is still being written (the disk needs more "
                        "than %d steps for one); each snapshot now follows the end of the write before it",
                        state.step, self.interval,
                    )  # fmt: skip
            return
        self.deferred_since = None
        self.save(state)
        self.taken.append(state.step)

    def summary(self) -> str | None:
        """The interval the snapshots achieved, where some were deferred."""
        if not self.deferrals or len(self.taken) < 2:
            return None
        achieved = (self.taken[-1] - self.taken[0]) / (len(self.taken) - 1)
        return (
            f"snapshots came every {achieved:.1f} steps on average, not every {self.interval}: {self.deferrals} were "
            "deferred while the one before was still being written (raise --snapshot-interval to match the disk)"
        )

    def save(self, state: TrainState, background: bool = True) -> Path:
        """Snapshot this step; with ``background`` False, return only once it is on disk."""
        if self.sharded:
            return self.save_sharded(state)
        checkpoint = state.state_dict()
        path = rundir.snapshot_path(self.out_dir, state.step)
        if not self.world.is_main:
            return path
        if not all_finite(state.model):
            raise TrainingDiverged(
                f"the weights hold NaN/inf at step {state.step}; not saving them (last good: {self.last})"
            )
        if path != self.last:
            self.writer.submit(checkpoint, path, background=background)
            self.last = path
        elif not background:
            self.writer.wait()  # this step's snapshot may still be in flight: the caller needs it on disk, or its error
        return path

    def save_sharded(self, state: TrainState) -> Path:
        """Snapshot this step as a directory of every rank's shards (every rank writes; rank 0 renames it into place
        once all have finished)."""
        path = rundir.snapshot_path(self.out_dir, state.step, sharded=True)
        if path == self.last:
            return path
        if not parallel.weights_finite(state.model, self.world):
            raise TrainingDiverged(
                f"the weights hold NaN/inf at step {state.step}; not saving them (last good: {self.last})"
            )
        tied = parallel.tied_names(state.model)
        sharded.save_snapshot(state.state_dict(full=False), path, self.world, tied, self.prune, self.hint)
        self.last = path
        return path

    def save_final(self, state: TrainState) -> Path:
        """The final model (rank 0 writes it, with checksums, before returning; under FSDP gathered onto rank 0 and
        written in the same format); every rank calls this."""
        checkpoint = state.state_dict(kind="final")
        finite = parallel.weights_finite(state.model, self.world)  # every rank: under FSDP each checks its shards
        path = self.out_dir / rundir.FINAL_NAME
        if self.world.is_main:
            self.writer.wait()
            if not finite:
                raise TrainingDiverged(f"the weights hold NaN/inf at step {state.step}; no final model written")
            self.writer.submit(checkpoint, path, background=False, checksums=True)
        return path

    def close(self) -> None:
        self.writer.close()
