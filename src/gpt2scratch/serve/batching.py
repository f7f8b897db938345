"""Continuous batching: one worker thread decodes every sequence in flight as one batch.

A request becomes sequences (one per prompt and choice), which wait in a bounded queue. Between two tokens the
worker starts waiting sequences in the engine's free slots (their prompts prefilled together, within a budget of
prompt tokens, so that running sequences wait for at most one such prefill per token), advances every running
sequence by one token, and retires those that finished, were cancelled by their client, or failed. Each sequence
samples with its own settings and its own ``torch.Generator``, so a seeded one gives the same tokens whether it runs
alone or beside others (and the same as ``generate`` with that seed). An error in one sequence fails it alone;
an error in a forward pass fails the sequences of that pass; the worker carries on.

The worker is the only thread that touches the model. It hands each sequence's progress to ``Sequence.deliver``
(called in the worker thread: it must not block), one ``Update`` per token.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from gpt2scratch.inference.engine import Engine
from gpt2scratch.inference.sampling import sample
from gpt2scratch.tokenizer import EOT_TOKEN, decode

log = logging.getLogger(__name__)

PREFILL_TOKENS = 512  # prompt tokens started per step at most (one longer prompt is started alone)


class QueueFull(Exception):
    """The queue holds ``max_queue`` sequences already: the client should retry later."""


class Closed(Exception):
    """The batcher is shutting down and takes no new sequences."""


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks its tokens (see ``sampling.sample``); ``seed`` None draws one from the OS."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class TokenInfo:
    """A token as the completions API reports it: its text, log-probability under the model (None for a prompt's
    first token), the most likely alternatives with theirs (the token itself included), and where its text starts."""

    text: str
    logprob: float | None
    top: dict[str, float] | None
    offset: int


@dataclass
class Update:
    """What a sequence produced since its last update: text safe to show (never part of a stop string or half a
    character), the tokens' log-probabilities if asked for, how many tokens were generated, and, at the end, why
    it ended (``stop`` or ``length``) or what went wrong."""

    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    generated: int = 0
    finish_reason: str | None = None
    error: str | None = None


class Sequence:
    """One completion of one prompt. Built by the server; advanced by the worker thread only, except ``cancel``.

    ``prompt`` token ids; ``prompt_text`` is echoed first if ``echo``; at most ``max_tokens`` new tokens; the text
    ends before the first of the ``stop`` strings or at GPT-2's end-of-text token; ``logprobs`` N reports each
    token's log-probability and the N most likely alternatives (and the prompt's, with ``echo``).
    """

    def __init__(
        self,
        prompt: list[int],
        max_tokens: int,
        deliver: Callable[[Update], None],
        sampling: Sampling | None = None,
        stop: Iterable[str] = (),
        logprobs: int | None = None,
        echo: bool = False,
        prompt_text: str = "",
    ):
        assert prompt and max_tokens >= 0
        self.prompt, self.max_tokens, self.deliver = prompt, max_tokens, deliver
        self.sampling = sampling or Sampling()
        self.stop, self.logprobs, self.echo = list(stop), logprobs, echo
        assert all(self.stop), "stop strings are not empty"
        self.prompt_text = prompt_text if echo else ""
        self.cancelled = False  # set from another thread: the client is gone
        self.done = False
        self.generator: torch.Generator | None = None
        self.pending = -1  # the last token sampled: the model's next input
        self.ids: list[int] = []  # the completion's tokens (without an end-of-text token)
        self.text = ""
        self.shown = 0  # characters of ``text`` delivered

    def cancel(self) -> None:
        self.cancelled = True

    def start(self, device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        if self.sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.sampling.seed)

    def echo_update(self, prompt_logprobs: torch.Tensor | None) -> None:
        """Deliver the echoed prompt; with ``logprobs``, each of its tokens' log-probabilities: token i's in
        ``prompt_logprobs[i - 1]`` (T, V); the first token has none."""
        tokens = []
        if self.logprobs is not None:
            offset = 0
            for i, token in enumerate(self.prompt):
                if i == 0:
                    tokens.append(TokenInfo(decode([token]), None, None, 0))
                else:
                    assert prompt_logprobs is not None
                    tokens.append(describe(prompt_logprobs[i - 1], token, self.logprobs, offset))
                offset = len(decode(self.prompt[: i + 1]))
        self.deliver(Update(self.prompt_text, tokens))
        if self.max_tokens == 0:
            self.finish("length")

    def accept(self, token: int, logprobs: torch.Tensor | None) -> None:
        """Take the token sampled for this sequence (``logprobs`` (V,): the distribution it came from, if the
        request wants log-probabilities); deliver what it adds; finish the sequence if it ends it."""
        self.pending = token
        info = []
        if logprobs is not None:
            info = [describe(logprobs, token, self.logprobs or 0, len(self.prompt_text) + len(self.text))]
        generated = len(self.ids) + 1
        if token == EOT_TOKEN:
            self.finish("stop", info, generated=1)
            return
        self.ids.append(token)
        self.text = decode(self.ids)
        cut = self._stop_at()
        if cut is not None:
            self.text = self.text[:cut]
            self.finish("stop", info, generated=1)
        elif generated >= self.max_tokens:
            self.finish("length", info, generated=1)
        else:
            end = self._safe_end()
            self.deliver(Update(self.text[self.shown : end], info, 1))
            self.shown = end

    def finish(self, reason: str, tokens: list[TokenInfo] | None = None, generated: int = 0) -> None:
        """End the sequence (``stop`` or ``length``), delivering the rest of its text."""
        self.done = True
        self.deliver(Update(self.text[self.shown :], tokens or [], generated, reason))
        self.shown = len(self.text)

    def fail(self, message: str) -> None:
        """End the sequence with an error; its client hears of it if it still can."""
        self.done = True
        try:
            self.deliver(Update(error=message))
        except Exception:  # the client is gone as well: nobody to tell
            log.debug("could not report a failed sequence", exc_info=True)

    def _stop_at(self) -> int | None:
        """Where the first stop string starts in the text, if one is there."""
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.shown - longest)
        found = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(found) if found else None

    def _safe_end(self) -> int:
        """How much of the text may be shown: not a character still split across tokens (U+FFFD at the end), nor
        an end that could be the beginning of a stop string."""
        end = len(self.text)
        while end > self.shown and self.text[end - 1] == "\ufffd":
            end -= 1
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.shown), held, -1):
                if self.text.endswith(s[:k], 0, end):
                    held = k
                    break
        return end - held


def describe(logprobs: torch.Tensor, token: int, n: int, offset: int) -> TokenInfo:
    """``token`` as reported by logprobs: its log-probability in ``logprobs`` (V,), and the ``n`` most likely."""
    chosen = float(logprobs[token])
    values, ids = logprobs.topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
    top = {decode([i]): v for v, i in zip(values.tolist(), ids.tolist(), strict=True)}
    top.setdefault(decode([token]), chosen)
    return TokenInfo(decode([token]), chosen, top, offset)


class Batcher:
    """The worker thread and its queue: ``submit`` sequences, ``close`` when done. For metrics, ``on_step(rows)``
    is told the batch size of every decoding step, ``on_tokens(n)`` every n tokens generated."""

    def __init__(
        self,
        engine: Engine,
        max_queue: int,
        prefill_tokens: int = PREFILL_TOKENS,
        on_step: Callable[[int], None] = lambda rows: None,
        on_tokens: Callable[[int], None] = lambda n: None,
    ):
        self.engine, self.max_queue, self.prefill_tokens = engine, max_queue, prefill_tokens
        self.on_step, self.on_tokens = on_step, on_tokens
        self.device = engine.cache.k.device
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []  # active[r] runs in the engine's row r
        self.condition = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="gpt2scratch-batcher", daemon=True)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.active)

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.closing

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue the sequences of one request, all or none: QueueFull if they do not fit, Closed when closing."""
        with self.condition:
            if self.closing:
                raise Closed
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull
            self.waiting.extend(sequences)
            self.condition.notify()

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker; sequences still queued or running fail with 'the server is shutting down'."""
        with self.condition:
            self.closing = True
            self.condition.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        while (newcomers := self._next()) is not None:
            try:
                self._retire()  # cancelled since the last step: their slots are free now
                if newcomers:
                    self._start(newcomers)
                if self.active:
                    self._step()
            except Exception:  # a bug of ours in the loop itself: fail what runs, keep serving
                log.exception("the batch failed")
                self._fail_active("internal error in the batch")
        with self.condition:
            left, self.waiting = [*self.waiting, *self.active], collections.deque()
        for seq in left:
            seq.fail("the server is shutting down")
        self.active.clear()

    def _next(self) -> list[Sequence] | None:
        """Wait for work; then take the waiting sequences that fit in free slots and in the prefill budget.
        None when closing."""
        with self.condition:
            while not (self.waiting or self.active or self.closing):
                self.condition.wait()
            if self.closing:
                return None
            taken: list[Sequence] = []
            tokens = 0
            while self.waiting and len(taken) < self.engine.free:
                seq = self.waiting[0]
                if taken and tokens + len(seq.prompt) > self.prefill_tokens:
                    break
                self.waiting.popleft()
                if not seq.cancelled:
                    taken.append(seq)
                    tokens += len(seq.prompt)
            return taken

    def _start(self, newcomers: list[Sequence]) -> None:
        ready = []
        for seq in newcomers:
            try:
                seq.start(self.device)
                if seq.echo:
                    wanted = seq.logprobs is not None and len(seq.prompt) > 1
                    seq.echo_update(self.engine.logits(seq.prompt[:-1]).double().log_softmax(-1) if wanted else None)
                if seq.max_tokens == 0:
                    if not seq.done:
                        seq.finish("length")
                else:
                    ready.append(seq)
            except Exception as err:
                log.exception("a sequence failed to start")
                seq.fail(f"internal error: {type(err).__name__}: {err}")
        if not ready:
            return
        try:
            # An echoed prompt may be one token longer than a slot: it is continued from its last max_len tokens.
            logits = self.engine.prefill([seq.prompt[-self.engine.cache.max_len :] for seq in ready])  # (m, V)
        except Exception as err:
            log.exception("prefill failed")
            for seq in ready:
                seq.fail(f"internal error: {type(err).__name__}: {err}")
            return
        self.active.extend(ready)
        self.on_tokens(len(ready))
        for seq, row in zip(ready, logits, strict=True):
            self._advance(seq, row)
        self._retire()

    def _step(self) -> None:
        self.on_step(len(self.active))
        try:
            logits = self.engine.step([seq.pending for seq in self.active])  # (B, V)
        except Exception:
            log.exception("a decoding step failed")
            self._fail_active("internal error in a decoding step")
            return
        self.on_tokens(len(self.active))
        for seq, row in zip(self.active, logits, strict=True):
            self._advance(seq, row)
        self._retire()

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample ``seq``'s next token from its ``logits`` (V,); a failure ends this sequence only."""
        try:
            s = seq.sampling
            token = int(sample(logits[None], s.temperature, s.top_k, s.top_p, seq.generator)[0])
            seq.accept(token, logits.double().log_softmax(-1) if seq.logprobs is not None else None)
        except Exception as err:
            log.exception("a sequence failed")
            seq.fail(f"internal error: {type(err).__name__}: {err}")

    def _retire(self) -> None:
        """Free the rows of sequences that are done or cancelled (highest row first: the last row, which moves
        into a freed one, is then always a live one)."""
        for row in range(len(self.active) - 1, -1, -1):
            if self.active[row].done or self.active[row].cancelled:
                last = self.engine.release(row)
                self.active[row] = self.active[last]
                self.active.pop()

    def _fail_active(self, message: str) -> None:
        for seq in self.active:
            seq.fail(message)
        self._retire()
