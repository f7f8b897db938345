"""What a run reports as it goes: ``metrics.jsonl`` (one JSON object per step) and the live progress line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """``metrics.jsonl``, appended (so a resumed run continues the file). Rank 0 only: other ranks pass no path."""

    def __init__(self, path: Path | None, after_step: int = 0):
        self._file = None
        if path is None:
            return
        if path.exists():  # a resumed run replaces what the run it continues logged after its snapshot
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= after_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a")  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn or foreign line: drop it


def progress_line(record: dict[str, Any], elapsed: float, steps_done: int, max_steps: int | None) -> str:
    """The live line: step, loss, lr, tokens/s, elapsed, the ETA when ``max_steps`` is set, the validation loss."""
    line = (
        f"step {record['step']:>6} | loss {record['loss']:.6f} | lr {record['lr']:.2e} | "
        f"{record['tokens_per_sec']:>8.1f} tok/s | {clock(elapsed)} elapsed"
    )
    if max_steps is not None:
        line += f" | ETA {clock(elapsed / max(1, steps_done) * (max_steps - record['step']))}"
    if "val_loss" in record:
        line += f" | val loss {record['val_loss']:.6f}"
    return line


def clock(seconds: float) -> str:
    """``seconds`` as H:MM:SS."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
