"""A/B of the fused output head + loss (loss.py) inside a real 124M training step. Run by hand, never in CI.

    OMP_NUM_THREADS=2 python benchmarks/head_loss.py                 # B=8, T=256, bf16 autocast where supported
    python benchmarks/head_loss.py --shape 4x32 --rounds 5

Steps alternate between ``model(x, y)`` (logits, then F.cross_entropy in fp32) and ``model(x, y,
return_logits=False)`` (the fused path), so both see the same machine noise; prints the median step of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt2scratch import GPT, GPTConfig
from gpt2scratch import device as devices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8x256", help="BxT (default 8x256)")
    parser.add_argument("--rounds", type=int, default=4, help="timed steps of each kind (default 4)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    args = parser.parse_args()
    b, t = (int(n) for n in args.shape.split("x"))
    cpu = torch.device("cpu")
    dtype = devices.pick_dtype(args.dtype, cpu)
    devices.keep_freed_memory()
    devices.configure_matmul(cpu)
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    x, y = torch.randint(0, 50257, (b, t)), torch.randint(0, 50257, (b, t))

    def step(fused: bool) -> float:
        t0 = time.perf_counter()
        with devices.autocast(cpu, dtype):
            _, loss = model(x, y, return_logits=not fused)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - t0

    for fused in (False, True):  # warm-up
        step(fused)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for fused in (False, True):
            times[fused].append(step(fused))
    plain, fused = statistics.median(times[False]), statistics.median(times[True])
    print(f"124M, B={b}, T={t}, {str(dtype).removeprefix('torch.')}, median of {args.rounds} alternating steps\n")
    print("| head + loss | s/step | tokens/s |")
    print("|---|---|---|")
    print(f"| logits, then F.cross_entropy | {plain:.2f} | {b * t / plain:.0f} |")
    print(f"| fused (loss.py) | {fused:.2f} | {b * t / fused:.0f} |")
    print(f"\nfused saves {1 - fused / plain:.0%} of a step")


if __name__ == "__main__":
    main()
