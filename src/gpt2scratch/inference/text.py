"""Text in, text out: prompts are tokenized, sampled from a model, and decoded, as a list or as a stream."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gpt2scratch.config.commands import SamplingConfig
from gpt2scratch.device import available_memory
from gpt2scratch.errors import UsageError
from gpt2scratch.inference.engine import generate, stream
from gpt2scratch.model import GPT
from gpt2scratch.tokenizer import EOT_TOKEN, check_vocabulary, decode, encode


def prompt_ids(model: GPT, prompt: str, sampling: SamplingConfig) -> tuple[list[int], int]:
    """The prompt's token ids and how many tokens to add; CheckpointError for a model whose vocabulary is not our
    tokenizer's, UsageError if the prompt does not fit."""
    check_vocabulary(model.config.vocab_size, "the model")
    ids = encode(prompt) if prompt else [EOT_TOKEN]
    block = model.config.block_size
    if len(ids) > block:
        raise UsageError(f"the prompt is {len(ids)} tokens, longer than the model's block size ({block})")
    new = sampling.max_new_tokens if sampling.max_new_tokens is not None else sampling.max_length - len(ids)
    if new <= 0:
        raise UsageError(
            f"--max-length {sampling.max_length} leaves no room after the {len(ids)}-token prompt; "
            "raise it or use --max-new-tokens"
        )
    return ids, new


def memory_needed(model: GPT, batch: int, prompt_len: int, new: int) -> int:
    """Bytes that generating ``new`` tokens after a ``prompt_len``-token prompt for ``batch`` rows allocates beside
    the weights: the KV cache, one step's logits and the token tensors."""
    config = model.config
    positions = min(config.block_size, prompt_len + new)
    kv_cache = 2 * config.n_layer * batch * positions * config.n_embd * model.transformer.wte.weight.element_size()
    logits = batch * config.vocab_size * 4 * 4  # fp32, plus the copies sampling makes (scaled, softmax, cumsum)
    tokens = 3 * batch * (prompt_len + new) * 8  # int64: the prompts, the growing context and the output
    return kv_cache + logits + tokens


def check_memory(model: GPT, batch: int, prompt_len: int, new: int) -> None:
    """UsageError, with both figures, if generation would need more memory than the model's device has free."""
    needed = memory_needed(model, batch, prompt_len, new)
    available = available_memory(model.transformer.wte.weight.device)
    if available is not None and needed > available:
        raise UsageError(
            f"--num-samples {batch} of {prompt_len + new} tokens needs about {needed / 1e9:.2f} GB of memory, more "
            f"than the {available / 1e9:.2f} GB available; lower --num-samples or --max-length/--max-new-tokens"
        )


def generate_text(model: GPT, prompt: str, sampling: SamplingConfig, static: bool | None = None) -> list[str]:
    """``num_samples`` continuations of ``prompt``, each with the prompt in front, generated as one batch
    on the model's device and in its dtype (see ``inference.load.for_inference``); ``static`` as ``stream``'s."""
    ids, new = prompt_ids(model, prompt, sampling)
    check_memory(model, sampling.num_samples, len(ids), new)  # before the first allocation of num_samples rows
    device = model.transformer.wte.weight.device
    idx = torch.tensor([ids] * sampling.num_samples, dtype=torch.long, device=device)  # (B, T)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    eos_token = EOT_TOKEN if sampling.stop_at_eot else None
    out = generate(model, idx, new, sampling.temperature, sampling.top_k, sampling.top_p, generator, eos_token,
                   static=static)  # fmt: skip
    return [decode(_until_eot(row.tolist(), len(ids), sampling.stop_at_eot)) for row in out]


def stream_text(model: GPT, prompt: str, sampling: SamplingConfig) -> Iterator[str]:
    """One sample (of batch 1), as pieces of text the moment they are decodable; the prompt comes first."""
    ids, new = prompt_ids(model, prompt, sampling)
    check_memory(model, 1, len(ids), new)
    device = model.transformer.wte.weight.device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    tokens: list[int] = []
    shown = ""
    yield decode(ids) if prompt else ""
    for token in stream(model, idx, new, sampling.temperature, sampling.top_k, sampling.top_p, generator):
        if sampling.stop_at_eot and int(token) == EOT_TOKEN:
            break
        tokens.append(int(token))
        text = decode(tokens)
        if not text.endswith("\ufffd"):  # hold back a character still split across tokens
            yield text[len(shown) :]
            shown = text
    if len(decode(tokens)) > len(shown):
        yield decode(tokens)[len(shown) :]


def _until_eot(row: list[int], prompt_len: int, stop: bool) -> list[int]:
    if stop and EOT_TOKEN in row[prompt_len:]:
        return row[: prompt_len + row[prompt_len:].index(EOT_TOKEN)]
    return row
