"""GPU benchmark, in one run: training throughput and MFU (our defaults and variants against a build-nanogpt-style
compiled model and transformers compiled, all written or built here), the share of training time that snapshots
take at the seed's interval, and decoding speed against transformers' ``generate``. Run by hand on a GPU:

    pip install -e ".[bench]"
    python benchmarks/gpu.py               # 124M, B=16, T=1024, bf16: ~6 minutes on one H100
    python benchmarks/gpu.py --quick       # a tiny model on the CPU in under a minute (CI runs this)

Prints Markdown tables. MFU is against the device's dense peak in the training dtype (training/flops.py), where
known. Every row trains or decodes the same shapes from the same random weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from gpt2scratch.config import GPTConfig, TrainConfig
from gpt2scratch.data import shards
from gpt2scratch.device import pick_device
from gpt2scratch.model import GPT
from gpt2scratch.training.flops import flops_per_token, peak_flops


@dataclasses.dataclass(frozen=True)
class Setup:
    preset: str
    n_layer: int
    n_head: int
    n_embd: int
    batch: int
    seq: int
    steps: int  # steps of our runs (200: long enough for --compile auto to compile)
    warmup: int  # steps not timed
    baseline_steps: int
    new_tokens: int  # decoding
    dtype: str


FULL = Setup("gpt2", 12, 12, 768, 16, 1024, 200, 20, 40, 500, "bfloat16")
QUICK = Setup("tiny", 2, 2, 64, 4, 64, 30, 5, 10, 32, "float32")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def shape(setup: Setup) -> GPTConfig:
    return GPTConfig(n_layer=setup.n_layer, n_head=setup.n_head, n_embd=setup.n_embd, block_size=setup.seq)


def token_shards(folder: Path, count: int) -> Path:
    """A train shard of random GPT-2 token ids, in llm.c's format: data without tokenizing anything."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(0).integers(0, 50257, count, dtype=np.uint16)
    (folder / "train_000000.bin").write_bytes(shards.header(count) + tokens.tobytes())
    return folder


# ---- training: ours, through the real loop ----


def train_ours(setup: Setup, device: torch.device, work: Path, name: str, **flags: Any) -> dict[str, Any]:
    """Our training loop on random tokens: median tokens/s of the timed steps, and wall time per step."""
    from gpt2scratch.training.loop import train

    data = token_shards(work / "data", setup.batch * setup.seq * (setup.steps + 2) + 1)
    cfg = TrainConfig(
        input=str(data), out_dir=str(work / name), preset="gpt2", n_layer=setup.n_layer, n_head=setup.n_head,
        n_embd=setup.n_embd, block_size=setup.seq, batch_size=setup.batch, seq_len=setup.seq,
        max_steps=setup.steps, target_loss=0.0, device=str(device), dtype=setup.dtype, no_sample=True,
        no_plot=True, log_interval=10**9, eval_interval=10**9, **{"snapshot_interval": 0, **flags},
    )  # fmt: skip
    train(cfg)
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    start = max(1, setup.warmup)  # the first step's record is where the timing starts
    timed = records[start:]
    wall = (timed[-1]["elapsed"] - records[start - 1]["elapsed"]) / len(timed)
    return {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in timed), "seconds_per_step": wall}


# ---- training: the baselines, written here ----


class NanoBlock(torch.nn.Module):
    """A GPT-2 block as build-nanogpt writes one: fused qkv, SDPA with is_causal, tanh GELU."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(c), torch.nn.LayerNorm(c)
        self.qkv, self.proj = torch.nn.Linear(c, 3 * c), torch.nn.Linear(c, c)
        self.fc, self.out = torch.nn.Linear(c, 4 * c), torch.nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(C, 2))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class NanoGPT(torch.nn.Module):
    """build-nanogpt's model, in its spirit: tied embedding padded to 50,304 rows, weights N(0, 0.02)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        c = config.n_embd
        self.wte = torch.nn.Embedding(50304, c)
        self.wpe = torch.nn.Embedding(config.block_size, c)
        self.blocks = torch.nn.ModuleList(NanoBlock(c, config.n_head) for _ in range(config.n_layer))
        self.ln = torch.nn.LayerNorm(c)
        for p in self.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.ln(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def train_baseline(setup: Setup, device: torch.device, which: str) -> dict[str, Any]:
    """A compiled baseline's steps (bf16 autocast where the setup is bf16, fused AdamW, clip 1.0)."""
    config = shape(setup)
    torch.manual_seed(0)
    if which == "nanogpt":
        model: torch.nn.Module = NanoGPT(config).to(device)

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return compiled(x, y)
    else:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        transformers.logging.set_verbosity_error()
        hf = GPT2Config(n_layer=setup.n_layer, n_head=setup.n_head, n_embd=setup.n_embd, n_positions=setup.seq)
        model = GPT2LMHeadModel(hf).to(device)

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return compiled(input_ids=x, labels=x).loss

    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type != "mps")
    dtype = getattr(torch, setup.dtype)
    x = torch.randint(0, 50257, (setup.batch, setup.seq), device=device)
    y = torch.randint(0, 50257, (setup.batch, setup.seq), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, device, warmup=3, steps=setup.baseline_steps)
    return {"tokens_per_sec": setup.batch * setup.seq / seconds, "seconds_per_step": seconds}


def timed(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of ``step`` over ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- decoding ----


def decode_rows(setup: Setup, device: torch.device, work: Path) -> list[tuple[str, int, float, float]]:
    """(dtype, batch, our tokens/s, transformers' tokens/s) for bf16 and fp32 at batch 1 and 5."""
    import transformers
    from transformers import GPT2LMHeadModel

    from gpt2scratch.checkpoint.hf import export

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from gpt2scratch.inference.engine import generate
    from gpt2scratch.inference.load import for_inference

    torch.manual_seed(0)
    plain = GPT(shape(setup))
    export(plain, work / "hf")
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        ours = for_inference(copy.deepcopy(plain), device, dtype)
        theirs = GPT2LMHeadModel.from_pretrained(work / "hf", torch_dtype=dtype).to(device).eval()
        for batch in (1, 5):
            idx = torch.randint(0, 50257, (batch, 8), device=device)
            n = setup.new_tokens
            run_ours = functools.partial(
                generate, ours, idx, n, top_k=50, generator=torch.Generator(device=device).manual_seed(0)
            )
            run_theirs = functools.partial(
                theirs.generate, idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                do_sample=True, top_k=50, pad_token_id=50256,
            )  # fmt: skip
            with torch.no_grad():
                mine, other = timed(run_ours, device, 1, 2), timed(run_theirs, device, 1, 2)
            rows.append((str(dtype).removeprefix("torch."), batch, batch * n / mine, batch * n / other))
    return rows


# ---- the tables ----


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model on the CPU: checks the script, not speed")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    device = torch.device("cpu") if args.quick else pick_device(args.device)
    dtype = getattr(torch, setup.dtype)
    peak = peak_flops(device, dtype)
    per_token = flops_per_token(shape(setup), setup.seq)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {setup.preset}-shaped model ({setup.n_layer} layers, "
          f"{setup.n_embd} wide), B={setup.batch}, T={setup.seq}, {setup.dtype}\n")  # fmt: skip

    def mfu(tokens_per_sec: float) -> str:
        return "n/a" if peak is None else f"{per_token * tokens_per_sec / peak:.1%}"

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        rows = {
            "gpt2-scratch, defaults": train_ours(setup, device, work, "defaults"),
            "gpt2-scratch, --compile off": train_ours(setup, device, work, "eager", compile="off"),
            "gpt2-scratch, --pad-vocab off": train_ours(setup, device, work, "unpadded", pad_vocab="off"),
            "build-nanogpt-style model, compiled": train_baseline(setup, device, "nanogpt"),
            "transformers GPT2LMHeadModel, compiled": train_baseline(setup, device, "transformers"),
        }
        snapshots = train_ours(setup, device, work, "snapshots", snapshot_interval=10)
        baseline = rows["build-nanogpt-style model, compiled"]["tokens_per_sec"]
        print("| training | tokens/s | MFU | vs build-nanogpt-style |\n|---|---|---|---|")
        for label, result in rows.items():
            rate = result["tokens_per_sec"]
            print(f"| {label} | {rate:,.0f} | {mfu(rate)} | {rate / baseline:.2f}x |")
        plain_step = rows["gpt2-scratch, defaults"]["seconds_per_step"]
        share = max(0.0, 1 - plain_step / snapshots["seconds_per_step"])
        print(f"\nsnapshots every 10 steps (defaults): {snapshots['seconds_per_step'] * 1000:.1f} ms a step against "
              f"{plain_step * 1000:.1f} ms without: {share:.1%} of training time\n")  # fmt: skip
        print("| decoding, top-k 50 | batch | gpt2-scratch tokens/s | transformers generate tokens/s | ratio |")
        print("|---|---|---|---|---|")
        for dtype_name, batch, mine, theirs in decode_rows(setup, device, work):
            print(f"| {dtype_name}, {setup.new_tokens} new tokens | {batch} | {mine:,.1f} | {theirs:,.1f} | "
                  f"{mine / theirs:.2f}x |")  # fmt: skip
    assert math.isfinite(share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
