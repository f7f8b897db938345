"""Where a batch-1 decoding step's time goes: gpt2-scratch's engine on a random 124M model, one token at a time.

    python benchmarks/decode_profile.py --dtype fp32     # or bf16, int8

Prints the time per token over 200 steps after a warm-up, the bytes of the weights a step reads, how long one plain
pass over a buffer of that size takes with the same threads (the memory floor of a step), and torch.profiler's table
of the ops of 50 steps by their own time. Run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gpt2scratch.config import GPTConfig
from gpt2scratch.device import configure_matmul
from gpt2scratch.inference.engine import Engine
from gpt2scratch.inference.load import for_inference
from gpt2scratch.inference.sampling import sample
from gpt2scratch.model import GPT

DTYPES = {"fp32": (torch.float32, "none"), "bf16": (torch.bfloat16, "none"), "int8": (torch.bfloat16, "int8")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    configure_matmul(cpu)
    dtype, quantize = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = for_inference(GPT(GPTConfig()), cpu, dtype, quantize)
    tensors = [*model.parameters(), *model.buffers()]
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)

    engine = Engine(model, 1)
    logits = engine.prefill([[464, 2068, 7586, 21831, 18045, 625, 262, 16931]])  # 8 tokens
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        nonlocal logits
        logits = engine.step(sample(logits, 1.0, 50, None, generator))

    for _ in range(20):
        step()
    steps = 200
    started = time.perf_counter()
    for _ in range(steps):
        step()
    per_token = (time.perf_counter() - started) / steps

    floor = torch.ones(weight_bytes // 4, dtype=torch.float32)
    for _ in range(3):
        floor.sum()
    started = time.perf_counter()
    for _ in range(10):
        floor.sum()
    one_pass = (time.perf_counter() - started) / 10

    print(
        f"{args.dtype}, batch 1, {args.threads} threads: {per_token * 1e3:.2f} ms a token ({1 / per_token:.1f} tok/s); "
        f"weights {weight_bytes / 1e6:.0f} MB, one pass over that many bytes {one_pass * 1e3:.2f} ms "
        f"({weight_bytes / one_pass / 1e9:.1f} GB/s)"
    )
    with torch.profiler.profile() as profiler:
        for _ in range(50):
            step()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
