"""What a run reports as it goes: ``metrics.jsonl`` (one JSON object per step), the same as TensorBoard scalars
(``--tensorboard``) and in Weights & Biases (``--wandb``), and the live progress line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpt2scratch.config import TrainConfig
from gpt2scratch.training.rundir import METRICS_NAME, TENSORBOARD_DIR
from gpt2scratch.training.wandb_log import WandbLog

# The TensorBoard tag of each record key that has one; a step's record gives the tags of the keys it holds.
TENSORBOARD_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_sec": "train/tokens_per_sec",
    "mfu": "train/mfu",
    "val_loss": "val/loss",
    "hellaswag_acc_norm": "val/hellaswag_acc_norm",
}


class MetricsLog:
    """``metrics.jsonl``, appended (so a resumed run continues the file), and with ``tensorboard`` (a folder) the
    same records as TensorBoard scalars, with ``wandb`` (a WandbLog) in Weights & Biases. Rank 0 only: other ranks
    pass no path."""

    def __init__(
        self, path: Path | None, after_step: int = 0, tensorboard: Path | None = None, wandb: WandbLog | None = None
    ):
        self._file = None
        self._writer: Any = None
        self._wandb = wandb
        if path is None:
            return
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter  # an optional extra: TrainConfig checked it is there

            # A new event file beside the earlier run's; purge_step hides what that run logged after its snapshot,
            # as the truncation below does for metrics.jsonl.
            self._writer = SummaryWriter(str(tensorboard), purge_step=after_step + 1 if after_step else None)
        if path.exists():  # a resumed run replaces what the run it continues logged after its snapshot
            lines = path.read_text(errors="replace").splitlines()  # bytes that are not text: torn, dropped below
            kept = [line for line in lines if _step_of(line) <= after_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a")  # noqa: SIM115 (closed by close())

    @classmethod
    def of_run(cls, cfg: TrainConfig, after_step: int, main: bool) -> MetricsLog:
        """The log of the run ``cfg`` describes (``metrics.jsonl``, and ``tensorboard/`` and W&B if asked): rank
        0's; an empty one elsewhere."""
        if not main:
            return cls(None)
        out_dir = Path(cfg.out_dir)
        wandb = None
        if cfg.wandb:
            wandb = WandbLog(out_dir, cfg.wandb_project, cfg.wandb_run_name, cfg.to_dict(), TENSORBOARD_TAGS)
        tensorboard = out_dir / TENSORBOARD_DIR if cfg.tensorboard else None
        return cls(out_dir / METRICS_NAME, after_step, tensorboard, wandb)

    def write(self, record: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.log(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._writer is not None:
            for key, tag in TENSORBOARD_TAGS.items():
                if key in record:
                    self._writer.add_scalar(tag, record[key], record["step"])
            if "samples" in record:  # as text, one block a sample (TensorBoard shows it as Markdown)
                blocks = ["    " + text.replace("\n", "\n    ") for text in record["samples"]]
                self._writer.add_text("samples", "\n\n".join(blocks), record["step"])
            self._writer.flush()  # a run being watched shows each step, as metrics.jsonl does

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return float("inf")  # a torn or foreign line: drop it


def progress_line(record: dict[str, Any], elapsed: float, steps_done: int, max_steps: int | None) -> str:
    """The live line: step, loss, lr, tokens/s, elapsed, MFU where the peak is known, the ETA when ``max_steps`` is
    set, the validation loss and accuracy when measured."""
    line = (
        f"step {record['step']:>6} | loss {record['loss']:.6f} | lr {record['lr']:.2e} | "
        f"{record['tokens_per_sec']:>8.1f} tok/s | {clock(elapsed)} elapsed"
    )
    if "mfu" in record:
        line += f" | MFU {record['mfu']:.1%}"
    if max_steps is not None:
        line += f" | ETA {clock(elapsed / max(1, steps_done) * (max_steps - record['step']))}"
    if "val_loss" in record:
        line += f" | val loss {record['val_loss']:.6f}"
    if "hellaswag_acc_norm" in record:
        line += f" | hellaswag acc_norm {record['hellaswag_acc_norm']:.4f}"
    return line


def clock(seconds: float) -> str:
    """``seconds`` as H:MM:SS."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
