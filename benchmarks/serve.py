"""Serving throughput and latency: ``gpt2-scratch serve`` under 1, 4 and 16 concurrent clients, batched and not.

A random model of the given preset (124M by default) is saved as a transformers directory and served twice: with
continuous batching (``--max-batch 16``) and without (``--max-batch 1``). At each concurrency, every client sends
``--rounds`` streamed completions of ``--tokens`` tokens, one after another; the table gives the generated tokens
per second over the whole run, and the p50/p99 of the request latency and of the time to the first token.
Targets (issue 14): at concurrency 16 with batching, >= 4x the tokens/s of concurrency 1, and p99 TTFT < 1 s.

    pip install -e ".[serve,bench]"
    OMP_NUM_THREADS=2 python benchmarks/serve.py                      # 124M, ~10 minutes on a 2-core CPU
    python benchmarks/serve.py --preset tiny --tokens 16 --rounds 1   # a quick check that it runs

Run by hand, never in CI. Only 127.0.0.1 is spoken to.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from gpt2scratch.checkpoint.hf import export
from gpt2scratch.config import preset
from gpt2scratch.model import GPT

REPO = Path(__file__).resolve().parent.parent


def start_server(model_dir: Path, log: Path, max_batch: int, dtype: str) -> tuple[subprocess.Popen, str]:
    """A server on 127.0.0.1 and a free port; returns once /health answers."""
    command = [sys.executable, "-m", "gpt2scratch", "serve", "--pretrained", str(model_dir), "--port", "0",
               "--dtype", dtype, "--max-batch", str(max_batch), "--max-queue", "1024"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("GPT2SCRATCH_API_KEY", None)
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    url = None
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            url = found.group(1)
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    process.kill()
    sys.exit(f"the server did not start:\n{log.read_text()}")


def completion(client: httpx.Client, url: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    """One streamed completion: (time to the first token, latency, tokens generated)."""
    body = {"prompt": prompt, "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    generated = 0
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
    assert first is not None
    return first, time.perf_counter() - start, generated


def load(url: str, concurrency: int, rounds: int, tokens: int) -> dict[str, float]:
    """``concurrency`` clients, each sending ``rounds`` completions in turn; the figures of the run."""
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client_loop(number: int) -> None:
        with httpx.Client() as client:
            for r in range(rounds):
                result = completion(client, url, f"Client {number}, round {r}: once upon a time", tokens)
                with lock:
                    results.append(result)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, range(concurrency)))
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    latency = sorted(r[1] for r in results)
    return {
        "requests": len(results),
        "tokens/s": sum(r[2] for r in results) / wall,
        "p50 latency": statistics.median(latency),
        "p99 latency": quantile(latency, 0.99),
        "p50 TTFT": statistics.median(ttft),
        "p99 TTFT": quantile(ttft, 0.99),
    }


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of sorted ``values`` (nearest rank: with few requests, p99 is the slowest)."""
    return values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="model shape (a random model of it is served)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per completion")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="completions per client")
    parser.add_argument("--dtype", default="auto", help="the server's --dtype")
    parser.add_argument("--max-batch", type=int, default=16, help="--max-batch of the batched server")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        torch.manual_seed(0)
        export(GPT(preset(args.preset)), model_dir)
        rows = []
        for label, max_batch in (("on", args.max_batch), ("off (--max-batch 1)", 1)):
            process, url = start_server(model_dir, Path(tmp) / f"server-{max_batch}.log", max_batch, args.dtype)
            try:
                completion(httpx.Client(), url, "warm-up", 4)
                for concurrency in levels:
                    figures = load(url, concurrency, args.rounds, args.tokens)
                    rows.append((label, concurrency, figures))
                    print(f"batching {label}, concurrency {concurrency}: {figures}", file=sys.stderr)
            finally:
                process.terminate()
                process.wait(60)
    print(f"\n#### Serving, {args.preset}, {args.tokens}-token completions, {args.rounds} per client\n")
    print("| batching | concurrency | requests | tokens/s | p50 / p99 latency (s) | p50 / p99 TTFT (s) |")
    print("|---|---|---|---|---|---|")
    for label, concurrency, f in rows:
        latency = f"{f['p50 latency']:.2f} / {f['p99 latency']:.2f}"
        ttft = f"{f['p50 TTFT']:.3f} / {f['p99 TTFT']:.3f}"
        print(f"| {label} | {concurrency} | {f['requests']:.0f} | {f['tokens/s']:.1f} | {latency} | {ttft} |")
    batched = {c: f for label, c, f in rows if label == "on"}
    if 1 in batched and max(levels) in batched:
        top = max(levels)
        speedup = batched[top]["tokens/s"] / batched[1]["tokens/s"]
        print(f"\nbatching on: concurrency {top} makes {speedup:.2f}x the tokens/s of concurrency 1 (target >= 4x); "
              f"p99 TTFT {batched[top]['p99 TTFT']:.3f} s (target < 1 s)")  # fmt: skip


if __name__ == "__main__":
    main()
