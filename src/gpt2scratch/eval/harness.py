"""gpt2-scratch as a backend of EleutherAI's lm-evaluation-harness, under the name ``gpt2scratch``.

    lm_eval --model gpt2scratch --model_args pretrained=PATH_OR_NAME,dtype=auto,batch_size=8 --tasks hellaswag

Only lm-eval imports this module, so the rest of the package works without it. Our pyproject declares it in the
``lm_eval.models`` entry-point group, where lm-eval's main branch looks for backends (its PR #4013); its releases up
to 0.4.13 read no entry points, and with them the command is ``python -m gpt2scratch.eval.harness ARGS`` (lm-eval's own
command line, this module imported first). Requests are tokenized as lm-eval's ``hf`` backend tokenizes them for
GPT-2, so both backends give the same log-likelihoods for the same weights (tests/test_harness.py compares them).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections import defaultdict
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from gpt2scratch.errors import UsageError
from gpt2scratch.eval.scoring import score_continuations
from gpt2scratch.inference.engine import stream
from gpt2scratch.inference.load import load_for_inference
from gpt2scratch.tokenizer import EOT_TEXT, EOT_TOKEN, decode, encode

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


@register_model("gpt2scratch")
class GPT2ScratchLM(LM):
    def __init__(
        self, pretrained: str = "gpt2", dtype: str = "auto", device: str = "auto", batch_size: Any = 8,
        quantize: str = "none",
    ):  # fmt: skip
        """``pretrained``: anything ``GPT.from_pretrained`` reads (a checkpoint of ours, a transformers directory,
        ``gpt2`` ...); ``dtype`` and ``device`` as ``pick_dtype`` and ``pick_device`` take them; ``quantize`` none
        or int8 (``load_for_inference``). Raises our typed errors."""
        super().__init__()
        try:
            self.batch_size = int(batch_size)  # lm-eval passes model_args' values as strings or numbers
        except ValueError:
            raise UsageError(f"batch_size must be a whole number, got {batch_size!r}") from None
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {self.batch_size}")
        self.model = load_for_inference(str(pretrained), str(device), str(dtype), str(quantize))
        weight = self.model.transformer.wte.weight
        self._device, self.dtype = weight.device, weight.dtype
        self.block = self.model.config.block_size

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> Any:
        """lm-eval adds its own ``--batch_size`` (1 unless given) and ``--device`` to the model_args, and a key in
        both would be a TypeError: here model_args win. ``--max_batch_size`` is for ``batch_size=auto``: dropped."""
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None}
        extra = {key: extra[key] for key in ("batch_size", "device") if key in extra and key not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> Any:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding produces it) of each (context,
        continuation) request."""
        results = self._score([encode_pair(*request.args) for request in requests], "loglikelihood")
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        """The log-probability of each whole text, after the EOT token, every token predicted once in windows of
        the block size, each window with as much context as fits (lm-eval's rolling windows)."""
        pairs, owners = [], []
        for number, request in enumerate(requests):
            windows = get_rolling_token_windows(encode(request.args[0]), EOT_TOKEN, self.block, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(number)
        totals = [0.0] * len(requests)
        for number, (logprob, _) in zip(owners, self._score(pairs, "loglikelihood_rolling"), strict=True):
            totals[number] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """The continuation of each context, greedy unless its gen_kwargs ask for sampling, cut at the first of its
        ``until`` strings or at the EOT token. Requests with the same kwargs and context length share a batch."""
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        prompts = []
        for number, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=256)
            room = self.block - kwargs["max_gen_toks"]  # the hf backend's rule: the prompt leaves room for them all
            if room <= 0:
                raise UsageError(f"max_gen_toks {kwargs['max_gen_toks']} leaves no room in a block of {self.block}")
            prompts.append(((encode(context) if context else [EOT_TOKEN])[-room:], kwargs))
            groups[repr(sorted(kwargs.items())), len(prompts[-1][0])].append(number)
        results = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until")
        for numbers in groups.values():
            for start in range(0, len(numbers), self.batch_size):
                batch = numbers[start : start + self.batch_size]
                texts = self._generate([prompts[n][0] for n in batch], prompts[batch[0]][1])
                for number, text in zip(batch, texts, strict=True):
                    results[number] = text
                    self.cache_hook.add_partial("generate_until", requests[number].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    def _generate(self, prompts: list[list[int]], kwargs: dict[str, Any]) -> list[str]:
        """Continuations of same-length ``prompts``, each token by the KV cache, until every row holds a stop string
        (the EOT token's text is one) or ``max_gen_toks`` tokens."""
        until = handle_stop_sequences(kwargs["until"], eos=EOT_TEXT)
        temperature = float(kwargs["temperature"]) if kwargs["do_sample"] else 0.0
        idx = torch.tensor(prompts, dtype=torch.long, device=self._device)  # (B, T)
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        top_k, top_p = kwargs.get("top_k", 50), kwargs.get("top_p")  # transformers' defaults, as the hf backend's
        for tokens in stream(self.model, idx, kwargs["max_gen_toks"], temperature, top_k, top_p):
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    rows[row].append(token)
                    done[row] = any(stop in decode(rows[row]) for stop in until)
            if all(done):
                break
        return [postprocess_generated_text(decode(row), until, think_end_token=None) for row in rows]

    def _score(self, pairs: list[Pair], desc: str) -> list[tuple[float, bool]]:
        """``score_continuations`` of ``pairs``, longest first (so that each batch pads little), in their order."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        bar = tqdm(total=len(pairs), desc=desc)

        def progress(done: int, total: int, note: str = "", /) -> None:
            bar.update(done - bar.n)

        scores = score_continuations(self.model, [pairs[i] for i in order], self.batch_size, self.dtype, progress)
        bar.close()
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for i, score in zip(order, scores, strict=True):
            results[i] = score
        return results


def encode_pair(context: str, continuation: str) -> Pair:
    """The token ids of a (context, continuation) request, split as lm-eval's hf backend splits them: spaces that
    end the context go to the continuation; the continuation is what encoding context + continuation adds after
    the context's own tokens. An empty context is the EOT token (or, if the continuation starts with it, that)."""
    if not context:
        ids = encode(continuation)
        return (ids[:1], ids[1:]) if ids[0] == EOT_TOKEN else ([EOT_TOKEN], ids)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids) :]


def main() -> None:
    """``python -m gpt2scratch.eval.harness ARGS``: lm-eval's command line, with the ``gpt2scratch`` backend known,
    and lm-eval's own ``local-completions`` told the served model's context (``with_server_context``)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[1:] = with_server_context(sys.argv[1:])
    cli_evaluate()


def with_server_context(argv: list[str]) -> list[str]:
    """``argv`` with ``max_length`` added to the model args of a ``local-completions`` model that has a
    ``base_url`` and no ``max_length``, from the ``max_model_len`` that the server's ``/v1/models`` gives (ours does,
    as vLLM's does). lm-eval 0.4 does not ask, and assumes 2048, which a GPT-2 server refuses (1024). It is the
    context + 2: lm-eval's API models keep one token for generation and score rolling windows one shorter still, so
    that with it they send the windows this backend and lm-eval's hf backend score (``context + 1`` tokens, which
    the server takes for scoring: serve/schema.py's ``fits``). Unchanged if the server does not say."""
    if "--model" not in argv or "--model_args" not in argv:
        return argv
    model, at = argv[argv.index("--model") + 1], argv.index("--model_args") + 1
    args = dict(part.split("=", 1) for part in argv[at].split(",") if "=" in part)
    if model != "local-completions" or "base_url" not in args or "max_length" in args:
        return argv
    server = args["base_url"].removesuffix("/").removesuffix("/completions").removesuffix("/v1")
    request = urllib.request.Request(f"{server}/v1/models")
    if "OPENAI_API_KEY" in os.environ:  # lm-eval sends this key to the server too
        request.add_header("Authorization", f"Bearer {os.environ['OPENAI_API_KEY']}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            length = json.load(answer)["data"][0]["max_model_len"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return argv
    if not isinstance(length, int) or length <= 1:
        return argv
    print(f"local-completions: max_length={length + 2}, from the server's max_model_len {length}", file=sys.stderr)
    return [*argv[:at], f"{argv[at]},max_length={length + 2}", *argv[at + 1 :]]


if __name__ == "__main__":
    main()
