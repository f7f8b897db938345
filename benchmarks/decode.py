"""Decoding speed: gpt2-scratch (fp32, bf16, int8) beside llama.cpp (f32, bf16, q8_0) on the same 124M model, same CPU.
Run by hand, never in CI.

    pip install -e ".[bench]"   # llama-cpp-python compiles llama.cpp from source (~15 min on 2 cores)
    python benchmarks/decode.py --llama-converter PATH/TO/llama.cpp/convert_hf_to_gguf.py
    python benchmarks/decode.py --tokens 50 --batches 1 --no-context-case      # a quick check of the script

llama.cpp's converter is not in the installed wheel: it is in llama-cpp-python's source archive, under
vendor/llama.cpp (``pip download --no-binary :all: --no-deps llama-cpp-python`` fetches it). Without llama_cpp, or
without the converter and GGUF files, only our rows are measured, and a message says why.

The model is a random GPT-2 124M (seed 0), exported to a transformers directory and converted to GGUF f32, bf16 and
q8_0. Every measurement runs in a fresh child process with the same number of threads (``--threads``): the model is
loaded, warmed up, then ``--tokens`` new tokens are timed after an 8-token prompt (top-k 50, temperature 1), with the
prompt's cost cancelled: rate = B * N / (t(prompt + 10 + N tokens) - t(prompt + 10 tokens)). llama.cpp is driven
through its C API (llama-cpp-python's bindings): batch B is B sequence ids in one llama_batch, each row with its own
top-k/dist sampler chain. The context case decodes 100 tokens after a 900-token prompt. Configurations are
interleaved and the best of ``--reps`` repetitions is kept, because a shared machine slows runs at random.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
PROMPT = "Hello, I'm a language model,"  # 8 GPT-2 tokens
SIGILL = -4
PAIRS = [("fp32", "f32"), ("bf16", "bf16"), ("int8", "q8_0")]  # ours, llama.cpp's nearest precision


# ---------------------------------------------------------------- children: each prints one JSON line ----


def prompt_ids(length: int) -> list[int]:
    """The first ``length`` tokens of the built-in Shakespeare corpus, or the 8-token prompt."""
    from gpt2scratch.tokenizer import encode

    if length == 8:
        return encode(PROMPT)[:8]
    from gpt2scratch.data.builtin import shakespeare_text

    return encode(shakespeare_text()[: length * 8])[:length]


def child_ours(precision: str, batch: int, prompt_len: int, new: int, threads: int) -> dict[str, Any]:
    import torch

    from gpt2scratch import GPT, GPTConfig
    from gpt2scratch.device import configure_matmul
    from gpt2scratch.inference.engine import generate
    from gpt2scratch.inference.load import for_inference

    torch.set_num_threads(threads)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    configure_matmul(torch.device("cpu"))  # what `gpt2-scratch generate` does
    torch.manual_seed(0)
    quantize = "int8" if precision == "int8" else "none"
    model = for_inference(GPT(GPTConfig()), torch.device("cpu"), dtype, quantize)
    idx = torch.tensor([prompt_ids(prompt_len)] * batch)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        generate(model, idx, n, top_k=50, generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t0

    return rate(run, batch, new)


def child_llama(path: str, batch: int, prompt_len: int, new: int, threads: int, repack: bool) -> dict[str, Any]:
    import logging

    import llama_cpp as L

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    L.llama_backend_init()
    model_params = L.llama_model_default_params()
    model_params.use_extra_bufts = repack  # llama.cpp's repacked (AMX) weights; off where they crash
    model = L.llama_model_load_from_file(path.encode(), model_params)
    params = L.llama_context_default_params()
    params.n_ctx = 1024 * batch  # each sequence its own 1024 positions
    params.n_batch = params.n_ubatch = max(512, batch * prompt_len)
    params.n_seq_max, params.n_threads, params.n_threads_batch = batch, threads, threads
    ctx = L.llama_init_from_model(model, params)
    prompt = prompt_ids(prompt_len)
    llama_batch = L.llama_batch_init(params.n_batch, 0, batch)

    def submit(items: list[tuple[int, int, int, bool]]) -> None:
        """Decode (token, position, sequence, wants logits) items as one batch."""
        for i, (token, pos, seq, logits) in enumerate(items):
            llama_batch.token[i], llama_batch.pos[i], llama_batch.n_seq_id[i] = token, pos, 1
            llama_batch.seq_id[i][0], llama_batch.logits[i] = seq, logits
        llama_batch.n_tokens = len(items)
        assert L.llama_decode(ctx, llama_batch) == 0

    def run(n: int) -> float:
        t0 = time.perf_counter()
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        chains = []
        for s in range(batch):
            chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(50))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(s))
            chains.append(chain)
        submit([(t, p, s, p == prompt_len - 1) for s in range(batch) for p, t in enumerate(prompt)])
        outputs = [s * prompt_len + prompt_len - 1 for s in range(batch)]  # where each row's logits are
        for step in range(n):
            tokens = [L.llama_sampler_sample(chains[s], ctx, outputs[s]) for s in range(batch)]
            if step == n - 1:
                break  # the n-th token is sampled, as ours is: no forward pass after it
            submit([(tokens[s], prompt_len + step, s, True) for s in range(batch)])
            outputs = list(range(batch))
        for chain in chains:
            L.llama_sampler_free(chain)
        return time.perf_counter() - t0

    return rate(run, batch, new)


def rate(run: Any, batch: int, new: int) -> dict[str, Any]:
    """New tokens/s of ``run(n)`` (the seconds to generate n tokens), the prompt and first tokens cancelled."""
    run(4)  # warm-up: kernels, caches, allocator
    short = run(10)
    long = run(10 + new)
    return {"tokens_per_sec": batch * new / (long - short), "ms_per_step": (long - short) / new * 1e3}


CHILDREN = {"ours": child_ours, "llama": child_llama}


# ---------------------------------------------------------------- parent ----


def run_child(name: str, *args: Any) -> tuple[dict[str, Any], int]:
    command = [sys.executable, str(HERE), "_child", name, json.dumps(args)]
    threads = str(args[-2] if name == "llama" else args[-1])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        if done.returncode != SIGILL:
            print(f"[{name} {args} failed, exit {done.returncode}]\n{done.stderr[-2000:]}", file=sys.stderr)
        return {}, done.returncode
    result = json.loads(lines[-1])
    print(f"  {name} {args}: {result['tokens_per_sec']:.1f} tok/s", file=sys.stderr)
    return result, 0


def make_ggufs(work: Path, converter: Path | None) -> dict[str, Path]:
    """GGUF files of the benchmark model (converted once into ``work``), by llama.cpp precision; {} if impossible."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print('llama.cpp skipped: llama_cpp is not installed (pip install -e ".[bench]", ~15 min)\n')
        return {}
    files = {kind: work / f"gpt2-124M-{kind}.gguf" for _, kind in PAIRS}
    if all(f.exists() for f in files.values()):
        return files
    if converter is None or not converter.exists():
        print("llama.cpp skipped: give --llama-converter (convert_hf_to_gguf.py from llama-cpp-python's source, "
              "under vendor/llama.cpp) to make its GGUF files\n")  # fmt: skip
        return {}
    import torch

    from gpt2scratch import GPT, GPTConfig
    from gpt2scratch.checkpoint.hf import export

    hf = work / "hf"
    if not (hf / "config.json").exists():
        torch.manual_seed(0)  # the same random weights as child_ours
        export(GPT(GPTConfig()), hf)
        config = json.loads((hf / "config.json").read_text())
        config["n_ctx"] = config["n_positions"]  # the converter still reads GPT-2's old key
        (hf / "config.json").write_text(json.dumps(config, indent=2))
    for kind, path in files.items():
        if not path.exists():
            command = [sys.executable, str(converter), str(hf), "--outtype", kind, "--outfile", str(path)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"llama.cpp skipped: converting to {kind} failed:\n{done.stderr[-2000:]}\n")
                return {}
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=500, help="new tokens timed per run (default 500)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 5, 16])
    parser.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions; the fastest counts (default 2)")
    parser.add_argument("--no-context-case", action="store_true", help="skip the 900-token-context rows")
    parser.add_argument("--llama-converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--work", type=Path, help="where the GGUF files are kept between runs (default: a temp dir)")
    args = parser.parse_args()
    import platform

    import torch

    print(f"# decoding, GPT-2 124M — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}\n")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ggufs = make_ggufs(work, args.llama_converter)
        cases = [(8, b, args.tokens) for b in args.batches]
        if not args.no_context_case:
            cases += [(900, b, 100) for b in args.batches if b <= 5]
        best: dict[tuple, float] = {}
        notes: dict[str, str] = {}
        repack = dict.fromkeys(ggufs, True)
        for _ in range(args.reps):
            for prompt_len, batch, new in cases:
                for ours, kind in PAIRS:
                    result, _ = run_child("ours", ours, batch, prompt_len, new, args.threads)
                    keep(best, ("ours", ours, prompt_len, batch), result)
                    if kind not in ggufs:
                        continue
                    for attempt in [True, False] if repack[kind] else [False]:
                        gguf = str(ggufs[kind])
                        result, code = run_child("llama", gguf, batch, prompt_len, new, args.threads, attempt)
                        if code != SIGILL:
                            break
                        # llama.cpp's AMX kernels (repacked q8_0 weights) die with an illegal instruction on some
                        # VMs: its plain CPU kernels then, as a user would have to.
                        repack[kind] = False
                        notes[kind] = f"llama.cpp {kind}: its repacked AMX weights crash here (SIGILL); run without"
                    keep(best, ("llama", kind, prompt_len, batch), result)
    print_table(best, cases, bool(ggufs))
    for note in notes.values():
        print(f"- {note}")


def keep(best: dict[tuple, float], key: tuple, result: dict[str, Any]) -> None:
    if result:
        best[key] = max(best.get(key, 0.0), result["tokens_per_sec"])


def print_table(best: dict[tuple, float], cases: list[tuple[int, int, int]], llama: bool) -> None:
    header = "| prompt, new tokens | batch |"
    for ours, kind in PAIRS:
        header += f" ours {ours} |" + (f" llama.cpp {kind} | ratio |" if llama else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for prompt_len, batch, new in cases:
        row = f"| {prompt_len}, {new} | {batch} |"
        for ours, kind in PAIRS:
            mine = best.get(("ours", ours, prompt_len, batch))
            row += f" {mine:.1f} |" if mine else " - |"
            if llama:
                theirs = best.get(("llama", kind, prompt_len, batch))
                row += f" {theirs:.1f} |" if theirs else " - |"
                row += f" {mine / theirs:.2f}x |" if mine and theirs else " - |"
        print(row)
    print("\nnew tokens/s, best of the repetitions; ratio = ours / llama.cpp at the nearest precision")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        print(json.dumps(CHILDREN[sys.argv[2]](*json.loads(sys.argv[3]))))
    else:
        main()
