"""A hostile sweep of the command line: hundreds of bad flags, inputs, out dirs, damaged checkpoints, environments
and signals against train, generate, export, eval, plot, prepare, consolidate and serve's start-up, and token shards,
JSON lines and Parquet files as training input, each in a fresh directory with a tiny model on the CPU.

Run by hand from the repository's root (it is not part of the test suite; a full sweep takes tens of minutes on two
cores):

    PYTHONPATH=src python tools/hostile_sweep.py --out /tmp/sweep [--only REGEX] [--jobs 2]

For each case it records the exit code, whether stderr holds a Traceback or "internal error", whether stderr is one
line (an error) or empty (a success), whether a file that existed before (another run's, the source checkpoint)
changed or vanished (sha256 before and after), temporary files left (``.tmp-``), a death by signal or a hang, and
whether a malicious pickle ran its command, and what a case's own ``check`` finds in its directory afterwards (a
resumed prepare's shards against an uninterrupted run's, say). It prints a table by group and the failing cases, and
writes every outcome to OUT/results.jsonl. A case whose stderr legitimately holds several lines (--debug, a progress
bar) says so in ``multiline``: it is counted apart, not hidden.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--preset",
    "tiny",
    "--n-embd",
    "32",
    "--block-size",
    "64",
    "-B",
    "4",
    "-T",
    "16",
    "--dtype",
    "float32",
    "--device",
    "cpu",
    "--no-sample",
    "--no-plot",
    "--max-steps",
    "2",
]
TRAIN = ["train", *TINY]
QUICK = [*TRAIN, "--target-loss", "100"]  # done at the first step, whatever --max-steps says (a flag may override)
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\n"
    "You are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\nFirst Citizen:\nFirst, you "
    "know Caius Marcius is chief enemy to the people.\n\nAll:\nWe know't, we know't.\n\n"
) * 4
BIG_REPEAT = 60_000  # TEXT * this: ~45 MB, several seconds of tokenizing with a progress bar
BIG_DOCS = 20_500  # lines of big.jsonl, a document of TEXT each: ~25 MB, enough for prepare's progress bar
BIG_PREPARE = ["--shard-tokens", "500000", "--val-tokens", "100000"]  # ~12 shards of big.jsonl
DOCS = "".join(json.dumps({"text": part}) + "\n" for part in TEXT.split("\n\n") if part)  # JSON lines, a speech each
SHARD_MAGIC = 20240520  # llm.c's
PWNED = "PWNED"  # the file a malicious pickle would create in the case's directory
ERROR_CODES = {1, 2}
RUNNING: dict[int, subprocess.Popen] = {}  # the command each worker thread runs now, killed if the sweep is stopped
STOPPING = threading.Event()
# One line: ours, argparse's (prog and command), or the stop of a training run with its resume command.
ERROR_LINE = re.compile(r"error: |(gpt2-scratch|train\.py)( \w+)?: error: |training stopped; snapshot: ")

Setup = Callable[[Path, "Base"], Any]


@dataclass
class Case:
    group: str
    name: str
    argv: list[str]  # after `gpt2-scratch` (or after `python train.py` with script=True)
    setup: Setup | None = None  # makes the case's files in its directory; may return a callable to run at the end
    codes: set[int] | None = None  # the exit codes that are right (None: any of 0, 1, 2)
    env: dict[str, str | None] = field(default_factory=dict)  # None removes a variable
    # (text to wait for, then seconds, then a signal to send, or a function of the output so far and the case's
    # directory to call: hostile requests to a server, say)
    signals: list[tuple[str, float, Any]] = field(default_factory=list)
    own: tuple[str, ...] = ()  # files the command may change (globs, relative to the case's directory)
    multiline: str = ""  # why several stderr lines are right here
    ignore: tuple[int, ...] = ()  # signals the parent process ignores (nohup, a background job)
    script: bool = False  # python train.py instead of gpt2-scratch
    timeout: float = 300
    check: Callable[[Path, Base], list[str]] | None = None  # more problems, found in the case's directory after it


@dataclass
class Base:
    """What cases copy: a 2-step run (snapshots at steps 1 and 2), a finished run, an export, a big text, a sharded
    snapshot of 2 FSDP ranks, a big JSON-lines file and its shards as an uninterrupted prepare writes them."""

    folder: Path

    @property
    def run(self) -> Path:
        return self.folder / "run"

    @property
    def snapshot(self) -> Path:
        return self.run / "snapshots" / "snapshot_step_2.pt"

    @property
    def finished(self) -> Path:
        return self.folder / "finished"

    @property
    def hf(self) -> Path:
        return self.folder / "hf"

    @property
    def big(self) -> Path:
        return self.folder / "big.txt"

    @property
    def sharded(self) -> Path:
        return self.folder / "fsdp" / "snapshots" / "snapshot_step_2"

    @property
    def big_jsonl(self) -> Path:
        return self.folder / "big.jsonl"

    @property
    def prepared(self) -> Path:
        """``prepare big.jsonl --out prepared`` with BIG_PREPARE, run in ``folder``."""
        return self.folder / "prepared"


def gpt2_scratch(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpt2scratch", *args]


def child_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def make_base(folder: Path) -> Base:
    base = Base(folder)
    if (folder / "done").exists():
        return base
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for run, flags in (
        (base.run, ["--snapshot-interval", "1", "--target-loss", "0"]),
        (base.finished, ["--target-loss", "20"]),
    ):
        run.mkdir()
        (run / "input.txt").write_text(TEXT, encoding="utf-8")
        subprocess.run(gpt2_scratch(*TRAIN, *flags), cwd=run, env=child_env(), check=True, capture_output=True)
    subprocess.run(
        gpt2_scratch("export", str(base.snapshot), str(base.hf)), env=child_env(), check=True, capture_output=True
    )
    base.big.write_text(TEXT * BIG_REPEAT, encoding="utf-8")
    fsdp = base.sharded.parent.parent
    fsdp.mkdir()
    (fsdp / "input.txt").write_text(TEXT, encoding="utf-8")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    flags = [*TINY, "-B", "2", "--parallel", "fsdp", "--snapshot-interval", "1", "--target-loss", "0"]
    subprocess.run(
        [*torchrun, str(REPO / "train.py"), *flags], cwd=fsdp, env=child_env(), check=True, capture_output=True
    )
    assert (base.sharded / ".metadata").is_file(), sorted(base.sharded.parent.iterdir())
    base.big_jsonl.write_text((json.dumps({"text": TEXT}) + "\n") * BIG_DOCS, encoding="utf-8")
    prepare = gpt2_scratch("prepare", base.big_jsonl.name, "--out", base.prepared.name, *BIG_PREPARE)
    subprocess.run(prepare, cwd=folder, env=child_env(), check=True, capture_output=True)
    (folder / "done").write_text("")
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- what a case's directory holds ----


def text(name: str = "input.txt", content: str | bytes = TEXT) -> Setup:
    def make(d: Path, base: Base) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))

    return make


def both(*setups: Setup) -> Setup:
    def make(d: Path, base: Base) -> Any:
        ends = [setup(d, base) for setup in setups]
        ends = [end for end in ends if callable(end)]
        return (lambda: [end() for end in ends]) if ends else None

    return make


def snap(name: str = "snap.pt") -> Setup:
    return lambda d, base: shutil.copyfile(base.snapshot, d / name)


def copy_of(source: str, name: str) -> Setup:
    """A copy of the base's ``run``, ``finished`` or ``hf`` folder."""
    return lambda d, base: shutil.copytree(getattr(base, source), d / name, dirs_exist_ok=True)


def big(name: str = "big.txt") -> Setup:
    return lambda d, base: os.link(base.big, d / name)  # a hard link: 45 MB need not be copied for every case


def fifo(name: str) -> Setup:
    return lambda d, base: os.mkfifo(d / name)


def checkpoint(name: str, change: Callable[[dict], Any]) -> Setup:
    """The base snapshot with ``change`` applied to its contents (a dict), saved as ``name``."""

    def make(d: Path, base: Base) -> None:
        import torch

        state = torch.load(base.snapshot, weights_only=True)
        replaced = change(state)
        torch.save(state if replaced is None else replaced, d / name)

    return make


def raw(name: str, content: Callable[[bytes], bytes]) -> Setup:
    return lambda d, base: (d / name).write_bytes(content(base.snapshot.read_bytes()))


class RunsCommand:
    """Unpickling this creates the file PWNED: what a malicious checkpoint does."""

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {PWNED}",))


def evil(name: str, kind: str) -> Setup:
    def make(d: Path, base: Base) -> None:
        import torch

        if kind == "raw":
            (d / name).write_bytes(pickle.dumps(RunsCommand(), protocol=4))
        elif kind == "raw2":
            (d / name).write_bytes(pickle.dumps(RunsCommand(), protocol=2))
        elif kind == "nested":
            state = torch.load(base.snapshot, weights_only=True)
            state["metadata"] = {"x": RunsCommand()}
            torch.save(state, d / name)
        else:
            torch.save(RunsCommand(), d / name)

    return make


def holding(code: str) -> Callable[[], None]:
    """Run ``code`` in another process until it prints "held"; returns what ends that process."""
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return lambda: (holder.kill(), holder.wait())


def lock_holder(out: str) -> Setup:
    """Another process holding the out dir's lock, as a running training does."""

    def make(d: Path, base: Base) -> Callable[[], None]:
        (d / out).mkdir(exist_ok=True)
        code = (
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(d / out / '.gpt2scratch.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True); time.sleep(900)\n"
        )
        return holding(code)

    return make


# ---- the cases ----


def train_flag_cases() -> list[Case]:
    ints = [
        "-B",
        "-T",
        "--grad-accum",
        "--warmup-steps",
        "--max-steps",
        "--eval-interval",
        "--eval-batches",
        "--snapshot-interval",
        "--keep-snapshots",
        "--seed",
        "--n-layer",
        "--n-head",
        "--n-embd",
        "--block-size",
        "--max-tokens",
        "--log-interval",
        "--hellaswag-limit",
    ]
    floats = ["--lr", "--min-lr", "--weight-decay", "--grad-clip", "--target-loss", "--val-fraction", "--dropout"]
    cases = []
    for flag in ints:
        for value in ("-1", "0", "99999999999999999999", "abc"):
            cases.append(Case("train flags", f"{flag}={value}", [*QUICK, flag, value], text()))
    for flag in floats:
        for value in ("-1", "0", "nan", "inf", "1e30", ""):
            cases.append(Case("train flags", f"{flag}={value}", [*QUICK, flag, value], text()))
    odd = {
        "preset-empty": ["--preset", ""],
        "preset-unknown": ["--preset", "gpt5"],
        "device-empty": ["--device", ""],
        "device-cuda": ["--device", "cuda"],
        "device-cuda-99": ["--device", "cuda:99"],
        "device-mps": ["--device", "mps"],
        "device-meta": ["--device", "meta"],
        "dtype-float16": ["--dtype", "float16"],
        "dtype-int8": ["--dtype", "int8"],
        "lr-schedule-bogus": ["--lr-schedule", "step"],
        "data-bogus": ["--data", "tolstoy"],
        "data-and-input": ["--data", "shakespeare", "--input", "input.txt"],
        "allow-changed-empty": ["--allow-changed", ""],
        "allow-changed-no-resume": ["--allow-changed", "lr"],
        "init-from-empty": ["--init-from", ""],
        "init-from-missing": ["--init-from", "nope.pt"],
        "resume-empty": ["--resume", ""],
        "hellaswag-empty": ["--hellaswag", ""],
        "hellaswag-missing": ["--hellaswag", "nope.jsonl"],
        "sample-prompt-huge": ["--sample-prompt", "word " * 200, "--max-steps", "1"],
        "seq-len-over-block": ["-T", "65"],
        "heads-not-dividing": ["--n-head", "3"],
        "model-huge-embd": ["--n-embd", "4000000", "--n-head", "1"],
        "model-huge-layers": ["--n-layer", "1000000"],
        "block-huge": ["--block-size", str(10**12)],
        "val-fraction-too-small": ["--val-fraction", "0.01"],
        "max-tokens-1": ["--max-tokens", "1"],
        "unknown-flag": ["--bogus"],
        "positional": ["extra"],
        "tensorboard": ["--tensorboard"],
        "compile-tiny": ["--compile", "--max-steps", "1"],
        "compile-bogus": ["--compile", "yes"],
        "compile-empty": ["--compile", ""],
        "compile-off": ["--compile", "off"],
        "pad-vocab-on": ["--pad-vocab", "on"],
        "pad-vocab-bogus": ["--pad-vocab", "64"],
        "defer-snapshots-on": ["--defer-snapshots", "on", "--snapshot-interval", "1", "--target-loss", "0"],
        "defer-snapshots-bogus": ["--defer-snapshots", "maybe"],
    }
    for name, flags in odd.items():
        cases.append(Case("train flags", name, [*QUICK, *flags], text(), timeout=600 if "compile" in name else 300))
    cases.append(Case("train flags", "no-command", [], codes={2}))
    cases.append(
        Case(
            "train flags",
            "debug-traceback",
            ["--debug", *TRAIN, "--input", "nope.txt"],
            codes={1},
            multiline="--debug shows the traceback",
        )
    )
    cases.append(Case("train flags", "train.py-bad-lr", [*TINY, "--lr", "-1"], text(), codes={2}, script=True))
    return cases


def run_file_cases() -> list[Case]:
    """Issue 23: the recipe's flags, --config files (TOML or a checkpoint's settings), --recipe and --print-plan."""
    cases = []
    for flag in ("--batch-tokens", "--sample-interval"):
        for value in ("-1", "0", "100", "99999999999999999999", "abc"):
            cases.append(Case("run files", f"{flag}={value}", [*QUICK, flag, value], text()))
    for flag in ("--adam-beta1", "--adam-beta2", "--adam-eps", "--decay-fraction", "--peak-flops"):
        for value in ("-1", "0", "1", "nan", "inf", ""):
            cases.append(Case("run files", f"{flag}={value}", [*QUICK, flag, value], text()))
    schedules = {
        "wsd-no-max-steps": ["--lr-schedule", "wsd", "--max-steps", "0"],
        "linear-steps-1": ["--lr-schedule", "linear", "--max-steps", "1", "--warmup-steps", "5"],
        "batch-tokens-vs-accum": ["--batch-tokens", "256", "--grad-accum", "3"],
        "samples-every-step": ["--sample-interval", "1", "--max-steps", "2", "--target-loss", "0"],
        "samples-huge-prompt": ["--sample-interval", "1", "--sample-prompt", "word " * 200],
    }
    for name, flags in schedules.items():
        cases.append(Case("run files", name, [*QUICK, *flags], text()))
    files: dict[str, Setup] = {
        "empty": text("run.toml", ""),
        "comment-only": text("run.toml", "# nothing\n"),
        "not-toml": text("run.toml", "lr = = 1\n"),
        "binary": text("run.toml", b"\xff\xfe\x00\x01" * 64),
        "nuls": text("run.toml", b"\x00" * 4096),
        "nested-deep": text("run.toml", "x = " + "[" * 50_000 + "]" * 50_000),
        "inline-table-deep": text("run.toml", "x = " + "{a = " * 50_000 + "1" + "}" * 50_000),
        "huge": text("run.toml", "# padding\n" * 300_000),
        "unknown-key": text("run.toml", "learning_rate = 1e-3\n"),
        "table": text("run.toml", "[optimizer]\nadam_beta2 = 0.95\n"),
        "wrong-type": text("run.toml", 'max_steps = "ten"\n'),
        "bool-for-int": text("run.toml", "max_steps = true\n"),
        "int-beyond-64-bits": text("run.toml", "max_steps = 9223372036854775807\nseed = 99999999999999999\n"),
        "float-nan": text("run.toml", "lr = nan\n"),
        "recipe-inside": text("run.toml", 'recipe = "gpt2-124m"\n'),
        "utf8-bom": text("run.toml", "\ufefflr = 1e-3\n"),
        "unicode-key": text("run.toml", '"l\u0280" = 1e-3\n'),
        "out-dir-empty": text("run.toml", 'out_dir = ""\n'),
        "fifo": fifo("run.toml"),
        "directory": lambda d, base: (d / "run.toml").mkdir(),
        "snapshot": snap("run.toml"),
        "snapshot-bad-args": checkpoint("run.toml", _set("train_args", {"lr": "x", "bogus": 1})),
        "snapshot-no-args": checkpoint("run.toml", _drop("train_args")),
        "snapshot-truncated": raw("run.toml", lambda b: b[: len(b) // 2]),
        "pickle-evil": evil("run.toml", "raw"),
        "torch-evil": evil("run.toml", "torch"),
    }
    for name, setup in files.items():
        argv = [*QUICK, "--config", "run.toml"]
        cases.append(Case("run files", f"config-{name}", argv, both(text(), setup), timeout=120))
    cases.append(Case("run files", "config-missing", [*QUICK, "--config", "nope.toml"], text(), codes={2}))
    cases.append(Case("run files", "config-dev-zero", [*QUICK, "--config", "/dev/zero"], text(), codes={2}))
    cases.append(Case("run files", "config-empty-path", [*QUICK, "--config", ""], text(), codes={2}))
    unreadable = both(text(), text("run.toml", "lr = 1e-3\n"), lambda d, base: (d / "run.toml").chmod(0))
    cases.append(Case("run files", "config-unreadable", [*QUICK, "--config", "run.toml"], unreadable))
    for name in ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m", "shakespeare"):
        cases.append(Case("run files", f"print-plan-{name}", ["train", "--recipe", name, "--print-plan"], codes={0}))
        cases.append(Case("run files", f"recipe-{name}-no-data", ["train", "--recipe", name, "--max-steps", "1",
                                                                  "--device", "cpu", "--preset", "tiny"]))  # fmt: skip
    for name, flags in {
        "recipe-unknown": ["--recipe", "gpt5"],
        "recipe-empty": ["--recipe", ""],
        "recipe-path": ["--recipe", "../../etc/passwd"],
        "print-plan-peak-zero": ["--print-plan", "--peak-flops", "0"],
        "print-plan-unwritable-out": ["--print-plan", "--out-dir", "/proc/nope"],
        "print-plan-missing-resume": ["--print-plan", "--resume", "nope.pt"],
    }.items():
        cases.append(Case("run files", name, ["train", *flags]))
    return cases


def generate_cases() -> list[Case]:
    ck = ["generate", "--checkpoint", "snap.pt", "--device", "cpu", "--dtype", "float32"]
    values = {
        "--num-samples": ["-1", "0", "100000000", "abc"],
        "--max-length": ["-1", "0", "1", "1000"],
        "--max-new-tokens": ["-1", "0", "1000"],
        "--top-k": ["-1", "0", "1000000000"],
        "--top-p": ["-1", "0", "2", "nan", "1e-300"],
        "--temperature": ["-1", "nan", "inf", "1e-300", "1e300"],
        "--seed": ["-1", str(2**64), "abc"],
        "--device": ["", "cuda", "tpu"],
        "--dtype": ["float16", "bfloat16"],
    }
    cases = [
        Case(
            "generate",
            f"{flag}={value}",
            [*ck, flag, value, "--max-new-tokens", "4"] if flag != "--max-new-tokens" else [*ck, flag, value],
            snap(),
        )
        for flag, options in values.items()
        for value in options
    ]
    prompts = {
        "prompt-empty": "",
        "prompt-over-block": "word " * 100,
        "prompt-surrogate-bytes": os.fsdecode(b"caf\xe9 \xff"),  # argv that is not UTF-8
        "prompt-special-token": "<|endoftext|>",
    }
    for name, prompt in prompts.items():
        cases.append(Case("generate", name, [*ck, "--prompt", prompt, "--max-new-tokens", "4"], snap()))
    cases += [
        Case("generate", "no-source", ["generate"], codes={2}),
        Case("generate", "both-sources", ["generate", "--checkpoint", "a", "--pretrained", "b"], codes={2}),
        Case("generate", "stream", [*ck, "--stream", "--max-new-tokens", "4", "--num-samples", "2"], snap(), {0}),
        Case(
            "generate",
            "pretrained-hf",
            ["generate", "--pretrained", "hf", "--max-new-tokens", "4"],
            copy_of("hf", "hf"),
            {0},
        ),
        Case(
            "generate",
            "pretrained-hub-offline",
            ["generate", "--pretrained", "gpt2"],
            codes={1},
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": "hf-home"},
        ),
        Case(
            "generate",
            "final-model",
            ["generate", "--checkpoint", "finished/final_model.pt", "--max-new-tokens", "4"],
            copy_of("finished", "finished"),
            {0},
        ),
        Case(
            "generate",
            "ascii-stdout",
            [*ck, "--prompt", "caf\u00e9 \u65e5\u672c", "--max-new-tokens", "4"],
            snap(),
            env={"PYTHONIOENCODING": "ascii", "LC_ALL": "C"},
        ),
        Case("generate", "stdout-closed-pipe", [*ck, "--num-samples", "50", "--max-new-tokens", "30"], snap()),
    ]
    return cases


def input_cases() -> list[Case]:
    inputs: dict[str, tuple[list[str], Setup | None]] = {
        "empty": (["--input", "e.txt"], text("e.txt", b"")),
        "one-newline": (["--input", "n.txt"], text("n.txt", b"\n")),
        "whitespace": (["--input", "w.txt"], text("w.txt", b" \n\t \n" * 100)),
        "binary-elf": (["--input", "b.txt"], text("b.txt", b"\x7fELF\x02\x01" + bytes(range(256)) * 20)),
        "nul-bytes": (["--input", "z.txt"], text("z.txt", TEXT.encode() + b"\x00" + TEXT.encode())),
        "latin-1": (["--input", "l.txt"], text("l.txt", TEXT.replace("Caius", "Ca\u00efus").encode("latin-1"))),
        "utf-16": (["--input", "u.txt"], text("u.txt", TEXT.encode("utf-16"))),
        "bom-utf8": (["--input", "bom.txt"], text("bom.txt", b"\xef\xbb\xbf" + TEXT.encode())),
        "cut-utf8": (["--input", "c.txt"], text("c.txt", TEXT.encode() + "\u65e5".encode()[:2])),
        "too-short": (["--input", "s.txt"], text("s.txt", "Speak.\n")),
        "fifo": (["--input", "pipe"], fifo("pipe")),
        "directory-empty": (["--input", "docs"], lambda d, base: (d / "docs").mkdir()),
        "directory-no-txt": (["--input", "docs"], text("docs/README.md", TEXT)),
        "directory-txt": (["--input", "docs"], text("docs/a.txt", TEXT)),
        "directory-binary-txt": (["--input", "docs"], both(text("docs/a.txt", TEXT), text("docs/b.txt", b"\xff" * 99))),
        "glob-nothing": (["--input", "*.nothing"], None),
        "glob-files": (["--input", "*.txt"], both(text("a.txt"), text("b.txt"))),
        "proc-cpuinfo": (["--input", "/proc/cpuinfo"], None),
        "proc-self-environ": (["--input", "/proc/self/environ"], None),
        "dev-null": (["--input", "/dev/null"], None),
        "dev-zero": (["--input", "/dev/zero"], None),
        "symlink-loop": (["--input", "loop.txt"], lambda d, base: os.symlink("loop.txt", d / "loop.txt")),
        "dangling-symlink": (["--input", "gone.txt"], lambda d, base: os.symlink("nowhere.txt", d / "gone.txt")),
        "no-input-txt": ([], None),
        "input-is-out-dir": (["--input", "input.txt", "--out-dir", "input.txt"], text()),
        "huge-line": (
            ["--input", "line.txt", "--max-steps", "1"],
            text("line.txt", ("word " * 5_000_000).encode()),
        ),
        "unicode-name": (["--input", "\u00e9t\u00e9 \u65e5.txt"], text("\u00e9t\u00e9 \u65e5.txt")),
        "newline-name": (["--input", "a\nb.txt"], text("a\nb.txt")),
        "dash-name": (["--input", "-B"], text("-B")),
    }
    cases = [
        Case("inputs", name, [*TRAIN, *flags], setup, multiline="progress bar" if name == "huge-line" else "")
        for name, (flags, setup) in inputs.items()
    ]
    cases.append(
        Case("inputs", "builtin-shakespeare", [*TRAIN, "--data", "shakespeare", "--max-tokens", "4096"], codes={0})
    )
    return cases


def out_dir_cases() -> list[Case]:
    cases = {
        "a-file": (["--out-dir", "input.txt"], text(), ()),
        "under-a-file": (["--out-dir", "input.txt/out"], text(), ()),
        "proc": (["--out-dir", "/proc/out"], text(), ()),
        "dev-null": (["--out-dir", "/dev/null"], text(), ()),
        "read-only": (["--out-dir", "ro"], both(text(), lambda d, b: (d / "ro").mkdir(mode=0o555)), ()),
        "another-run": (["--out-dir", "victim"], both(text(), copy_of("run", "victim")), ()),
        "another-finished-run": (["--out-dir", "victim"], both(text(), copy_of("finished", "victim")), ()),
        "cwd-is-a-run": ([], copy_of("run", "."), ()),
        "metrics-only": (["--out-dir", "v"], both(text(), text("v/metrics.jsonl", '{"step": 1, "loss": 9}\n')), ()),
        "loss-png-only": (["--out-dir", "v", "--max-steps", "1"], both(text(), text("v/loss.png", b"\x89PNG")), ()),
        "in-use": (["--out-dir", "busy"], both(text(), lock_holder("busy")), ()),
        "snapshots-a-file": (["--out-dir", "v"], both(text(), text("v/snapshots", "notes")), ()),
        "snapshots-a-dangling-link": (
            ["--out-dir", "v"],
            both(text(), lambda d, b: (d / "v").mkdir() or os.symlink("/nope", d / "v/snapshots")),
            (),
        ),
        "final-a-directory": (["--out-dir", "v"], both(text(), text("v/final_model.pt/x", "x")), ()),
        "metrics-a-directory": (["--out-dir", "v"], both(text(), text("v/metrics.jsonl/x", "x")), ()),
        "token-cache-a-file": (["--out-dir", "v"], both(text(), text("v/token_cache", "x")), ()),
        "token-cache-garbage": (
            ["--out-dir", "v"],
            both(text(), text("v/token_cache/tokens-00000000000000000000.u16", b"\xff" * 7)),
            (),
        ),
        "symlink-to-a-run": (
            ["--out-dir", "link"],
            both(text(), copy_of("run", "victim"), lambda d, b: os.symlink("victim", d / "link")),
            (),
        ),
        "stale-temporaries": (
            ["--out-dir", "v"],
            both(text(), text("v/snapshots/.snapshot_step_9.pt.tmp-999999", "x"), text("v/.keep.tmp-1", "mine")),
            ("v/snapshots/.snapshot_step_9.pt.tmp-999999",),
        ),
        "user-files-kept": (
            ["--max-steps", "2"],
            both(text(), text("notes.txt", "mine"), text("data/x.bin", b"1")),
            (),
        ),
    }
    return [Case("out dirs", name, [*TRAIN, *flags], setup, own=own) for name, (flags, setup, own) in cases.items()]


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda state: state.__setitem__(key, value)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda state: state.pop(key)


def _nested(key: str, sub: str, value: Any) -> Callable[[dict], None]:
    return lambda state: state[key].__setitem__(sub, value)


def _each_moment(change: Callable[[dict], Any]) -> Callable[[dict], None]:
    return lambda state: [change(m) for m in state["optimizer_state_dict"]["state"].values()]


def _weights(change: Callable[[dict], Any]) -> Callable[[dict], None]:
    return lambda state: change(state["model_state_dict"])


def damaged_checkpoints() -> dict[str, Setup]:
    """Damaged files, each saved as ``ck.pt``."""
    import torch

    keys = [
        "format_version",
        "kind",
        "model_state_dict",
        "optimizer_state_dict",
        "scaler",
        "config",
        "step",
        "loss",
        "rng",
        "rng_per_rank",
        "loader",
        "train_args",
        "metadata",
    ]
    made: dict[str, Setup] = {}
    for key in keys:
        made[f"{key}-missing"] = checkpoint("ck.pt", _drop(key))
        for label, value in (("none", None), ("text", "12")):
            made[f"{key}-{label}"] = checkpoint("ck.pt", _set(key, value))
    made |= {
        "truncated-half": raw("ck.pt", lambda b: b[: len(b) // 2]),
        "truncated-1k": raw("ck.pt", lambda b: b[:1000]),
        "truncated-tail": raw("ck.pt", lambda b: b[:-10]),
        "empty-file": raw("ck.pt", lambda b: b""),
        "random-bytes": raw("ck.pt", lambda b: random.Random(1).randbytes(50_000)),
        "flipped-bytes": raw("ck.pt", lambda b: b[:4000] + bytes(x ^ 0xFF for x in b[4000:4100]) + b[4100:]),
        "zeros": raw("ck.pt", lambda b: bytes(len(b))),
        "json": raw("ck.pt", lambda b: b'{"model_state_dict": {}}'),
        "evil-torch-save": evil("ck.pt", "torch"),
        "evil-raw-pickle-4": evil("ck.pt", "raw"),
        "evil-raw-pickle-2": evil("ck.pt", "raw2"),
        "evil-nested": evil("ck.pt", "nested"),
        "format-99": checkpoint("ck.pt", _set("format_version", 99)),
        "format-float": checkpoint("ck.pt", _set("format_version", 1.0)),
        "not-a-dict": checkpoint("ck.pt", lambda s: [s]),
        "tensor-only": checkpoint("ck.pt", lambda s: torch.zeros(3)),
        "config-n-layer-huge": checkpoint("ck.pt", _nested("config", "n_layer", 10**6)),
        "config-block-huge": checkpoint("ck.pt", _nested("config", "block_size", 10**12)),
        "config-embd-huge": checkpoint("ck.pt", _nested("config", "n_embd", 2**24)),
        "config-vocab-1": checkpoint("ck.pt", _nested("config", "vocab_size", 1)),
        "config-embd-0": checkpoint("ck.pt", _nested("config", "n_embd", 0)),
        "config-heads-3": checkpoint("ck.pt", _nested("config", "n_head", 3)),
        "config-dropout-2": checkpoint("ck.pt", _nested("config", "dropout", 2.0)),
        "config-unknown-key": checkpoint("ck.pt", _nested("config", "colour", "red")),
        "config-int-key": checkpoint("ck.pt", lambda s: s["config"].__setitem__(7, 1)),
        "weights-missing-key": checkpoint("ck.pt", _weights(lambda w: w.pop("transformer.ln_f.weight"))),
        "weights-extra-key": checkpoint("ck.pt", _weights(lambda w: w.__setitem__("extra", torch.zeros(1)))),
        "weights-wrong-shape": checkpoint(
            "ck.pt", _weights(lambda w: w.__setitem__("transformer.ln_f.weight", torch.zeros(3)))
        ),
        "weights-not-tensor": checkpoint("ck.pt", _weights(lambda w: w.__setitem__("transformer.ln_f.bias", 1.0))),
        "weights-nan": checkpoint("ck.pt", _weights(lambda w: w["transformer.ln_f.weight"].fill_(float("nan")))),
        "weights-int": checkpoint(
            "ck.pt", _weights(lambda w: w.__setitem__("transformer.ln_f.weight", w["transformer.ln_f.weight"].long()))
        ),
        "weights-half": checkpoint(
            "ck.pt", _weights(lambda w: w.__setitem__("transformer.ln_f.weight", w["transformer.ln_f.weight"].half()))
        ),
        "moments-smaller": checkpoint("ck.pt", _each_moment(lambda m: m.update(exp_avg=torch.zeros(3)))),
        "moments-larger": checkpoint("ck.pt", _each_moment(lambda m: m.update(exp_avg_sq=torch.zeros(10**6)))),
        "moments-missing": checkpoint("ck.pt", _each_moment(lambda m: m.pop("exp_avg"))),
        "moment-step-pair": checkpoint("ck.pt", _each_moment(lambda m: m.update(step=torch.tensor([1.0, 2.0])))),
        "moment-step-text": checkpoint("ck.pt", _each_moment(lambda m: m.update(step="x"))),
        "optimizer-groups-3": checkpoint(
            "ck.pt",
            lambda s: s["optimizer_state_dict"]["param_groups"].append(
                dict(s["optimizer_state_dict"]["param_groups"][1])
            ),
        ),
        "optimizer-betas-text": checkpoint(
            "ck.pt", lambda s: [g.__setitem__("betas", "ab") for g in s["optimizer_state_dict"]["param_groups"]]
        ),
        "rng-short": checkpoint("ck.pt", _set("rng", {"cpu": torch.zeros(3, dtype=torch.uint8)})),
        "rng-per-rank-garbage": checkpoint("ck.pt", _set("rng_per_rank", [{"cpu": "x"}])),
        "loader-huge": checkpoint("ck.pt", _set("loader", {"position": 10**15})),
        "loader-float": checkpoint("ck.pt", _set("loader", {"position": 3.5})),
        "step-huge": checkpoint("ck.pt", _set("step", 10**18)),
        "loss-nan": checkpoint("ck.pt", _set("loss", float("nan"))),
        "train-args-garbage": checkpoint("ck.pt", lambda s: s["train_args"].update(batch_size="x", lr=[1])),
        "metadata-garbage": checkpoint(
            "ck.pt", lambda s: s["metadata"].update(input_sha256=5, world_size="x", changed_on_resume="x")
        ),
        "scaler-garbage": checkpoint("ck.pt", _set("scaler", {"scale": "x"})),
    }
    return made


def checkpoint_cases() -> list[Case]:
    cases = []
    model_related = re.compile(
        r"^(truncated|empty|random|flipped|zeros|json|evil|format|not-a-dict|tensor-only|"
        r"config|weights|model_state_dict)"
    )
    for name, setup in damaged_checkpoints().items():
        resume = [*TRAIN, "--resume", "ck.pt", "--max-steps", "4"]
        cases.append(Case("damaged checkpoints", f"resume-{name}", resume, both(text(), setup)))
        if model_related.match(name):
            cases.append(
                Case(
                    "damaged checkpoints",
                    f"generate-{name}",
                    ["generate", "--checkpoint", "ck.pt", "--max-new-tokens", "4"],
                    setup,
                )
            )
            if name.startswith(("config", "evil", "truncated", "weights-wrong", "model_state_dict")):
                cases.append(Case("damaged checkpoints", f"export-{name}", ["export", "ck.pt", "hf"], setup))
    cases += [
        Case(
            "damaged checkpoints",
            "eval-truncated",
            ["eval", "--checkpoint", "ck.pt", "--perplexity", "input.txt"],
            both(text(), damaged_checkpoints()["truncated-half"]),
            {1},
        ),
        Case(
            "damaged checkpoints",
            "init-from-evil",
            [*TRAIN, "--init-from", "ck.pt"],
            both(text(), evil("ck.pt", "raw")),
        ),
        Case(
            "damaged checkpoints",
            "init-from-n-layer-huge",
            [*TRAIN, "--init-from", "ck.pt"],
            both(text(), damaged_checkpoints()["config-n-layer-huge"]),
        ),
        Case(
            "damaged checkpoints",
            "resume-auto-newest-damaged",
            [*TRAIN, "--resume", "auto", "--max-steps", "4", "--out-dir", "run", "--input", "run/input.txt"],
            both(copy_of("run", "run"), raw("run/snapshots/snapshot_step_2.pt", lambda b: b[:999])),
            own=("run/**",),
        ),
        Case(
            "damaged checkpoints",
            "resume-auto-all-damaged",
            [*TRAIN, "--resume", "auto", "--max-steps", "4", "--out-dir", "run", "--input", "run/input.txt"],
            both(
                copy_of("run", "run"),
                raw("run/snapshots/snapshot_step_2.pt", lambda b: b[:999]),
                raw("run/snapshots/snapshot_step_1.pt", lambda b: b[:99]),
            ),
            {1},
        ),
        Case(
            "damaged checkpoints",
            "hf-config-array",
            ["generate", "--pretrained", "hf"],
            both(copy_of("hf", "hf"), text("hf/config.json", "[1]")),
            {1},
        ),
        Case(
            "damaged checkpoints",
            "hf-config-garbage-types",
            ["generate", "--pretrained", "hf"],
            both(copy_of("hf", "hf"), text("hf/config.json", '{"n_embd": null, "n_layer": "x"}')),
            {1, 2},
        ),
        Case(
            "damaged checkpoints",
            "hf-config-not-json",
            ["generate", "--pretrained", "hf"],
            both(copy_of("hf", "hf"), text("hf/config.json", b"\xff\xfe")),
            {1},
        ),
        Case(
            "damaged checkpoints",
            "hf-safetensors-truncated",
            ["generate", "--pretrained", "hf"],
            both(copy_of("hf", "hf"), raw("hf/model.safetensors", lambda b: b"\x08" + bytes(20))),
            {1},
        ),
        Case(
            "damaged checkpoints",
            "hf-no-weights",
            ["generate", "--pretrained", "hf"],
            both(copy_of("hf", "hf"), lambda d, b: (d / "hf/model.safetensors").unlink()),
            {1},
        ),
        Case(
            "damaged checkpoints",
            "hf-evil-bin",
            ["generate", "--pretrained", "hf"],
            both(
                copy_of("hf", "hf"),
                lambda d, b: (d / "hf/model.safetensors").unlink(),
                evil("hf/pytorch_model.bin", "torch"),
            ),
            {1},
        ),
        Case("damaged checkpoints", "checkpoint-is-fifo", ["generate", "--checkpoint", "pipe"], fifo("pipe"), {1}),
        Case("damaged checkpoints", "checkpoint-dev-zero", ["generate", "--checkpoint", "/dev/zero"], None, {1}),
        Case("damaged checkpoints", "checkpoint-proc", ["generate", "--checkpoint", "/proc/self/status"], None, {1}),
        Case("damaged checkpoints", "checkpoint-dir", ["generate", "--checkpoint", "."], None, {1}),
    ]
    return cases


ENV_CASES = {
    "world-size-abc": {"WORLD_SIZE": "abc"},
    "world-size-0": {"WORLD_SIZE": "0"},
    "world-size-negative": {"WORLD_SIZE": "-2", "RANK": "0"},
    "world-size-2-no-rank": {"WORLD_SIZE": "2"},
    "rank-abc": {"WORLD_SIZE": "2", "RANK": "abc"},
    "rank-beyond": {"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "5"},
    "rank-1-no-rendezvous": {
        "WORLD_SIZE": "2",
        "RANK": "1",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    },
    "local-rank-abc": {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "abc"},
    "master-port-abc": {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "abc"},
    "omp-threads-abc": {"OMP_NUM_THREADS": "abc"},
    "cuda-visible-garbage": {"CUDA_VISIBLE_DEVICES": "zz"},
    "locale-c-ascii": {"LC_ALL": "C", "LANG": "C", "PYTHONIOENCODING": "ascii"},
    "home-unset": {"HOME": None},
    "tmpdir-missing": {"TMPDIR": "/nonexistent/tmp"},
}


def environment_cases() -> list[Case]:
    cases = []
    for name, env in ENV_CASES.items():
        # A rank whose master never answers waits for it, as torch does (30 minutes): it must stop on SIGTERM.
        stop = [("", 8.0, signal.SIGTERM)] if name == "rank-1-no-rendezvous" else []
        codes = {143} if stop else None
        cases.append(Case("environment", f"train-{name}", list(TRAIN), text(), codes, env=env, signals=stop))
    for name in ("world-size-abc", "world-size-2-no-rank", "rank-1-no-rendezvous", "omp-threads-abc"):
        env = ENV_CASES[name]
        ok = {2} if name == "omp-threads-abc" else {0}  # the others are torchrun's, which only train reads
        cases.append(
            Case(
                "environment",
                f"generate-{name}",
                ["generate", "--checkpoint", "snap.pt", "--max-new-tokens", "2"],
                snap(),
                ok,
                env=env,
            )
        )
        cases.append(Case("environment", f"export-{name}", ["export", "snap.pt", "hf"], snap(), ok, env=env))
        cases.append(
            Case(
                "environment",
                f"eval-{name}",
                ["eval", "--checkpoint", "snap.pt", "--perplexity", "input.txt", "--context", "32"],
                both(snap(), text()),
                ok,
                env=env,
            )
        )
        cases.append(
            Case("environment", f"plot-{name}", ["plot", "run", "-o", "p.png"], copy_of("run", "run"), ok, env=env)
        )
    return cases


def signal_cases() -> list[Case]:
    big_input = ["--input", "big.txt", "--max-steps", "1"]
    long_run = ["--max-steps", "100000", "--target-loss", "0", "--snapshot-interval", "2"]
    stream = ["generate", "--checkpoint", "snap.pt", "--stream", "--num-samples", "100000", "--max-new-tokens", "8"]
    cases = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        name = signal.Signals(sig).name
        cases += [
            Case(
                "signals",
                f"{name}-while-tokenizing",
                [*TRAIN, *big_input],
                big(),
                {128 + sig},
                signals=[("tokenizing:", 0.5, sig)],
                multiline="progress bar",
            ),
            Case(
                "signals",
                f"{name}-while-training",
                [*TRAIN, *long_run],
                text(),
                {130},
                signals=[("step      3 |", 0.0, sig)],
            ),
            Case("signals", f"{name}-generate-stream", stream, snap(), {128 + sig}, signals=[("--- sample 2", 0, sig)]),
        ]
    cases += [
        Case(
            "signals",
            "double-SIGINT-while-tokenizing",
            [*TRAIN, *big_input],
            big(),
            {130},
            signals=[("tokenizing:", 0.5, signal.SIGINT), ("", 0.05, signal.SIGINT)],
            multiline="progress bar",
        ),
        Case(
            "signals",
            "double-SIGINT-while-training",
            [*TRAIN, *long_run, "--n-embd", "128", "--snapshot-interval", "1"],
            text(),
            {130},
            signals=[("step      3 |", 0, signal.SIGINT), ("step ", 0.05, signal.SIGINT)],
            multiline="the second signal's line after the first's warning",
        ),
        Case(
            "signals",
            "SIGTERM-then-SIGINT-while-training",
            [*TRAIN, *long_run],
            text(),
            {130},
            signals=[("step      2 |", 0, signal.SIGTERM), ("", 0.01, signal.SIGINT)],
        ),
        Case(
            "signals",
            "SIGHUP-ignored-by-parent",
            [*TRAIN, "--max-steps", "6"],
            text(),
            {0},
            signals=[("step      2 |", 0, signal.SIGHUP)],
            ignore=(signal.SIGHUP,),
        ),
        Case(
            "signals",
            "SIGINT-ignored-by-parent",
            [*stream[:5], "4", "--max-new-tokens", "4"],
            snap(),
            {0},
            signals=[("--- sample 2", 0, signal.SIGINT)],
            ignore=(signal.SIGINT,),
        ),
        Case(
            "signals",
            "SIGTERM-export",
            ["export", "snap.pt", "hf"],
            snap(),
            {0, 143},
            signals=[("", 3.0, signal.SIGTERM)],
        ),
        Case(
            "signals",
            "SIGTERM-eval",
            ["eval", "--checkpoint", "snap.pt", "--perplexity", "big.txt", "--context", "64"],
            both(snap(), big()),
            {143},
            signals=[("", 8.0, signal.SIGTERM)],
            multiline="progress bar",
        ),
        Case(
            "signals",
            "SIGTERM-resume",
            [*TRAIN, "--resume", "auto", "--out-dir", "run", "--input", "run/input.txt", *long_run],
            copy_of("run", "run"),
            {130},
            signals=[("step      4 |", 0, signal.SIGTERM)],
            own=("run/**",),
        ),
    ]
    return cases


HELLASWAG = json.dumps({"ctx": "The cat", "endings": [" sat.", " ran.", " flew.", " swam."], "label": 0})


def eval_cases() -> list[Case]:
    ck = ["eval", "--checkpoint", "snap.pt"]
    ppl = [*ck, "--perplexity", "input.txt"]
    hs = [*ck, "--hellaswag", "q.jsonl"]
    cases = {
        "nothing-to-do": (ck, snap(), {2}),
        "ppl-missing": ([*ck, "--perplexity", "nope.txt"], snap(), {1}),
        "ppl-empty-string": ([*ck, "--perplexity", ""], snap(), {2}),
        "ppl-empty-file": ([*ck, "--perplexity", "e.txt"], both(snap(), text("e.txt", b"")), {1}),
        "ppl-binary": ([*ck, "--perplexity", "b.txt"], both(snap(), text("b.txt", b"\x00\xff" * 100)), {1}),
        "ppl-fifo": ([*ck, "--perplexity", "pipe"], both(snap(), fifo("pipe")), {1}),
        "ppl-dir": ([*ck, "--perplexity", "."], snap(), {1}),
        "ppl-one-token": ([*ck, "--perplexity", "o.txt"], both(snap(), text("o.txt", "a")), {0, 1}),
        "context-0": ([*ppl, "--context", "0"], both(snap(), text()), {2}),
        "context-over-block": ([*ppl, "--context", "1000"], both(snap(), text()), {2}),
        "stride-over-context": ([*ppl, "--context", "32", "--stride", "64"], both(snap(), text()), {2}),
        "stride-1": ([*ppl, "--context", "32", "--stride", "1"], both(snap(), text()), {0}),
        "batch-huge": ([*ppl, "--batch-size", "100000000", "--context", "32"], both(snap(), text()), {0, 2}),
        "output-dir": ([*ppl, "--output", "."], both(snap(), text()), {2}),
        "output-missing-dir": ([*ppl, "--output", "no/such/r.json"], both(snap(), text()), {2}),
        "output-empty": ([*ppl, "--output", ""], both(snap(), text()), {2}),
        "hs-valid": (hs, both(snap(), text("q.jsonl", HELLASWAG + "\n")), {0}),
        "hs-empty-file": (hs, both(snap(), text("q.jsonl", b"")), {1}),
        "hs-not-json": (hs, both(snap(), text("q.jsonl", "{nope\n")), {1}),
        "hs-array-line": (hs, both(snap(), text("q.jsonl", "[1, 2]\n")), {1}),
        "hs-label-out": (hs, both(snap(), text("q.jsonl", HELLASWAG.replace('"label": 0', '"label": 9') + "\n")), {1}),
        "hs-label-negative": (hs, both(snap(), text("q.jsonl", HELLASWAG.replace('"label": 0', '"label": -1'))), {1}),
        "hs-one-ending": (hs, both(snap(), text("q.jsonl", '{"ctx": "a", "endings": ["b"], "label": 0}')), {1}),
        "hs-binary": (hs, both(snap(), text("q.jsonl", b"\xff\xfe\x00")), {1}),
        "hs-fifo": ([*ck, "--hellaswag", "pipe"], both(snap(), fifo("pipe")), {1}),
        "hs-huge-context": (
            hs,
            both(snap(), text("q.jsonl", json.dumps({"ctx": "word " * 500, "endings": ["a", "b"], "label": 0}))),
            {0, 1, 2},
        ),
        "hs-limit-0": ([*hs, "--limit", "0"], both(snap(), text("q.jsonl", HELLASWAG)), {2}),
        "train-hellaswag-bad": (
            [*TRAIN, "--hellaswag", "q.jsonl", "--eval-interval", "1"],
            both(text(), text("q.jsonl", "{nope")),
            {1},
        ),
    }
    return [
        Case("eval", name, argv, setup, codes, multiline="progress bar" if name == "stride-1" else "")
        for name, (argv, setup, codes) in cases.items()
    ]


def plot_cases() -> list[Case]:
    cases = {
        "run": (["plot", "run", "-o", "p.png"], copy_of("run", "run"), {0}),
        "missing": (["plot", "nope", "-o", "p.png"], None, {1, 2}),
        "empty-arg": (["plot", "", "-o", "p.png"], None, {2}),
        "not-png": (["plot", "run", "-o", "p.jpg"], copy_of("run", "run"), {2}),
        "output-dir": (
            ["plot", "run", "-o", "out.png"],
            both(copy_of("run", "run"), lambda d, b: (d / "out.png").mkdir()),
            {1, 2},
        ),
        "output-missing-dir": (["plot", "run", "-o", "no/p.png"], copy_of("run", "run"), {0}),
        "output-over-metrics": (["plot", "run", "-o", "run/metrics.jsonl.png"], copy_of("run", "run"), {0}),
        "empty-metrics": (["plot", "m.jsonl", "-o", "p.png"], text("m.jsonl", b""), {1}),
        "garbage-metrics": (["plot", "m.jsonl", "-o", "p.png"], text("m.jsonl", b"\xff\x00garbage\n"), {1}),
        "nan-metrics": (
            ["plot", "m.jsonl", "-o", "p.png"],
            text("m.jsonl", '{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity}\n'),
            {0, 1},
        ),
        "text-values": (["plot", "m.jsonl", "-o", "p.png"], text("m.jsonl", '{"step": "a", "loss": "b"}\n'), {1}),
        "array-lines": (["plot", "m.jsonl", "-o", "p.png"], text("m.jsonl", "[1, 2]\n"), {1}),
        "huge-values": (
            ["plot", "m.jsonl", "-o", "p.png"],
            text("m.jsonl", '{"step": 1e308, "loss": 1e308}\n'),
            {0, 1},
        ),
        "fifo": (["plot", "pipe", "-o", "p.png"], fifo("pipe"), {1}),
        "dir-without-metrics": (["plot", "d", "-o", "p.png"], lambda d, b: (d / "d").mkdir(), {1}),
        "same-run-twice": (["plot", "run", "run", "-o", "p.png"], copy_of("run", "run"), {0}),
        "over-source": (["plot", "run", "-o", "run/loss.png"], copy_of("run", "run"), {0}),
    }
    return [Case("plot", name, argv, setup, codes) for name, (argv, setup, codes) in cases.items()]


def export_cases() -> list[Case]:
    cases = {
        "ok": (["export", "snap.pt", "hf"], snap(), {0}, ()),
        "onto-file": (["export", "snap.pt", "input.txt"], both(snap(), text()), {1}, ()),
        "non-empty": (["export", "snap.pt", "hf"], both(snap(), copy_of("hf", "hf")), {1}, ()),
        "force-model-dir": (["export", "snap.pt", "hf", "--force"], both(snap(), copy_of("hf", "hf")), {0}, ("hf/**",)),
        "force-run-dir": (
            ["export", "run/snapshots/snapshot_step_2.pt", "run", "--force"],
            copy_of("run", "run"),
            {1},
            (),
        ),
        "force-cwd-with-config": (
            ["export", "snap.pt", ".", "--force"],
            both(snap(), text(), text("config.json", "{}")),
            {1},
            (),
        ),
        "force-source-dir": (
            ["export", "hf/final_model.pt", "hf", "--force"],
            both(copy_of("hf", "hf"), lambda d, b: shutil.copyfile(b.snapshot, d / "hf/final_model.pt")),
            {1},
            (),
        ),
        "force-source-named-bin": (
            ["export", "hf/pytorch_model.bin", "hf", "--force"],
            both(copy_of("hf", "hf"), lambda d, b: shutil.copyfile(b.snapshot, d / "hf/pytorch_model.bin")),
            {1},
            (),
        ),
        "force-cwd-model-dir": (
            ["export", "../snap.pt", ".", "--force"],
            both(snap(), copy_of("hf", "hf")),
            {1},
            (),
        ),  # run in hf/ (run_case)
        "into-itself": (["export", "snap.pt", "snap.pt/hf"], snap(), {1}, ()),
        "into-proc": (["export", "snap.pt", "/proc/hf"], snap(), {1}, ()),
        "checkpoint-dir": (["export", ".", "hf"], None, {1, 2}, ()),
        "checkpoint-empty": (["export", "", "hf"], None, {2}, ()),
        "out-empty": (["export", "snap.pt", ""], snap(), {2}, ()),
        "hf-dir-as-checkpoint": (["export", "hf/model.safetensors", "out"], copy_of("hf", "hf"), {1}, ()),
        "final-model": (["export", "finished/final_model.pt", "out"], copy_of("finished", "finished"), {0}, ()),
        "symlink-target": (
            ["export", "snap.pt", "link", "--force"],
            both(snap(), copy_of("hf", "hf"), lambda d, b: os.symlink("hf", d / "link")),
            {0},
            ("hf/**",),
        ),
        # issue 25: GGUF
        "gguf-ok": (["export", "snap.pt", "m.gguf", "--format", "gguf", "--outtype", "q8_0"], snap(), {0}, ()),
        "gguf-onto-checkpoint": (["export", "snap.pt", "snap.pt", "--format", "gguf", "--force"], snap(), {2}, ()),
        "gguf-existing": (["export", "snap.pt", "input.txt", "--format", "gguf"], both(snap(), text()), {2}, ()),
        "gguf-force-existing": (
            ["export", "snap.pt", "input.txt", "--format", "gguf", "--force"],
            both(snap(), text()),
            {0},
            ("input.txt",),
        ),
        "gguf-onto-dir": (
            ["export", "snap.pt", "hf", "--format", "gguf", "--force"],
            both(snap(), copy_of("hf", "hf")),
            {2},
            (),
        ),
        "gguf-into-proc": (["export", "snap.pt", "/proc/m.gguf", "--format", "gguf"], snap(), {1}, ()),
        "gguf-into-missing-dir": (["export", "snap.pt", "a/b/m.gguf", "--format", "gguf"], snap(), {0}, ()),
        "gguf-fifo": (
            ["export", "snap.pt", "f.gguf", "--format", "gguf", "--force"],
            both(snap(), fifo("f.gguf")),
            {0, 1, 2},
            ("f.gguf",),
        ),
        "gguf-bad-format": (["export", "snap.pt", "m", "--format", "onnx"], snap(), {2}, ()),
        "gguf-outtype-with-hf": (["export", "snap.pt", "m", "--outtype", "f16"], snap(), {2}, ()),
        "gguf-bad-outtype": (["export", "snap.pt", "m.gguf", "--format", "gguf", "--outtype", "q2"], snap(), {2}, ()),
    }
    return [Case("export", name, argv, setup, codes, own=own) for name, (argv, setup, codes, own) in cases.items()]


def resume_cases() -> list[Case]:
    """Resuming with changed flags, into other runs, over later points of its own run."""
    resume = [*TRAIN, "--resume", "run/snapshots/snapshot_step_1.pt", "--max-steps", "4", "--input", "run/input.txt"]
    auto = [*TRAIN, "--resume", "auto", "--out-dir", "run", "--max-steps", "4", "--input", "run/input.txt"]
    cases = {
        "auto-ok": (auto, copy_of("run", "run"), {0}, ("run/**",)),
        "auto-other-batch": ([*auto, "-B", "2"], copy_of("run", "run"), {2}, ()),
        "auto-other-lr-allowed": (
            [*auto, "--lr", "1e-3", "--allow-changed", "lr"],
            copy_of("run", "run"),
            {0},
            ("run/**",),
        ),
        "auto-other-input": (
            [*auto, "--input", "o.txt"],
            both(copy_of("run", "run"), text("o.txt", TEXT.upper())),
            {2},
            (),
        ),
        "auto-other-shape": ([*auto, "--n-embd", "64"], copy_of("run", "run"), {1}, ()),
        "auto-max-steps-behind": ([*auto, "--max-steps", "1"], copy_of("run", "run"), {2}, ()),
        "older-point-in-place": ([*resume, "--out-dir", "run"], copy_of("run", "run"), {1}, ()),
        "into-another-run": (
            [*resume, "--out-dir", "victim"],
            both(copy_of("run", "run"), copy_of("finished", "victim")),
            {1},
            (),
        ),
        "final-in-place": (
            [*TRAIN, "--resume", "v/final_model.pt", "--out-dir", "v", "--max-steps", "3", "--input", "v/input.txt"],
            copy_of("finished", "v"),
            {0},
            ("v/**",),
        ),
        "auto-finished": (
            [*TRAIN, "--resume", "auto", "--out-dir", "v", "--input", "v/input.txt"],
            copy_of("finished", "v"),
            {1},
            (),
        ),
        "allow-unknown": ([*auto, "--allow-changed", "colour"], copy_of("run", "run"), {2}, ()),
        "allow-weight-decay": (
            [*auto, "--weight-decay", "0.5", "--allow-changed", "weight_decay"],
            copy_of("run", "run"),
            {0},
            ("run/**",),
        ),
        "metrics-garbage": (
            auto,
            both(copy_of("run", "run"), text("run/metrics.jsonl", b"\xff\xfe garbage\n{")),
            {0, 1},
            ("run/**",),
        ),
        "metrics-a-directory": (
            auto,
            both(
                copy_of("run", "run"),
                lambda d, b: ((d / "run/metrics.jsonl").unlink(), (d / "run/metrics.jsonl").mkdir()),
            ),
            {1},
            (),
        ),
        "resume-a-directory": ([*TRAIN, "--resume", "run"], copy_of("run", "run"), {1}, ()),
        "resume-hf-dir": ([*TRAIN, "--resume", "hf"], copy_of("hf", "hf"), {1}, ()),
        "init-from-hf": ([*TRAIN, "--init-from", "hf"], both(text(), copy_of("hf", "hf")), {0}, ()),
        "init-from-and-resume": (
            [*auto, "--init-from", "hf"],
            both(copy_of("run", "run"), copy_of("hf", "hf")),
            {0, 1, 2},
            ("run/**",),
        ),
    }
    return [Case("resume", name, argv, setup, codes, own=own) for name, (argv, setup, codes, own) in cases.items()]


# ---- prepare, consolidate, serve, and shards or documents as training input ----


def shard(
    name: str, tokens: int = 1000, count: int | None = None, magic: int = SHARD_MAGIC, version: int = 1,
    token_id: int | None = None, size: int | None = None,
) -> Setup:  # fmt: skip
    """A token shard in llm.c's format: 256 int32 (magic, version, count, zeros), then ``tokens`` uint16 ids (all
    ``token_id``, else counting up); ``count`` for a header that lies, ``size`` to cut or pad the file to that many
    bytes."""

    def make(d: Path, base: Base) -> None:
        import numpy as np

        header = np.zeros(256, dtype="<i4")
        header[:3] = magic, version, tokens if count is None else count
        ids = np.full(tokens, token_id) if token_id is not None else np.arange(tokens) % 50_000
        data = header.tobytes() + ids.astype("<u2").tobytes()
        if size is not None:
            data = data[:size] + bytes(max(0, size - len(data)))
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return make


def parquet(name: str, columns: dict[str, list] | None = None, string_column: str = "") -> Setup:
    """A Parquet file of ``columns`` (a column of strings, none null, holds TEXT's speeches by default);
    ``string_column`` names an empty column of strings for a file of no rows."""

    def make(d: Path, base: Base) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if string_column:
            table = pa.table({string_column: pa.array([], pa.string())})
        else:
            table = pa.table(columns or {"text": [part for part in TEXT.split("\n\n") if part]})
        pq.write_table(table, d / name)

    return make


def edit(name: str, change: Callable[[bytes], bytes]) -> Setup:
    """The case's own file ``name`` (copied there by an earlier setup), its bytes changed."""
    return lambda d, base: (d / name).write_bytes(change((d / name).read_bytes()))


def remove(name: str) -> Setup:
    return lambda d, base: shutil.rmtree(d / name) if (d / name).is_dir() else (d / name).unlink()


def big_jsonl(name: str = "big.jsonl") -> Setup:
    return lambda d, base: os.link(base.big_jsonl, d / name)


def prepared(name: str = "shards") -> Setup:
    """A copy of the base's prepare of big.jsonl, and big.jsonl beside it (so that the same prepare finds it done)."""
    return both(big_jsonl(), lambda d, base: shutil.copytree(base.prepared, d / name))


def interrupted_prepare(sig: int, shards: int = 2) -> Setup:
    """big.jsonl, and the prepare of BIG_PREPARE stopped by ``sig`` once it has finished ``shards`` shards."""

    def make(d: Path, base: Base) -> None:
        big_jsonl()(d, base)
        command = gpt2_scratch("prepare", "big.jsonl", "--out", "shards", *BIG_PREPARE)
        run = subprocess.Popen(command, cwd=d, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(list((d / "shards").glob("*_*.bin"))) < shards and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        run.send_signal(sig)
        run.wait()

    return make


def same_shards(d: Path, base: Base) -> list[str]:
    """A case's check: shards/ holds byte for byte the shards of the base's uninterrupted prepare, and lists them
    the same."""
    import hashlib as _hashlib

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: _hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.bin"))}

    found, expected = digests(d / "shards"), digests(base.prepared)
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or [n for n in expected if found.get(n) != expected[n]]
        return [f"shards differ from an uninterrupted prepare's: {differ[:4]}"]
    manifest = json.loads((d / "shards" / "manifest.json").read_text())
    if manifest["shards"] != json.loads((base.prepared / "manifest.json").read_text())["shards"]:
        return ["manifest.json lists the shards otherwise than an uninterrupted prepare's"]
    return []


def sources_listed(count: int) -> Callable[[Path, Base], list[str]]:
    """A case's check: the prepare's manifest lists ``count`` input files."""

    def check(d: Path, base: Base) -> list[str]:
        manifest = d / "shards" / "manifest.json"
        listed = len(json.loads(manifest.read_text())["sources"]) if manifest.is_file() else 0
        return [] if listed == count else [f"the manifest lists {listed} input files, not {count}"]

    return check


def failed_prepare(argv: list[str], before: Setup, after: Setup | None = None) -> Setup:
    """``before``, then ``gpt2-scratch prepare ARGV`` run to its end (a failure, here), then ``after``."""

    def make(d: Path, base: Base) -> None:
        before(d, base)
        subprocess.run(gpt2_scratch("prepare", *argv), cwd=d, env=child_env(), capture_output=True, timeout=300)
        if after is not None:
            after(d, base)

    return make


def prepare_cases() -> list[Case]:
    out = ["--out", "shards"]
    docs = text("d.jsonl", DOCS)
    good = DOCS.encode()
    nested = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    cases: dict[str, tuple[list[str], Setup | None, set[int] | None]] = {
        "text-ok": (["input.txt", *out], text(), {0}),
        "jsonl-ok": (["d.jsonl", *out, "--shard-tokens", "100", "--val-tokens", "50"], docs, {0}),
        "parquet-ok": (["d.parquet", *out], parquet("d.parquet"), {0}),
        "no-input": (out, None, {2}),
        "no-out": (["input.txt"], text(), {2}),
        "out-empty": (["input.txt", "--out", ""], text(), {2}),
        "missing-input": (["nope.jsonl", *out], None, {1}),
        "input-empty-string": (["", *out], None, {1, 2}),
        "empty-txt": (["e.txt", *out], text("e.txt", b""), {0, 1}),
        "empty-jsonl": (["e.jsonl", *out], text("e.jsonl", b""), {1}),
        "blank-lines-jsonl": (["b.jsonl", *out], text("b.jsonl", b"\n \n\t\n"), {1}),
        "dir-empty": (["docs", *out], lambda d, b: (d / "docs").mkdir(), {1}),
        "dir-nothing-readable": (
            ["docs", *out],
            both(text("docs/README.md"), text("docs/data.csv", "a,b\n"), text("docs/.hidden.jsonl", DOCS)),
            {1},
        ),
        "dir-symlink-cycle": (
            ["docs", *out],
            both(text("docs/d.jsonl", DOCS), lambda d, b: os.symlink(".", d / "docs/again")),
            {0, 1},
        ),
        "json-not-json": (["d.jsonl", *out], text("d.jsonl", good + b"{nope\n"), {1}),
        "json-array-line": (["d.jsonl", *out], text("d.jsonl", b"[1, 2]\n"), {1}),
        "json-field-missing": (["d.jsonl", *out], text("d.jsonl", b'{"body": "a"}\n'), {1}),
        "json-field-number": (["d.jsonl", *out], text("d.jsonl", b'{"text": 5}\n'), {1}),
        "json-field-null": (["d.jsonl", *out], text("d.jsonl", b'{"text": null}\n'), {1}),
        "json-field-object": (["d.jsonl", *out], text("d.jsonl", b'{"text": {"a": [1]}}\n'), {1}),
        "json-deeply-nested": (["d.jsonl", *out], text("d.jsonl", good + nested), {1}),
        "json-lone-surrogate": (["d.jsonl", *out], text("d.jsonl", good + b'{"text": "a \\ud800 b"}\n'), {1}),
        "json-raw-nul": (["d.jsonl", *out], text("d.jsonl", b'{"text": "a\x00b"}\n'), {1}),
        "jsonl-latin-1": (["d.jsonl", *out], text("d.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1")), {1}),
        "jsonl-utf-16": (["d.jsonl", *out], text("d.jsonl", DOCS.encode("utf-16")), {1}),
        "text-field-other": (
            ["d.jsonl", *out, "--text-field", "body"],
            text("d.jsonl", DOCS.replace("text", "body")),
            {0},
        ),
        "text-field-empty": (["d.jsonl", *out, "--text-field", ""], docs, {2}),
        "txt-latin-1": (["l.txt", *out], text("l.txt", "caf\u00e9\n".encode("latin-1")), {1}),
        "txt-nul-bytes": (["z.txt", *out], text("z.txt", TEXT.encode() + b"\x00"), {1}),
        "gzip-corrupt": (["d.jsonl.gz", *out], text("d.jsonl.gz", b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4), {1}),
        "gzip-truncated": (["d.jsonl.gz", *out], text("d.jsonl.gz", gzip.compress(good * 20)[:300]), {1}),
        "gzip-not-gzip": (["d.jsonl.gz", *out], text("d.jsonl.gz", good), {1}),
        "parquet-corrupt": (["d.parquet", *out], text("d.parquet", b"PAR1" + bytes(200) + b"PAR1"), {1}),
        "parquet-zero-bytes": (["d.parquet", *out], text("d.parquet", b""), {1}),
        "parquet-no-column": (["d.parquet", *out], parquet("d.parquet", {"body": ["a", "b"]}), {1}),
        "parquet-int-column": (["d.parquet", *out], parquet("d.parquet", {"text": [1, 2]}), {1}),
        "parquet-null-row": (["d.parquet", *out], parquet("d.parquet", {"text": ["a", None]}), {1}),
        "parquet-no-rows": (["d.parquet", *out], parquet("d.parquet", string_column="text"), {1}),
        "arrow-corrupt": (["d.arrow", *out], text("d.arrow", b"ARROW1" + bytes(300)), {1}),
        "datasets-state-garbage": (["ds", *out], both(text("ds/state.json", "{"), text("ds/x.arrow", b"")), {1}),
        "dataset-dict": (["ds", *out], both(text("ds/dataset_dict.json", "{}"), text("ds/train/x.arrow", b"")), {1}),
        "fifo": (["pipe", *out], fifo("pipe"), {1}),
        "dev-zero": (["/dev/zero", *out], None, {1}),
        "proc-self-environ": (["/proc/self/environ", *out], None, {1}),
        "symlink-loop": (["loop.jsonl", *out], lambda d, b: os.symlink("loop.jsonl", d / "loop.jsonl"), {1}),
        "dangling-symlink": (["gone.jsonl", *out], lambda d, b: os.symlink("nowhere.jsonl", d / "gone.jsonl"), {1}),
        "glob-nothing": (["*.jsonl", *out], None, {1}),
        "glob-files": (["*.jsonl", *out], both(docs, text("e.jsonl", DOCS)), {0}),
        "same-input-twice": (["d.jsonl", "d.jsonl", *out], docs, {0}),
        "prepared-dir-as-input": (["old", *out], prepared("old"), {1}),
        "out-a-file": (["d.jsonl", "--out", "d.jsonl"], docs, {1}),
        "out-under-a-file": (["d.jsonl", "--out", "d.jsonl/shards"], docs, {1}),
        "out-dev-null": (["d.jsonl", "--out", "/dev/null"], docs, {1}),
        "out-proc": (["d.jsonl", "--out", "/proc/shards"], docs, {1}),
        "out-same-as-input-dir": (["docs", "--out", "docs"], text("docs/d.jsonl", DOCS), {0, 1}),
        "out-other-shards": (["input.txt", *out], both(text(), prepared()), {1}),
        "out-foreign-shards": (["d.jsonl", *out], both(docs, shard("shards/train_000000.bin")), {1}),
        "out-manifest-garbage": (["d.jsonl", *out], both(docs, text("shards/manifest.json", b"\xff{")), {1}),
        "out-manifest-array": (["d.jsonl", *out], both(docs, text("shards/manifest.json", "[1]")), {1}),
        "out-manifest-shards-garbage": (
            ["big.jsonl", *out, *BIG_PREPARE],
            both(
                prepared(),
                edit("shards/manifest.json", lambda b: b.replace(b'"name": "train_000001.bin"', b'"name": 5')),
            ),
            {1},
        ),
        "out-user-files": (["d.jsonl", *out], both(docs, text("shards/notes.txt", "mine")), {0}),
        "out-in-use": (["d.jsonl", *out], both(docs, lock_holder("shards")), {1}),
        "shard-tokens-0": (["d.jsonl", *out, "--shard-tokens", "0"], docs, {2}),
        "shard-tokens-negative": (["d.jsonl", *out, "--shard-tokens", "-1"], docs, {2}),
        "shard-tokens-2-31": (["d.jsonl", *out, "--shard-tokens", str(2**31)], docs, {2}),
        "shard-tokens-huge": (["d.jsonl", *out, "--shard-tokens", "99999999999999999999"], docs, {2}),
        "shard-tokens-abc": (["d.jsonl", *out, "--shard-tokens", "abc"], docs, {2}),
        "shard-tokens-1": (["d.jsonl", *out, "--shard-tokens", "1"], docs, {0}),
        "val-tokens-negative": (["d.jsonl", *out, "--val-tokens", "-1"], docs, {2}),
        "val-tokens-whole-corpus": (["d.jsonl", *out, "--val-tokens", "1000000"], docs, {1}),
        "workers-0": (["d.jsonl", *out, "--workers", "0"], docs, {2}),
        "workers-negative": (["d.jsonl", *out, "--workers", "-3"], docs, {2}),
        "workers-huge-threads": (
            ["d.jsonl", *out, "--workers", "99999999999999999999", "--parallel", "threads"],
            docs,
            None,
        ),
        "workers-64-processes": (["d.jsonl", *out, "--workers", "64", "--parallel", "processes"], docs, {0, 2}),
        "parallel-bogus": (["d.jsonl", *out, "--parallel", "gpu"], docs, {2}),
        "rerun-after-fixing-a-bad-line": (
            ["d.jsonl", *out],
            failed_prepare(["d.jsonl", *out], text("d.jsonl", good + b"{nope\n"), docs),  # then the line fixed
            {0},
        ),
        "rerun-after-val-tokens-too-large": (
            ["d.jsonl", *out, "--val-tokens", "10"],
            failed_prepare(["d.jsonl", *out, "--val-tokens", "1000000"], docs),
            {0},
        ),
    }
    made = [
        Case("prepare", name, ["prepare", *argv], setup, codes, own=("shards/**",) if codes == {0} else ())
        for name, (argv, setup, codes) in cases.items()
    ]
    big = ["prepare", "big.jsonl", *out, *BIG_PREPARE]
    made += [
        Case("prepare", "rerun-finished", big, prepared(), {0}, multiline=""),
        Case(
            "prepare",
            "rerun-after-a-shard-deleted",
            big,
            both(prepared(), remove("shards/train_000003.bin")),
            {0},
            own=("shards/**",),
            multiline="progress bar",
            check=same_shards,
        ),
        Case(
            "prepare",
            "rerun-after-a-shard-truncated",
            big,
            both(prepared(), edit("shards/train_000005.bin", lambda b: b[:5000])),
            {0},
            own=("shards/**",),
            multiline="progress bar",
            check=same_shards,
        ),
        Case(
            "prepare",
            "stale-temporaries",
            ["prepare", "d.jsonl", *out],
            both(docs, text("shards/.train_000000.bin.tmp-999999", "x"), text("shards/.mine.tmp-1", "mine")),
            {0},
            own=("shards/.train_000000.bin.tmp-999999",),
        ),
        Case(
            "prepare",
            "dir-symlink-cycle-read-once",
            ["prepare", "docs", *out],
            both(text("docs/d.jsonl", DOCS), lambda d, b: os.symlink(".", d / "docs/again")),
            {0, 1},
            own=("shards/**",),
            check=sources_listed(1),
        ),
    ]
    for sig in (signal.SIGTERM, signal.SIGINT):
        name = signal.Signals(sig).name
        made += [
            Case(
                "prepare",
                f"{name}-mid-prepare",
                big,
                big_jsonl(),
                {128 + sig},
                signals=[("preparing", 1.0, sig)],
                multiline="progress bar",
            ),
            Case(
                "prepare",
                f"rerun-after-{name}",
                big,
                interrupted_prepare(sig),
                {0},
                own=("shards/**",),
                multiline="progress bar",
                check=same_shards,
            ),
        ]
    return made


def sharded_snapshot(name: str = "snap") -> Setup:
    return lambda d, base: shutil.copytree(base.sharded, d / name)


def consolidate_cases() -> list[Case]:
    snapshot = sharded_snapshot()
    cases: dict[str, tuple[list[str], Setup | None, set[int], tuple[str, ...]]] = {
        "ok": (["snap", "out.pt"], snapshot, {0}, ()),
        "no-arguments": ([], None, {2}, ()),
        "snapshot-empty-string": (["", "out.pt"], None, {1, 2}, ()),
        "output-empty-string": (["snap", ""], snapshot, {2}, ()),
        "missing": (["nope", "out.pt"], None, {1}, ()),
        "a-file": (["snap.pt", "out.pt"], snap(), {1}, ()),
        "empty-dir": (["snap", "out.pt"], lambda d, b: (d / "snap").mkdir(), {1}, ()),
        "no-metadata": (["snap", "out.pt"], both(snapshot, remove("snap/.metadata")), {1}, ()),
        "metadata-a-dir": (
            ["snap", "out.pt"],
            both(snapshot, remove("snap/.metadata"), lambda d, b: (d / "snap/.metadata").mkdir()),
            {1},
            (),
        ),
        "metadata-evil-pickle": (["snap", "out.pt"], both(snapshot, evil("snap/.metadata", "raw")), {1}, ()),
        "metadata-evil-pickle-2": (["snap", "out.pt"], both(snapshot, evil("snap/.metadata", "raw2")), {1}, ()),
        "metadata-evil-torch-save": (
            ["snap", "out.pt"],
            both(snapshot, evil("evil.pt", "torch"), lambda d, b: os.replace(d / "evil.pt", d / "snap/.metadata")),
            {1},
            (),
        ),
        "metadata-truncated": (
            ["snap", "out.pt"],
            both(snapshot, edit("snap/.metadata", lambda b: b[: len(b) // 2])),
            {1},
            (),
        ),
        "metadata-empty": (["snap", "out.pt"], both(snapshot, edit("snap/.metadata", lambda b: b"")), {1}, ()),
        "metadata-random": (
            ["snap", "out.pt"],
            both(snapshot, edit("snap/.metadata", lambda b: random.Random(2).randbytes(len(b)))),
            {1},
            (),
        ),
        "shard-truncated": (
            ["snap", "out.pt"],
            both(snapshot, edit("snap/__1_0.distcp", lambda b: b[: len(b) // 2])),
            {1},
            (),
        ),
        "shard-empty": (["snap", "out.pt"], both(snapshot, edit("snap/__0_0.distcp", lambda b: b"")), {1}, ()),
        "shard-zeroed": (
            ["snap", "out.pt"],
            both(snapshot, edit("snap/__0_0.distcp", lambda b: bytes(len(b)))),
            {1},
            (),
        ),
        "shard-missing": (["snap", "out.pt"], both(snapshot, remove("snap/__1_0.distcp")), {1}, ()),
        "a-snapshot-being-written": (
            [".snapshot_step_3.tmp-99", "out.pt"],
            both(sharded_snapshot(".snapshot_step_3.tmp-99"), remove(".snapshot_step_3.tmp-99/.metadata")),
            {1},
            (".snapshot_step_3.tmp-99/**",),
        ),
        "the-snapshots-folder": (["run/snapshots", "out.pt"], copy_of("run", "run"), {1}, ()),
        "output-exists": (["snap", "out.pt"], both(snapshot, text("out.pt", "mine")), {2}, ()),
        "output-exists-force": (
            ["snap", "out.pt", "--force"],
            both(snapshot, text("out.pt", "mine")),
            {0},
            ("out.pt",),
        ),
        "output-a-dir": (["snap", "out"], both(snapshot, lambda d, b: (d / "out").mkdir()), {2}, ()),
        "output-missing-dir": (["snap", "no/such/out.pt"], snapshot, {0, 1}, ()),
        "output-under-a-file": (["snap", "input.txt/out.pt"], both(snapshot, text()), {1, 2}, ()),
        "output-proc": (["snap", "/proc/out.pt"], snapshot, {1}, ()),
        "output-fifo": (["snap", "pipe"], both(snapshot, fifo("pipe")), {2}, ()),
        "output-symlink-force": (
            ["snap", "link.pt", "--force"],
            both(snapshot, text("victim.pt", "mine"), lambda d, b: os.symlink("victim.pt", d / "link.pt")),
            {0, 1, 2},
            (),
        ),
        "output-onto-the-snapshot": (["snap", "snap"], snapshot, {2}, ()),
        "output-onto-the-snapshot-force": (["snap", "snap", "--force"], snapshot, {2}, ()),
        "output-inside-the-snapshot": (["snap", "snap/out.pt"], snapshot, {1, 2}, ()),
        "output-onto-its-metadata": (["snap", "snap/.metadata", "--force"], snapshot, {1, 2}, ()),
        "output-onto-its-shard": (["snap", "snap/__0_0.distcp", "--force"], snapshot, {1, 2}, ()),
        "output-onto-its-metadata-via-link": (
            ["snap", "same/.metadata", "--force"],
            both(snapshot, lambda d, b: os.symlink("snap", d / "same")),
            {1, 2},
            (),
        ),
    }
    made = [
        Case("consolidate", name, ["consolidate", *argv], setup, codes, own=own)
        for name, (argv, setup, codes, own) in cases.items()
    ]
    made += [
        Case(
            "consolidate",
            "SIGTERM",
            ["consolidate", "snap", "out.pt"],
            snapshot,
            {0, 143},
            signals=[("", 2.0, signal.SIGTERM)],
        ),
        Case(
            "consolidate",
            "torchrun-variables",
            ["consolidate", "snap", "out.pt"],
            snapshot,
            {0},
            env=ENV_CASES["rank-1-no-rendezvous"],
        ),
    ]
    return made


def port_holder(port: int) -> Setup:
    """Another process listening on ``port``."""

    def make(d: Path, base: Base) -> Callable[[], None]:
        code = (
            "import socket, time\n"
            f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
            "print('held', flush=True); time.sleep(900)\n"
        )
        return holding(code)

    return make


def hostile_requests(requests: list[tuple[str, str, Any, set[int]]]) -> Callable[[str, Path], None]:
    """What a case sends to the server it started, once it serves: (method, path, body, the statuses that are
    right). Every answer that is not one of them, or a 4xx/5xx without OpenAI's error body, is written to
    problems.json in the case's directory for ``requests_check``."""

    def send(output: str, d: Path) -> None:
        import httpx

        found = re.search(r"on (http://127\.0\.0\.1:\d+)", output)
        problems = [] if found else ["no serving line with an address"]
        for method, path, body, statuses in requests if found else []:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                answer = httpx.request(method, found.group(1) + path, content=None if body is None else content,
                                       headers={"Content-Type": "application/json"}, timeout=60)  # fmt: skip
            except httpx.HTTPError as err:
                problems.append(f"{method} {path}: {type(err).__name__}: {err}")
                continue
            if answer.status_code not in statuses:
                problems.append(
                    f"{method} {path}: {answer.status_code}, expected {sorted(statuses)}: {answer.text[:200]}"
                )
            elif answer.status_code >= 400:
                try:
                    error = answer.json()["error"]
                    assert set(error) == {"message", "type", "param", "code"}
                except (ValueError, KeyError, TypeError, AssertionError):
                    problems.append(f"{method} {path}: {answer.status_code} without OpenAI's error body")
        (d / "problems.json").write_text(json.dumps(problems))

    return send


def requests_check(d: Path, base: Base) -> list[str]:
    path = d / "problems.json"
    return json.loads(path.read_text()) if path.exists() else ["the requests were never sent"]


def serve_request_cases() -> list[Case]:
    """Issue 25: hostile requests to the new endpoints and the page, on a running server (then SIGTERM)."""
    ck = ["serve", "--checkpoint", "snap.pt", "--device", "cpu", "--port", "0"]
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    groups: dict[str, list[tuple[str, str, Any, set[int]]]] = {
        "page": [("GET", "/", None, {200}), ("POST", "/", {}, {405}), ("GET", "/index.html", None, {404})],
        "tokenize": [
            ("POST", "/tokenize", {"prompt": "<|endoftext|>" * 2000}, {200}),
            ("POST", "/tokenize", {"prompt": "\udcff".encode("utf-8", "surrogatepass").decode("latin-1")}, {200}),
            ("POST", "/tokenize", {"prompt": "x" * 1_100_000}, {413}),
            ("POST", "/tokenize", {"prompt": None}, {400}),
            ("POST", "/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, {400}),
            ("POST", "/tokenize", [], {400}),
            ("POST", "/tokenize", b"\xff\xfe", {400}),
            ("POST", "/tokenize", deep, {400, 413}),
            ("GET", "/tokenize", None, {405}),
        ],
        "detokenize": [
            ("POST", "/detokenize", {"tokens": list(range(50257))}, {200}),
            ("POST", "/detokenize", {"tokens": [2**70]}, {400}),
            ("POST", "/detokenize", {"tokens": [1.5, 2]}, {400}),
            ("POST", "/detokenize", {"tokens": [True]}, {400}),
            ("POST", "/detokenize", {"tokens": None}, {400}),
            ("POST", "/detokenize", {"tokens": [50256] * 20000}, {200}),
            ("GET", "/tokenizer_info", None, {200}),
        ],
        "lenient-fields": [
            ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2, **{f"f{i}": i for i in range(300)}}, {200}),
            ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 1, "x" * 20000: 1}, {200}),
            ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 1, "stop": [f"s{i}" for i in range(64)]}, {200}),
            ("POST", "/v1/completions", {"prompt": "a", "stop": [f"s{i}" for i in range(65)]}, {400}),
            # the base model's context is 64 tokens: prompt + max_tokens may reach 65, an echoed prompt be 65
            ("POST", "/v1/completions", {"prompt": [1] * 60, "max_tokens": 5}, {200}),
            ("POST", "/v1/completions", {"prompt": [1] * 60, "max_tokens": 6}, {400}),
            ("POST", "/v1/completions", {"prompt": [1] * 65, "max_tokens": 1, "echo": True, "logprobs": 1}, {200}),
            ("POST", "/v1/completions", {"prompt": [1] * 66, "max_tokens": 1, "echo": True, "logprobs": 1}, {400}),
            ("POST", "/v1/completions", {"prompt": [1] * 65, "max_tokens": 2, "echo": True}, {400}),
            ("POST", "/v1/completions", {"prompt": [1] * 65, "max_tokens": 1}, {400}),
        ],
    }
    stop = ("", 0.2, signal.SIGTERM)
    return [
        Case(
            "serve requests",
            name,
            ck,
            snap(),
            {0, 143},
            signals=[("serving ", 0.3, hostile_requests(sent)), stop],
            timeout=240,
            check=requests_check,
        )
        for name, sent in groups.items()
    ]


def serve_cases() -> list[Case]:
    """Start-up only: what serve does with bad flags and model sources, and a signal soon after it starts."""
    ck = ["serve", "--checkpoint", "snap.pt", "--device", "cpu", "--port", "0"]
    term = [("serving ", 0.5, signal.SIGTERM)]  # once it serves: it must stop by itself, exit 0 (or 143), and quietly
    held = free_port()
    starts: dict[str, tuple[list[str], Setup | None, dict[str, str | None]]] = {
        "ok": (ck, snap(), {}),
        "pretrained-hf": (["serve", "--pretrained", "hf", "--port", "0"], copy_of("hf", "hf"), {}),
        "sharded-snapshot": (["serve", "--checkpoint", "snap", "--port", "0"], sharded_snapshot(), {}),
        "final-model": (
            ["serve", "--checkpoint", "finished/final_model.pt", "--port", "0"],
            copy_of("finished", "finished"),
            {},
        ),
        "open-host-without-key": ([*ck, "--host", "0.0.0.0"], snap(), {"GPT2SCRATCH_API_KEY": None}),
        "ipv6-loopback": ([*ck, "--host", "::1"], snap(), {}),
        "localhost": ([*ck, "--host", "localhost"], snap(), {}),
        "api-key-env-empty": (ck, snap(), {"GPT2SCRATCH_API_KEY": ""}),
        "quantize-int8": ([*ck, "--quantize", "int8"], snap(), {}),
        "max-batch-1": ([*ck, "--max-batch", "1"], snap(), {}),
        "max-queue-huge": ([*ck, "--max-queue", str(10**12)], snap(), {}),
        "shutdown-timeout-0": ([*ck, "--shutdown-timeout", "0"], snap(), {}),
        "shutdown-timeout-huge": ([*ck, "--shutdown-timeout", "1e30"], snap(), {}),
        "dtype-float64": ([*ck, "--dtype", "float64"], snap(), {}),
        "torchrun-variables": (ck, snap(), ENV_CASES["rank-1-no-rendezvous"]),
    }
    made = [
        Case(
            "serve",
            name,
            argv,
            setup,
            {0, 2, 143} if name == "ipv6-loopback" else {0, 143},
            env=env,
            signals=term,
            timeout=120,
        )
        for name, (argv, setup, env) in starts.items()
    ]
    at = "serving "
    made += [
        Case("serve", "SIGINT-after-start", ck, snap(), {0, 130}, signals=[(at, 0.5, signal.SIGINT)], timeout=120),
        Case("serve", "SIGHUP-after-start", ck, snap(), {0, 129}, signals=[(at, 0.5, signal.SIGHUP)], timeout=120),
        Case(
            "serve", "SIGTERM-at-the-serving-line", ck, snap(), {0, 143}, signals=[(at, 0, signal.SIGTERM)], timeout=120
        ),
        Case("serve", "SIGTERM-while-loading", ck, snap(), {0, 143}, signals=[("", 1.5, signal.SIGTERM)], timeout=120),
        Case(
            "serve",
            "double-SIGTERM",
            ck,
            snap(),
            {0, 143},
            signals=[(at, 0.5, signal.SIGTERM), ("", 0.01, signal.SIGTERM)],
            timeout=120,
        ),
        Case(
            "serve",
            "SIGTERM-then-SIGINT",
            ck,
            snap(),
            {0, 130, 143},
            signals=[(at, 0.5, signal.SIGTERM), ("", 0.05, signal.SIGINT)],
            timeout=120,
        ),
    ]
    refused: dict[str, tuple[list[str], Setup | None, set[int]]] = {
        "no-source": (["serve"], None, {2}),
        "both-sources": (["serve", "--checkpoint", "a", "--pretrained", "b"], None, {2}),
        "checkpoint-empty": (["serve", "--checkpoint", ""], None, {2}),
        "checkpoint-missing": (["serve", "--checkpoint", "nope.pt", "--port", "0"], None, {1}),
        "checkpoint-dir": (["serve", "--checkpoint", ".", "--port", "0"], None, {1}),
        "checkpoint-fifo": (["serve", "--checkpoint", "pipe", "--port", "0"], fifo("pipe"), {1}),
        "checkpoint-truncated": (
            ["serve", "--checkpoint", "ck.pt", "--port", "0"],
            raw("ck.pt", lambda b: b[:999]),
            {1},
        ),
        "checkpoint-evil": (["serve", "--checkpoint", "ck.pt", "--port", "0"], evil("ck.pt", "raw"), {1}),
        "snapshot-evil-metadata": (
            ["serve", "--checkpoint", "snap", "--port", "0"],
            both(sharded_snapshot(), evil("snap/.metadata", "raw")),
            {1},
        ),
        "pretrained-hub-offline": (["serve", "--pretrained", "gpt2", "--port", "0"], None, {1}),
        "pretrained-missing-dir": (["serve", "--pretrained", "nope", "--port", "0"], None, {1, 2}),
        "port-negative": ([*ck, "--port", "-1"], snap(), {2}),
        "port-65536": ([*ck, "--port", "65536"], snap(), {2}),
        "port-huge": ([*ck, "--port", "99999999999999999999"], snap(), {2}),
        "port-abc": ([*ck, "--port", "abc"], snap(), {2}),
        "port-in-use": ([*ck, "--port", str(held)], both(snap(), port_holder(held)), {2}),
        "host-empty": ([*ck, "--host", ""], snap(), {2}),
        "host-unresolvable": ([*ck, "--host", "no-such-host.invalid"], snap(), {2}),
        "host-not-ours": ([*ck, "--host", "192.0.2.7"], snap(), {2}),
        "host-url": ([*ck, "--host", "http://127.0.0.1"], snap(), {2}),
        "max-batch-0": ([*ck, "--max-batch", "0"], snap(), {2}),
        "max-batch-huge": ([*ck, "--max-batch", str(10**12)], snap(), {2}),
        "max-queue-0": ([*ck, "--max-queue", "0"], snap(), {2}),
        "shutdown-timeout-nan": ([*ck, "--shutdown-timeout", "nan"], snap(), {2}),
        "shutdown-timeout-inf": ([*ck, "--shutdown-timeout", "inf"], snap(), {2}),
        "shutdown-timeout-negative": ([*ck, "--shutdown-timeout", "-1"], snap(), {2}),
        "api-key-blank": ([*ck, "--api-key", " "], snap(), {2}),
        "device-cuda-99": ([*ck, "--device", "cuda:99"], snap(), {2}),
        "dtype-int8": ([*ck, "--dtype", "int8"], snap(), {2}),
        "quantize-bogus": ([*ck, "--quantize", "int4"], snap(), {2}),
        "omp-threads-abc": (ck, snap(), {2}),
    }
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": "hf-home"}
    made += [
        Case(
            "serve",
            name,
            argv,
            setup,
            codes,
            timeout=120,
            signals=[("serving ", 0.5, signal.SIGTERM)],
            env={"OMP_NUM_THREADS": "abc"} if name == "omp-threads-abc" else offline,
        )
        for name, (argv, setup, codes) in refused.items()
    ]
    return made


def shard_input_cases() -> list[Case]:
    """train --input: token shards (a directory, a file, a glob), JSON lines and Parquet, well and badly made."""
    good = shard("shards/train_000000.bin")
    val = shard("shards/val_000000.bin", 200)
    manifest = {"format": {"magic": SHARD_MAGIC}, "complete": True}

    def listing(shards: list[Any], complete: bool = True) -> Setup:
        return text("shards/manifest.json", json.dumps({**manifest, "complete": complete, "shards": shards}))

    entry = {"name": "train_000000.bin", "tokens": 1000, "sha256": "0" * 64}
    inputs: dict[str, tuple[list[str], Setup | None, set[int]]] = {
        "dir-ok": (["shards"], both(good, val), {0}),
        "dir-prepared": (["shards"], prepared(), {0}),
        "one-bin-file": (["shards/train_000000.bin"], good, {0}),
        "glob-of-bins": (["shards/*.bin"], both(good, shard("shards/train_000001.bin")), {0}),
        "bad-magic": (["shards"], shard("shards/train_000000.bin", magic=20240521), {1}),
        "version-2": (["shards"], shard("shards/train_000000.bin", version=2), {1}),
        "count-beyond-the-file": (["shards"], shard("shards/train_000000.bin", count=2000), {1}),
        "count-negative": (["shards"], shard("shards/train_000000.bin", count=-5), {1}),
        "count-int32-max": (["shards"], shard("shards/train_000000.bin", count=2**31 - 1), {1}),
        "truncated": (["shards"], shard("shards/train_000000.bin", size=1024 + 999), {1}),
        "odd-size": (["shards"], shard("shards/train_000000.bin", size=1024 + 2001), {1}),
        "header-only": (["shards"], shard("shards/train_000000.bin", 0), {1}),
        "shorter-than-header": (["shards"], shard("shards/train_000000.bin", size=100), {1}),
        "empty-file": (["shards"], shard("shards/train_000000.bin", size=0), {1}),
        "not-a-shard-bin": (["x.bin"], text("x.bin", TEXT), {1}),
        "val-only": (["shards"], val, {1}),
        "mixed-sizes": (
            ["shards"],
            both(shard("shards/train_000000.bin", 10), shard("shards/train_000001.bin", 3000)),
            {0},
        ),
        "all-too-short": (
            ["shards"],
            both(shard("shards/train_000000.bin", 30), shard("shards/train_000001.bin", 40)),
            {1},
        ),
        "val-too-short": (["shards"], both(good, shard("shards/val_000000.bin", 10)), {1}),
        "val-damaged": (["shards"], both(good, shard("shards/val_000000.bin", 200, count=999)), {1}),
        "token-beyond-vocab": (["shards"], shard("shards/train_000000.bin", token_id=60_000), {1}),
        "shard-a-directory": (["shards"], both(good, lambda d, b: (d / "shards/train_000001.bin").mkdir()), {0}),
        "shard-a-fifo": (["shards"], both(good, fifo("shards/train_000001.bin")), {0}),
        "shard-a-dangling-link": (
            ["shards"],
            both(good, lambda d, b: os.symlink("nowhere.bin", d / "shards/train_000001.bin")),
            {0},
        ),
        "manifest-unfinished": (["shards"], both(good, listing([entry], complete=False)), {1}),
        "manifest-other-size": (["shards"], both(good, listing([{**entry, "tokens": 5}])), {1}),
        "manifest-not-json": (["shards"], both(good, text("shards/manifest.json", b"\xff{")), {0}),
        "manifest-shards-not-objects": (["shards"], both(good, listing([1])), {1}),
        "manifest-entry-without-sha256": (
            ["shards"],
            both(good, listing([{"name": entry["name"], "tokens": 1000}])),
            {1},
        ),
        "manifest-tokens-text": (["shards"], both(good, listing([{**entry, "tokens": "1000"}])), {1}),
        "manifest-name-number": (["shards"], both(good, listing([{**entry, "name": 7}])), {1}),
        "jsonl-ok": (["d.jsonl"], text("d.jsonl", DOCS), {0}),
        "jsonl-bad-line": (["d.jsonl"], text("d.jsonl", DOCS + "{nope\n"), {1}),
        "jsonl-field-missing": (["d.jsonl"], text("d.jsonl", DOCS.replace("text", "body")), {1}),
        "jsonl-field-number": (["d.jsonl"], text("d.jsonl", DOCS + '{"text": 5}\n'), {1}),
        "jsonl-latin-1": (["d.jsonl"], text("d.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1")), {1}),
        "jsonl-deeply-nested": (
            ["d.jsonl"],
            text("d.jsonl", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
            {1},
        ),
        "jsonl-lone-surrogate": (["d.jsonl"], text("d.jsonl", DOCS + '{"text": "\\ud800"}\n'), {1}),
        "jsonl-blank": (["d.jsonl"], text("d.jsonl", "\n\n"), {1}),
        "jsonl-gz-corrupt": (["d.jsonl.gz"], text("d.jsonl.gz", b"\x1f\x8b\x08\x00garbage"), {1}),
        "parquet-ok": (["d.parquet"], parquet("d.parquet"), {0}),
        "parquet-no-rows": (["d.parquet"], parquet("d.parquet", string_column="text"), {1}),
        "parquet-corrupt": (["d.parquet"], text("d.parquet", b"PAR1" + bytes(100)), {1}),
        "parquet-no-column": (["d.parquet"], parquet("d.parquet", {"body": ["a b c"] * 50}), {1}),
        "parquet-null-row": (["d.parquet"], parquet("d.parquet", {"text": [TEXT, None]}), {1}),
    }
    cases = [
        Case("shards", name, [*TRAIN, "--input", *argv], setup, codes) for name, (argv, setup, codes) in inputs.items()
    ]
    cases += [
        Case("shards", "val-fraction", [*TRAIN, "--input", "shards", "--val-fraction", "0.1"], good, {2}),
        Case("shards", "max-tokens-1", [*TRAIN, "--input", "shards", "--max-tokens", "1"], good, {1}),
        Case("shards", "shuffle-shards", [*TRAIN, "--input", "shards", "--shuffle-shards"], good, {0}),
        Case("shards", "shuffle-shards-of-text", [*TRAIN, "--shuffle-shards"], text(), {2}),
        Case(
            "shards",
            "jsonl-text-field-other",
            [*TRAIN, "--input", "d.jsonl", "--text-field", "body"],
            text("d.jsonl", DOCS.replace("text", "body")),
            {0},
        ),
    ]
    return cases


def all_cases() -> list[Case]:
    return (
        train_flag_cases()
        + run_file_cases()
        + generate_cases()
        + input_cases()
        + out_dir_cases()
        + checkpoint_cases()
        + resume_cases()
        + environment_cases()
        + signal_cases()
        + eval_cases()
        + plot_cases()
        + export_cases()
        + prepare_cases()
        + consolidate_cases()
        + serve_cases()
        + serve_request_cases()
        + shard_input_cases()
    )


# ---- running a case ----


def snapshot_files(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under ``folder`` (not following links out of it), the lock file aside."""
    found = {}
    for path in folder.rglob("*"):
        if path.name == ".gpt2scratch.lock" or path.is_symlink() or not path.is_file():
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        found[str(path.relative_to(folder))] = digest.hexdigest()
    return found


def run_case(case: Case, base: Base, root: Path) -> dict[str, Any]:
    d = root / re.sub(r"[^\w.=+-]", "_", case.group) / re.sub(r"[^\w.=+-]", "_", case.name)
    if d.exists():
        subprocess.run(["chmod", "-R", "u+rwx", str(d)], check=False)
        shutil.rmtree(d)
    d.mkdir(parents=True)
    cwd = d / "hf" if case.name == "force-cwd-model-dir" else d
    end = case.setup(d, base) if case.setup else None
    before = snapshot_files(d)
    existing = {str(p.relative_to(d)) for p in d.rglob("*")}  # files and folders: a temporary folder set up is not left
    command = [sys.executable, str(REPO / "train.py"), *case.argv] if case.script else gpt2_scratch(*case.argv)

    def preexec() -> None:  # as a terminal starts it (the sweep itself may run as a background job, SIGINT ignored)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN if sig in case.ignore else signal.SIG_DFL)

    if STOPPING.is_set():
        raise KeyboardInterrupt
    started = time.monotonic()
    proc = RUNNING[threading.get_ident()] = subprocess.Popen(
        command,
        cwd=cwd,
        env=child_env(case.env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=preexec,
    )
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [
        threading.Thread(target=_read, args=(stream, sink), daemon=True)
        for stream, sink in ((proc.stdout, out), (proc.stderr, err))
    ]
    for reader in readers:
        reader.start()
    hang = False
    try:
        for wanted, delay, sig in case.signals:
            deadline = time.monotonic() + case.timeout
            while wanted.encode() not in b"".join(out) + b"".join(err) and proc.poll() is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            time.sleep(delay)
            if proc.poll() is None and callable(sig):
                sig((b"".join(out) + b"".join(err)).decode(errors="replace"), d)
            elif proc.poll() is None:
                proc.send_signal(sig)
        proc.wait(timeout=max(1.0, case.timeout - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        hang = True
        proc.kill()
        proc.wait()
    for reader in readers:
        reader.join(timeout=10)
    seconds = time.monotonic() - started
    if callable(end):
        end()
    stdout = b"".join(out).decode(errors="replace")
    stderr = b"".join(err).decode(errors="replace")
    after = snapshot_files(d)
    own = [re.compile(_glob_regex(pattern)) for pattern in case.own]
    changed = sorted(p for p, h in before.items() if after.get(p) not in (h,) and not any(r.fullmatch(p) for r in own))
    temporaries = sorted(
        str(p.relative_to(d)) for p in d.rglob("*") if ".tmp-" in p.name and str(p.relative_to(d)) not in existing
    )
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.strip()]
    code = proc.returncode
    result = {
        "group": case.group,
        "name": case.name,
        "argv": case.argv,
        "code": code,
        "seconds": round(seconds, 1),
        "traceback": "Traceback" in stderr or "Traceback" in stdout,
        "internal": "internal error" in stderr,
        "stderr_lines": len(lines),
        "stderr": stderr[-1500:],
        "changed": changed,
        "temporaries": temporaries,
        "hang": hang,
        "signal_death": code is not None and code < 0,
        "pwned": any(p.name == PWNED for p in d.rglob(PWNED)),
        "multiline_expected": case.multiline,
        "checked": case.check(d, base) if case.check else [],
    }
    result["problems"] = problems(case, result, lines)
    return result


def run_safely(case: Case, base: Base, root: Path) -> dict[str, Any]:
    """``run_case``, with a failure of the sweep itself recorded as the case's problem instead of ending the sweep."""
    try:
        return run_case(case, base, root)
    except Exception as err:
        return {"group": case.group, "name": case.name, "argv": case.argv, "code": None, "seconds": 0,
                "traceback": False, "internal": False, "stderr_lines": 0, "stderr": "", "changed": [],
                "temporaries": [], "hang": False, "signal_death": False, "pwned": False, "multiline_expected": "",
                "checked": [],
                "problems": [f"the sweep could not run it: {type(err).__name__}: {err}"]}  # fmt: skip


def _glob_regex(pattern: str) -> str:
    return re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")


def _read(stream: Any, sink: list[bytes]) -> None:
    while chunk := stream.read1(65536):
        sink.append(chunk)


def problems(case: Case, r: dict[str, Any], lines: list[str]) -> list[str]:
    found = []
    if r["hang"]:
        found.append("hang")
    if r["signal_death"]:
        found.append(f"died by signal {-r['code']}")
    if r["traceback"] and not case.multiline:
        found.append("traceback")
    if r["internal"]:
        found.append("internal error")
    if r["changed"]:
        found.append(f"files changed or lost: {r['changed'][:4]}")
    if r["temporaries"]:
        found.append(f"temporaries left: {r['temporaries'][:4]}")
    if r["pwned"]:
        found.append("a pickle ran its command")
    found += r["checked"]
    codes = case.codes if case.codes is not None else {0, *ERROR_CODES}
    if not r["hang"] and r["code"] not in codes:
        found.append(f"exit {r['code']}, expected {sorted(codes)}")
    if not case.multiline:
        if r["code"] == 0 and lines:
            found.append(f"stderr on success: {lines[0][:100]!r}")
        if r["code"] not in (0, None) and not r["signal_death"]:
            if len(lines) != 1:
                found.append(f"{len(lines)} stderr lines")
            elif not ERROR_LINE.match(lines[0]):
                found.append(f"stderr is not an error line: {lines[0][:100]!r}")
    return found


# ---- the report ----


def report(results: list[dict[str, Any]]) -> str:
    groups = sorted({r["group"] for r in results}, key=[r["group"] for r in results].index)
    header = (
        "| group | cases | failing | tracebacks | internal errors | multi-line errors (expected) | "
        "files lost/changed | temporaries left | deaths by signal, hangs | pickles run |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]

    def row(name: str, rs: list[dict[str, Any]]) -> str:
        multi = sum(
            1 for r in rs if r["stderr_lines"] > 1 and r["code"] not in (0, None) and not r["multiline_expected"]
        )
        expected = sum(1 for r in rs if r["stderr_lines"] > 1 and r["multiline_expected"])
        return (
            f"| {name} | {len(rs)} | {sum(1 for r in rs if r['problems'])} | "
            f"{sum(1 for r in rs if r['traceback'] and not r['multiline_expected'])} | "
            f"{sum(1 for r in rs if r['internal'])} | {multi} ({expected}) | {sum(1 for r in rs if r['changed'])} | "
            f"{sum(1 for r in rs if r['temporaries'])} | "
            f"{sum(1 for r in rs if r['signal_death'] or r['hang'])} | {sum(1 for r in rs if r['pwned'])} |"
        )

    for group in groups:
        rows.append(row(group, [r for r in results if r["group"] == group]))
    rows.append(row("**all**", results))
    failing = [r for r in results if r["problems"]]
    lines = ["\n".join(rows), "", f"{len(failing)} failing case(s)" + (":" if failing else "")]
    for r in failing:
        first = next((line for line in r["stderr"].splitlines() if line.strip()), "")
        lines.append(f"- [{r['group']}] {r['name']}: {'; '.join(r['problems'])} | exit {r['code']} | {first[:160]}")
    codes = Counter(r["code"] for r in results)
    lines.append("")
    lines.append("exit codes: " + ", ".join(f"{code}: {n}" for code, n in sorted(codes.items(), key=str)))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/sweep", help="where the cases' directories and results go")
    parser.add_argument("--only", default=None, help="run only the cases whose 'group/name' matches this regex")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at the same time (default 2)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args()
    cases = all_cases()
    names = Counter(f"{c.group}/{c.name}" for c in cases)
    assert all(n == 1 for n in names.values()), [name for name, n in names.items() if n > 1]
    if args.only:
        cases = [c for c in cases if re.search(args.only, f"{c.group}/{c.name}")]
    if args.list:
        for c in cases:
            print(f"{c.group}/{c.name}: {' '.join(c.argv)[:150]}")
        print(f"{len(cases)} cases")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"preparing the base run in {out / 'base'} ...", flush=True)
    base = make_base(out / "base")
    print(f"running {len(cases)} cases, {args.jobs} at a time", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped sweep kills the commands it runs
    with ThreadPoolExecutor(args.jobs) as pool, open(out / "results.jsonl", "w") as log:
        try:
            done = list(_results(pool, cases, base, out, log))
        finally:
            STOPPING.set()
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in list(RUNNING.values()):
                if proc.poll() is None:
                    proc.kill()
    print()
    text_report = report(done)
    (out / "report.md").write_text(text_report + "\n")
    print(text_report)
    return 1 if any(r["problems"] for r in done) else 0


def _results(pool: ThreadPoolExecutor, cases: list[Case], base: Base, out: Path, log: Any) -> Iterator[dict]:
    """Each case's outcome, in order, as the pool finishes them; logged and printed on the way."""
    for count, result in enumerate(pool.map(lambda case: run_safely(case, base, out / "cases"), cases), 1):
        log.write(json.dumps(result) + "\n")
        log.flush()
        mark = "FAIL " + "; ".join(result["problems"]) if result["problems"] else "ok"
        print(
            f"{count:4d}/{len(cases)} [{result['group']}] {result['name']}: exit {result['code']} "
            f"({result['seconds']} s) {mark}",
            flush=True,
        )
        yield result


if __name__ == "__main__":
    sys.exit(main())
