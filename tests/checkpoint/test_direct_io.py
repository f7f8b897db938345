"""The aligned in-memory file of background snapshots: what it holds loads exactly as ``torch.save`` wrote it."""

from __future__ import annotations

from pathlib import Path
from typing import IO, cast

import pytest
import torch

from gpt2scratch.checkpoint.direct_io import AlignedBuffer
from gpt2scratch.checkpoint.format import FORMAT_VERSION, read_checkpoint


@pytest.mark.parametrize("capacity", [1, 1 << 26])  # a buffer far too small grows; a large one is reused
def test_buffer_written_with_o_direct_loads_like_torch_save(tmp_path: Path, capacity: int) -> None:
    weights = torch.full((1_000_003,), 1.5)  # not a multiple of the 4096-byte block: the padding must go
    state = {"format_version": FORMAT_VERSION, "model_state_dict": {"w": weights}, "config": {}}
    buffer = AlignedBuffer()
    for round_ in range(2):
        buffer.reset(capacity)
        torch.save(state, cast("IO[bytes]", buffer))
        path = tmp_path / f"snapshot_{round_}.pt"
        buffer.write_to(path)
        assert path.stat().st_size == buffer.size
        loaded = read_checkpoint(path)
        assert torch.equal(loaded["model_state_dict"]["w"], weights)
        weights.add_(1.0)
    buffer.release()
