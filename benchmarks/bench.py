"""Side-by-side benchmark: gpt2-scratch vs transformers on this machine, in one run. Run by hand, never in CI.

    pip install -e ".[bench]"
    OMP_NUM_THREADS=2 python benchmarks/bench.py                  # everything (~25 min on a 2-core CPU)
    python benchmarks/bench.py --only train --shapes 4x32          # one section, one shape

Each measurement runs in a fresh child process (so global settings such as matmul precision never leak between
rows) and reports its peak RSS. Prints Markdown tables with the ratios the speed issue asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SEQ_DEFAULTS = {"4x32": (4, 32, 3, 15), "8x256": (8, 256, 1, 5)}  # B, T, warm-up steps, timed steps


# ---------------------------------------------------------------- children: each prints one JSON line ----


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _tokens(n: int) -> Any:
    """The first n tokens of the built-in Shakespeare corpus (int64 tensor)."""
    import torch

    from gpt2scratch.data.builtin import shakespeare_text
    from gpt2scratch.tokenizer import encode_batch

    text = shakespeare_text()[: n * 6]
    return torch.tensor(encode_batch([text])[0][:n], dtype=torch.long)


def child_matmul(dtype_name: str) -> dict[str, Any]:
    """GFLOP/s of the GPT-2 MLP matmul shapes (128 and 2048 rows), the best of several timings."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    results = []
    for m in (128, 2048):
        a = torch.randn(m, 768, dtype=dtype)
        w = torch.randn(3072, 768, dtype=dtype)
        for _ in range(3):
            torch.nn.functional.linear(a, w)
        best = 0.0
        for _ in range(5):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.3:
                torch.nn.functional.linear(a, w)
                n += 1
            best = max(best, 2 * m * 768 * 3072 * n / (time.perf_counter() - t0) / 1e9)
        results.append(best)
    return {"gflops": max(results)}


def child_train_ours(b: int, t: int, warmup: int, steps: int, snapshot_interval: int) -> dict[str, Any]:
    """Our real training loop with auto settings (what `gpt2-scratch train` does), timed from metrics.jsonl."""
    from gpt2scratch.config import TrainConfig
    from gpt2scratch.training.loop import train

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as out:
        cfg = TrainConfig(
            data="shakespeare",
            out_dir=out,
            batch_size=b,
            seq_len=t,
            max_steps=warmup + steps,
            target_loss=0.0,
            snapshot_interval=snapshot_interval,
            keep_snapshots=1,
            no_sample=True,
        )
        t0 = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_sec"] for r in records[warmup:]]
    return {
        "tokens_per_sec": statistics.median(timed),
        "steps_wall": records[-1]["elapsed"] - records[warmup - 1]["elapsed"],  # the timed steps, stalls included
        "elapsed": [r["elapsed"] for r in records],
        "wall": wall,
        "dtype": str(result.dtype).removeprefix("torch."),
        "rss": _peak_rss_gib(),
    }


def child_train_hf(b: int, t: int, warmup: int, steps: int, best: bool) -> dict[str, Any]:
    """transformers' GPT2LMHeadModel: fp32 + plain AdamW (defaults), or bf16 autocast + fused AdamW (its best)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1337)
    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=best)
    tokens = _tokens(b * t * (warmup + steps) + 1)
    times = []
    for step in range(warmup + steps):
        x = tokens[step * b * t : (step + 1) * b * t].view(b, t)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=best):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return {"tokens_per_sec": b * t / statistics.median(times[warmup:]), "rss": _peak_rss_gib()}


def child_generate(impl: str, new: int, dtype_name: str) -> dict[str, Any]:
    """New tokens/s for batch 5, an 8-token prompt, top-k 50: ours (KV cache or not) or transformers' generate."""
    import torch

    from gpt2scratch import GPT, GPTConfig
    from gpt2scratch.device import configure_matmul
    from gpt2scratch.inference.load import for_inference
    from gpt2scratch.tokenizer import encode

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    prompt = torch.tensor([encode("Hello, I'm a language model,")[:8]] * 5)
    torch.manual_seed(0)
    if impl == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config()).eval()

        def run(n: int) -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=True,
                    top_k=50,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    pad_token_id=50256,
                )
    else:
        # What `gpt2-scratch generate` does: the fp32 matmul path check, the weights cast once to the dtype.
        configure_matmul(torch.device("cpu"))
        ours = for_inference(GPT(GPTConfig()), torch.device("cpu"), dtype)

        def run(n: int) -> None:
            ours.generate(prompt, n, top_k=50, use_cache=impl == "ours")

    run(4)  # warm-up
    if impl == "ours-nocache" and new > 100:
        # A loop without a cache costs a full forward over the growing context per token; timing all 500 steps takes
        # many minutes, so time every 25th step's forward at its real length and sum (trapezoid) over all steps.
        lengths = list(range(8, 8 + new + 1, 25))
        costs = []
        for length in lengths:
            idx = torch.randint(0, 50257, (5, length))
            t0 = time.perf_counter()
            with torch.no_grad():
                ours(idx, last_only=True)
            costs.append(time.perf_counter() - t0)
        total = sum((costs[i] + costs[i + 1]) / 2 * (lengths[i + 1] - lengths[i]) for i in range(len(costs) - 1))
        return {"tokens_per_sec": 5 * new / total, "estimated": True, "rss": _peak_rss_gib()}
    t0 = time.perf_counter()
    run(new)
    return {"tokens_per_sec": 5 * new / (time.perf_counter() - t0), "rss": _peak_rss_gib()}


def child_tokenize(path: str, ours: bool) -> dict[str, Any]:
    """MB/s, peak RSS and cores used of our tokenizer pipeline (file -> uint16 file), or of one tiktoken thread."""
    from gpt2scratch.data.corpus import tokenize_files
    from gpt2scratch.tokenizer import get_encoding

    source = Path(path)
    size = source.stat().st_size
    get_encoding()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if ours:
        tokenize_files([source], source.with_suffix(".u16"))
    else:
        encoding = get_encoding()
        with open(source, encoding="utf-8") as f:
            while block := f.read(1 << 22):
                encoding.encode_ordinary(block)
    wall = time.perf_counter() - t0
    return {"mb_s": size / wall / 1e6, "cores_used": (time.process_time() - cpu0) / wall, "rss": _peak_rss_gib()}


CHILDREN = {
    "matmul": child_matmul,
    "train_ours": child_train_ours,
    "train_hf": child_train_hf,
    "generate": child_generate,
    "tokenize": child_tokenize,
}


# ---------------------------------------------------------------- parent: run children, print tables ----


def run_child(name: str, *args: Any) -> dict[str, Any]:
    command = [sys.executable, str(HERE), "_child", name, json.dumps(args)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"[{name} {args} failed]\n{done.stderr[-2000:]}", file=sys.stderr)
        return {}
    result = json.loads(lines[-1])
    print(f"  {name} {args}: {result}", file=sys.stderr)
    return result


def flops_per_token(t: int, n_layer: int = 12, n_embd: int = 768) -> float:
    """Training FLOPs per token (6N + attention), N without the position embedding: the 124M model."""
    n = 124_439_808 - 1024 * 768
    return 6 * n + 12 * n_layer * n_embd * t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("train", "generate", "snapshot", "tokenize"), action="append")
    parser.add_argument("--shapes", nargs="+", default=list(SEQ_DEFAULTS), choices=list(SEQ_DEFAULTS))
    parser.add_argument("--gen-lengths", nargs="+", type=int, default=[100, 500])
    parser.add_argument("--tokenize-mb", type=int, default=1024, help="size of the text to tokenize (default 1 GB)")
    args = parser.parse_args()
    sections = args.only or ["train", "generate", "snapshot", "tokenize"]
    import platform

    import torch

    print(f"# gpt2-scratch benchmark — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}\n")  # fmt: skip
    peak = {"bf16": run_child("matmul", "bf16").get("gflops", float("nan")),
            "fp32": run_child("matmul", "fp32").get("gflops", float("nan"))}  # fmt: skip
    print(f"Measured matmul peak (768x3072, best of 128/2048 rows): bf16 {peak['bf16']:.0f} GFLOP/s, "
          f"fp32 {peak['fp32']:.0f} GFLOP/s\n")  # fmt: skip

    if "train" in sections:
        print("## Training, 124M, AdamW lr 3e-4, tokens/s (median step)\n")
        print("| shape | ours (auto) | HF fp32 + AdamW | HF bf16 + fused AdamW | ours/HF fp32 | ours/HF best | "
              "MFU ours | peak RSS ours / HF fp32 / HF best (GiB) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for shape in args.shapes:
            b, t, warm, steps = SEQ_DEFAULTS[shape]
            ours = run_child("train_ours", b, t, warm, steps, 0)
            hf = run_child("train_hf", b, t, warm, steps, False)
            best = run_child("train_hf", b, t, warm, steps, True)
            if not (ours and hf and best):
                continue
            mfu = (
                ours["tokens_per_sec"]
                * flops_per_token(t)
                / 1e9
                / peak["bf16" if ours["dtype"] == "bfloat16" else "fp32"]
            )
            print(f"| B={b},T={t} | {ours['tokens_per_sec']:.0f} ({ours['dtype']}) | {hf['tokens_per_sec']:.0f} | "
                  f"{best['tokens_per_sec']:.0f} | {ours['tokens_per_sec'] / hf['tokens_per_sec']:.2f}x | "
                  f"{ours['tokens_per_sec'] / best['tokens_per_sec']:.2f}x | {mfu:.0%} | "
                  f"{ours['rss']:.1f} / {hf['rss']:.1f} / {best['rss']:.1f} |")  # fmt: skip
        print()

    if "generate" in sections:
        print("## Generation, 124M, batch 5, prompt 8 tokens, top-k 50, new tokens/s\n")
        print("| new tokens | dtype | ours (KV cache) | HF generate | ours without cache | ours/HF | ours/no cache |")
        print("|---|---|---|---|---|---|---|")
        for new in args.gen_lengths:
            for dtype in ("bf16", "fp32"):
                ours = run_child("generate", "ours", new, dtype)
                hf = run_child("generate", "hf", new, dtype)
                slow = run_child("generate", "ours-nocache", new, dtype)
                if not (ours and hf and slow):
                    continue
                note = " (est.)" if slow.get("estimated") else ""
                print(f"| {new} | {dtype} | {ours['tokens_per_sec']:.0f} | {hf['tokens_per_sec']:.0f} | "
                      f"{slow['tokens_per_sec']:.1f}{note} | {ours['tokens_per_sec'] / hf['tokens_per_sec']:.2f}x | "
                      f"{ours['tokens_per_sec'] / slow['tokens_per_sec']:.1f}x |")  # fmt: skip
        print()

    if "snapshot" in sections:
        b, t, warm, _ = SEQ_DEFAULTS["4x32"]
        steps, interval = 100, 10
        without = run_child("train_ours", b, t, warm, steps, 0)
        with_snap = run_child("train_ours", b, t, warm, steps, interval)
        if without and with_snap:
            # Window "all": every timed step. Window "steady": from the step after the first snapshot's stall on,
            # i.e. without the one-time cost of allocating (and on a VM, the host backing) the 1.5 GB buffer.
            first = interval + 1  # the first snapshot is taken after step `interval` and delays the next step
            rows = []
            for name, start in (("all timed steps", warm), (f"steps {first + 1}-{warm + steps}", first)):
                off = without["elapsed"][-1] - without["elapsed"][start - 1]
                on = with_snap["elapsed"][-1] - with_snap["elapsed"][start - 1]
                rows.append((name, off, on, max(0.0, 1 - off / on)))
            stall = (with_snap["elapsed"][first - 1] - with_snap["elapsed"][first - 2]) - (
                without["elapsed"][first - 1] - without["elapsed"][first - 2]
            )
            print(
                f"## Snapshots at the seed's interval (124M, B=4, T=32, every {interval} steps, ~1.5 GB each, "
                f"{steps} steps)\n"
            )
            print("| window | steps' wall time without snapshots | with | share of wall time spent on snapshots |")
            print("|---|---|---|---|")
            for name, off, on, share in rows:
                print(f"| {name} | {off:.1f} s | {on:.1f} s | {share:.1%} |")
            print(f"\nThe first snapshot (allocating its buffer) delayed training by {stall:.1f} s.\n")

    if "tokenize" in sections:
        from gpt2scratch.data.builtin import shakespeare_text

        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            source = Path(tmp) / "big.txt"
            base = shakespeare_text().encode("utf-8")
            with open(source, "wb") as f:
                for _ in range(args.tokenize_mb * 2**20 // len(base) + 1):
                    f.write(base)
                f.flush()
                os.fsync(f.fileno())  # so the kernel is not still writing it back while we measure
            ours = run_child("tokenize", str(source), True)
            single = run_child("tokenize", str(source), False)
        if ours and single:
            print(f"## Tokenization ({args.tokenize_mb} MiB of text, the Shakespeare corpus repeated)\n")
            print("| ours (file -> token file) | tiktoken, one thread | ratio | ours: cores used, peak RSS |")
            print("|---|---|---|---|")
            print(f"| {ours['mb_s']:.1f} MB/s | {single['mb_s']:.1f} MB/s | {ours['mb_s'] / single['mb_s']:.2f}x | "
                  f"{ours['cores_used']:.2f} of {os.cpu_count()}, {ours['rss']:.2f} GiB |\n")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        print(json.dumps(CHILDREN[sys.argv[2]](*json.loads(sys.argv[3]))))
    else:
        main()
