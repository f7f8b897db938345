"""The batched decoding engine: rows of different lengths in one batch compute what each row computes alone."""

from __future__ import annotations

import pytest
import torch

from gpt2scratch.config import GPTConfig
from gpt2scratch.inference.engine import Engine
from gpt2scratch.model import GPT

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(dtype: torch.dtype) -> GPT:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)  # spread the logits: no near-ties between tokens
    return model.to(dtype).eval()


def prompts(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def last_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    """The next-token logits after ``ids``, from one plain forward pass (no cache)."""
    return model(torch.tensor([ids]))[0][0, -1]  # (V,)


def test_prefill_of_rows_of_different_lengths_equals_each_row_alone() -> None:
    model = make_model(torch.float64)
    rows = prompts(5, 17, 1, 9)
    batched = Engine(model, slots=4).prefill(rows)  # (4, V)
    for r, ids in enumerate(rows):
        alone = Engine(model, slots=1).prefill([ids])[0]
        torch.testing.assert_close(batched[r], alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(batched[r], last_logits(model, ids), rtol=0, atol=1e-12)


def test_rows_join_and_leave_between_tokens() -> None:
    """Continuous batching: rows start while others are mid-way, leave when done (the last row moving into the freed
    slot), and every row's greedy tokens and logits are those of a plain forward over its own tokens."""
    model = make_model(torch.float64)
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
    model = make_model(torch.bfloat16)
    rows = prompts(3, 20, 9)
    engine = Engine(model, slots=3)
    engine.prefill(rows)
    nxt = [5, 6, 7]
    logits = engine.step(nxt).float()  # (3, V)
    for r, ids in enumerate(rows):
        full = last_logits(model, [*ids, nxt[r]]).float()
        assert (logits[r] - full).abs().max() <= 0.05 * full.abs().max()


def test_a_full_row_is_refused_and_nothing_changes() -> None:
    model = make_model(torch.float64)
    engine = Engine(model, slots=2, max_len=10)
    with pytest.raises(ValueError, match="does not fit in a KV cache of 10 positions"):
        engine.prefill([[1] * 11])
    assert engine.rows == 0
    engine.prefill([[1] * 9, [2] * 3])
    engine.step([3, 4])  # the first row holds 10 tokens now
    with pytest.raises(ValueError, match="11 tokens"):
        engine.step([3, 4])
    assert engine.rows == 2 and engine.cache.lengths[:2] == [10, 4]
