"""training/metrics.py: metrics.jsonl and the same records as TensorBoard events (``--tensorboard``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import metrics, skip_without, tiny_config

from gpt2scratch.config import TrainConfig
from gpt2scratch.errors import UsageError
from gpt2scratch.training.metrics import MetricsLog

# Values a float32 holds exactly: TensorBoard stores scalars as float32.
RECORDS = [
    {"step": 1, "loss": 10.5, "lr": 0.25, "grad_norm": 2.5, "tokens": 64, "tokens_per_sec": 900.0, "elapsed": 0.1},
    {"step": 2, "loss": 9.25, "lr": 0.5, "grad_norm": 1.5, "tokens": 128, "tokens_per_sec": 950.0, "elapsed": 0.2,
     "val_loss": 9.75, "hellaswag_acc_norm": 0.25},
    {"step": 3, "loss": 8.0, "lr": 0.125, "grad_norm": 1.25, "tokens": 192, "tokens_per_sec": 1000.0, "elapsed": 0.3},
]  # fmt: skip


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the event files in ``folder``: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@skip_without("tensorboard")
def test_tensorboard_holds_each_metric_under_its_tag_at_its_step(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tensorboard")
    for record in RECORDS:
        log.write(record)
    log.close()
    assert scalars(tmp_path / "tensorboard") == {  # tokens and elapsed are not curves of their own
        "train/loss": [(1, 10.5), (2, 9.25), (3, 8.0)],
        "train/lr": [(1, 0.25), (2, 0.5), (3, 0.125)],
        "train/grad_norm": [(1, 2.5), (2, 1.5), (3, 1.25)],
        "train/tokens_per_sec": [(1, 900.0), (2, 950.0), (3, 1000.0)],
        "val/loss": [(2, 9.75)],
        "val/hellaswag_acc_norm": [(2, 0.25)],
    }
    assert metrics(tmp_path) == RECORDS  # one write feeds both


@skip_without("tensorboard")
def test_events_are_on_disk_at_each_step_before_the_log_is_closed(tmp_path: Path) -> None:
    """A run being watched shows every step at once, not after TensorBoard's two-minute flush."""
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tensorboard")
    try:
        log.write(RECORDS[0])
        assert scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 10.5)]
    finally:
        log.close()


@skip_without("tensorboard")
def test_a_resumed_run_hides_the_events_logged_after_its_snapshot(tmp_path: Path) -> None:
    """As metrics.jsonl is cut back to the snapshot's step, so TensorBoard hides the first run's later steps."""
    folder = tmp_path / "tensorboard"
    first = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=folder)
    for step in range(1, 6):
        first.write({"step": step, "loss": float(step)})
    first.close()
    resumed = MetricsLog(tmp_path / "metrics.jsonl", after_step=3, tensorboard=folder)
    for step in range(4, 7):
        resumed.write({"step": step, "loss": 10.0 * step})
    resumed.close()
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # appended beside the first run's file
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert scalars(folder)["train/loss"] == expected
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path)] == expected


def test_ranks_other_than_0_write_no_events(tmp_path: Path) -> None:
    log = MetricsLog(None, tensorboard=tmp_path / "tensorboard")
    log.write(RECORDS[0])
    log.close()
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_without_the_package_is_a_one_line_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec gives None
    with pytest.raises(UsageError) as err:
        TrainConfig(tensorboard=True)  # checked when the flags are parsed, before any tokenizing or training
    assert str(err.value) == '--tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"'
    assert TrainConfig().tensorboard is False  # without the flag nothing is asked of the package


@skip_without("tensorboard")
def test_a_run_with_tensorboard_writes_its_metrics_as_events(tmp_path: Path, text_file: Path, one_thread: None) -> None:
    from gpt2scratch.training.loop import train

    out = tmp_path / "out"
    flags = ["--input", str(text_file), "--out-dir", str(out), "--max-steps", "3", "--target-loss", "0"]
    flags += ["--snapshot-interval", "0", "--tensorboard", "--val-fraction", "0.3", "--eval-interval", "2"]
    train(tiny_config(*flags, "--eval-batches", "1"))
    records, events = metrics(out), scalars(out / "tensorboard")
    assert set(events) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "val/loss"}
    for key, tag in [("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                     ("tokens_per_sec", "train/tokens_per_sec"), ("val_loss", "val/loss")]:  # fmt: skip
        logged = [(r["step"], r[key]) for r in records if key in r]
        assert [step for step, _ in events[tag]] == [step for step, _ in logged], tag
        assert [value for _, value in events[tag]] == pytest.approx([value for _, value in logged], rel=1e-6), tag
    assert [step for step, _ in events["train/loss"]] == [1, 2, 3]
    assert [step for step, _ in events["val/loss"]] == [2]


def test_a_resumed_log_drops_what_is_not_text_and_keeps_its_steps(tmp_path: Path) -> None:
    """The sweep: resuming a run whose metrics.jsonl held bytes that are not UTF-8 was an internal error."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 9.0}\n\xff\xfe torn\n{"step": 2, "loss": 8.0}\n{"step": 3, "loss": 7.0}\n')
    log = MetricsLog(path, after_step=2)
    log.write({"step": 3, "loss": 6.5})
    log.close()
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path)] == [(1, 9.0), (2, 8.0), (3, 6.5)]


@skip_without("tensorboard")
def test_samples_are_text_and_mfu_a_scalar_in_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=tmp_path / "tensorboard")
    log.write({**RECORDS[0], "mfu": 0.375, "samples": ["Hello, I'm a language model, and\nmore", "Hello, I'm"]})
    log.write(RECORDS[1])
    log.close()
    assert scalars(tmp_path / "tensorboard")["train/mfu"] == [(1, 0.375)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    [tag] = [t for t in events.Tags()["tensors"] if t.startswith("samples")]
    [event] = events.Tensors(tag)
    text = event.tensor_proto.string_val[0].decode()
    assert (
        event.step == 1 and "    Hello, I'm a language model, and\n    more" in text and text.endswith("    Hello, I'm")
    )
    assert metrics(tmp_path)[0]["samples"][1] == "Hello, I'm"


def test_the_progress_line_shows_mfu_when_it_is_known() -> None:
    from gpt2scratch.training.metrics import progress_line

    assert "| MFU 37.5% |" in progress_line({**RECORDS[0], "mfu": 0.375}, 1.0, 1, 10)
    assert "MFU" not in progress_line(RECORDS[0], 1.0, 1, 10)
