"""checkpoint/staging.py and the writer that stages on the host (what a GPU run uses): the file holds the state as
it was when it was submitted, whatever training does to the tensors afterwards; buffers are reused; tied tensors
stay one."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2scratch.checkpoint.format import CheckpointWriter
from gpt2scratch.checkpoint.staging import HostStaging


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "step": 1,
            "rng": {"cpu": torch.get_rng_state()}, "note": ["a", 2]}  # fmt: skip


def tied_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11, bias=False))
    model[1].weight = model[0].weight  # tied, as GPT-2's embedding and head
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    return model, optimizer


def test_staged_copies_are_taken_at_stage_time_and_reused() -> None:
    model, optimizer = tied_model()
    staging = HostStaging()
    staged, event = staging.stage(state_of(model, optimizer))
    assert event is None  # CPU tensors: copied at once
    weights = staged["model_state_dict"]
    assert weights["0.weight"] is weights["1.weight"]  # tied: one buffer
    assert staged["note"] == ["a", 2] and staged["step"] == 1
    before = weights["0.weight"].clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)  # training goes on
    assert torch.equal(weights["0.weight"], before)
    again, _ = staging.stage(state_of(model, optimizer))
    assert again["model_state_dict"]["0.weight"] is weights["0.weight"]  # the same buffer, refilled
    assert torch.equal(again["model_state_dict"]["0.weight"], model[0].weight)


def test_a_staging_writer_writes_the_state_as_it_was_submitted(tmp_path: Path) -> None:
    model, optimizer = tied_model()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    writer = CheckpointWriter(stage_on_host=True)
    writer.submit(state_of(model, optimizer), tmp_path / "snap.pt")  # in the background
    with torch.no_grad():
        model[0].weight.mul_(0)  # the next step, while the write may still be going
    writer.close()
    saved = torch.load(tmp_path / "snap.pt", weights_only=True)
    for name, value in expected.items():
        assert torch.equal(saved["model_state_dict"][name], value), name
    assert saved["model_state_dict"]["0.weight"].data_ptr() == saved["model_state_dict"]["1.weight"].data_ptr()
    assert saved["optimizer_state_dict"]["state"][0]["exp_avg"].shape == (11, 4)
    assert not writer.busy
