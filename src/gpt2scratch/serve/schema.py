"""OpenAI's completions API, as data: a request body checked field by field, the responses and their errors.

Every mistake in a request is an ``APIError`` with OpenAI's error body, ``{"error": {"message", "type", "param",
"code"}}``, and a 4xx status, so the ``openai`` client raises its usual exceptions. ``top_k`` is accepted as an
extension (as llama.cpp and vLLM do). Parameters we cannot honour (``suffix``, penalties, ``logit_bias``,
``best_of`` above ``n``) are refused unless they have their neutral value. Fields we do not know are ignored, as
vLLM and llama.cpp ignore them (clients written for those send several); the request lists them
(``CompletionRequest.ignored``) so that the server can say so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from gpt2scratch.config.commands import SEEDS
from gpt2scratch.serve.batching import TokenInfo
from gpt2scratch.tokenizer import EOT_TOKEN, N_VOCAB, decode, encode

MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 5  # OpenAI's limit
MAX_STOP = 64  # OpenAI allows 4; lm-eval's tasks send more, and vLLM and llama.cpp take any number
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions

KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "echo", "logprobs",
         "stream", "stream_options", "user", "suffix", "presence_penalty", "frequency_penalty", "logit_bias",
         "best_of"}  # fmt: skip


class APIError(Exception):
    """A request we answer with an error: HTTP ``status`` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A checked request: one token list per prompt (``texts``: the prompts as text, for ``echo``), and how to
    continue each of them ``n`` times."""

    prompts: list[list[int]]
    texts: list[str]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    n: int
    stop: list[str]
    seed: int | None
    echo: bool
    logprobs: int | None
    stream: bool
    include_usage: bool
    ignored: tuple[str, ...] = ()  # the body's fields this server does not know, ignored


def parse_json(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; APIError for anything else."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}.")
    return body


def parse_completion(body: dict[str, Any], model: str, block_size: int) -> CompletionRequest:
    """Check a /v1/completions body against OpenAI's rules and the served ``model``; APIError names the field."""
    ignored = tuple(sorted(str(key) for key in set(body) - KNOWN))
    get = {key: value for key, value in body.items() if value is not None and key in KNOWN}.get  # null: the default
    name = get("model", model)
    if not isinstance(name, str):
        raise APIError(400, f"model must be a string, got {kind_of(name)}", "model")
    if name != model:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{model}'", "model",
                       "model_not_found")  # fmt: skip
    if "prompt" not in body:
        raise APIError(400, "prompt is required", "prompt")
    prompts, texts = _prompts(body["prompt"])
    n = _integer(get("n", 1), "n", 1, MAX_N)
    best_of = _integer(get("best_of", n), "best_of", 1, MAX_N)
    if best_of != n:
        raise APIError(400, f"best_of must equal n ({n}): this server returns every completion it makes", "best_of")
    max_tokens = _integer(get("max_tokens", DEFAULT_MAX_TOKENS), "max_tokens", 0, None)
    echo = boolean(get("echo", False), "echo")
    for i, ids in enumerate(prompts):
        if not fits(len(ids), max_tokens, block_size, echo):
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            raise APIError(
                400,
                f"{which} is {_tokens(len(ids))} and max_tokens is {max_tokens}: {len(ids) + max_tokens} in all, more "
                f"than the model's context of {block_size} tokens; shorten the prompt or lower max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )
    temperature = _number(get("temperature", 1.0), "temperature", 0.0, 2.0)
    top_p = _number(get("top_p", 1.0), "top_p", 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "top_p must be greater than 0 and at most 1, got 0", "top_p")
    top_k = _integer(get("top_k", 0), "top_k", -1, N_VOCAB)
    seed = get("seed")
    if seed is not None:
        seed = _integer(seed, "seed", -(2**63), SEEDS - 1) % SEEDS  # negative seeds alias, as torch's do
    logprobs = get("logprobs")
    if logprobs is not None:
        logprobs = _integer(logprobs, "logprobs", 0, MAX_LOGPROBS)
    stream = boolean(get("stream", False), "stream")
    include_usage = False
    options = get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "stream_options must be an object with at most include_usage", "stream_options")
    if options:
        include_usage = boolean(options.get("include_usage", False), "stream_options")
    _neutral(get, "suffix", None)
    _neutral(get, "presence_penalty", 0)
    _neutral(get, "frequency_penalty", 0)
    _neutral(get, "logit_bias", {})
    if get("user") is not None and not isinstance(get("user"), str):
        raise APIError(400, f"user must be a string, got {kind_of(get('user'))}", "user")
    return CompletionRequest(
        prompts, texts, max_tokens, temperature, top_p if top_p < 1 else None, top_k if top_k > 0 else None, n,
        _stop(get("stop", [])), seed, echo, logprobs, stream, include_usage, ignored,
    )  # fmt: skip


def fits(prompt: int, max_tokens: int, block: int, echo: bool) -> bool:
    """Whether a prompt of ``prompt`` tokens and ``max_tokens`` new ones fit a model of context ``block``. The last
    new token is never fed back, so prompt + max_tokens may reach block + 1. With ``echo``, a prompt may also be
    block + 1 tokens (its first has nothing to predict it, so one pass of block scores the rest), and then continues
    from its last ``block`` tokens: lm-eval scores windows of exactly that length through ``local-completions``."""
    if echo and prompt == block + 1:
        return max_tokens <= 1
    return prompt <= block and prompt + max_tokens <= block + 1


def _prompts(prompt: Any) -> tuple[list[list[int]], list[str]]:
    """A string, a list of strings, a list of token ids or a list of such lists, as token lists and texts. An empty
    text is GPT-2's end-of-text token, the start of a document (as ``generate`` does)."""
    if isinstance(prompt, str):
        return [encode(prompt) or [EOT_TOKEN]], [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, "prompt must be a string, a list of strings, or token ids (a list or a list of lists)",
                       "prompt")  # fmt: skip
    if all(isinstance(p, str) for p in prompt):
        return [encode(p) or [EOT_TOKEN] for p in prompt], list(prompt)
    lists = [prompt] if all(is_int(t) for t in prompt) else prompt
    for ids in lists:
        if not isinstance(ids, list) or not ids or not all(is_int(t) for t in ids):
            raise APIError(400, "prompt: token ids must be non-empty lists of integers", "prompt")
        bad = [t for t in ids if not 0 <= t < N_VOCAB]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {N_VOCAB})", "prompt")
    return lists, [decode(ids) for ids in lists]


def _stop(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop may hold at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return stops


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def kind_of(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(type(value), repr(value))


def _integer(value: Any, name: str, low: int, high: int | None) -> int:
    if not is_int(value):
        raise APIError(400, f"{name} must be an integer, got {kind_of(value)}", name)
    if value < low or (high is not None and value > high):
        limits = f"at least {low}" if high is None else f"between {low} and {high}"
        raise APIError(400, f"{name} must be {limits}, got {value}", name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise APIError(400, f"{name} must be a number, got {kind_of(value)}", name)
    if not low <= value <= high:
        raise APIError(400, f"{name} must be between {low:g} and {high:g}, got {value}", name)
    return float(value)


def boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {kind_of(value)}", name)
    return value


def _neutral(get: Any, name: str, neutral: Any) -> None:
    """Refuse a parameter we do not implement unless it asks for what we do anyway."""
    value = get(name, neutral)
    if value != neutral or type(value) is bool:
        raise APIError(400, f"{name} is not supported by this server (only {json.dumps(neutral)})", name)


def logprobs_body(tokens: list[TokenInfo]) -> dict[str, Any]:
    """The ``logprobs`` object of a choice (or of a streamed chunk)."""
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [t.top for t in tokens],
        "text_offset": [t.offset for t in tokens],
    }


def choice_body(index: int, text: str, finish_reason: str | None, tokens: list[TokenInfo] | None) -> dict[str, Any]:
    logprobs = None if tokens is None else logprobs_body(tokens)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(
    id: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, int] | None
) -> dict[str, Any]:
    """A completion, or one streamed chunk of it (the same shape, as OpenAI's)."""
    body: dict[str, Any] = {"id": id, "object": "text_completion", "created": created, "model": model}
    body["choices"] = choices
    if usage is not None:
        body["usage"] = usage
    return body


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
