"""Picking the next token from a model's logits: greedy, temperature, top-k and top-p (nucleus) sampling.

A decoding step ends with logits over GPT-2's 50,257 tokens for each row. PyTorch's CPU ``topk`` and ``argmax`` scan
that row with scalar code (~150 us per row on this project's CPUs, a sizeable share of a batch-16 step), while ``amax``
is vectorized (~10 us). So the top-k tokens are found in two passes: the maximum of every 64-token chunk (vectorized),
then ``topk`` over only the chunks whose maximum ranks among the k largest: every token of the true top k lies in one
of them (a chunk holding a top-k token has a maximum at least as large; k chunks with larger maxima would hold k
larger tokens). The result is the same tokens in the same order as ``topk`` over the whole row.
"""

from __future__ import annotations

import torch

CHUNK = 64  # tokens per chunk of the first pass: four AVX-512 registers of fp32


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row, (B,), drawn from ``logits`` (B, V) after temperature, top-k and top-p filtering;
    ``temperature`` 0 is greedy (the first of equal maxima, as ``argmax``)."""
    if temperature == 0:
        return top_candidates(logits, 1)[1][:, 0]
    candidates = None  # vocabulary ids of the columns of ``logits`` once it is cut to the top k
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = top_candidates(logits, top_k)  # (B, k), most likely first
    logits = logits.float() / temperature  # scaling by a positive number keeps the order: done on k columns only
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            logits, candidates = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = logits.softmax(dim=-1)
        # Drop a token when the more likely ones before it already reach top_p; the most likely always stays.
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    # Inverse-CDF sampling: one uniform number per row (torch.multinomial would draw one per vocabulary entry).
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, k or V)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device) * cdf[:, -1:]  # (B, 1)
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)  # (B, 1): first entry above u
    if candidates is not None:
        choice = candidates.gather(-1, choice)
    return choice.squeeze(-1)  # (B,)


def top_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row and their columns, (B, k) each, largest first, as ``torch.topk`` gives
    them, found through chunk maxima on a CPU (see the module docstring). Among equal logits the one taken may
    differ from ``topk``'s, which does not promise an order either; for k = 1 it is the first, as ``argmax``'s."""
    B, V = logits.shape
    chunks = V // CHUNK
    if logits.device.type != "cpu" or chunks < 4 * k:  # too few chunks to gain, or a GPU, whose topk is fast
        if k == 1:
            return logits.max(dim=-1, keepdim=True)
        return torch.topk(logits, k, dim=-1)
    logits = logits.float()  # amax over bf16 takes 4x longer than converting first (exact) and reducing fp32
    body = logits[:, : chunks * CHUNK].unflatten(1, (chunks, CHUNK))  # (B, chunks, CHUNK): a view
    maxima = body.amax(dim=-1)  # (B, chunks)
    # k = 1: the first chunk holding the largest maximum (argmax over chunks is cheap) keeps argmax's tie rule.
    best = maxima.argmax(dim=-1, keepdim=True) if k == 1 else maxima.topk(k, dim=-1).indices  # (B, k)
    columns = (best[:, :, None] * CHUNK + torch.arange(CHUNK, device=logits.device)).flatten(1)  # (B, k * CHUNK)
    tail = torch.arange(chunks * CHUNK, V, device=logits.device).expand(B, -1)  # (B, V mod CHUNK): always kept
    columns = torch.cat([columns, tail], dim=1)  # in vocabulary order when k = 1
    values = logits.gather(1, columns)
    values, picked = values.max(dim=-1, keepdim=True) if k == 1 else values.topk(k, dim=-1)  # (B, k)
    return values, columns.gather(1, picked)
