"""Decoding: the one loop that turns a model and prompts into tokens, for ``generate``, the samples after training,
lm-eval's ``generate_until`` (``stream``/``generate`` below) and the server (serve/batching.py, through ``Engine``).

Many independent sequences are decoded as one batch, with a KV cache of fixed slots, each row at its own position.
The server runs every sequence in flight as one batch. Sequences join (``Engine.prefill``) and leave
(``Engine.release``) between tokens, and ``Engine.step`` advances each of them by one token, so the rows of a batch
hold prompts and completions of different lengths. The cache is allocated once, (L, slots, nh, max_len, hs) for the
keys and for the values; the active rows are kept packed in slots 0..rows-1 (a row that leaves is replaced by the
last one), so a step reads the cache through a view, never a gather. The model sees the rows of one forward pass as
a ``SlotBatch`` (model.Cache): per-row positions, and an attention mask where rows differ in length.

Shape letters as in model.py; S is the number of key positions the longest row of a batch attends over.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from gpt2scratch.config import GPTConfig
from gpt2scratch.device import attention_kernels
from gpt2scratch.inference.sampling import sample
from gpt2scratch.inference.static_cache import StaticDecoder

if TYPE_CHECKING:
    from gpt2scratch.model import GPT


class SlotCache:
    """Keys and values for ``slots`` sequences of up to ``max_len`` tokens; ``lengths[s]`` are valid in slot s."""

    def __init__(self, config: GPTConfig, slots: int, max_len: int, device: torch.device, dtype: torch.dtype):
        assert 0 < max_len <= config.block_size
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, slots, config.n_head, max_len, hs)  # (L, slots, nh, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * slots

    def batch(self, first: int, new: list[int]) -> SlotBatch:
        """The cache of slots ``first`` .. ``first + len(new) - 1`` for one forward pass in which slot
        ``first + r`` receives ``new[r]`` tokens (the pass's T may be larger: the rest of a row is padding)."""
        return SlotBatch(self, first, new)

    def move(self, source: int, target: int) -> None:
        """Copy the sequence held in slot ``source`` into slot ``target``; ``source`` is then free."""
        n = self.lengths[source]
        self.k[:, target, :, :n] = self.k[:, source, :, :n]  # (L, nh, n, hs)
        self.v[:, target, :, :n] = self.v[:, source, :, :n]
        self.lengths[target], self.lengths[source] = n, 0


class SlotBatch:
    """``model.Cache`` over consecutive slots of a SlotCache, for one forward pass: row r's new tokens come right
    after the ``lengths`` its slot already holds. Rows that start at the same position attend with the plain causal
    mask (padding after a row's tokens is then harmless: no real token looks at a later position); otherwise each
    row sees its own keys only, through an explicit mask."""

    def __init__(self, cache: SlotCache, first: int, new: list[int]):
        self.cache, self.first, self.new = cache, first, new
        self.starts = cache.lengths[first : first + len(new)]
        self.mask: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None

    def positions(self, T: int) -> torch.Tensor:
        end = max(self.starts) + T
        if end > self.cache.max_len:
            raise ValueError(f"sequence of {end} tokens does not fit in a KV cache of {self.cache.max_len} positions")
        device = self.cache.k.device
        starts = torch.tensor(self.starts, dtype=torch.long, device=device)  # (B,)
        self.pos = starts[:, None] + torch.arange(T, dtype=torch.long, device=device)  # (B, T)
        if len(set(self.starts)) > 1:
            keys = torch.arange(end, device=device)  # (S,)
            self.mask = (keys[None, None, :] <= self.pos[:, :, None])[:, None]  # (B, 1, T, S): each row's past
        return self.pos

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        assert self.pos is not None, "positions() comes first in a forward pass"
        B, _, T, _ = k.size()
        rows = slice(self.first, self.first + B)
        keys, values = self.cache.k[layer, rows], self.cache.v[layer, rows]  # (B, nh, max_len, hs) views
        if self.mask is None:  # every row starts at the same position: one slice
            start = self.starts[0]
            keys[:, :, start : start + T] = k
            values[:, :, start : start + T] = v
        else:  # row r's token t goes to position pos[r, t]
            index = torch.arange(B, device=k.device)[:, None]  # (B, 1), broadcast against pos (B, T)
            keys[index, :, self.pos] = k.transpose(1, 2)  # the indexed view is (B, T, nh, hs)
            values[index, :, self.pos] = v.transpose(1, 2)
        end = max(self.starts) + T
        return keys[:, :, :end], values[:, :, :end], self.mask  # (B, nh, S, hs), (B, nh, S, hs), (B, 1, T, S)

    def advance(self, T: int) -> None:
        for r, n in enumerate(self.new):  # padding is not held: the next token overwrites it
            self.cache.lengths[self.first + r] += n


class Engine:
    """Batched decoding with ``model`` over ``slots`` rows, in the model's device and dtype.

    Rows 0..``rows``-1 are active. ``prefill`` starts new rows after them, ``step`` feeds one token to every
    active row, ``release`` frees a row (the last one moves into its place). Logits come back in the model's dtype.
    """

    def __init__(self, model: GPT, slots: int, max_len: int | None = None):
        weight = model.transformer.wte.weight  # the activations' dtype, also where the head is int8 (ops/quantize.py)
        self.model = model
        self.cache = SlotCache(model.config, slots, max_len or model.config.block_size, weight.device, weight.dtype)
        self.slots = slots
        self.rows = 0

    @property
    def free(self) -> int:
        return self.slots - self.rows

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Start one row per prompt in the next free slots; the logits of each prompt's last token, (m, V).

        Raises ValueError (and starts nothing) if a prompt does not fit in a slot."""
        m = len(prompts)
        assert 0 < m <= self.free and all(prompts)
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        device = self.cache.k.device
        idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts], dtype=torch.long, device=device)  # (m, T)
        first = self.rows
        self.cache.lengths[first : first + m] = [0] * m
        with attention_kernels(device):
            hidden = self.model.transformer(idx, self.cache.batch(first, lengths))  # (m, T, C)
        self.rows += m
        last = torch.tensor(lengths, device=device) - 1  # (m,): where each prompt ends in its padded row
        return self.model.lm_head(hidden[torch.arange(m, device=device), last])  # (m, V)

    @torch.no_grad()
    def step(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Append ``tokens[r]`` to row r, for every active row; the logits of the next token of each, (rows, V).

        Raises ValueError (and changes nothing) if a row is full."""
        assert len(tokens) == self.rows > 0
        idx = torch.as_tensor(tokens, dtype=torch.long, device=self.cache.k.device)[:, None]  # (B, 1)
        with attention_kernels(idx.device):
            hidden = self.model.transformer(idx, self.cache.batch(0, [1] * self.rows))  # (B, 1, C)
        return self.model.lm_head(hidden[:, 0])  # (B, V)

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """The logits after every token of one sequence, (T, V), computed outside the slots (for the
        log-probabilities of an echoed prompt)."""
        idx = torch.tensor([ids], dtype=torch.long, device=self.cache.k.device)  # (1, T)
        return self.model.lm_head(self.model.transformer(idx))[0]  # (T, V)

    def release(self, row: int) -> int:
        """Free ``row``; the last row moves into its slot, so that the active rows stay packed. Returns the index
        the moved row had (``row`` itself when it was the last)."""
        assert 0 <= row < self.rows
        last = self.rows - 1
        if row != last:
            self.cache.move(last, row)
        self.cache.lengths[last] = 0
        self.rows -= 1
        return last

    def clear(self) -> None:
        """Free every row."""
        self.cache.lengths = [0] * self.slots
        self.rows = 0

    @property
    def full(self) -> bool:
        """Whether some active row holds ``max_len`` tokens: one more would not fit."""
        return max(self.cache.lengths[: self.rows], default=0) >= self.cache.max_len


@torch.no_grad()
def stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    static: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of each row, (B,), ``max_new_tokens`` times, continuing the prompts ``idx`` (B, T).

    Sampling as ``sampling.sample``: logits / temperature (0 means greedy), then the ``top_k`` most likely tokens
    and/or the smallest set whose probability reaches ``top_p``. With ``use_cache`` each step feeds one token per
    row through a KV cache: ``static`` (default: on CUDA) a fixed-size one with CUDA graphs (static_cache.py),
    else an ``Engine``'s slots; past ``block_size`` the context slides (the cache is refilled with the last
    half-block). Without, every step is a full forward pass over the context (the reference the caches are tested
    against).
    """
    assert idx.dim() == 2
    block = model.config.block_size
    static = idx.device.type == "cuda" if static is None else static
    context = idx  # (B, T + tokens so far): what a refill of the cache starts from
    engine: Engine | StaticDecoder | None = None
    token = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(context[:, -block:], last_only=True)[0][:, -1]  # (B, V)
        elif engine is None or engine.full:
            # (Re)fill the cache with the prompt, or with the last half-block once the context is full.
            keep = context[:, -block:] if engine is None else context[:, -(block // 2) :]
            if engine is None:
                max_len = min(block, keep.size(1) + max_new_tokens)
                cuda = idx.device.type == "cuda"
                batch = idx.size(0)
                engine = StaticDecoder(model, batch, max_len, graphs=cuda) if static else Engine(model, batch, max_len)
            if isinstance(engine, StaticDecoder):
                logits = engine.prefill(keep)
            else:
                engine.clear()
                logits = engine.prefill(keep.tolist())
        else:
            assert token is not None
            logits = engine.step(token)
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        context = torch.cat([context, token[:, None]], dim=1)  # (B, T+1)
        yield token


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_token: int | None = None,
    use_cache: bool = True,
    static: bool | None = None,
) -> torch.Tensor:
    """The prompts ``idx`` (B, T) followed by up to ``max_new_tokens`` sampled tokens: (B, T + n).

    With ``eos_token``, a row that produced it is padded with it from then on, and generation stops early once
    every row has. See ``stream`` for the other arguments.
    """
    out = [idx]
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for token in stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache, static):
        if eos_token is not None:
            token = token.masked_fill(done, eos_token)
            done |= token == eos_token
        out.append(token[:, None])
        if eos_token is not None and bool(done.all()):
            break
    return torch.cat(out, dim=1)
