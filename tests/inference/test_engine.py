"""Decoding: the KV cache (SlotCache) and generate/stream against the full forward (greedy within and past the block,
sampling, end of text), and the batched engine: rows of different lengths in one batch compute what each row computes
alone."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, random_ids

from gpt2scratch.config import GPTConfig
from gpt2scratch.inference.engine import Engine, SlotCache, stream
from gpt2scratch.model import GPT

# The engine's model; make_model(CONFIG, 0.1, dtype) spreads its logits: no near-ties between tokens.
CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48)

pytestmark = pytest.mark.usefixtures("one_thread")


def prompts(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def last_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    """The next-token logits after ``ids``, from one plain forward pass (no cache)."""
    return model(torch.tensor([ids]))[0][0, -1]  # (V,)


def test_prefill_of_rows_of_different_lengths_equals_each_row_alone() -> None:
    model = make_model(CONFIG, 0.1, torch.float64)
    rows = prompts(5, 17, 1, 9)
    batched = Engine(model, slots=4).prefill(rows)  # (4, V)
    for r, ids in enumerate(rows):
        alone = Engine(model, slots=1).prefill([ids])[0]
        torch.testing.assert_close(batched[r], alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(batched[r], last_logits(model, ids), rtol=0, atol=1e-12)


def test_rows_join_and_leave_between_tokens() -> None:
    """Continuous batching: rows start while others are mid-way, leave when done (the last row moving into the freed
    slot), and every row's greedy tokens and logits are those of a plain forward over its own tokens."""
    model = make_model(CONFIG, 0.1, torch.float64)
    engine = Engine(model, slots=3)
    waiting = prompts(4, 11, 2, 7, 1)
    budget = [6, 3, 9, 5, 4]  # new tokens per sequence
    running: list[list[int]] = []  # the tokens of the sequence in each engine row
    owner: list[int] = []  # which sequence each row holds
    finished: dict[int, list[int]] = {}
    next_id, logits = 0, torch.empty(0)
    while next_id < len(waiting) or running:
        start = engine.rows
        if engine.free and next_id < len(waiting):  # one or two newcomers per step, prefilled together
            joining = list(range(next_id, min(next_id + engine.free, next_id + 2, len(waiting))))
            new_logits = engine.prefill([waiting[i] for i in joining])
            running += [list(waiting[i]) for i in joining]
            owner += joining
            next_id += len(joining)
            logits = torch.cat([logits[:start], new_logits])
        for row, tokens in enumerate(running):
            torch.testing.assert_close(logits[row], last_logits(model, tokens), rtol=0, atol=1e-12)
            tokens.append(int(logits[row].argmax()))
        for row in range(len(running) - 1, -1, -1):  # retire, highest row first, as the batcher does
            if len(running[row]) - len(waiting[owner[row]]) == budget[owner[row]]:
                finished[owner[row]] = running[row]
                last = engine.release(row)
                running[row], owner[row] = running[last], owner[last]
                running.pop(), owner.pop()
        if running:
            logits = engine.step([tokens[-1] for tokens in running])
    for i, ids in enumerate(waiting):
        alone = model.generate(torch.tensor([ids]), budget[i], temperature=0)[0].tolist()
        assert finished[i] == alone
    assert engine.rows == 0 and engine.free == 3


def test_bf16_step_over_rows_of_different_lengths() -> None:
    """bf16 on a CPU takes the two-product attention with a mask: each row stays within bf16 rounding of its own
    full forward pass."""
    model = make_model(CONFIG, 0.1, torch.bfloat16)
    rows = prompts(3, 20, 9)
    engine = Engine(model, slots=3)
    engine.prefill(rows)
    nxt = [5, 6, 7]
    logits = engine.step(nxt).float()  # (3, V)
    for r, ids in enumerate(rows):
        full = last_logits(model, [*ids, nxt[r]]).float()
        assert (logits[r] - full).abs().max() <= 0.05 * full.abs().max()


def test_a_full_row_is_refused_and_nothing_changes() -> None:
    model = make_model(CONFIG, 0.1, torch.float64)
    engine = Engine(model, slots=2, max_len=10)
    with pytest.raises(ValueError, match="does not fit in a KV cache of 10 positions"):
        engine.prefill([[1] * 11])
    assert engine.rows == 0
    engine.prefill([[1] * 9, [2] * 3])
    engine.step([3, 4])  # the first row holds 10 tokens now
    with pytest.raises(ValueError, match="11 tokens"):
        engine.step([3, 4])
    assert engine.rows == 2 and engine.cache.lengths[:2] == [10, 4]


# --- the KV cache and generate: cached decoding computes what the full forward computes ----------------------------

# Small shapes with a small vocabulary (logits far apart, tests in milliseconds); the last one without biases.
CONFIGS = [
    GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=97),
    GPTConfig(n_layer=3, n_head=4, n_embd=48, block_size=24, vocab_size=101),
    GPTConfig(n_layer=1, n_head=3, n_embd=24, block_size=16, vocab_size=89, bias=False),
]


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model(CONFIGS[0], 0.2)


def cached(model: GPT, cache: SlotCache, idx: torch.Tensor) -> torch.Tensor:
    """The logits (B, T, V) of a forward pass of ``idx`` (B, T) after what ``cache`` holds (every row alike)."""
    return model(idx, cache=cache.batch(0, [idx.size(1)] * idx.size(0)))[0]


def test_cache_overflow_is_a_value_error(model: GPT) -> None:
    cache = SlotCache(model.config, 1, 32, torch.device("cpu"), torch.float32)
    cached(model, cache, random_ids(model.config.vocab_size, 1, 30))
    with pytest.raises(ValueError, match=r"sequence of 33 tokens does not fit in a KV cache of 32 positions"):
        cached(model, cache, random_ids(model.config.vocab_size, 1, 3))
    assert cache.lengths == [30]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"L{c.n_layer}H{c.n_head}C{c.n_embd}")
def test_cached_forward_in_chunks_equals_full_forward(config: GPTConfig) -> None:
    """Prompt, then several tokens at once (the masked path), then one at a time: the same logits as one pass."""
    model = make_model(config, 0.2)
    idx = random_ids(config.vocab_size, 2, config.block_size)
    full, _ = model(idx)
    cache = SlotCache(config, 2, config.block_size, torch.device("cpu"), torch.float32)
    pieces, start = [], 0
    for size in (5, 4, 1, 1, 3, config.block_size - 14):
        pieces.append(cached(model, cache, idx[:, start : start + size]))
        start += size
    assert cache.lengths == [config.block_size] * 2
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_bf16_cached_decoding_follows_the_full_forward() -> None:
    """In bf16, each cached step's logits stay within bf16 rounding of a full forward over the same tokens."""
    model = make_model(CONFIGS[0], 0.2).to(torch.bfloat16)
    idx = random_ids(CONFIGS[0].vocab_size, 2, 24)
    full, _ = model(idx)
    cache = SlotCache(CONFIGS[0], 2, 24, torch.device("cpu"), torch.bfloat16)
    cached(model, cache, idx[:, :8])
    steps = [cached(model, cache, idx[:, t : t + 1]) for t in range(8, 24)]
    error = (torch.cat(steps, dim=1).float() - full[:, 8:].float()).abs().max()
    assert error <= 0.05 * full.float().abs().max()


# --- KV-cache generation -----------------------------------------------------------------------------------------

# Two logits closer than this are a tie at this precision: rounding may decide either way between two equally valid
# computations (cached or not), so greedy choices may differ there and only there.
TIE = {torch.float32: 1e-4, torch.float64: 1e-10}


def assert_same_greedy(model: GPT, a: torch.Tensor, b: torch.Tensor, prompt_len: int) -> None:
    """Token for token equal, except that the first difference may be at a near-tie of the two chosen logits
    (after which the sequences legitimately go their own ways). In float64 a near-tie does not happen."""
    assert a.shape == b.shape
    differ = (a != b).nonzero()
    if len(differ) == 0:
        return
    row, t = (int(i) for i in differ[differ[:, 1].argmin()])
    assert t >= prompt_len
    logits, _ = model(a[row : row + 1, max(0, t - model.config.block_size) : t])
    gap = (logits[0, -1, a[row, t]] - logits[0, -1, b[row, t]]).abs().item()
    assert gap < TIE[logits.dtype], f"row {row} differs at position {t}, where the logits differ by {gap}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"L{c.n_layer}H{c.n_head}C{c.n_embd}")
@pytest.mark.parametrize("prompt_len", [1, 7])
def test_cached_greedy_generation_equals_uncached_within_block(
    config: GPTConfig, prompt_len: int, dtype: torch.dtype
) -> None:
    model = make_model(config, 0.2).to(dtype)
    idx = random_ids(config.vocab_size, 3, prompt_len)
    new = config.block_size - prompt_len  # fill the block exactly
    with_cache = model.generate(idx, new, temperature=0, use_cache=True)
    without = model.generate(idx, new, temperature=0, use_cache=False)
    assert with_cache.shape == (3, config.block_size)
    assert torch.equal(with_cache[:, :prompt_len], idx)
    assert_same_greedy(model, with_cache, without, prompt_len)
    if dtype == torch.float64:
        assert torch.equal(with_cache, without)
    assert len({tuple(row) for row in with_cache[:, prompt_len:].tolist()}) > 1  # rows really differ


def sliding_greedy_reference(model: GPT, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache over the window ``stream`` documents: the whole context while it fits,
    then, once it would exceed the block, only the last half-block, growing again until the next slide."""
    block = model.config.block_size
    context, start = idx, max(0, idx.size(1) - block)
    for _ in range(max_new_tokens):
        if context.size(1) - start > block:
            start = context.size(1) - block // 2
        logits, _ = model(context[:, start:])
        context = torch.cat([context, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return context


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"L{c.n_layer}H{c.n_head}C{c.n_embd}")
def test_cached_greedy_generation_past_block_size(config: GPTConfig) -> None:
    model = make_model(config, 0.2).double()  # exact comparisons: no near-ties at this precision
    idx = random_ids(config.vocab_size, 2, 5)
    new = 3 * config.block_size  # the context slides several times
    with_cache = model.generate(idx, new, temperature=0, use_cache=True)
    without = model.generate(idx, new, temperature=0, use_cache=False)
    assert with_cache.shape == without.shape == (2, 5 + new)
    # Within the block both see the same context, so they agree token for token.
    assert torch.equal(with_cache[:, : config.block_size], without[:, : config.block_size])
    # Past it, the cache keeps the documented sliding window, and matches a cache-free decoder of that window.
    assert torch.equal(with_cache, sliding_greedy_reference(model, idx, new))


def test_prompt_as_long_as_the_block() -> None:
    model = make_model(CONFIGS[0], 0.2).double()
    idx = random_ids(model.config.vocab_size, 2, model.config.block_size)
    out = model.generate(idx, 10, temperature=0)
    assert out.shape == (2, model.config.block_size + 10)
    assert torch.equal(out, sliding_greedy_reference(model, idx, 10))


# --- sampling ----------------------------------------------------------------------------------------------------


def test_same_seed_same_samples_other_seed_other_samples(model: GPT) -> None:
    idx = random_ids(model.config.vocab_size, 4, 3)

    def run(seed: int) -> torch.Tensor:
        return model.generate(idx, 20, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(seed))

    first = run(1234)
    assert torch.equal(first, run(1234))
    assert not torch.equal(first, run(1235))
    # Without an explicit generator, the global seed decides.
    torch.manual_seed(7)
    a = model.generate(idx, 20, top_k=None)
    torch.manual_seed(7)
    assert torch.equal(a, model.generate(idx, 20, top_k=None))


def test_stream_yields_the_tokens_of_generate(model: GPT) -> None:
    idx = random_ids(model.config.vocab_size, 3, 4)
    generated = model.generate(idx, 40, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(3))
    tokens = list(stream(model, idx, 40, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(3)))
    assert len(tokens) == 40 and all(t.shape == (3,) for t in tokens)
    assert torch.equal(torch.stack(tokens, dim=1), generated[:, 4:])


def test_generate_with_top_k_samples_within_the_model_top_k(model: GPT) -> None:
    k, prompt, new = 3, 4, 6
    idx = random_ids(model.config.vocab_size, 1, prompt).expand(200, -1)
    out = model.generate(idx, new, temperature=1.0, top_k=k, generator=torch.Generator().manual_seed(0))
    for t in range(prompt, prompt + new):
        logits, _ = model(out[:, :t], last_only=True)
        kth = logits[:, -1].topk(k).values[:, -1]  # (B,)
        chosen = logits[:, -1].gather(1, out[:, t : t + 1]).squeeze(1)  # (B,)
        assert bool((chosen >= kth - 1e-5).all()), f"a token outside the top {k} at position {t}"
    assert len(set(out[:, prompt].tolist())) == k  # the first new token does use all k choices


def test_generate_with_top_p_samples_within_the_nucleus(model: GPT) -> None:
    top_p, prompt = 0.6, 4
    idx = random_ids(model.config.vocab_size, 1, prompt).expand(300, -1)
    out = model.generate(idx, 1, top_k=None, top_p=top_p, generator=torch.Generator().manual_seed(0))
    logits, _ = model(idx[:1])
    probs, order = logits[0, -1].softmax(-1).sort(descending=True)
    size = int((probs.cumsum(0) < top_p).sum()) + 1  # the smallest prefix reaching top_p
    assert set(out[:, -1].tolist()) <= set(order[:size].tolist())


# --- end of text -------------------------------------------------------------------------------------------------


def test_eos_token_pads_finished_rows_and_stops_when_all_are_done(model: GPT) -> None:
    idx = random_ids(model.config.vocab_size, 3, 2)
    plain = model.generate(idx, 20, temperature=0)
    new = plain[:, 2:]
    eos = int(new[0, 3])  # row 0 produces it at step 3 (or earlier)
    out = model.generate(idx, 20, temperature=0, eos_token=eos)
    firsts = []
    for row in range(3):
        hits = (new[row] == eos).nonzero()
        first = int(hits[0]) if len(hits) else None
        firsts.append(first)
        got = out[row, 2:]
        if first is None:
            assert torch.equal(got, new[row, : got.size(0)])
        else:
            assert torch.equal(got[: first + 1], new[row, : first + 1])
            assert bool((got[first:] == eos).all())
    if all(f is not None for f in firsts):
        assert out.size(1) == 2 + max(firsts) + 1  # stopped as soon as every row had ended
    else:
        assert out.size(1) == 22


def test_eos_stops_early() -> None:
    model = make_model(CONFIGS[0], 0.2)
    idx = random_ids(model.config.vocab_size, 1, 3)
    plain = model.generate(idx, 15, temperature=0)
    eos = int(plain[0, 3 + 4])
    first = int((plain[0, 3:] == eos).nonzero()[0])
    out = model.generate(idx, 15, temperature=0, eos_token=eos)
    assert torch.equal(out, plain[:, : 3 + first + 1])
