"""The batching worker and its sequences: stop strings, split characters, seeds, failures and the bounded queue."""

from __future__ import annotations

import threading

import pytest
import torch

from gpt2scratch.config import GPTConfig
from gpt2scratch.inference.engine import Engine
from gpt2scratch.model import GPT
from gpt2scratch.serve.batching import Batcher, Closed, QueueFull, Sampling, Sequence, Update
from gpt2scratch.tokenizer import EOT_TOKEN, decode, encode

pytestmark = pytest.mark.usefixtures("one_thread")


class Inbox:
    """A sequence's updates, as the server's request would receive them; ``wait`` until the last one."""

    def __init__(self) -> None:
        self.updates: list[Update] = []
        self.ended = threading.Event()

    def __call__(self, update: Update) -> None:
        self.updates.append(update)
        if update.finish_reason is not None or update.error is not None:
            self.ended.set()

    @property
    def text(self) -> str:
        return "".join(u.text for u in self.updates)

    def wait(self) -> Inbox:
        assert self.ended.wait(30), "the sequence never ended"
        return self


def feed(text: str, stop: list[str], max_tokens: int = 100) -> Inbox:
    """A sequence given the tokens of ``text`` one by one, as if the model had sampled them."""
    inbox = Inbox()
    seq = Sequence([EOT_TOKEN], max_tokens, inbox, stop=stop)
    for token in encode(text):
        if seq.done:
            break
        seq.accept(token, None)
    return inbox


def test_a_stop_string_across_tokens_is_never_shown() -> None:
    text = "The quick brown fox jumps over the lazy dog"
    inbox = feed(text, stop=["own fo", "zebra"])
    assert inbox.text == "The quick br"
    assert inbox.updates[-1].finish_reason == "stop"
    assert all("ow" not in u.text for u in inbox.updates)  # held back until it was known to be the stop string
    assert sum(u.generated for u in inbox.updates) == len(encode("The quick brown fox"))


def test_a_held_back_prefix_that_is_no_stop_string_is_shown_later() -> None:
    inbox = feed("one two three", stop=["two four"], max_tokens=3)
    assert inbox.text == "one two three" and inbox.updates[-1].finish_reason == "length"
    assert [u.text for u in inbox.updates] == ["one", " ", "two three"]  # "two" waited for the next token


def test_characters_split_across_tokens_arrive_whole() -> None:
    text = "🤗 naïve 日本語 🤗"
    tokens = encode(text)
    assert len(tokens) > len(text.split())  # the emoji and the CJK characters take several byte tokens
    inbox = feed(text, stop=[])
    assert inbox.text == text
    assert all("\ufffd" not in u.text for u in inbox.updates)


def test_end_of_text_ends_the_completion_without_its_text() -> None:
    inbox = Inbox()
    seq = Sequence([EOT_TOKEN], 10, inbox)
    for token in [*encode("Hi there"), EOT_TOKEN, *encode(" never")]:
        if not seq.done:
            seq.accept(token, None)
    assert inbox.text == "Hi there" and inbox.updates[-1].finish_reason == "stop"
    assert sum(u.generated for u in inbox.updates) == 3  # "Hi", " there" and the end-of-text token


# --- the worker, on a real model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return Engine(model.double().eval(), slots=4)


@pytest.fixture
def batcher(engine: Engine):
    batcher = Batcher(engine, max_queue=16, prefill_tokens=8)  # a small budget: newcomers join over several steps
    batcher.start()
    yield batcher
    batcher.close(10)
    assert engine.rows == 0


def run(batcher: Batcher, *sequences: Sequence) -> None:
    batcher.submit(list(sequences))
    for seq in sequences:
        assert isinstance(seq.deliver, Inbox)
        seq.deliver.wait()


def sequence(prompt: str, max_tokens: int, sampling: Sampling) -> Sequence:
    return Sequence(encode(prompt), max_tokens, Inbox(), sampling)


def test_a_seeded_sequence_is_the_same_alone_beside_others_and_in_generate(batcher: Batcher, engine: Engine) -> None:
    sampling = Sampling(temperature=0.9, top_k=40, seed=1234)
    alone = sequence("Hello, I'm a language model,", 30, sampling)
    run(batcher, alone)
    others = [sequence("x" * (i + 1), 5 + 7 * i, Sampling(temperature=1.0, seed=i)) for i in range(5)]
    others.append(sequence("Greedy", 12, Sampling(temperature=0)))
    again = sequence("Hello, I'm a language model,", 30, sampling)
    run(batcher, *others[:3], again, *others[3:])  # more sequences than slots: they join as others leave
    assert again.ids == alone.ids and len(alone.ids) == 30
    assert again.deliver.text == alone.deliver.text == decode(alone.ids)  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(1234)
    idx = torch.tensor([encode("Hello, I'm a language model,")])
    expected = engine.model.generate(idx, 30, temperature=0.9, top_k=40, generator=generator)[0, idx.size(1) :]
    assert alone.ids == expected.tolist()
    for seq in others:  # each of them as if it had run alone
        solo = sequence(decode(seq.prompt), seq.max_tokens, seq.sampling)
        run(batcher, solo)
        assert solo.ids == seq.ids


def test_a_failing_sequence_fails_alone_and_the_worker_carries_on(batcher: Batcher) -> None:
    class Gone(Inbox):
        """A client whose event loop closed after three tokens: delivering raises."""

        def __call__(self, update: Update) -> None:
            if len(self.updates) == 3:
                self.ended.set()
                raise RuntimeError("Event loop is closed")
            super().__call__(update)

    greedy = Sampling(temperature=0)
    broken = Sequence(encode("one"), 20, Gone(), greedy)
    healthy = [sequence(f"two {i}", 15, greedy) for i in range(3)]
    run(batcher, broken, *healthy)
    assert len(broken.deliver.updates) == 3 and broken.done  # type: ignore[attr-defined]
    for seq in healthy:
        assert seq.deliver.updates[-1].finish_reason == "length" and len(seq.ids) == 15  # type: ignore[attr-defined]
    later = sequence("two 0", 15, greedy)
    run(batcher, later)
    assert later.ids == healthy[0].ids


def test_the_queue_is_bounded_and_takes_a_request_whole_or_not_at_all(engine: Engine) -> None:
    batcher = Batcher(engine, max_queue=3)  # not started: nothing leaves the queue
    batcher.submit([sequence("a", 1, Sampling()) for _ in range(2)])
    with pytest.raises(QueueFull):
        batcher.submit([sequence("b", 1, Sampling()) for _ in range(2)])
    assert batcher.queued == 2
    batcher.submit([sequence("c", 1, Sampling())])
    waiting = list(batcher.waiting)
    batcher.start()
    batcher.close(10)
    with pytest.raises(Closed):
        batcher.submit([sequence("d", 1, Sampling())])
    for seq in waiting:  # closed before their turn, or ended normally if the worker got to them first
        last = seq.deliver.updates[-1]  # type: ignore[attr-defined]
        assert last.error == "the server is shutting down" or last.finish_reason == "length"


def test_newcomers_join_within_the_prefill_budget_between_decoding_steps(engine: Engine) -> None:
    """With a budget of 4 prompt tokens per step, three 4-token prompts join one per step, each step decoding the
    rows already running: the batch grows 1, 2, 3, 4 instead of the running row waiting for all three prefills."""
    sizes: list[int] = []
    batcher = Batcher(engine, max_queue=8, prefill_tokens=4, on_step=sizes.append)
    greedy = Sampling(temperature=0)
    first = sequence("a b c d", 40, greedy)
    batcher.submit([first])  # queued before the worker starts: the first step is certain to hold it alone
    newcomers = [sequence(f"e f g {i}", 20, greedy) for i in range(3)]
    batcher.submit(newcomers)
    batcher.start()
    try:
        for seq in [first, *newcomers]:
            seq.deliver.wait()  # type: ignore[attr-defined]
    finally:
        batcher.close(10)
    assert all(len(encode(decode(seq.prompt))) == 4 for seq in newcomers)
    assert sizes[:4] == [1, 2, 3, 4]
