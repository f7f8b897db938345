"""The lm-evaluation-harness backend: the same log-likelihoods and greedy text as lm-eval's own hf backend on the same
weights, a task run end to end through lm-eval's command line, and the entry point that names the backend."""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, skip_without

from gpt2scratch.checkpoint.format import FORMAT_VERSION
from gpt2scratch.checkpoint.hf import export
from gpt2scratch.errors import UsageError
from gpt2scratch.model import GPT
from gpt2scratch.tokenizer import EOT_TOKEN

pytestmark = [skip_without("lm_eval"), pytest.mark.usefixtures("one_thread")]
needs_hf_backend = skip_without("accelerate")  # lm-eval's hf backend imports it

CHOICES = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "Two plus two is ", "choices": ["four", "five"], "label": 1},  # a trailing space: moved to the ending
    {"question": "Cats like to", "choices": ["sleep", "swim", "fly"], "label": 2},
]
TEXTS = ["A short line.", "word " * 150]  # the second spans several 64-token windows


def save_checkpoint(model: GPT, path: Path) -> Path:
    torch.save({"format_version": FORMAT_VERSION, "model_state_dict": model.state_dict(),
                "config": model.config.to_dict()}, path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random tiny model, as a transformers directory ("hf") and as a checkpoint of ours ("checkpoint")."""
    folder = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    model = GPT(TINY)
    export(model, folder / "hf")
    return {"hf": folder / "hf", "checkpoint": save_checkpoint(model, folder / "model.pt")}


def ours_for(pretrained: Path, batch_size: Any = 3) -> Any:
    from gpt2scratch.eval.harness import GPT2ScratchLM

    return GPT2ScratchLM(pretrained=str(pretrained), dtype="float32", device="cpu", batch_size=batch_size)


@pytest.fixture(scope="module")
def ours(weights: dict[str, Path]) -> Any:
    return ours_for(weights["hf"])


@pytest.fixture(scope="module")
def hf(weights: dict[str, Path]) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(weights["hf"]), dtype="float32", device="cpu", batch_size=3)


def requests(kind: str, *args: tuple) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, arg, index) for index, arg in enumerate(args)]


LOGLIKELIHOOD_CASES = [
    ("The cat sat on the", " mat"),
    ("Hello ", "world"),  # the context's trailing space belongs to the continuation's first token
    ("", "Hello there"),  # no context: the EOT token is the context
    ("x", "<|endoftext|> y"),  # the special token in the text is token 50256 to both
    ("a " * 100, "b c d"),  # longer than the block: both keep the tail
]


@needs_hf_backend
def test_loglikelihood_matches_hf_backend(ours: Any, hf: Any) -> None:
    batch = requests("loglikelihood", *LOGLIKELIHOOD_CASES)
    got, expected = ours.loglikelihood(batch), hf.loglikelihood(batch)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    assert [logprob for logprob, _ in got] == pytest.approx([logprob for logprob, _ in expected], abs=1e-4)


@needs_hf_backend
def test_loglikelihood_rolling_matches_hf_backend(ours: Any, hf: Any) -> None:
    batch = requests("loglikelihood_rolling", *[(text,) for text in [*TEXTS, "<|endoftext|>"]])
    got = ours.loglikelihood_rolling(batch)
    assert all(isinstance(value, float) for value in got)
    assert got == pytest.approx(hf.loglikelihood_rolling(batch), abs=1e-4)


def test_checkpoint_scores_as_its_export(weights: dict[str, Path], ours: Any) -> None:
    batch = requests("loglikelihood", *LOGLIKELIHOOD_CASES)
    got, expected = ours_for(weights["checkpoint"]).loglikelihood(batch), ours.loglikelihood(batch)
    assert [logprob for logprob, _ in got] == pytest.approx([logprob for logprob, _ in expected], abs=1e-5)


def generation(prompt: str, **gen_kwargs: Any) -> tuple:
    return (prompt, {"max_gen_toks": 24, **gen_kwargs})


@needs_hf_backend
def test_generate_until_is_hf_greedy_text_cut_at_the_stop_string(ours: Any, hf: Any) -> None:
    # Two prompts of one length share a batch; the third, shorter, runs apart.
    prompts = ["Once upon a time", "Once upon a hill", "Hello"]
    free = ours.generate_until(requests("generate_until", *[generation(p) for p in prompts]))
    assert free == hf.generate_until(requests("generate_until", *[generation(p) for p in prompts]))
    assert all(len(text) > 6 for text in free)
    stops = [text[len(text) // 2 : len(text) // 2 + 3] for text in free]  # text each greedy run goes on past
    pairs = zip(prompts, stops, strict=True)
    batch = requests("generate_until", *[generation(prompt, until=[stop, "never"]) for prompt, stop in pairs])
    cut = ours.generate_until(batch)
    assert cut == [text[: text.index(stop)] for text, stop in zip(free, stops, strict=True)]
    assert cut == hf.generate_until(batch)


def test_generate_until_stops_at_eot(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(TINY)
    with torch.no_grad():  # ln_f gives every position the same vector, and only EOT's embedding points along it
        model.transformer.ln_f.weight.zero_()
        model.transformer.wte.weight[EOT_TOKEN] = 100 * model.transformer.ln_f.bias.normal_()
    lm = ours_for(save_checkpoint(model, tmp_path / "eot.pt"))
    assert lm.generate_until(requests("generate_until", generation("Once upon a time", max_gen_toks=8))) == [""]


def test_batch_size_must_be_a_whole_number(weights: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="batch_size must be a whole number, got 'auto'"):
        ours_for(weights["hf"], batch_size="auto")


def test_entry_point_names_the_backend() -> None:
    from gpt2scratch.eval.harness import GPT2ScratchLM

    found = entry_points(group="lm_eval.models").select(name="gpt2scratch")
    assert found, "no lm_eval.models entry point: reinstall the package (pip install -e .)"
    assert next(iter(found)).load() is GPT2ScratchLM


def write_tasks(folder: Path) -> None:
    """A multiple-choice task and a perplexity task on local JSONL files, read by datasets' json builder."""
    (folder / "choice.jsonl").write_text("".join(json.dumps(item) + "\n" for item in CHOICES))
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    common = "dataset_path: json\ntest_split: test\n"
    for name, data, rest in [
        ("tiny_choice", "choice", 'output_type: multiple_choice\ndoc_to_text: "Q: {{question}}"\n'
         'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'),
        ("tiny_text", "text", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         "metric_list:\n  - metric: word_perplexity\n"),
    ]:  # fmt: skip
        kwargs = f"dataset_kwargs:\n  cache_dir: {folder / 'cache'}\n  data_files:\n    test: {folder / data}.jsonl\n"
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{common}{kwargs}{rest}")


@needs_hf_backend
def test_lm_eval_command_line_runs_tasks_with_the_backend(
    weights: dict[str, Path], hf: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m gpt2scratch.eval.harness`` as a user runs it (in this process), batch_size in model_args beside
    lm-eval's own default one; every logged response is what the hf backend answers to the same request."""
    from gpt2scratch.eval.harness import main

    write_tasks(tmp_path)
    model_args = f"pretrained={weights['hf']},dtype=float32,device=cpu,batch_size=2"
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "gpt2scratch", "--model_args", model_args,
                                      "--tasks", "tiny_choice,tiny_text", "--include_path", str(tmp_path),
                                      "--output_path", str(tmp_path / "out"), "--log_samples"])  # fmt: skip
    main()
    (results,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(results.read_text())["config"]["model_args"]["batch_size"] == 2
    for task, kind in [("tiny_choice", "loglikelihood"), ("tiny_text", "loglikelihood_rolling")]:
        (log,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        samples = [json.loads(line) for line in log.read_text().splitlines()]
        args = [tuple(a.values()) for sample in samples for a in sample["arguments"].values()]
        logged = [float(r[0] if kind == "loglikelihood" else r) for s in samples for r in s["filtered_resps"]]
        expected = getattr(hf, kind)(requests(kind, *args))
        expected = [r[0] for r in expected] if kind == "loglikelihood" else expected
        assert len(logged) == len(args) == (8 if kind == "loglikelihood" else 2)
        assert logged == pytest.approx(expected, abs=1e-4)


# ---- lm-eval's own local-completions against `gpt2-scratch serve` (issue 25) ----

LONG_CHOICES = [*CHOICES, {"question": "a " * 100, "choices": ["b c", "d"], "label": 0}]  # past the context


@pytest.fixture(scope="module")
def served(weights: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import Server

    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    log = tmp_path_factory.mktemp("served") / "serve.log"
    server = Server(weights["hf"], log, "--dtype", "float64").wait_ready()
    try:
        yield server
    finally:
        server.stop()


def test_the_harness_tells_local_completions_the_served_context(served: Any) -> None:
    from gpt2scratch.eval.harness import with_server_context

    argv = ["--model", "local-completions", "--model_args", f"base_url={served.url}/v1/completions,model=m"]
    assert with_server_context(argv)[-1] == f"base_url={served.url}/v1/completions,model=m,max_length=66"
    given = ["--model", "local-completions", "--model_args", f"base_url={served.url}/v1/completions,max_length=9"]
    assert with_server_context(given) == given
    assert with_server_context(["--model", "hf", "--model_args", "pretrained=x"]) == ["--model", "hf", "--model_args",
                                                                                         "pretrained=x"]  # fmt: skip
    nobody = ["--model", "local-completions", "--model_args", "base_url=http://127.0.0.1:9/v1/completions"]
    assert with_server_context(nobody) == nobody  # no server there: lm-eval's own default stays


def test_lm_eval_local_completions_through_the_server_matches_our_backend(
    served: Any, weights: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm-eval's ``local-completions`` with no tokenizer and no max_length: it finds the server's tokenizer
    endpoints (``tokenizer_backend=auto`` -> remote) and the harness gives it the served context. Loglikelihood,
    rolling loglikelihood and generation equal our backend's on the same weights (float64 on both sides), a
    question and a document longer than the context included."""
    import httpx

    from gpt2scratch.eval.harness import GPT2ScratchLM, main

    write_tasks(tmp_path)
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(item) + "\n" for item in LONG_CHOICES))
    (tmp_path / "tiny_long.yaml").write_text(
        (tmp_path / "tiny_choice.yaml").read_text().replace("task: tiny_choice", "task: tiny_long")
        .replace("choice.jsonl", "long.jsonl")
    )  # fmt: skip
    (tmp_path / "tiny_gen.yaml").write_text(
        (tmp_path / "tiny_choice.yaml").read_text().split("output_type")[0].replace("tiny_choice", "tiny_gen")
        + 'output_type: generate_until\ndoc_to_text: "Q: {{question}}"\ndoc_to_target: "{{choices[0]}}"\n'
        "generation_kwargs:\n  until: [\".\", \"\\n\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )  # fmt: skip
    name = httpx.get(f"{served.url}/v1/models").json()["data"][0]["id"]
    model_args = f"base_url={served.url}/v1/completions,model={name},num_concurrent=1"
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "local-completions", "--model_args", model_args,
                                      "--tasks", "tiny_long,tiny_text,tiny_gen", "--include_path", str(tmp_path),
                                      "--output_path", str(tmp_path / "out"), "--log_samples"])  # fmt: skip
    main()
    ours = GPT2ScratchLM(pretrained=str(weights["hf"]), dtype="float64", device="cpu", batch_size=3)
    for task, kind in [("tiny_long", "loglikelihood"), ("tiny_text", "loglikelihood_rolling"),
                       ("tiny_gen", "generate_until")]:  # fmt: skip
        (log,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        samples = [json.loads(line) for line in log.read_text().splitlines()]
        args = [tuple(a.values()) for sample in samples for a in sample["arguments"].values()]
        logged = [r for s in samples for r in s["resps"]]
        expected = getattr(ours, kind)(requests(kind, *args))
        assert len(logged) == len(args) == {"loglikelihood": 10, "loglikelihood_rolling": 2, "generate_until": 3}[kind]
        if kind == "generate_until":
            assert [r[0] for r in logged] == expected
        elif kind == "loglikelihood":
            assert [float(r[0][0]) for r in logged] == pytest.approx([e[0] for e in expected], abs=1e-4)
        else:
            assert [float(r[0]) for r in logged] == pytest.approx(expected, abs=1e-4)
