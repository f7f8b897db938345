"""A run's metrics in Weights & Biases (``--wandb``), beside metrics.jsonl: the scalars TensorBoard gets, under the
same names, the samples of ``--sample-interval`` as a table, and the run's settings as its config.

W&B's own environment applies: ``WANDB_MODE=offline`` keeps everything on this machine (``wandb sync`` uploads it
later), ``WANDB_API_KEY`` logs in. The run's W&B id is kept in the out dir, so a resumed run continues the same W&B
run (W&B keeps the steps it already has; the resumed steps after the snapshot's are logged again only where W&B
accepts them, from the first step it has not seen).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from gpt2scratch.errors import GPT2ScratchError, first_line

ID_FILE = "wandb-run-id"  # in the out dir


class WandbLog:
    """One W&B run for one training run, written by rank 0."""

    def __init__(self, out_dir: Path, project: str, name: str | None, config: dict[str, Any], tags: dict[str, str]):
        import wandb  # an optional extra: TrainConfig checked that it is there

        id_file = out_dir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        out_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        self._wandb = wandb
        self._tags = tags
        try:
            self._run = wandb.init(project=project, name=name, config=config, dir=str(out_dir), id=run_id,
                                   resume="allow")  # fmt: skip
        except Exception as err:  # W&B's own errors (no API key, no network, a bad project name) are many
            detail = first_line(err) or type(err).__name__
            raise GPT2ScratchError(
                f"--wandb could not start a W&B run ({detail}); log in with `wandb login`, or set WANDB_MODE=offline "
                "to keep the run on this machine"
            ) from None

    def log(self, record: dict[str, Any]) -> None:
        values: dict[str, Any] = {tag: record[key] for key, tag in self._tags.items() if key in record}
        if "samples" in record:
            rows = [[record["step"], text] for text in record["samples"]]
            values["samples"] = self._wandb.Table(columns=["step", "sample"], data=rows)
        self._run.log(values, step=record["step"])

    def close(self) -> None:
        self._run.finish()
