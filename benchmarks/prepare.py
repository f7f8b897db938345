"""`gpt2-scratch prepare` on a large JSON-lines file against one tiktoken thread on the same documents.

    python benchmarks/prepare.py                 # ~1 GB of jsonl (the Shakespeare corpus, cut into documents)
    python benchmarks/prepare.py --mb 20         # a quick check of the script
    taskset -c 0,1 python benchmarks/prepare.py  # the README's figure: 2 cores

Makes the jsonl (documents of ~4 KB: the plays cut at line ends, copied with a number in front until the size is
reached), runs `python -m gpt2scratch prepare` on it as a user would, then encodes the same documents with
tiktoken's gpt2 encoding on one thread in this process. Prints MB/s of document text for each (prepare's: the whole
command, and without the interpreter's start-up, timed apart), their ratio, the cores prepare used and its peak RSS
(its largest process). Run by hand, never in CI.
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

SRC = Path(__file__).resolve().parent.parent / "src"
LAUNCHER = """
import json, resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"cpu_seconds": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss}, f)
sys.exit(code)
"""


def documents(size: int) -> list[str]:
    """The plays cut at line ends into documents of ~4 KB, as many copies as make ``size`` bytes of text."""
    from gpt2scratch.data.builtin import shakespeare_text

    text, pieces, start = shakespeare_text(), [], 0
    while start < len(text):
        end = text.find("\n", start + 4000)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    found, total, copy = [], 0, 0
    while total < size:
        for piece in pieces:
            doc = f"{copy}: {piece}"
            found.append(doc)
            total += len(doc.encode("utf-8"))
            if total >= size:
                break
        copy += 1
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=1024, help="MB of document text (default 1024)")
    parser.add_argument("--workers", type=int, default=None, help="prepare --workers (default: one per core)")
    parser.add_argument("--parallel", default="auto", choices=("auto", "threads", "processes"))
    parser.add_argument("--dir", default=None, help="where to write the jsonl and the shards (default: a temp dir)")
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    env = {**os.environ, "PYTHONPATH": str(SRC)}

    folder = Path(args.dir or tempfile.mkdtemp(prefix="prepare-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "docs.jsonl"
    docs = documents(args.mb * 10**6)
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    with open(source, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    del docs
    print(
        f"{source}: {source.stat().st_size / 1e6:.0f} MB of jsonl, {text_bytes / 1e6:.0f} MB of text", file=sys.stderr
    )

    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gpt2scratch", "--version"], env=env, check=True, capture_output=True)
    start_up = time.perf_counter() - started

    command = [sys.executable, "-m", "gpt2scratch", "prepare", str(source), "--out", str(folder / "shards")]
    command += ["--parallel", args.parallel] + (["--workers", str(args.workers)] if args.workers else [])
    # prepare runs under a small launcher that reports its children's resource use. A child forked from this
    # process would count the documents this process still holds in its peak RSS (ru_maxrss survives exec).
    usage_file = folder / "usage.json"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(usage_file), *command], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"prepare failed:\n{done.stderr[-3000:]}")
    print(done.stdout.strip(), file=sys.stderr)
    usage = json.loads(usage_file.read_text())  # prepare and its workers
    cores = usage["cpu_seconds"] / wall
    peak_gib = usage["maxrss_kib"] / 2**20  # the largest process of the tree

    from gpt2scratch.tokenizer import get_encoding

    encode = get_encoding().encode_ordinary
    encoding_seconds = 0.0
    with open(source, "rb") as f:
        for line in f:
            doc = json.loads(line)["text"]
            t0 = time.perf_counter()
            encode(doc)
            encoding_seconds += time.perf_counter() - t0

    prepare_mb_s = text_bytes / wall / 1e6
    warm_mb_s = text_bytes / (wall - start_up) / 1e6
    tiktoken_mb_s = text_bytes / encoding_seconds / 1e6
    mode = next((line for line in done.stdout.splitlines() if line.startswith("tokenizing on")), "")
    print(f"\n## prepare: {text_bytes / 1e6:.0f} MB of text in jsonl, {len(os.sched_getaffinity(0))} cores ({mode})\n")
    print("| prepare (whole command) | without start-up | tiktoken, one thread | ratio | cores used | peak RSS |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {prepare_mb_s:.1f} MB/s | {warm_mb_s:.1f} MB/s | {tiktoken_mb_s:.1f} MB/s | "
        f"{warm_mb_s / tiktoken_mb_s:.2f}x | {cores:.2f} | {peak_gib:.2f} GiB |"
    )
    print(f"\n(start-up of the interpreter and package: {start_up:.1f} s; prepare's whole run: {wall:.1f} s)")


if __name__ == "__main__":
    main()
