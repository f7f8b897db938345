"""inference/static_cache.py: decoding through a fixed-size KV cache (what CUDA uses: the same shapes at every step,
the position on the device) gives the tokens the slot engine gives, greedy and sampled, within the block and past
it, and refuses what does not fit."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, random_ids

from gpt2scratch.config import GPTConfig
from gpt2scratch.inference.engine import stream
from gpt2scratch.inference.static_cache import StaticCache, StaticDecoder

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48)


@pytest.mark.parametrize("prompt_len", [1, 7, 48])
@pytest.mark.parametrize("batch", [1, 3])
def test_static_greedy_tokens_are_the_slot_engine_s_in_float64(prompt_len: int, batch: int) -> None:
    model = make_model(CONFIG, 0.2, torch.float64)
    idx = random_ids(CONFIG.vocab_size, batch, prompt_len)
    new = 3 * CONFIG.block_size  # past the block: the context slides several times
    static = model.generate(idx, new, temperature=0, static=True)
    slots = model.generate(idx, new, temperature=0, static=False)
    assert static.shape == (batch, prompt_len + new)
    assert torch.equal(static, slots)


def test_static_sampled_tokens_are_the_slot_engine_s_in_float64() -> None:
    model = make_model(CONFIG, 0.2, torch.float64)
    idx = random_ids(CONFIG.vocab_size, 4, 5)
    runs = [
        model.generate(idx, 60, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7), static=static)
        for static in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


def test_the_static_cache_s_shapes_never_change() -> None:
    model = make_model(CONFIG, 0.2, torch.float64)
    decoder = StaticDecoder(model, batch=2, max_len=20)
    decoder.prefill(random_ids(CONFIG.vocab_size, 2, 4))
    shapes = set()
    for _ in range(10):
        decoder.step(torch.tensor([1, 2]))
        cache = decoder.cache
        shapes.add((tuple(cache.k[0].shape), tuple(cache.mask.shape)))
    assert shapes == {((2, 2, 20, 16), (1, 20))}  # keys over all 20 positions; a mask of one query by 20 keys
    assert decoder.filled == 14 and int(decoder.cache.length) == 14


def test_what_does_not_fit_is_a_value_error() -> None:
    model = make_model(CONFIG, 0.2, torch.float64)
    decoder = StaticDecoder(model, batch=1, max_len=6)
    with pytest.raises(ValueError, match="7 tokens do not fit in a KV cache of 6 positions"):
        decoder.prefill(random_ids(CONFIG.vocab_size, 1, 7))
    decoder.prefill(random_ids(CONFIG.vocab_size, 1, 5))
    decoder.step(torch.tensor([3]))
    with pytest.raises(ValueError, match="the KV cache of 6 positions is full"):
        decoder.step(torch.tensor([3]))
    assert isinstance(decoder.cache, StaticCache)


def test_stream_picks_the_slots_on_the_cpu_by_default() -> None:
    model = make_model(CONFIG, 0.2, torch.float64)
    idx = random_ids(CONFIG.vocab_size, 1, 3)
    default = torch.stack(list(stream(model, idx, 20, temperature=0)), dim=1)
    slots = torch.stack(list(stream(model, idx, 20, temperature=0, static=False)), dim=1)
    assert torch.equal(default, slots)
