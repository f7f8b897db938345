"""The tokenizer over HTTP, in vLLM's shapes: ``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``,
which lm-evaluation-harness's ``local-completions`` (``tokenizer_backend=remote``, or ``auto``, which finds them)
and other clients of vLLM-style servers use to count and split tokens as the served model does."""

from __future__ import annotations

from typing import Any

from gpt2scratch.serve.schema import APIError, boolean, is_int, kind_of
from gpt2scratch.tokenizer import EOT_TEXT, N_VOCAB, decode, encode


def _model(body: dict[str, Any], model: str) -> None:
    name = body.get("model")
    if name is not None and name != model:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{model}'", "model",
                       "model_not_found")  # fmt: skip


def tokenize(body: dict[str, Any], model: str, block: int) -> dict[str, Any]:
    """``{"prompt": text}`` -> ``{"count", "max_model_len", "tokens"}``. GPT-2 adds no special tokens of its own, so
    ``add_special_tokens`` changes nothing; ``<|endoftext|>`` in the text is its token, 50256."""
    _model(body, model)
    if "messages" in body:
        raise APIError(400, "GPT-2 has no chat format: send a prompt to tokenize", "messages")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise APIError(400, f"prompt must be a string, got {kind_of(prompt)}", "prompt")
    boolean(body.get("add_special_tokens", True), "add_special_tokens")
    tokens = encode(prompt)
    return {"count": len(tokens), "max_model_len": block, "tokens": tokens}


def detokenize(body: dict[str, Any], model: str) -> dict[str, Any]:
    """``{"tokens": [ids]}`` -> ``{"prompt": text}``."""
    _model(body, model)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(is_int(t) for t in tokens):
        raise APIError(400, "tokens must be a list of token ids (integers)", "tokens")
    bad = [t for t in tokens if not 0 <= t < N_VOCAB]
    if bad:
        raise APIError(400, f"tokens: token id {bad[0]} is outside the vocabulary [0, {N_VOCAB})", "tokens")
    return {"prompt": decode(tokens)}


def tokenizer_info(block: int) -> dict[str, Any]:
    """What the tokenizer is, as vLLM describes one: GPT-2's BPE, whose one special token ends (and begins) texts."""
    return {
        "tokenizer_class": "GPT2TokenizerFast",
        "vocab_size": N_VOCAB,
        "model_max_length": block,
        "eos_token": EOT_TEXT,
        "bos_token": EOT_TEXT,
        "unk_token": EOT_TEXT,
        "pad_token": None,
        "chat_template": None,
    }
