"""`gpt2-scratch generate`: numbered samples, reproducible seeds, streaming, lengths, and one-line errors."""

from __future__ import annotations

import copy
import random
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import ONE_THREAD, assert_one_line_error, run_cli, run_main

from gpt2scratch import device as device_module
from gpt2scratch.checkpoint.hf import export
from gpt2scratch.config import GPTConfig
from gpt2scratch.config.commands import SamplingConfig
from gpt2scratch.errors import CheckpointError, UsageError
from gpt2scratch.inference.engine import stream
from gpt2scratch.inference.load import for_inference
from gpt2scratch.inference.text import generate_text, prompt_ids, stream_text
from gpt2scratch.model import GPT
from gpt2scratch.tokenizer import decode, encode

PROMPT = "Hello, I'm a language model,"  # the CLI's default prompt: 8 tokens
BLOCK = 64
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 saved as a transformers directory (config.json + model.safetensors + tokenizer)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)  # a less uniform next-token distribution than at init
    out = tmp_path_factory.mktemp("tiny-hf")
    export(model, out)
    return out


@pytest.fixture(scope="module")
def model(hf_dir: Path) -> GPT:
    return GPT.from_pretrained(hf_dir).eval()


def samples(stdout: str) -> list[str]:
    """The texts under the '--- sample N ---' headers, checking that N counts 1, 2, 3..."""
    parts = re.split(r"^--- sample (\d+) ---\n", stdout, flags=re.MULTILINE)
    numbers = [int(n) for n in parts[1::2]]
    assert numbers == list(range(1, len(numbers) + 1)), stdout
    return [text.removesuffix("\n") for text in parts[2::2]]


@pytest.fixture
def fp32_matmul_precision():
    """generate_text in this process, computed as the CLI computes it (which may pick the oneDNN fp32 matmul)."""
    before = torch.get_float32_matmul_precision()
    from gpt2scratch import device as devices

    devices.configure_matmul(CPU)
    yield
    torch.set_float32_matmul_precision(before)


# The CLI runs of this module, started together: each spends most of its time importing torch, which overlaps well.
GENERATE = ["generate", "--device", "cpu", "--dtype", "float32"]
RUNS = {
    "seed 7": ["--seed", "7"],
    "seed 7 again": ["--seed", "7"],
    "seed 8": ["--seed", "8"],
    "stream": ["--stream", "--seed", "5", "--num-samples", "2", "--max-new-tokens", "12"],
    "int8": ["--seed", "7", "--quantize", "int8"],
}


@pytest.fixture(scope="module")
def runs(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    commands = {name: [*GENERATE, "--pretrained", str(hf_dir), *flags] for name, flags in RUNS.items()}
    junk = tmp_path_factory.mktemp("junk") / "junk.pt"
    junk.write_bytes(NOT_CHECKPOINTS["random-bytes-2"])
    commands["junk"] = [*GENERATE, "--checkpoint", str(junk)]
    with ThreadPoolExecutor(len(commands)) as pool:
        futures = {name: pool.submit(run_cli, *args, env=ONE_THREAD) for name, args in commands.items()}
    return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def stdout(runs: dict[str, subprocess.CompletedProcess]) -> dict[str, str]:
    """The output of the runs that must succeed."""
    for name in RUNS:
        assert runs[name].returncode == 0, runs[name].stderr
        assert "Traceback" not in runs[name].stderr
    return {name: runs[name].stdout for name in RUNS}


def test_prints_five_numbered_samples(stdout: dict[str, str], model: GPT, fp32_matmul_precision: None) -> None:
    texts = samples(stdout["seed 7"])
    assert len(texts) == 5
    assert all(text.startswith(PROMPT) and len(text) > len(PROMPT) for text in texts)
    assert len(set(texts)) == 5
    # They are what the library makes of the defaults: max length 30 tokens, prompt included, top-k 50.
    assert texts == generate_text(model, PROMPT, SamplingConfig(seed=7))


def test_quantize_int8_samples_from_the_int8_model(
    stdout: dict[str, str], model: GPT, fp32_matmul_precision: None
) -> None:
    int8 = for_inference(copy.deepcopy(model), CPU, torch.float32, quantize="int8")
    assert samples(stdout["int8"]) == generate_text(int8, PROMPT, SamplingConfig(seed=7))


def test_same_seed_same_samples(stdout: dict[str, str]) -> None:
    assert stdout["seed 7 again"] == stdout["seed 7"]


def test_other_seed_other_samples(stdout: dict[str, str]) -> None:
    other = samples(stdout["seed 8"])
    assert len(other) == 5
    assert all(a != b for a, b in zip(other, samples(stdout["seed 7"]), strict=True))


def test_stream(stdout: dict[str, str], model: GPT, fp32_matmul_precision: None) -> None:
    texts = samples(stdout["stream"])
    assert len(texts) == 2 and all(text.startswith(PROMPT) for text in texts)
    # Sample i is a batch-1 stream seeded with seed + i, of exactly --max-new-tokens tokens after the prompt.
    ids = encode(PROMPT)
    for i, text in enumerate(texts):
        sampling = SamplingConfig(num_samples=1, max_new_tokens=12, seed=5 + i)
        assert prompt_ids(model, PROMPT, sampling) == (ids, 12)
        assert text == "".join(stream_text(model, PROMPT, sampling))
        assert [text] == generate_text(model, PROMPT, sampling)
        generator = torch.Generator().manual_seed(5 + i)
        tokens = [int(t) for t in stream(model, torch.tensor([ids]), 12, top_k=50, generator=generator)]
        assert len(tokens) == 12 and text == decode(ids + tokens)


def test_stream_text_pieces_follow_the_tokens(model: GPT) -> None:
    """Streaming and batch generation agree, and no piece holds half a character."""
    sampling = SamplingConfig(num_samples=1, max_new_tokens=30, seed=11, top_k=None)
    pieces = list(stream_text(model, "🤗 ", sampling))
    assert pieces[0] == "🤗 "
    assert all("\ufffd" not in piece for piece in pieces[:-1])
    assert "".join(pieces) == generate_text(model, "🤗 ", sampling)[0]


@pytest.mark.parametrize(("max_length", "new"), [(9, 1), (12, 4), (30, 22)])
def test_max_length_counts_the_prompt(model: GPT, max_length: int, new: int) -> None:
    ids, n = prompt_ids(model, PROMPT, SamplingConfig(max_length=max_length))
    assert (len(ids), n) == (8, new)


def test_max_new_tokens_wins_over_max_length(model: GPT) -> None:
    assert prompt_ids(model, PROMPT, SamplingConfig(max_length=5, max_new_tokens=3)) == (encode(PROMPT), 3)
    assert prompt_ids(model, "Hi", SamplingConfig(max_new_tokens=40)) == ([17250], 40)
    assert prompt_ids(model, "", SamplingConfig(max_length=4)) == ([50256], 3)  # no prompt: start at <|endoftext|>
    texts = generate_text(model, "Hi", SamplingConfig(num_samples=2, max_new_tokens=40, seed=3))
    assert len(texts) == 2 and all(text.startswith("Hi") for text in texts)


# --- errors ------------------------------------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "final_model.pt"
    code, out, err = run_main("generate", "--checkpoint", str(missing))
    assert_one_line_error(code, err, 1, str(missing))
    assert out == ""


def test_missing_pretrained_directory(tmp_path: Path) -> None:
    code, _, err = run_main("generate", "--pretrained", str(tmp_path / "no-such-dir"))
    assert_one_line_error(code, err, 1, "no-such-dir")


NOT_CHECKPOINTS = {
    **{f"random-bytes-{seed}": random.Random(seed).randbytes(4096) for seed in range(4)},
    "text": b"hello world\nthis is not a checkpoint\n",
    "empty": b"",
}


@pytest.mark.parametrize("name", NOT_CHECKPOINTS)
def test_file_that_is_not_a_checkpoint(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.pt"
    path.write_bytes(NOT_CHECKPOINTS[name])
    code, _, err = run_main("generate", "--checkpoint", str(path))
    assert_one_line_error(code, err, 1, str(path))


@pytest.mark.parametrize("name", NOT_CHECKPOINTS)
def test_file_that_is_not_a_checkpoint_is_not_called_unsafe(tmp_path: Path, name: str) -> None:
    """Garbage is corrupt or foreign, not 'Python objects that could run code' (that is for real pickled code)."""
    path = tmp_path / f"{name}.pt"
    path.write_bytes(NOT_CHECKPOINTS[name])
    _, _, err = run_main("generate", "--checkpoint", str(path))
    assert "could run code" not in err
    assert re.search(r"truncated|corrupt|not a gpt2-scratch checkpoint", err), err


def test_error_in_a_real_process_has_no_traceback(runs: dict[str, subprocess.CompletedProcess]) -> None:
    result = runs["junk"]
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


def test_prompt_longer_than_the_block(hf_dir: Path) -> None:
    prompt = " ".join(["hello"] * (BLOCK + 6))
    code, _, err = run_main("generate", "--pretrained", str(hf_dir), "--device", "cpu", "--prompt", prompt)
    assert_one_line_error(code, err, 2, "the prompt is 70 tokens", "block size (64)")


def test_prompt_exactly_the_block_is_fine(hf_dir: Path) -> None:
    args = ["--device", "cpu", "--num-samples", "1", "--max-new-tokens", "3", "--prompt", "hello" + " hello" * 63]
    code, out, err = run_main("generate", "--pretrained", str(hf_dir), *args)
    assert code == 0, err
    assert samples(out)[0].startswith("hello hello")


def test_max_length_smaller_than_the_prompt(hf_dir: Path) -> None:
    code, _, err = run_main("generate", "--pretrained", str(hf_dir), "--device", "cpu", "--max-length", "5")
    assert_one_line_error(code, err, 2, "--max-length 5", "8-token prompt")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--top-k", "0"], "--top-k must be a positive integer, got 0"),
        (["--top-k", "-3"], "--top-k"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p"),
        (["--temperature", "-1"], "--temperature"),
        (["--num-samples", "0"], "--num-samples"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--device", "tpu"], "tpu"),
        (["--dtype", "float16"], "float16 is not supported on the CPU"),
    ],
)
def test_bad_flags(hf_dir: Path, flags: list[str], fragment: str) -> None:
    device = [] if "--device" in flags else ["--device", "cpu"]
    code, out, err = run_main("generate", "--pretrained", str(hf_dir), *device, *flags)
    assert_one_line_error(code, err, 2, fragment)
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_cuda_device(hf_dir: Path) -> None:
    code, _, err = run_main("generate", "--pretrained", str(hf_dir), "--device", "cuda")
    assert_one_line_error(code, err, 2, "no CUDA GPU is available", "--device cpu")


@pytest.mark.parametrize(
    "args",
    [
        ["generate"],  # neither --checkpoint nor --pretrained
        ["generate", "--checkpoint", "a.pt", "--pretrained", "gpt2"],
        ["generate", "--pretrained", "gpt2", "--top-k", "many"],
        ["generate", "--pretrained", "gpt2", "--dtype", "float8"],
    ],
)
def test_argument_errors(args: list[str]) -> None:
    code, _, err = run_main(*args)
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "(see --help)" in err


# --- issue 16: models of another vocabulary, seeds, memory ------------------------------------------------------


@pytest.fixture(scope="module")
def other_vocabulary_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers directory of a model with 1,000 tokens, not GPT-2's 50,257."""
    out = tmp_path_factory.mktemp("vocab-1000") / "model"
    export(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=BLOCK, vocab_size=1000)), out)
    return out


def test_library_refuses_a_model_of_another_vocabulary(other_vocabulary_dir: Path) -> None:
    model = GPT.from_pretrained(other_vocabulary_dir)
    with pytest.raises(CheckpointError, match="1,000 tokens"):
        generate_text(model, PROMPT, SamplingConfig())
    with pytest.raises(CheckpointError, match="1,000 tokens"):
        next(stream_text(model, PROMPT, SamplingConfig(num_samples=1)))


def test_stream_seeds_wrap_at_the_end_of_the_range(hf_dir: Path, model: GPT) -> None:
    """Streamed sample i is seeded with seed + i: past 2**64 - 1 that starts again at 0 instead of crashing."""
    args = ["--device", "cpu", "--dtype", "float32", "--stream", "--num-samples", "2", "--max-new-tokens", "3"]
    args += ["--seed", str(2**64 - 1)]
    code, out, err = run_main("generate", "--pretrained", str(hf_dir), *args)
    assert code == 0, err
    expected = [
        "".join(stream_text(model, PROMPT, SamplingConfig(num_samples=1, max_new_tokens=3, seed=seed)))
        for seed in (2**64 - 1, 0)
    ]
    assert samples(out) == expected


def test_generation_that_does_not_fit_in_memory_is_refused(
    model: GPT, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimate (KV cache, logits, tokens) is compared with MemAvailable before anything is allocated."""
    meminfo = tmp_path / "meminfo"
    monkeypatch.setattr(device_module, "MEMINFO", meminfo)
    meminfo.write_text("MemTotal:     2000000 kB\nMemAvailable: 1000000 kB\n")
    # 2,000 rows of fp32 logits with sampling's copies are 1.6 GB (the KV cache of this tiny model is 12 MB)
    message = r"--num-samples 2000 of 12 tokens needs about 1\.6\d GB .* the 1\.02 GB available"
    with pytest.raises(UsageError, match=message):
        generate_text(model, PROMPT, SamplingConfig(num_samples=2000, max_new_tokens=4))
    meminfo.write_text("MemTotal:        2000 kB\nMemAvailable:     100 kB\n")  # less than one row of logits
    sampling = SamplingConfig(num_samples=3, max_new_tokens=4)
    with pytest.raises(UsageError, match="--num-samples 1 of 12 tokens"):
        next(stream_text(model, PROMPT, sampling))
    monkeypatch.setattr(device_module, "MEMINFO", tmp_path / "absent")  # not Linux: no check
    assert len(generate_text(model, PROMPT, sampling)) == 3


def test_samples_a_terminal_cannot_show_are_escaped_not_a_crash(tmp_path: Path, hf_dir: Path) -> None:
    """The sweep: with an ASCII-only stdout (LC_ALL=C, PYTHONIOENCODING=ascii) printing a sample was an internal
    UnicodeEncodeError."""
    env = {"PYTHONIOENCODING": "ascii", "LC_ALL": "C", **ONE_THREAD}
    args = ["--pretrained", str(hf_dir), "--prompt", "caf\u00e9 \u65e5", "--max-new-tokens", "2", "--num-samples", "1"]
    result = run_cli("generate", *args, "--device", "cpu", cwd=tmp_path, env=env)
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert "caf\\xe9 \\u65e5" in result.stdout
