"""Where a run's checkpoints are written: its snapshots (in the background, never of non-finite weights, pruned to
--keep-snapshots) and its final model."""

from __future__ import annotations

import functools
from pathlib import Path

from gpt2scratch.checkpoint import sharded
from gpt2scratch.checkpoint.format import CheckpointWriter, all_finite
from gpt2scratch.distributed import parallelize as parallel
from gpt2scratch.distributed.world import World
from gpt2scratch.errors import TrainingDiverged
from gpt2scratch.training import rundir
from gpt2scratch.training.state import TrainState


class Checkpoints:
    """The run's checkpoints, its snapshots and its final model. Snapshots are written by rank 0 in the
    background, one at a time, never of non-finite weights; with ``sharded`` (FSDP), they are directories written
    by every rank (checkpoint/sharded.py), before ``save`` returns.

    Every rank calls ``save`` (building the state gathers every rank's RNG state).
    """

    def __init__(self, out_dir: Path, keep: int, world: World, sharded: bool = False):
        self.out_dir, self.world, self.sharded = out_dir, world, sharded
        self.hint = "free some space" + (", lower --keep-snapshots" if keep != 1 else "") + " or use another --out-dir"
        self.prune = functools.partial(rundir.prune, out_dir, keep)
        self.writer = CheckpointWriter(self.prune, space_hint=self.hint)
        self.last: Path | None = None  # the newest snapshot written by this run

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
