"""Memory per rank and step time of DDP, FSDP, and FSDP with activation checkpointing. Run by hand, never in CI.

    python benchmarks/parallel_memory.py                          # gpt2-medium, B=4, T=256, 2 ranks, CPU (gloo), fp32
    python benchmarks/parallel_memory.py --preset tiny --steps 2  # a quick check that it runs
    python benchmarks/parallel_memory.py --device cuda --preset gpt2-xl -B 8 -T 1024 --dtype bfloat16 \
        --peak-tflops 989                                         # on 2 GPUs, with MFU against that peak

Each row is a fresh ``torchrun --nproc_per_node N`` whose workers are this file: the model of the preset, sharded or
wrapped by parallel.py as ``train --parallel`` does, AdamW, random tokens, one warm-up step and ``--steps`` timed
ones. Per rank it reports the bytes of weights, gradients and AdamW state that rank holds (FSDP: about 1/N of DDP's),
the peak memory while stepping (on the CPU the peak RSS since the model was set up, freed set-up memory returned to
the OS first; on CUDA the peak allocated), and the median step time. The table shows the largest rank.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
MODES = {"DDP": ("ddp", False), "FSDP": ("fsdp", False), "FSDP + activation checkpointing": ("fsdp", True)}
GIB = 2**30


def worker(args: argparse.Namespace) -> None:
    """One rank: set up as training does, step, print one JSON line starting with RESULT."""
    import torch

    from gpt2scratch.config import TrainConfig
    from gpt2scratch.device import autocast, pick_dtype
    from gpt2scratch.distributed import parallelize as parallel
    from gpt2scratch.distributed.world import from_env, init, shutdown
    from gpt2scratch.model import GPT
    from gpt2scratch.training.optim import make_optimizer

    world = from_env()
    device = init(world, torch.device(args.device))
    mode, recompute = MODES[args.worker]
    cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, parallel=mode,
                      activation_checkpointing=recompute, device=args.device, dtype=args.dtype)  # fmt: skip
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(0)
    model = parallel.parallelize(GPT(cfg.model_config()).to(device), cfg, world, device, dtype)
    optimizer = make_optimizer(model)
    wrapped = parallel.wrap(model, world, device)
    generator = torch.Generator().manual_seed(world.rank)
    x, y = (torch.randint(0, 50257, (cfg.batch_size, cfg.seq_len), generator=generator).to(device) for _ in "xy")
    held: dict[str, int] = {}

    def step() -> float:
        started = time.perf_counter()
        with autocast(device, dtype):
            _, loss = wrapped(x, y, return_logits=False)
        loss.backward()
        held["grads"] = nbytes(p.grad for p in model.parameters() if p.grad is not None)
        parallel.clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    step()  # warm-up: AdamW's state is allocated here
    release_freed_memory(device)
    times = [step() for _ in range(args.steps)]
    held["weights"] = nbytes(model.parameters())
    held["optimizer"] = nbytes(t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    result = {"rank": world.rank, "peak": peak, "step": statistics.median(times), **held}
    print("RESULT " + json.dumps(result), flush=True)
    shutdown(world)


def nbytes(tensors: Any) -> int:
    """Bytes of the given tensors held by this rank (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def release_freed_memory(device: Any) -> None:
    """Forget the set-up's peak: return freed heap memory to the OS and reset the peak counters."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS (Linux)


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_mode(mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}"]
    launcher.append(f"--master_port={port}")
    options = ["--preset", args.preset, "-B", str(args.batch_size), "-T", str(args.seq_len), "--steps", str(args.steps),
               "--device", args.device, "--dtype", args.dtype]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([*launcher, str(HERE), "--worker", mode, *options], capture_output=True, text=True, env=env)
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or len(results) != args.nproc:
        print(f"[{mode} failed]\n{done.stderr[-3000:]}", file=sys.stderr)
        return []
    print(f"  {mode}: {results}", file=sys.stderr)
    return results


def flops_per_token(preset: str, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (the position embedding aside) plus attention's 12 L C T."""
    import torch

    from gpt2scratch.config import PRESETS
    from gpt2scratch.model import GPT

    config = PRESETS[preset]
    with torch.device("meta"):  # shapes only
        n = GPT(config).num_params(non_embedding=True)
    return 6 * n + 12 * config.n_layer * config.n_embd * seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)  # a rank of one row
    parser.add_argument("--preset", default="gpt2-medium")
    parser.add_argument("-B", "--batch-size", type=int, default=4)
    parser.add_argument("-T", "--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode (median reported)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (processes; GPUs with --device cuda)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    parser.add_argument("--peak-tflops", type=float, help="the accelerator's peak in the dtype, for MFU")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    tokens = args.nproc * args.batch_size * args.seq_len
    print(f"{args.preset}, world size {args.nproc}, B={args.batch_size} per rank, T={args.seq_len}, {args.device}, "
          f"{args.dtype}; the largest rank, median of {args.steps} steps\n")  # fmt: skip
    print("| mode | weights / grads / AdamW state per rank (GiB) | peak memory per rank (GiB) | step (s) | tokens/s |"
          + (" MFU |" if args.peak_tflops else ""))  # fmt: skip
    print("|---|---|---|---|---|" + ("---|" if args.peak_tflops else ""))
    for mode in MODES:
        results = run_mode(mode, args)
        if not results:
            print(f"| {mode} | failed | | | |")
            continue
        top = max(results, key=lambda r: r["peak"])
        held = " / ".join(f"{max(r[k] for r in results) / GIB:.2f}" for k in ("weights", "grads", "optimizer"))
        step = max(r["step"] for r in results)
        row = f"| {mode} | {held} | {top['peak'] / GIB:.2f} | {step:.2f} | {tokens / step:.0f} |"
        if args.peak_tflops:
            achieved = flops_per_token(args.preset, args.seq_len) * tokens / step
            row += f" {achieved / (args.peak_tflops * 1e12 * args.nproc):.0%} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
