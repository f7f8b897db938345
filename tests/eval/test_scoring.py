"""Evaluation against an independent reference: perplexity with a sliding window and multiple-choice scoring equal
what transformers' GPT2LMHeadModel computes on the same exported weights; a trained model prefers its own text; bad
question files are one-line errors naming the line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXT, TINY, assert_one_line_error, run_cli, tiny_config

from gpt2scratch.checkpoint.hf import export
from gpt2scratch.errors import DataError, UsageError
from gpt2scratch.eval import scoring as evaluate
from gpt2scratch.model import GPT
from gpt2scratch.tokenizer import encode

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [
    {"ctx": "First Citizen: Before we proceed any further,", "endings": ["hear me speak.", "the moon", "a b c", "no"],
     "label": 0},
    {"ctx": "All: Speak,", "endings": ["speak.", "Citizen resolved famish", "x y", "hear me"], "label": "0"},
    {"ctx": "You are all resolved rather to die than to", "endings": ["famish?", "speak", "price corn"], "label": 2},
]  # fmt: skip


@pytest.mark.parametrize(("n", "context", "stride"), [(2, 8, 4), (9, 8, 4), (100, 8, 4), (100, 8, 7), (57, 16, 1)])
def test_windows_predict_every_token_but_the_first_once(n: int, context: int, stride: int) -> None:
    predicted = []
    for begin, end, first in evaluate.windows(n, context, stride):
        assert end - begin <= context and begin < first <= end
        predicted += range(first, end)
    assert predicted == list(range(1, n))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, object]:
    """A random tiny model of ours and the same weights in transformers' GPT2LMHeadModel (through our export)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = GPT(TINY).eval()
    folder = tmp_path_factory.mktemp("exported") / "model"
    export(ours, folder)
    return ours, transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


def hf_sliding_window_nll(hf: object, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The method of transformers' perplexity guide: total NLL and number of predicted tokens."""
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        inputs = torch.tensor([ids[begin:end]])
        labels = inputs.clone()
        labels[:, : -(end - previous_end)] = -100  # only the tokens no earlier window predicted
        with torch.no_grad():
            loss = hf(inputs, labels=labels).loss  # type: ignore[operator]
        valid = int((labels[:, 1:] != -100).sum())  # transformers shifts the labels: the first has no prediction
        total += float(loss) * valid
        count += valid
        previous_end = end
        if end == len(ids):
            break
    return total, count


@pytest.mark.parametrize(("context", "stride"), [(64, 32), (40, 13)])
def test_perplexity_equals_transformers_sliding_window(models: tuple, context: int, stride: int) -> None:
    ours, hf = models
    text = SAMPLE_TEXT * 2
    ids = encode(text, allow_special=False)
    result = evaluate.perplexity(ours, [np.array(ids)], len(text.encode()), context, stride, batch_size=3)
    total, count = hf_sliding_window_nll(hf, ids, context, stride)
    assert result.predicted_tokens == count == len(ids) - 1 and result.tokens == len(ids)
    assert result.loss == pytest.approx(total / count, rel=1e-4)
    assert result.perplexity == pytest.approx(np.exp(total / count), rel=1e-4)
    assert result.bits_per_byte == pytest.approx(total / np.log(2) / len(text.encode()), rel=1e-4)


def test_multiple_choice_equals_transformers(models: tuple, tmp_path: Path) -> None:
    ours, hf = models
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    result = evaluate.multiple_choice(ours, evaluate.read_choices(path), batch_size=5)
    right = right_norm = 0
    for question, ours_sums in zip(QUESTIONS, result.logprobs, strict=True):
        context = encode(question["ctx"])
        sums, means = [], []
        for ending in question["endings"]:
            tokens = encode(" " + ending)
            with torch.no_grad():
                logits = hf(torch.tensor([context + tokens])).logits[0]  # type: ignore[operator]
            logprobs = F.log_softmax(logits[len(context) - 1 : -1], dim=-1)
            sums.append(float(logprobs.gather(-1, torch.tensor(tokens)[:, None]).sum()))
            means.append(sums[-1] / len(tokens))
        assert ours_sums == pytest.approx(sums, abs=1e-4)
        right += int(np.argmax(sums)) == int(question["label"])
        right_norm += int(np.argmax(means)) == int(question["label"])
    assert (result.acc, result.acc_norm, result.n) == (right / 3, right_norm / 3, 3)


def test_a_context_longer_than_the_block_keeps_its_tail(models: tuple, caplog: pytest.LogCaptureFixture) -> None:
    ours, _ = models
    tail = encode(" hear me speak.")
    long_context = [464] * 200 + list(range(1000, 1000 + 62 - len(tail) + 1))
    [(cut, _)] = evaluate.score_continuations(ours, [(long_context, tail)])
    [(whole, _)] = evaluate.score_continuations(ours, [(long_context[-(65 - len(tail)) :], tail)])
    assert cut == pytest.approx(whole, abs=1e-5)
    assert "kept their tail" in caplog.text


def test_a_trained_model_prefers_its_own_text(tmp_path: Path) -> None:
    from gpt2scratch.training.loop import train

    (tmp_path / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    flags = ["--input", str(tmp_path / "input.txt"), "--out-dir", str(tmp_path / "out"), "--max-steps", "60"]
    result = train(tiny_config(*flags, "--target-loss", "0", "--snapshot-interval", "0"))
    model = GPT.from_pretrained(result.model_path).eval()
    words = SAMPLE_TEXT.split()
    random.Random(0).shuffle(words)
    scores = {}
    for name, text in (("original", SAMPLE_TEXT), ("shuffled", " ".join(words))):
        ids = np.array(encode(text, allow_special=False))
        scores[name] = evaluate.perplexity(model, [ids], len(text.encode()), 64, 32).perplexity
    assert scores["original"] < scores["shuffled"] / 2, scores


BAD_QUESTIONS = {
    "not-json": ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{oops\n', r"questions\.jsonl:2: not valid JSON"),
    "no-context": ('{"endings": ["b", "c"], "label": 0}\n', r":1: no context"),
    "one-ending": ('{"ctx": "a", "endings": ["b"], "label": 0}\n', r":1: 'endings' or 'choices' must be a list"),
    "label-out-of-range": ('{"context": "a", "choices": ["b", "c"], "label": 2}\n', r":1: label 2 is not an index"),
    "empty": ("\n\n", r"holds no questions"),
    "not-utf8": (  # the sweep: an internal UnicodeDecodeError
        b'{"ctx": "a", "endings": ["b", "c"], "label": 0}\n\xff\xfe\n',
        r"questions\.jsonl:2: not UTF-8 text",
    ),
}


@pytest.mark.parametrize("case", list(BAD_QUESTIONS))
def test_bad_question_files_name_the_line(case: str, tmp_path: Path) -> None:
    content, message = BAD_QUESTIONS[case]
    path = tmp_path / "questions.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        evaluate.read_choices(path)


def test_a_stride_as_long_as_the_context_is_refused(models: tuple) -> None:
    ours, _ = models
    with pytest.raises(UsageError, match=r"--stride must be in \[1, --context\)"):
        evaluate.perplexity(ours, [np.arange(100)], 100, context=32, stride=32)


def test_eval_command_prints_and_writes_results(models: tuple, tmp_path: Path) -> None:
    ours, _ = models
    export(ours, tmp_path / "model")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    args = ["eval", "--pretrained", "model", "--perplexity", "text.txt", "--hellaswag", "q.jsonl", "--limit", "2"]
    result = run_cli(*args, "--dtype", "float32", "--output", "results.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["multiple_choice"]["n"] == 2 and written["perplexity"]["predicted_tokens"] > 0
    assert f"{written['perplexity']['perplexity']:.3f}" in result.stdout
    missing = run_cli("eval", "--pretrained", "model", "--hellaswag", "nope.jsonl", cwd=tmp_path)
    assert_one_line_error(missing.returncode, missing.stderr, 1, "nope.jsonl does not exist")
    nothing = run_cli("eval", "--pretrained", "model", cwd=tmp_path)
    assert_one_line_error(nothing.returncode, nothing.stderr, 2, "nothing to evaluate")


def test_json_nested_past_the_recursion_limit_is_one_line_everywhere(tmp_path: Path) -> None:
    """A line of 100,000 [ is a RecursionError inside json: each reader of a user's JSON says so in one line."""
    from gpt2scratch.errors import CheckpointError, DataError
    from gpt2scratch.eval import scoring as evaluate
    from gpt2scratch.training import plot

    deep = "[" * 100_000
    questions = tmp_path / "q.jsonl"
    questions.write_text(deep + "\n")
    with pytest.raises(DataError, match="nested too deeply"):
        evaluate.read_choices(questions)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(deep)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        GPT.from_pretrained(tmp_path / "hf")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(deep + "\n" + '{"step": 1, "loss": 2.0}\n')
    assert [r["step"] for r in plot.read_run(str(metrics)).records] == [1]
