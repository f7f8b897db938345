"""Reused host buffers that a checkpoint's tensors are copied into, so that it can be serialized and written on
another thread while training goes on.

For CUDA tensors the buffers are pinned and the copies asynchronous (``non_blocking``), queued on the training
stream behind the step that produced the values and ahead of the step that changes them; one CUDA event says when
they are done, so the training thread only queues them. CPU tensors are copied at once. The buffers are allocated
by the first snapshot and reused by every later one; tensors that share memory (GPT-2's tied embedding and head)
share one buffer, so the file holds them once.
"""

from __future__ import annotations

from typing import Any

import torch


class HostStaging:
    """``stage(state)``: ``state`` with every tensor replaced by its copy in a reused host buffer, and the CUDA event
    to wait on before reading the copies (None when none was asynchronous). A buffer is reused by the next
    ``stage``: read the copies (serialize them) before staging again."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def stage(self, state: Any) -> tuple[Any, torch.cuda.Event | None]:
        shared: dict[tuple, torch.Tensor] = {}
        gpus: set[torch.device] = set()

        def copy(value: Any, where: str) -> Any:
            if isinstance(value, torch.Tensor):
                key = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
                if key not in shared:
                    shared[key] = self._copy(value.detach(), where)
                    if value.is_cuda:
                        gpus.add(value.device)
                return shared[key]
            if isinstance(value, dict):
                return {k: copy(v, f"{where}/{k}") for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                copied = [copy(v, f"{where}/{i}") for i, v in enumerate(value)]
                return copied if isinstance(value, list) else tuple(copied)
            return value

        staged = copy(state, "")
        event = None
        if gpus:
            assert len(gpus) == 1, f"a checkpoint's tensors on several GPUs: {sorted(map(str, gpus))}"
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(gpus.pop()))  # on the stream of the copies, after them
        return staged, event

    def _copy(self, tensor: torch.Tensor, where: str) -> torch.Tensor:
        buffer = self._buffers.get(where)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self._buffers[where] = buffer
        buffer.copy_(tensor, non_blocking=tensor.is_cuda)
        return buffer

    def release(self) -> None:
        self._buffers.clear()
