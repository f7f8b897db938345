"""Perplexity throughput: `gpt2-scratch eval --perplexity` against transformers' sliding-window loop (the method of
its perplexity guide), on the same text, the same weights (a random 124M GPT-2, exported) and the same dtype.

    python benchmarks/perplexity.py                      # 124M, 16k tokens of Shakespeare, context 1024, stride 512
    python benchmarks/perplexity.py --tokens 4096 --dtype bfloat16

Prints a table: predicted tokens per second for each, their ratio, and the two mean losses (equal to ~1e-5 in fp32).
Run by hand, never in CI. After a warm-up window, the two sides run ``--repeat`` times, alternating, and each side's
fastest run counts (on a shared machine the slow runs are the ones another job slowed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side, alternating; the fastest counts")
    args = parser.parse_args()

    from transformers import GPT2LMHeadModel

    from gpt2scratch import GPT, GPTConfig
    from gpt2scratch.checkpoint.hf import export
    from gpt2scratch.data.builtin import shakespeare_text
    from gpt2scratch.device import configure_matmul
    from gpt2scratch.eval import scoring as evaluate
    from gpt2scratch.inference.load import for_inference
    from gpt2scratch.tokenizer import encode

    configure_matmul(torch.device("cpu"))
    dtype = getattr(torch, args.dtype)
    text = shakespeare_text()[: args.tokens * 5]
    ids = encode(text, allow_special=False)[: args.tokens]
    num_bytes = len(text.encode())  # only the ratio of the two sides matters here
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    with tempfile.TemporaryDirectory() as folder:
        export(model, Path(folder) / "hf")
        hf = GPT2LMHeadModel.from_pretrained(Path(folder) / "hf", torch_dtype=dtype).eval()
    ours = for_inference(model, torch.device("cpu"), dtype)

    evaluate.perplexity(ours, [np.array(ids[: args.context])], num_bytes, args.context, args.stride)  # warm-up

    def run_ours() -> tuple[int, float]:
        tokens = [np.array(ids)]
        result = evaluate.perplexity(ours, tokens, num_bytes, args.context, args.stride, args.batch_size, dtype)
        return result.predicted_tokens, result.loss

    def run_transformers() -> tuple[int, float]:
        total, count, previous_end = 0.0, 0, 0
        for begin in range(0, len(ids), args.stride):
            end = min(begin + args.context, len(ids))
            inputs = torch.tensor([ids[begin:end]])
            labels = inputs.clone()
            labels[:, : -(end - previous_end)] = -100
            with torch.no_grad():
                loss = hf(inputs, labels=labels).loss
            valid = int((labels[:, 1:] != -100).sum())
            total, count, previous_end = total + float(loss) * valid, count + valid, end
            if end == len(ids):
                break
        return count, total / count

    seconds: dict[str, list[float]] = {"ours": [], "hf": []}
    outcome = {}
    for _ in range(args.repeat):
        for side, run in (("ours", run_ours), ("hf", run_transformers)):
            t0 = time.perf_counter()
            outcome[side] = run()
            seconds[side].append(time.perf_counter() - t0)
    (predicted, ours_loss), (count, hf_loss) = outcome["ours"], outcome["hf"]
    ours_seconds, hf_seconds = min(seconds["ours"]), min(seconds["hf"])

    print(f"# perplexity, 124M (random weights), {len(ids)} tokens, context {args.context}, stride {args.stride}, "
          f"{args.dtype}, {torch.get_num_threads()} threads, fastest of {args.repeat} runs each\n")  # fmt: skip
    print("| | predicted tokens/s | mean loss |")
    print("|---|---|---|")
    print(f"| gpt2-scratch eval (batch {args.batch_size}) | {predicted / ours_seconds:.0f} | {ours_loss:.6f} |")
    print(f"| transformers sliding-window loop | {count / hf_seconds:.0f} | {hf_loss:.6f} |")
    print(f"\nratio: {hf_seconds / ours_seconds:.2f}x")


if __name__ == "__main__":
    main()
