"""Decoding with a static KV cache: every step has the same shapes, so a GPU never picks kernels per length, and
the one-token step can be captured once as a CUDA graph and replayed (launching ~200 kernels one by one costs more
than running them at 124M and batch 1).

The rows of a batch are decoded in step, all at the same position (``generate``, ``stream``: one prompt or equal
prompts), into keys and values allocated once for ``max_len`` positions. Attention always spans all of them, with a
mask of the positions filled so far, and the position itself lives on the device, so a step needs nothing from the
host: no per-step tensor built from Python numbers, no synchronisation. The server's batches, whose rows differ in
length, use engine.py's slots instead.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from gpt2scratch.config import GPTConfig
from gpt2scratch.device import attention_kernels
from gpt2scratch.errors import first_line

if TYPE_CHECKING:
    from gpt2scratch.model import GPT

log = logging.getLogger(__name__)


class StaticCache:
    """``model.Cache`` over fixed buffers: keys and values (L, B, nh, max_len, hs), the filled length on the device."""

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        assert 0 < max_len <= config.block_size
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = torch.zeros((), dtype=torch.long, device=device)  # positions filled, the same for every row
        self.keys = torch.arange(max_len, device=device)  # (S,): the position of each key
        self.max_len = max_len
        self.pos = self.keys[:1]
        self.mask = self.keys[None, :1] >= 0

    def positions(self, T: int) -> torch.Tensor:
        """(T,): right after the filled ones. The caller checks that they fit (``StaticDecoder``), so that nothing
        here depends on a number held by the host."""
        self.pos = self.length + torch.arange(T, device=self.keys.device)  # (T,)
        self.mask = self.keys[None, :] <= self.pos[:, None]  # (T, S): each new token sees the filled keys and itself
        return self.pos

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self.k[layer].index_copy_(2, self.pos, k)  # (B, nh, T, hs) into positions pos
        self.v[layer].index_copy_(2, self.pos, v)
        return self.k[layer], self.v[layer], self.mask[None, None]  # (B, nh, S, hs) twice, (1, 1, T, S)

    def advance(self, T: int) -> None:
        self.length += T

    def clear(self) -> None:
        self.length.zero_()


class StaticDecoder:
    """``prefill(idx)`` then ``step(token)``, each giving the logits of the next token of every row, (B, V), from a
    StaticCache of ``max_len`` positions. With ``graphs`` (CUDA) the one-token step is captured as a CUDA graph at
    the first step and replayed after (the token copied into the graph's input, the logits copied out of its
    output); if capturing fails, the step runs as it is, after one warning line."""

    def __init__(self, model: GPT, batch: int, max_len: int, graphs: bool = False):
        weight = model.transformer.wte.weight
        self.model = model
        self.cache = StaticCache(model.config, batch, max_len, weight.device, weight.dtype)
        self.filled = 0  # the host's count of the positions filled: what it fed, known without asking the device
        self.device = weight.device
        self.graphs = graphs
        self._graph: Any = None  # torch.cuda.CUDAGraph once captured
        self._token = torch.zeros(batch, dtype=torch.long, device=weight.device)  # the graph's input
        self._logits: torch.Tensor | None = None  # the graph's output

    @property
    def full(self) -> bool:
        return self.filled >= self.cache.max_len

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Start again from the prompts ``idx`` (B, T); the logits after their last tokens."""
        if idx.size(1) > self.cache.max_len:
            raise ValueError(f"{idx.size(1)} tokens do not fit in a KV cache of {self.cache.max_len} positions")
        self.cache.clear()
        with attention_kernels(self.device):
            hidden = self.model.transformer(idx, self.cache)  # (B, T, C)
        self.filled = idx.size(1)
        return self.model.lm_head(hidden[:, -1])  # (B, V)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append ``token`` (B,) to every row; the logits of the next token, (B, V). ValueError when full."""
        if self.full:
            raise ValueError(f"the KV cache of {self.cache.max_len} positions is full")
        with attention_kernels(self.device):
            if self.graphs and self._graph is None:
                self._capture()
            if self._graph is not None:
                self._token.copy_(token)
                with torch.cuda.device(self.device):  # the model's GPU, which need not be the current one
                    self._graph.replay()
                assert self._logits is not None
                logits = self._logits.clone()  # the next replay overwrites the output
            else:
                logits = self._one_token(token)
        self.filled += 1
        return logits

    def _one_token(self, token: torch.Tensor) -> torch.Tensor:
        hidden = self.model.transformer(token[:, None], self.cache)  # (B, 1, C)
        return self.model.lm_head(hidden[:, 0])  # (B, V)

    def _capture(self) -> None:
        """Record the one-token step into a CUDA graph. The warm-up runs (which choose kernels and allocate) write
        the position about to be written anyway, and the filled length is put back after them."""
        length = self.cache.length.clone()
        try:
            with torch.cuda.device(self.device):  # streams and graphs of the model's GPU, not the current one's
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._one_token(self._token)
                        self.cache.length.copy_(length)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # Recorded, not run: the cache stays as the warm-up left it. thread_local: the snapshot writer's
                # thread may synchronize with the GPU while this captures.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self._logits = self._one_token(self._token)
            self._graph = graph
        except Exception as err:  # an operation that cannot be captured, a driver that refuses
            self.cache.length.copy_(length)  # whatever the failure interrupted, the step starts where it was
            log.warning("capturing the decoding step as a CUDA graph failed (%s: %s); decoding without it",
                        type(err).__name__, first_line(err))  # fmt: skip
            self.graphs = False
