"""Picking tokens from logits (inference/sampling.py): greedy, top-k, top-p, and the chunked top-k equal to
torch.topk."""

from __future__ import annotations

import pytest
import torch

from gpt2scratch.inference.sampling import CHUNK, sample, top_candidates


def test_temperature_zero_is_argmax() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, temperature=0, top_k=3, top_p=0.5), logits.argmax(-1))


LOGITS = torch.randn(1, 40, generator=torch.Generator().manual_seed(11)) * 2  # one fixed distribution over 40 tokens
DRAWS = 20_000


def draw(logits: torch.Tensor, **kwargs) -> torch.Tensor:
    """DRAWS samples from one row of logits, as one batch."""
    return sample(logits.expand(DRAWS, -1), generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("k", [1, 2, 5, 39])
def test_top_k_keeps_only_the_k_most_likely(k: int) -> None:
    drawn = draw(LOGITS, top_k=k)
    allowed = set(LOGITS[0].topk(k).indices.tolist())
    seen = set(drawn.tolist())
    assert seen <= allowed
    assert seen == allowed or k == 39  # with 20,000 draws every kept token shows up (the 39th may be rare)
    # Frequencies follow the renormalised distribution over the kept tokens.
    probs = LOGITS[0].softmax(-1)
    kept = torch.zeros_like(probs)
    kept[list(allowed)] = probs[list(allowed)]
    expected = kept / kept.sum()
    freq = torch.bincount(drawn, minlength=40).float() / DRAWS
    assert (freq - expected).abs().max() < 0.015


def test_top_k_larger_than_the_vocabulary_is_plain_sampling() -> None:
    freq = torch.bincount(draw(LOGITS, top_k=1000), minlength=40).float() / DRAWS
    assert (freq - LOGITS[0].softmax(-1)).abs().max() < 0.015


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [(0.3, {0}), (0.45, {0}), (0.55, {0, 1}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3}), (1.0, None)],
)
def test_top_p_keeps_only_the_nucleus(top_p: float, nucleus: set[int] | None) -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    order = torch.tensor([2, 0, 3, 1])  # token ids not in probability order, to exercise the un-sorting
    logits = torch.empty(1, 4)
    logits[0, order] = probs.log()
    drawn = draw(logits, top_p=top_p)
    ranks = {int((order == t).nonzero()) for t in set(drawn.tolist())}  # back to 0 = most likely
    expected = nucleus if nucleus is not None else {0, 1, 2, 3}
    assert ranks == expected
    freq = torch.bincount(drawn, minlength=4).float()[order] / DRAWS  # by rank
    kept = torch.tensor([p if i in expected else 0.0 for i, p in enumerate(probs.tolist())])
    assert (freq - kept / kept.sum()).abs().max() < 0.015


def test_top_k_and_top_p_per_row() -> None:
    logits = torch.stack([LOGITS[0], LOGITS[0].flip(0)])  # two rows with different favourites
    drawn = sample(logits.repeat(2000, 1), top_k=3, generator=torch.Generator().manual_seed(0)).view(2000, 2)
    assert set(drawn[:, 0].tolist()) == set(LOGITS[0].topk(3).indices.tolist())
    assert set(drawn[:, 1].tolist()) == set(LOGITS[0].flip(0).topk(3).indices.tolist())


def test_chunked_top_k_is_torch_topk() -> None:
    """Vocabulary-sized rows (not a multiple of the chunk), bf16 and fp32, a favourite in the tail and rows whose top
    tokens crowd into one chunk: the same values as topk, at columns that hold them, each column once."""
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        logits = torch.randn(3, 50257, generator=g) * (1 + trial % 3)
        if trial % 4 == 1:
            logits[:, -5] = 100.0  # the largest logit among the last V mod CHUNK, outside every chunk
        if trial % 4 == 2:
            logits[1, 640 : 640 + CHUNK] += 50.0  # the whole top 50 in one chunk
        if trial % 2:
            logits = logits.bfloat16()
        values, columns = top_candidates(logits, 50)
        want = torch.topk(logits.float(), 50).values
        assert torch.equal(values, want)
        assert torch.equal(logits.float().gather(1, columns), want)
        assert all(len(set(row)) == 50 for row in columns.tolist())


def test_chunked_greedy_takes_the_first_of_equal_maxima_as_argmax() -> None:
    logits = torch.randn(4, 50257, generator=torch.Generator().manual_seed(1))
    logits[0, [70, 9000, 50250]] = 9.0  # ties across chunks and the tail
    logits[1, [130, 131]] = 9.0  # within a chunk
    logits[2, [50250, 50256]] = 9.0  # within the tail
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    assert sample(logits, temperature=0)[:3].tolist() == [70, 130, 50250]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sampling_over_the_chunked_top_k_follows_the_distribution(dtype: torch.dtype) -> None:
    """top-k 5 over a row long enough for the chunked search (1,300 = 20 chunks and a tail of 20): only the 5 largest
    are drawn, at their renormalised frequencies."""
    logits = torch.full((1, 1300), -10.0)
    favourites = torch.tensor([3, 700, 1000, 1100, 1295])
    logits[0, favourites] = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0])
    logits = logits.to(dtype)
    drawn = sample(logits.expand(DRAWS, -1), top_k=5, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == set(favourites.tolist())
    freq = torch.tensor([(drawn == f).float().mean().item() for f in favourites.tolist()])
    assert (freq - logits[0, favourites].float().softmax(-1)).abs().max() < 0.015
