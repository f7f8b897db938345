"""`gpt2-scratch serve`: real servers in subprocesses on 127.0.0.1, spoken to with the official `openai` client.

Three servers start together: the main one (a tiny model in float64, where kernel order cannot flip a sampled token,
so batched and lone completions are compared exactly), a slow one (a wider model, one sequence per batch, a queue of
one: disconnects and 429s), and one that is stopped with SIGTERM while it has requests in flight.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import KEY, REPO, Server, assert_one_line_error, run_cli, save_model, skip_without

from gpt2scratch.config import GPTConfig
from gpt2scratch.config.commands import API_KEY_ENV, ModelSource, SamplingConfig, ServeConfig
from gpt2scratch.errors import UsageError
from gpt2scratch.inference.load import for_inference
from gpt2scratch.inference.text import generate_text
from gpt2scratch.model import GPT
from gpt2scratch.serve.server import is_loopback, listen, serve
from gpt2scratch.tokenizer import encode

pytestmark = [skip_without("fastapi"), skip_without("uvicorn"), skip_without("openai")]

PROMPT = "Hello, I'm a language model,"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("serve")
    tiny = save_model(folder / "tiny", GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    wide = save_model(folder / "wide", GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=512))
    started = {
        "main": Server(tiny, folder / "main.log", "--dtype", "float64", "--max-batch", "8", env={API_KEY_ENV: KEY}),
        "slow": Server(wide, folder / "slow.log", "--max-batch", "1", "--max-queue", "1", "--api-key", KEY),
        "drain": Server(wide, folder / "drain.log", "--max-batch", "1", "--api-key", KEY),
    }
    try:
        yield {name: server.wait_ready() for name, server in started.items()} | {"tiny": tiny}
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def main(servers: dict[str, Any]) -> Server:
    return servers["main"]


@pytest.fixture(scope="module")
def model(servers: dict[str, Any]) -> GPT:
    """The main server's model, in this process, as ``generate`` runs it."""
    return for_inference(GPT.from_pretrained(servers["tiny"]), CPU, torch.float64)


def reference(model: GPT, prompt: str, max_tokens: int, seed: int = 0, **sampling: Any) -> str:
    """The completion ``generate`` makes (one sample, stopping at end-of-text as the server does)."""
    cfg = SamplingConfig(num_samples=1, max_new_tokens=max_tokens, seed=seed, stop_at_eot=True, **sampling)
    with_prompt = generate_text(model, prompt, cfg)[0]
    assert with_prompt.startswith(prompt)
    return with_prompt[len(prompt) :]


# --- completions ------------------------------------------------------------------------------------------------


def test_completion(main: Server, model: GPT) -> None:
    result = main.client().completions.create(model=main_model(main), prompt=PROMPT, max_tokens=12, seed=3,
                                              extra_body={"top_k": 50})  # fmt: skip
    assert result.object == "text_completion" and result.model == main_model(main)
    assert len(result.choices) == 1 and result.choices[0].finish_reason == "length"
    assert result.choices[0].text == reference(model, PROMPT, 12, seed=3)  # what `generate --seed 3` samples
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(encode(PROMPT)), 12)
    assert [m.id for m in main.client().models.list().data] == [main_model(main)]


def main_model(server: Server) -> str:
    import httpx

    return httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]


def test_streamed_chunks_reassemble_to_the_completion(main: Server) -> None:
    client = main.client()
    whole = client.completions.create(model=main_model(main), prompt=PROMPT, max_tokens=20, seed=11)
    stream = client.completions.create(model=main_model(main), prompt=PROMPT, max_tokens=20, seed=11, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_n_choices_draw_from_seed_plus_index(main: Server, model: GPT) -> None:
    result = main.client().completions.create(model=main_model(main), prompt=PROMPT, max_tokens=8, n=3, seed=5)
    assert [c.index for c in result.choices] == [0, 1, 2]
    texts = [c.text for c in result.choices]
    assert texts == [reference(model, PROMPT, 8, seed=5 + i, top_k=None) for i in range(3)]
    assert len(set(texts)) == 3 and result.usage.completion_tokens == 24


def test_stop_string(main: Server, model: GPT) -> None:
    client = main.client()
    full = reference(model, PROMPT, 20, temperature=0)
    stop = full[7:10]  # cut the greedy text in its middle
    expected = full[: full.index(stop)]
    for stream in (False, True):
        result = client.completions.create(model=main_model(main), prompt=PROMPT, max_tokens=20, temperature=0,
                                           stop=[stop, "never appears"], stream=stream)  # fmt: skip
        choices = [c.choices[0] for c in result] if stream else result.choices
        assert "".join(c.text for c in choices) == expected
        assert choices[-1].finish_reason == "stop"


def test_logprobs_are_the_models(main: Server, model: GPT) -> None:
    result = main.client().completions.create(model=main_model(main), prompt=PROMPT, max_tokens=6, logprobs=3,
                                              temperature=0)  # fmt: skip
    choice = result.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == 6
    ids = encode(PROMPT + choice.text)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids]))[0][0].log_softmax(-1)  # (T, V)
    prompt_len = len(encode(PROMPT))
    for i, (value, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs, strict=True)):
        expected = logprobs[prompt_len - 1 + i]
        assert value == pytest.approx(float(expected[ids[prompt_len + i]]), abs=1e-9)
        assert len(top) == 3 and max(top.values()) == pytest.approx(float(expected.max()), abs=1e-9)  # greedy: in top
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_returns_the_prompt_and_its_logprobs(main: Server, model: GPT) -> None:
    client = main.client()
    result = client.completions.create(model=main_model(main), prompt=PROMPT, max_tokens=4, echo=True, logprobs=0,
                                       temperature=0)  # fmt: skip
    choice = result.choices[0]
    assert choice.text == PROMPT + reference(model, PROMPT, 4, temperature=0)
    ids = encode(PROMPT)
    lp = choice.logprobs
    assert "".join(lp.tokens[: len(ids)]) == PROMPT and lp.token_logprobs[0] is None
    with torch.no_grad():
        logprobs = model(torch.tensor([ids]))[0][0].log_softmax(-1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(logprobs[i - 1, ids[i]]), abs=1e-9)
    scored = client.completions.create(model=main_model(main), prompt=PROMPT, max_tokens=0, echo=True)  # scoring only
    assert scored.choices[0].text == PROMPT and scored.usage.completion_tokens == 0


def test_a_seed_gives_the_same_completion_alone_or_beside_seven_others(main: Server) -> None:
    client = main.client()

    def ask(prompt: str, seed: int, max_tokens: int) -> str:
        return client.completions.create(model=main_model(main), prompt=prompt, max_tokens=max_tokens, seed=seed,
                                         temperature=0.8, top_p=0.95).choices[0].text  # fmt: skip

    alone = ask(PROMPT, 99, 30)
    others = [(f"Story {i}:" + " once" * i, i, 10 + 3 * i) for i in range(7)]
    with ThreadPoolExecutor(8) as pool:
        beside = pool.submit(ask, PROMPT, 99, 30)
        rest = [pool.submit(ask, *args) for args in others]
        assert beside.result() == alone
        assert all(isinstance(f.result(), str) for f in rest)


def test_greedy_equals_the_generate_command(servers: dict[str, Any], main: Server) -> None:
    args = ["generate", "--pretrained", str(servers["tiny"]), "--device", "cpu", "--dtype", "float64"]
    args += ["--temperature", "0", "--num-samples", "1", "--max-new-tokens", "25", "--stop-at-eot", "--prompt", PROMPT]
    printed = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert printed.returncode == 0, printed.stderr
    generated = printed.stdout.removeprefix("--- sample 1 ---\n").removesuffix("\n")
    result = main.client().completions.create(model=main_model(main), prompt=PROMPT, max_tokens=25, temperature=0)
    assert PROMPT + result.choices[0].text == generated


def test_sixteen_concurrent_requests_are_all_answered_correctly(main: Server, model: GPT) -> None:
    requests = [(f"Request {i} says" + "!" * (i % 5), 4 + i, 1000 + i) for i in range(16)]  # more than --max-batch 8
    client = main.client()

    def ask(prompt: str, max_tokens: int, seed: int) -> str:
        result = client.completions.create(model=main_model(main), prompt=prompt, max_tokens=max_tokens, seed=seed)
        return result.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: ask(*r), requests))
    for (prompt, max_tokens, seed), answer in zip(requests, answers, strict=True):
        assert answer == reference(model, prompt, max_tokens, seed=seed, top_k=None)


# --- errors -------------------------------------------------------------------------------------------------------

LONG = "hello" + " hello" * 39  # 40 tokens
BAD_REQUESTS = {
    "malformed JSON": (b'{"prompt": "a",', 400, "JSON"),
    "not an object": (b"[1, 2]", 400, "JSON object"),
    "no prompt": ({"max_tokens": 3}, 400, "prompt is required"),
    "prompt of a wrong type": ({"prompt": 5}, 400, "prompt"),
    "empty prompt list": ({"prompt": []}, 400, "prompt"),
    "token id outside the vocabulary": ({"prompt": [1, 50257]}, 400, "50257"),
    "max_tokens a string": ({"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens must be an integer"),
    "max_tokens a boolean": ({"prompt": "a", "max_tokens": True}, 400, "max_tokens must be an integer"),
    "negative max_tokens": ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens must be at least 0"),
    "huge max_tokens": ({"prompt": "a", "max_tokens": 10**12}, 400, "max_tokens is 1000000000000"),
    "prompt + max_tokens past the block": ({"prompt": LONG, "max_tokens": 30}, 400, "40 tokens and max_tokens is 30"),
    "n of 0": ({"prompt": "a", "n": 0}, 400, "n must be between 1 and 16"),
    "n over the limit": ({"prompt": "a", "n": 17}, 400, "n must be between 1 and 16"),
    "negative temperature": ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    "temperature a string": ({"prompt": "a", "temperature": "hot"}, 400, "temperature must be a number"),
    "top_p of 0": ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    "logprobs over 5": ({"prompt": "a", "logprobs": 6}, 400, "logprobs must be between 0 and 5"),
    "empty stop string": ({"prompt": "a", "stop": [""]}, 400, "stop"),
    "65 stop strings": ({"prompt": "a", "stop": [f"s{i}" for i in range(65)]}, 400, "at most 64"),
    "seed a float": ({"prompt": "a", "seed": 1.5}, 400, "seed must be an integer"),
    "echo a string": ({"prompt": "a", "echo": "yes"}, 400, "echo must be true or false"),
    "suffix": ({"prompt": "a", "suffix": "b"}, 400, "suffix is not supported"),
    "unknown model": ({"prompt": "a", "model": "gpt-4"}, 404, "The model 'gpt-4' does not exist"),
    "oversized body": ({"prompt": "a" * (2 << 20)}, 413, "larger than"),
    "chat endpoint": (("POST", "/v1/chat/completions", {"messages": []}), 400, "no chat format"),
    "wrong method": (("GET", "/v1/completions", None), 405, "Method Not Allowed"),
    "unknown endpoint": (("POST", "/v1/embeddings", {}), 404, "Not Found"),
    "tokenize without a prompt": (("POST", "/tokenize", {"text": "a"}), 400, "prompt must be a string"),
    "tokenize chat messages": (("POST", "/tokenize", {"messages": []}), 400, "no chat format"),
    "tokenize another model": (("POST", "/tokenize", {"prompt": "a", "model": "x"}), 404, "does not exist"),
    "detokenize a string": (("POST", "/detokenize", {"tokens": "abc"}), 400, "tokens must be a list of token ids"),
    "detokenize past the vocabulary": (("POST", "/detokenize", {"tokens": [50257]}), 400, "outside the vocabulary"),
    "tokenize bad JSON": (("POST", "/tokenize", b"{"), 400, "not valid JSON"),
    "tokenize a number": (("POST", "/tokenize", {"prompt": 5}), 400, "prompt must be a string"),
    "tokenize a list body": (("POST", "/tokenize", ["a"]), 400, "must be a JSON object"),
    "detokenize booleans": (("POST", "/detokenize", {"tokens": [True, 1]}), 400, "tokens must be a list of token ids"),
    "detokenize nested lists": (("POST", "/detokenize", {"tokens": [[1]]}), 400, "tokens must be a list of token ids"),
    "detokenize a negative id": (("POST", "/detokenize", {"tokens": [-1]}), 400, "outside the vocabulary"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_is_a_4xx_in_openais_error_shape(main: Server, name: str) -> None:
    import httpx

    request, status, fragment = BAD_REQUESTS[name]
    method, path, body = request if isinstance(request, tuple) else ("POST", "/v1/completions", request)
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    answer = httpx.request(method, f"{main.url}{path}", content=content, headers=headers, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"], error


def test_a_good_request_still_works_after_the_bad_ones(main: Server, model: GPT) -> None:
    test_bad_request_is_a_4xx_in_openais_error_shape(main, "malformed JSON")
    result = main.client().completions.create(model=main_model(main), prompt=PROMPT, max_tokens=5, temperature=0)
    assert result.choices[0].text == reference(model, PROMPT, 5, temperature=0)
    assert main.health()["status"] == "ok"
    assert main.metric('gpt2scratch_requests_total{endpoint="/v1/completions",status="400"}') >= 1


def test_without_the_key_a_request_is_refused(main: Server) -> None:
    import httpx
    import openai

    body = {"prompt": "a", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        answer = httpx.post(f"{main.url}/v1/completions", json=body, headers=headers)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        main.client(key="wrong").completions.create(model=main_model(main), prompt="a", max_tokens=1)
    assert httpx.get(f"{main.url}/health").status_code == 200  # health checks need no key


# --- load, disconnects, shutdown ----------------------------------------------------------------------------------


def wait_until(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(servers: dict[str, Any]) -> None:
    slow: Server = servers["slow"]
    client = slow.client()
    generated, cancelled = (
        slow.metric(f"gpt2scratch_{name}_total") for name in ("generated_tokens", "cancelled_requests")
    )
    stream = client.completions.create(model=main_model(slow), prompt="a", max_tokens=400, stream=True)
    next(iter(stream))
    stream.close()
    wait_until(lambda: slow.health()["running"] == 0)
    assert slow.metric("gpt2scratch_generated_tokens_total") - generated < 200  # of 400: freed, not run to the end
    assert slow.metric("gpt2scratch_cancelled_requests_total") - cancelled == 1
    result = client.completions.create(model=main_model(slow), prompt="a", max_tokens=3)  # --max-batch 1: a free slot
    assert result.usage.completion_tokens == 3


def test_a_full_queue_answers_429_with_retry_after(servers: dict[str, Any]) -> None:
    import httpx

    slow: Server = servers["slow"]  # one sequence runs, one may wait
    client = slow.client()
    running = client.completions.create(model=main_model(slow), prompt="a", max_tokens=400, stream=True)
    next(iter(running))
    waiting = client.completions.create(model=main_model(slow), prompt="b", max_tokens=400, stream=True)
    wait_until(lambda: slow.health()["queued"] == 1)
    answer = httpx.post(f"{slow.url}/v1/completions", json={"prompt": "c"}, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "1"
    assert answer.json()["error"]["code"] == "rate_limit_exceeded"
    running.close()
    waiting.close()
    wait_until(lambda: slow.health()["running"] == slow.health()["queued"] == 0)


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(servers: dict[str, Any]) -> None:
    drain: Server = servers["drain"]  # one sequence per batch: the second request waits while the first runs
    client, model_id = drain.client(), main_model(drain)
    results: dict[str, Any] = {}

    def ask(name: str) -> None:
        results[name] = client.completions.create(model=model_id, prompt=name, max_tokens=200, temperature=0)

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    wait_until(lambda: drain.health()["queued"] == 1 and drain.health()["running"] == 1)
    drain.process.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", int(drain.url.rsplit(":", 1)[1])), timeout=1).close()
        except OSError:
            return True
        return False

    wait_until(refused)
    assert "second" not in results  # new connections were refused while a request was still in flight
    for thread in threads:
        thread.join(60)
    assert drain.process.wait(60) == 0, drain.log.read_text()
    for name in ("first", "second"):
        assert results[name].choices[0].finish_reason == "length"
        assert results[name].usage.completion_tokens == 200
    assert "Traceback" not in drain.log.read_text()


# --- start-up -----------------------------------------------------------------------------------------------------


def test_a_port_in_use_is_a_one_line_error_and_an_open_host_without_a_key_a_warning(servers: dict[str, Any]) -> None:
    """On every interface (0.0.0.0) without a key, serve warns; this port is the main server's, so it stops there,
    before listening anywhere."""
    port = servers["main"].url.rsplit(":", 1)[1]
    args = ["serve", "--pretrained", str(servers["tiny"]), "--host", "0.0.0.0", "--port", port]
    printed = run_cli(*args, env={"OMP_NUM_THREADS": "1", API_KEY_ENV: ""}, timeout=120)
    assert_one_line_error(printed.returncode, printed.stderr, 2, f"cannot listen on 0.0.0.0:{port}", "--port")
    assert "warning: listening on 0.0.0.0 without an API key" in printed.stdout
    with pytest.raises(UsageError, match="another --port"):
        listen("127.0.0.1", int(port))


@pytest.mark.parametrize(
    "signals", [[signal.SIGHUP], [signal.SIGTERM, signal.SIGINT]], ids=["SIGHUP", "SIGTERM-then-SIGINT"]
)
def test_a_stop_signal_soon_after_start_exits_0_without_a_traceback(
    servers: dict[str, Any], tmp_path: Path, signals: list[signal.Signals]
) -> None:
    """Once, SIGHUP (which uvicorn leaves alone) raised the CLI's stop inside the event loop (exit 129), and a second
    Ctrl-C (uvicorn's forced exit) cancelled the application's lifespan: both printed a traceback."""
    server = Server(servers["tiny"], tmp_path / "serve.log", "--max-batch", "1").wait_ready()
    for sig in signals:
        server.process.send_signal(sig)
        time.sleep(0.05)
    assert server.process.wait(60) == 0, server.log.read_text()
    assert "Traceback" not in server.log.read_text() and "server stopped" in server.log.read_text()


@pytest.mark.parametrize(
    ("host", "loopback"), [("127.0.0.1", True), ("127.3.0.1", True), ("localhost", True), ("::1", True),
                           ("0.0.0.0", False), ("::", False), ("192.0.2.7", False)]
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    """Which hosts serve does not warn about when there is no API key."""
    assert is_loopback(host) == loopback


def test_the_server_stack_is_imported_only_to_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import sys, gpt2scratch.cli, gpt2scratch.serve.server, gpt2scratch.serve.batching\n"
    code += "print(sorted(m for m in sys.modules "
    code += "if m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0 and result.stdout == "[]\n", result.stderr
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    with pytest.raises(UsageError, match=r'serve needs uvicorn: pip install -e "\.\[serve\]"'):
        serve(ServeConfig(model=ModelSource(pretrained="gpt2")))


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [({"max_batch": 0}, "--max-batch"), ({"port": 70000}, "--port"), ({"shutdown_timeout": -1}, "--shutdown-timeout"),
     ({"api_key": " "}, "--api-key"), ({"max_queue": 0}, "--max-queue")],
)  # fmt: skip
def test_bad_flags(flags: dict[str, Any], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        ServeConfig(**flags)


# --- what vLLM-style clients ask: the tokenizer, the context, fields they add (issue 25) ------------------------------


def test_tokenize_and_detokenize_in_vllm_s_shapes(main: Server) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    text = "Hello, I'm a language model,<|endoftext|> and more"
    answer = httpx.post(f"{main.url}/tokenize", json={"prompt": text, "add_special_tokens": False}, headers=headers)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body == {"count": len(encode(text)), "max_model_len": 64, "tokens": encode(text)}
    assert 50256 in body["tokens"]  # the end-of-text marker is its token, as lm-eval's remote tokenizer expects
    back = httpx.post(f"{main.url}/detokenize", json={"tokens": body["tokens"]}, headers=headers).json()
    assert back == {"prompt": text}
    info = httpx.get(f"{main.url}/tokenizer_info", headers=headers).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64
    assert httpx.post(f"{main.url}/tokenize", json={"prompt": "a"}).status_code == 401  # behind the key too


def test_v1_models_gives_the_context_length(main: Server) -> None:
    [model] = main.client().models.list().data
    assert model.max_model_len == 64  # type: ignore[attr-defined]  # vLLM's field


def test_unknown_fields_are_ignored_listed_in_a_header_and_logged_once(main: Server, model: GPT) -> None:
    import httpx

    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "repetition_penalty": 1.0, "min_p": 0.1,
            "stop": [f"never{i}" for i in range(40)]}  # fmt: skip
    for _ in range(2):
        answer = httpx.post(f"{main.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                            timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Ignored-Fields"] == "min_p, repetition_penalty"
        assert answer.json()["choices"][0]["text"] == reference(model, PROMPT, 5, temperature=0)
    log = main.log.read_text()
    assert log.count("ignoring the request field 'min_p'") == 1 and log.count("'repetition_penalty'") == 1
    plain = httpx.post(f"{main.url}/v1/completions", json={"prompt": "a", "max_tokens": 1},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # fmt: skip
    assert "X-Ignored-Fields" not in plain.headers


def test_what_fits_the_context_reaches_one_past_it(main: Server, model: GPT) -> None:
    """The last new token is never fed back, so prompt + max_tokens may be the block + 1; an echoed prompt may be the
    block + 1 itself (its first token is only context), as lm-eval's local-completions sends its windows."""
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    ids = encode("one two three four five six seven eight nine ten " * 10)[:65]  # the block (64) + 1
    assert len(ids) == 65

    def post(body: dict) -> Any:
        return httpx.post(f"{main.url}/v1/completions", json=body, headers=headers, timeout=60)

    scored = post({"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0})
    assert scored.status_code == 200, scored.text
    got = scored.json()["choices"][0]["logprobs"]["token_logprobs"][1:65]  # the prompt's, after its first token
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    expected = logits[0].double().log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert got == pytest.approx(expected, abs=1e-9)
    assert post({"prompt": ids[:60], "max_tokens": 5, "temperature": 0}).status_code == 200  # 65 = block + 1
    refused = post({"prompt": ids[:60], "max_tokens": 6})
    assert refused.status_code == 400 and "context_length_exceeded" in refused.text
    assert post({"prompt": ids, "max_tokens": 1}).status_code == 400  # without echo the prompt must fit
    assert post({"prompt": ids, "max_tokens": 2, "echo": True}).status_code == 400
