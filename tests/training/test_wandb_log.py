"""training/wandb_log.py: ``train --wandb`` in W&B's offline mode (nothing leaves the machine). The run directory W&B
writes holds the run's scalars at every step, the samples as a table, and the settings as its config; a resumed run
continues the same W&B run. Read back with a reader of W&B's record log written here (its Python reader left the
package when W&B moved to its Go core)."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SAMPLE_TEXT, metrics, skip_without, tiny_config

from gpt2scratch.training.loop import train
from gpt2scratch.training.wandb_log import ID_FILE

pytestmark = skip_without("wandb")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    caplog.set_level(logging.INFO, logger="gpt2scratch")
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def wandb_records(run_file: Path) -> Iterator[Any]:
    """The protobuf records of a ``run-*.wandb`` file: W&B's log format, LevelDB's (a 7-byte file header, then
    blocks of 32 KiB of chunks, each a 7-byte header of checksum, length and kind: whole, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pending = run_file.read_bytes(), 32768, b""
    assert data[:4] == b":W&B"
    position = 7
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            position += room
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every step W&B recorded (key -> value) and the run's config, from the run directories under ``out``."""
    steps, config = [], {}
    for run_file in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                steps.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                              for item in record.history.item})  # fmt: skip
            elif kind == "run":
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return steps, config


def test_an_offline_run_holds_the_scalars_the_samples_and_the_settings(tmp_path: Path, offline: None) -> None:
    (tmp_path / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    cfg = tiny_config("--input", str(tmp_path / "input.txt"), "--out-dir", str(tmp_path / "out"), "--max-steps", "4",
                      "--target-loss", "0", "--wandb", "--wandb-run-name", "tiny", "--sample-interval", "2",
                      "--snapshot-interval", "2")  # fmt: skip
    train(cfg)
    steps, config = history(tmp_path / "out")
    logged = {int(step["_step"]): step for step in steps}
    records = metrics(tmp_path / "out")
    assert sorted(logged) == [1, 2, 3, 4]
    for record in records:
        step = logged[record["step"]]
        assert step["train/loss"] == pytest.approx(record["loss"]) and step["train/lr"] == record["lr"]
        assert step["train/grad_norm"] == pytest.approx(record["grad_norm"])
    assert logged[2]["samples/_type"] == "table-file" and "samples/_type" not in logged[1]
    assert logged[2]["samples/nrows"] == 5 and logged[2]["samples/ncols"] == 2
    [table] = (tmp_path / "out" / "wandb").glob(f"offline-run-*/files/{logged[2]['samples/path']}")
    rows = json.loads(table.read_text())["data"]
    assert rows == [[2, text] for text in records[1]["samples"]]  # the step's samples, as metrics.jsonl has them
    assert config["max_steps"] == 4 and config["wandb_run_name"] == "tiny"
    run_id = (tmp_path / "out" / ID_FILE).read_text().strip()
    assert list((tmp_path / "out" / "wandb").glob(f"offline-run-*-{run_id}"))


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path: Path, offline: None) -> None:
    (tmp_path / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    flags = ["--input", str(tmp_path / "input.txt"), "--out-dir", str(tmp_path / "out"), "--target-loss", "0",
             "--wandb", "--snapshot-interval", "2"]  # fmt: skip
    train(tiny_config(*flags, "--max-steps", "2"))
    run_id = (tmp_path / "out" / ID_FILE).read_text().strip()
    train(tiny_config(*flags, "--max-steps", "4", "--resume", "auto"))
    assert (tmp_path / "out" / ID_FILE).read_text().strip() == run_id
    steps, _ = history(tmp_path / "out")
    assert sorted(int(step["_step"]) for step in steps) == [1, 2, 3, 4]
    folders = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(run_id in path.name for path in folders)  # W&B numbers a resumed run's folder


def test_wandb_without_the_package_is_a_one_line_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from gpt2scratch.config import TrainConfig
    from gpt2scratch.errors import UsageError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UsageError, match=r'--wandb needs the wandb package: pip install -e "\.\[wandb\]"'):
        TrainConfig(wandb=True)


def test_no_api_key_online_is_one_line(tmp_path: Path) -> None:
    """In a process of its own: W&B keeps its settings for the life of a process."""
    import os

    from conftest import TINY_TRAIN_FLAGS, assert_one_line_error, run_cli

    (tmp_path / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    home = tmp_path / "home"  # no ~/.netrc: not logged in to W&B
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB")}
    env |= {"HOME": str(home), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    result = run_cli("train", *TINY_TRAIN_FLAGS, "--max-steps", "1", "--wandb", cwd=tmp_path, env=env)
    assert_one_line_error(result.returncode, result.stderr, 1, "--wandb could not start a W&B run (",
                          "WANDB_MODE=offline")  # fmt: skip
