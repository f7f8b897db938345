"""Measuring a model: the perplexity of a text, and zero-shot multiple choice (HellaSwag) scored by log-likelihood.

Both rest on one question, asked of the model in batches: how likely are these tokens after that context?
``perplexity`` asks it of a whole text with a sliding window (the method of transformers' perplexity guide: a window
of ``context`` tokens advancing by ``stride``, each predicting only the tokens no earlier window predicted);
``score_continuations`` asks it of (context, continuation) pairs, which multiple choice and the lm-evaluation-harness
backend (eval/harness.py) are made of. The training loop, ``gpt2-scratch eval`` and the harness all call these
functions.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gpt2scratch.config.commands import Progress
from gpt2scratch.device import autocast
from gpt2scratch.errors import DataError, UsageError
from gpt2scratch.model import GPT
from gpt2scratch.ops.head_loss import head_loss
from gpt2scratch.tokenizer import encode

log = logging.getLogger(__name__)


@dataclass
class Perplexity:
    loss: float  # mean negative log-likelihood, nats per predicted token
    perplexity: float
    bits_per_byte: float  # total loss / ln 2 / UTF-8 bytes of the text
    tokens: int
    predicted_tokens: int  # every token but the first of each text
    bytes: int


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first target) of each window over ``n_tokens`` tokens: the window reads tokens [begin, end) and
    predicts the tokens [first target, end), those no earlier window predicted; each has every token before it in the
    window as context. Together they predict every token but the first, once."""
    spans, previous_end = [], 0
    for begin in range(0, max(1, n_tokens - 1), stride):
        end = min(begin + context, n_tokens)
        spans.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == n_tokens:
            break
    return spans


@torch.no_grad()
def perplexity(
    model: GPT,
    texts: Sequence[np.ndarray],
    num_bytes: int,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> Perplexity:
    """The perplexity of token sequences ``texts`` (one per document, none crossing into another), whose UTF-8 text
    is ``num_bytes`` long. ``context`` defaults to the block size and ``stride`` to half of it."""
    context = context or model.config.block_size
    stride = stride or max(1, context // 2)
    if not 2 <= context <= model.config.block_size:
        raise UsageError(f"--context must be in [2, {model.config.block_size}] (the block size), got {context}")
    if not 1 <= stride < context:
        raise UsageError(f"--stride must be in [1, --context), so that every token keeps some context; got {stride}")
    jobs = [(text, span) for text in texts for span in windows(len(text), context, stride) if span[1] - span[0] > 1]
    device = model.lm_head.weight.device
    total, count = 0.0, 0
    model.eval()
    for done in range(0, len(jobs), batch_size):
        batch = jobs[done : done + batch_size]
        width = max(end - begin for _, (begin, end, _) in batch) - 1
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), -1, dtype=torch.long)  # -1: not a target (padding, or predicted before)
        for row, (text, (begin, end, first)) in enumerate(batch):
            window = torch.from_numpy(text[begin:end].astype(np.int64))
            x[row, : end - begin - 1] = window[:-1]
            y[row, first - begin - 1 : end - begin - 1] = window[first - begin :]
        x, y = x.to(device), y.to(device)
        targets = y >= 0  # (B, T): half of each window is context only, and needs no output head
        n = int(targets.sum())
        with autocast(device, dtype):
            hidden = model.transformer(x)[targets]  # (n, C)
            loss = head_loss(hidden, model.lm_head.weight, y[targets])
        total += float(loss) * n
        count += n
        if progress is not None:
            progress(min(done + batch_size, len(jobs)), len(jobs))
    if count == 0:
        raise DataError("the text is too short to measure: it needs at least two tokens")
    mean = total / count
    return Perplexity(mean, math.exp(mean), total / math.log(2) / num_bytes, sum(map(len, texts)), count, num_bytes)


@torch.no_grad()
def score_continuations(
    model: GPT,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation after the context,
    and whether it is the greedy one (each of its tokens the most likely). Longer than the block, the context keeps
    its tail (said once in the log); a continuation must not be empty."""
    block, device = model.config.block_size, model.transformer.wte.weight.device
    results: list[tuple[float, bool]] = []
    cut = 0
    model.eval()
    for done in range(0, len(pairs), batch_size):
        rows = []
        for context, continuation in pairs[done : done + batch_size]:
            assert len(continuation) > 0, "an empty continuation has no likelihood"
            ids = [*context, *continuation][-(block + 1) :]  # the tail that fits: block inputs predict block targets
            cut += len(context) + len(continuation) > block + 1
            rows.append((ids, min(len(continuation), len(ids) - 1)))
        width = max(len(ids) for ids, _ in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for row, (ids, _) in enumerate(rows):
            x[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        with autocast(device, dtype):
            hidden = model.transformer(x.to(device))  # (B, T, C): the head only where a continuation is predicted
        for row, (ids, n) in enumerate(rows):
            at = slice(len(ids) - 1 - n, len(ids) - 1)  # the positions that predict the continuation's n tokens
            with autocast(device, dtype):
                logits = model.lm_head(hidden[row, at])  # (n, V)
            logprobs = F.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(ids[len(ids) - n :], device=device)
            total = float(logprobs.gather(-1, target[:, None]).sum())
            results.append((total, bool((logprobs.argmax(dim=-1) == target).all())))
        if progress is not None:
            progress(len(results), len(pairs))
    if cut:
        log.warning("%d context(s) longer than the model's block of %d tokens: kept their tail", cut, block)
    return results


@dataclass
class Choice:
    """One multiple-choice question: a context, its possible endings, and the index of the right one."""

    context: str
    endings: list[str]
    label: int


@dataclass
class ChoiceResult:
    acc: float  # the ending with the highest summed log-probability is right
    acc_norm: float  # the ending with the highest mean log-probability per token is right
    n: int
    logprobs: list[list[float]]  # per question, per ending: summed log-probability


def read_choices(path: str | Path, limit: int | None = None) -> list[Choice]:
    """Questions from a JSONL file: HellaSwag's (``ctx``, ``endings``, ``label``) or the generic (``context``,
    ``choices``, ``label``). DataError naming the file and line for a malformed line, missing field or bad label."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    choices: list[Choice] = []
    with open(path, "rb") as f:  # decoded line by line, so that a line that is not UTF-8 is named
        for number, raw in enumerate(f, 1):
            if limit is not None and len(choices) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8 text; give a JSONL file") from None
            if not line.strip():
                continue
            choices.append(_parse_choice(line, f"{path}:{number}"))
    if not choices:
        raise DataError(f"{path} holds no questions")
    return choices


def _parse_choice(line: str, where: str) -> Choice:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from None
    except RecursionError:  # json's decoder recurses once per level of [ or {
        raise DataError(f"{where}: JSON nested too deeply to read") from None
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object")
    context = item.get("ctx", item.get("context"))
    endings = item.get("endings", item.get("choices"))
    label = item.get("label")
    if not isinstance(context, str):
        raise DataError(f"{where}: no context (a string field 'ctx' or 'context')")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
        raise DataError(f"{where}: 'endings' or 'choices' must be a list of at least two non-empty strings")
    if isinstance(label, str) and label.isdigit():
        label = int(label)  # HellaSwag's files give the label as a string
    if type(label) is not int or not 0 <= label < len(endings):
        raise DataError(f"{where}: label {label!r} is not an index into the {len(endings)} endings")
    return Choice(context, endings, label)


def multiple_choice(
    model: GPT,
    choices: Sequence[Choice],
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> ChoiceResult:
    """Zero-shot accuracy as build-nanogpt and llm.c score HellaSwag: the context's tokens, then each ending
    tokenized with a leading space; ``acc`` by the summed log-probability of the ending, ``acc_norm`` by its mean."""
    pairs, lengths = [], []
    for choice in choices:
        context = encode(choice.context, allow_special=False)
        for ending in choice.endings:
            tokens = encode(" " + ending, allow_special=False)
            pairs.append((context, tokens))
            lengths.append(len(tokens))
    scores = iter(score_continuations(model, pairs, batch_size, dtype, progress))
    counts = iter(lengths)
    right = right_norm = 0
    logprobs = []
    for choice in choices:
        sums = [next(scores)[0] for _ in choice.endings]
        means = [s / next(counts) for s in sums]
        right += int(np.argmax(sums)) == choice.label
        right_norm += int(np.argmax(means)) == choice.label
        logprobs.append(sums)
    n = len(choices)
    return ChoiceResult(right / n, right_norm / n, n, logprobs)


def read_texts(files: Sequence[Path]) -> Iterator[tuple[np.ndarray, int]]:
    """Each file's tokens (as they are: no special tokens added) and its size in UTF-8 bytes."""
    from gpt2scratch.tokenizer import get_encoding

    encoding = get_encoding()
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text (bad byte at offset {err.start}); convert it to UTF-8") from None
        yield np.asarray(encoding.encode_ordinary(text), dtype=np.int64), len(text.encode("utf-8"))


def describe(result: Any) -> dict[str, Any]:
    """A result as the plain values that ``--output`` writes (per-question log-probabilities left out)."""
    values = dict(vars(result))
    values.pop("logprobs", None)
    return values
