"""Bad input through the real command line: each mistake is one line on stderr, the right exit code, no traceback.

Exit code 2 is a usage error (a flag out of range or inconsistent), 1 a failure (missing or unreadable files, a
checkpoint that does not fit). A user's mistake is never reported as an internal error.

Most cases call ``gpt2scratch.cli.main`` in this process (``run_main``), which is all the console script does; those
where a process of their own proves more start one (``run_cli``): see ``SUBPROCESS``.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE_TEXT, TINY_TRAIN_FLAGS, RunsCommand, digest, run_cli, run_main

from gpt2scratch.checkpoint.hf import export
from gpt2scratch.config import GPTConfig
from gpt2scratch.model import GPT

ENTRY_POINT = Path(sys.executable).with_name("gpt2-scratch")
FORMS = {
    "gpt2-scratch": str(ENTRY_POINT) if ENTRY_POINT.is_file() else None,  # the console script, else -m gpt2scratch
    "train.py": str(REPO / "train.py"),  # takes train's flags without the command
}

# The files a case can name (in its working directory), each made from the snapshot of a real 2-step run.
FILES: dict[str, Callable[[Path, Path], object]] = {
    "text.txt": lambda path, snap: path.write_text(SAMPLE_TEXT * 3, encoding="utf-8"),
    "empty.txt": lambda path, snap: path.write_bytes(b""),
    "binary.txt": lambda path, snap: path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(57) + SAMPLE_TEXT.encode()),
    "latin1.txt": lambda path, snap: path.write_bytes(SAMPLE_TEXT.replace("Caius", "Ca\u00efus").encode("latin-1")),
    "short.txt": lambda path, snap: path.write_text("Speak, speak.\n", encoding="utf-8"),
    "docs": lambda path, snap: (path.mkdir(), (path / "README.md").write_text("not a .txt\n")),
    "snap.pt": lambda path, snap: shutil.copyfile(snap, path),
    "truncated.pt": lambda path, snap: path.write_bytes(snap.read_bytes()[: snap.stat().st_size // 2]),
    "random.bin": lambda path, snap: path.write_bytes(random.Random(0).randbytes(4096)),
    "foreign.pt": lambda path, snap: torch.save(torch.load(snap, weights_only=True)["model_state_dict"], path),
    "evil.pt": lambda path, snap: torch.save(RunsCommand(f"touch {path.parent / 'pwned'}"), path),
    "vocab1000": lambda path, snap: export(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=1000)), path),
    "a-model": lambda path, snap: (path.mkdir(), (path / "config.json").write_text('{"model_type": "gpt2"}\n')),
}

TRAIN = ("train", *TINY_TRAIN_FLAGS, "--input", "text.txt", "--max-steps", "1")  # later flags override these
BOTH = ("gpt2-scratch", "train.py")


class Case(NamedTuple):
    argv: tuple[str, ...]  # after the program
    code: int
    message: str  # a regex the one line of stderr matches
    forms: tuple[str, ...] = ("gpt2-scratch",)


CASES = {
    "no-input-txt": Case(("train",), 1, r"^error: no input\.txt in this directory", BOTH),
    "input-missing": Case((*TRAIN, "--input", "nope.txt"), 1, r"input nope\.txt does not exist"),
    "input-empty": Case((*TRAIN, "--input", "empty.txt"), 1, r"is empty"),
    "input-binary": Case((*TRAIN, "--input", "binary.txt"), 1, r"binary file"),
    "input-not-utf8": Case((*TRAIN, "--input", "latin1.txt"), 1, r"not UTF-8 text \(bad byte at offset \d+\)"),
    "input-too-short": Case((*TRAIN, "--input", "short.txt"), 1, r"fewer than one batch needs \(65 "),
    "input-dir-no-txt": Case((*TRAIN, "--input", "docs"), 1, r"docs has no \.txt files"),
    "batch-0": Case((*TRAIN, "-B", "0"), 2, r"-B/--batch-size must be a positive integer, got 0"),
    "seq-len-negative": Case((*TRAIN, "-T", "-1"), 2, r"-T/--seq-len must be a positive integer, got -1"),
    "lr-0": Case((*TRAIN, "--lr", "0"), 2, r"--lr must be in \(0, 10\), got 0", BOTH),
    "lr-negative": Case((*TRAIN, "--lr", "-1"), 2, r"--lr must be in \(0, 10\), got -1"),
    "snapshot-interval-negative": Case(
        (*TRAIN, "--snapshot-interval", "-1"), 2, r"--snapshot-interval must be zero or positive"
    ),
    "keep-snapshots-negative": Case(
        (*TRAIN, "--keep-snapshots", "-2"), 2, r"--keep-snapshots must be zero or positive"
    ),
    "seq-len-over-block": Case((*TRAIN, "-T", "65"), 2, r"\(65\) is larger than the model's block size \(64\)"),
    "embd-not-divisible": Case(
        (*TRAIN, "--n-embd", "30", "--n-head", "4"), 2, r"n_embd \(30\) must be divisible by n_head \(4\)"
    ),
    "preset-unknown": Case((*TRAIN, "--preset", "nope"), 2, r"unknown preset 'nope'; choose one of: gpt2,"),
    "device-unknown": Case((*TRAIN, "--device", "nope"), 2, r"device 'nope'"),
    "device-cuda-absent": Case((*TRAIN, "--device", "cuda"), 2, r"no CUDA GPU is available here"),
    "dtype-float16-cpu": Case((*TRAIN, "--dtype", "float16"), 2, r"float16 is not supported on the CPU"),
    "max-steps-0": Case((*TRAIN, "--max-steps", "0"), 2, r"--max-steps must be a positive integer, got 0"),
    "val-fraction-1.5": Case((*TRAIN, "--val-fraction", "1.5"), 2, r"--val-fraction must be in \[0, 1\), got 1\.5"),
    "unknown-flag": Case((*TRAIN, "--bogus"), 2, r"unrecognized arguments: --bogus", BOTH),
    "out-dir-under-a-file": Case((*TRAIN, "--out-dir", "text.txt/out"), 1, r"cannot write to --out-dir text\.txt/out"),
    "resume-missing": Case((*TRAIN, "--resume", "missing.pt"), 1, r"no checkpoint at missing\.pt"),
    "resume-auto-nothing": Case((*TRAIN, "--resume", "auto"), 1, r"--resume auto: no snapshot in"),
    "resume-truncated": Case((*TRAIN, "--resume", "truncated.pt"), 1, r"truncated\.pt is truncated or corrupt"),
    "resume-random-bytes": Case((*TRAIN, "--resume", "random.bin"), 1, r"random\.bin is (truncated or )?corrupt"),
    "resume-foreign": Case((*TRAIN, "--resume", "foreign.pt"), 1, r"foreign\.pt is not a gpt2-scratch checkpoint"),
    "resume-malicious": Case((*TRAIN, "--resume", "evil.pt"), 1, r"refused to load evil\.pt"),
    "resume-other-shape": Case(
        (*TRAIN, "--resume", "snap.pt", "--n-embd", "64", "--max-steps", "5"),
        1,
        r"n_embd=32 .*, this run asks for .*n_embd=64",
    ),
    "generate-missing": Case(("generate", "--checkpoint", "missing.pt"), 1, r"missing\.pt is neither a file"),
    "generate-top-k-0": Case(
        ("generate", "--checkpoint", "snap.pt", "--top-k", "0"), 2, r"--top-k must be a positive integer, got 0"
    ),
    "export-not-a-checkpoint": Case(("export", "text.txt", "exported"), 1, r"text\.txt is (truncated or )?corrupt"),
    # issue 16: generate and export
    "generate-other-vocabulary": Case(
        ("generate", "--pretrained", "vocab1000"), 1, r"vocab1000 has a vocabulary of 1,000 tokens, .*50,257-token BPE"
    ),
    "generate-temperature-nan": Case(
        ("generate", "--checkpoint", "snap.pt", "--temperature", "nan"), 2, r"--temperature must be .*finite.*got nan"
    ),
    "generate-temperature-inf": Case(
        ("generate", "--checkpoint", "snap.pt", "--temperature", "inf"), 2, r"--temperature must be .*finite.*got inf"
    ),
    "generate-seed-too-large": Case(
        ("generate", "--checkpoint", "snap.pt", "--seed", str(10**22)), 2, r"--seed must be in \[0, 2\*\*64"
    ),
    "generate-num-samples-huge": Case(
        ("generate", "--checkpoint", "snap.pt", "--num-samples", "100000000"),
        2,
        r"--num-samples 100000000 of 30 tokens needs about \d+\.\d+ GB of memory, more than the \d+\.\d+ GB available",
    ),
    "export-into-a-model": Case(("export", "snap.pt", "a-model"), 1, r"a-model is not empty; .*or --force"),
    "export-force-over-other-files": Case(
        ("export", "snap.pt", "docs", "--force"), 1, r"docs is not a model directory \(it has no config\.json\)"
    ),
    "export-onto-a-file": Case(("export", "snap.pt", "text.txt"), 1, r"text\.txt is a file"),
}


# Issue 16: a run knows what it is (items 1, 2, 6, 12), checked before the first step.
FILES.update(
    {
        "victim": lambda path, snap: shutil.copytree(snap.parent.parent, path),  # another run's out dir, in use
        "other.txt": lambda path, snap: path.write_text(SAMPLE_TEXT.upper() * 3, encoding="utf-8"),
        "badstep.pt": lambda path, snap: torch.save({**torch.load(snap, weights_only=True), "step": "12"}, path),
        "pipe": lambda path, snap: os.mkfifo(path),
    }
)
RESUME = (*TRAIN, "--resume", "snap.pt", "--max-steps", "5")
CASES.update(
    {
        "resume-into-another-run": Case(
            (*RESUME, "--out-dir", "victim"), 1, r"victim holds another run \(snapshot_step_2\.pt, metrics\.jsonl\)"
        ),
        "resume-other-batch": Case(
            (*RESUME, "-B", "2"), 2, r"-B/--batch-size 2, the checkpoint's 4; .*--allow-changed batch_size to change"
        ),
        "resume-other-lr-and-clip": Case(
            (*RESUME, "--lr", "1e-3", "--grad-clip", "1"),
            2,
            r"--lr 0\.001, the checkpoint's 0\.003; --grad-clip 1\.0, the checkpoint's 0\.0; "
            r".*--allow-changed lr,grad_clip",
        ),
        "resume-other-input": Case(
            (*RESUME, "--input", "other.txt"),
            2,
            r"--input/--data gives another text \(sha256 \w{12}, the checkpoint's \w{12}\)",
        ),
        "resume-allow-unknown": Case(
            (*RESUME, "--allow-changed", "colour"), 2, r"unknown field\(s\) colour; choose from"
        ),
        "allow-without-resume": Case((*TRAIN, "--allow-changed", "lr"), 2, r"--allow-changed applies to a resumed run"),
        "resume-max-steps-behind": Case(
            (*RESUME, "--max-steps", "1"), 2, r"--max-steps 1 is not beyond the checkpoint's step 2; raise it"
        ),
        "resume-damaged-step": Case(
            (*TRAIN, "--resume", "badstep.pt", "--max-steps", "5"), 1, r"badstep\.pt is damaged: its step is '12'"
        ),
        "out-dir-empty": Case((*TRAIN, "--out-dir", ""), 2, r"--out-dir must not be empty; give \. for"),
        "input-fifo": Case((*TRAIN, "--input", "pipe"), 1, r"input pipe is not a regular file \(a FIFO"),
        "init-from-other-vocabulary": Case(
            (*TRAIN, "--init-from", "vocab1000"), 1, r"--init-from vocab1000 has a vocabulary of 1,000 tokens"
        ),
        "resume-fifo": Case((*TRAIN, "--resume", "pipe"), 1, r"pipe is not a regular file \(a FIFO"),
        "generate-fifo": Case(("generate", "--checkpoint", "pipe"), 1, r"pipe is not a regular file \(a FIFO"),
        "model-too-large": Case(
            (*TRAIN, "--n-embd", "1000000"), 2, r"parameters needs at least .* GB to train .*, more than"
        ),
        "block-too-large": Case((*TRAIN, "--block-size", str(10**12)), 2, r"parameters needs at least .* GB to train"),
        "seed-too-large": Case((*TRAIN, "--seed", str(2**64)), 2, r"--seed must be in \[0, "),
    }
)


def _with_optimizer_state(snap: Path, path: Path, change: Callable[[dict], object]) -> None:
    state = torch.load(snap, weights_only=True)
    for moments in state["optimizer_state_dict"]["state"].values():
        change(moments)
    torch.save(state, path)


def _with_config(snap: Path, path: Path, **change: int) -> None:
    state = torch.load(snap, weights_only=True)
    torch.save({**state, "config": {**state["config"], **change}}, path)


def _run_dir(path: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content)


# The late sweep on 6d7295c: internal errors, crashes and late failures, each now one line before anything runs.
FILES.update(
    {
        "small-moments.pt": lambda path, snap: _with_optimizer_state(
            snap, path, lambda m: m.update(exp_avg=torch.zeros(3), exp_avg_sq=torch.zeros(3))
        ),
        "huge-block.pt": lambda path, snap: _with_config(snap, path, block_size=10**12),
        "huge-layers.pt": lambda path, snap: _with_config(snap, path, n_layer=10**6),
        "hf-array": lambda path, snap: (path.mkdir(), (path / "config.json").write_text("[1, 2]")),
        "evil.pkl": lambda path, snap: path.write_bytes(pickle.dumps(RunsCommand(f"touch {path.parent / 'pwned'}"))),
        "metrics-only": lambda path, snap: _run_dir(path, {"metrics.jsonl": b'{"step": 1, "loss": 10.9}\n'}),
        "snapshots-a-file": lambda path, snap: _run_dir(path, {"snapshots": b"my notes"}),
        "damaged-run": lambda path, snap: _run_dir(path, {"snapshots/snapshot_step_2.pt": snap.read_bytes()[:5000]}),
    }
)
CASES.update(
    {
        "resume-smaller-moments": Case(
            (*TRAIN, "--resume", "small-moments.pt", "--max-steps", "5"),
            1,
            r"small-moments\.pt is damaged: its optimizer_state_dict does not fit .* exp_avg is a tensor .*\(3,\)",
        ),
        "generate-checkpoint-empty": Case(("generate", "--checkpoint", ""), 2, r"^error: --checkpoint must not be"),
        "generate-config-json-array": Case(("generate", "--pretrained", "hf-array"), 1, r"holds an array, not a JSON"),
        "generate-huge-block-size": Case(
            ("generate", "--checkpoint", "huge-block.pt"), 1, r"wpe\.weight has shape \(64, 32\), the config needs"
        ),
        "export-huge-n-layer": Case(("export", "huge-layers.pt", "hf"), 1, r"the config has n_layer=1000000"),
        "eval-huge-n-layer": Case(
            ("eval", "--checkpoint", "huge-layers.pt", "--perplexity", "text.txt"), 1, r"n_layer=1000000"
        ),
        "generate-raw-pickle": Case(("generate", "--checkpoint", "evil.pkl"), 1, r"^error: refused to load evil\.pkl"),
        "fresh-run-over-metrics": Case(
            (*TRAIN, "--out-dir", "metrics-only"), 1, r"already holds metrics\.jsonl of an earlier run .*; move it"
        ),
        "weight-decay-huge": Case((*TRAIN, "--weight-decay", "1e30"), 2, r"would zero or flip every weight"),
        "snapshots-a-file": Case(
            (*TRAIN, "--out-dir", "snapshots-a-file"), 1, r"snapshots is in the way: a run writes a directory there"
        ),
        "resume-auto-all-damaged": Case(
            (*TRAIN, "--out-dir", "damaged-run", "--resume", "auto", "--max-steps", "5"),
            1,
            r"no snapshot in damaged-run/snapshots loads \(snapshot_step_2\.pt: damaged.*--resume PATH",
        ),
        "hellaswag-empty": Case((*TRAIN, "--hellaswag", ""), 2, r"--hellaswag must not be empty"),
    }
)


# Issue 12: token shards and prepare's inputs.
def _shard(path: Path, magic: int = 20240520, count: int = 200, tokens: int = 200) -> None:
    path.mkdir()
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, 1, count
    (path / "train_000000.bin").write_bytes(header.tobytes() + np.arange(tokens, dtype=np.uint16).tobytes())


def _prepared(path: Path) -> None:
    from gpt2scratch.config.commands import PrepareConfig
    from gpt2scratch.data.prepare import prepare

    (path.parent / "one.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    prepare(PrepareConfig(inputs=[str(path.parent / "one.txt")], out=str(path), shard_tokens=100))


FILES.update(
    {
        "badmagic": lambda path, snap: _shard(path, magic=20240521),
        "truncated": lambda path, snap: _shard(path, count=200, tokens=150),
        "malformed.jsonl": lambda path, snap: path.write_text('{"text": "a"}\n{"text": "b"\n'),
        "nofield.jsonl": lambda path, snap: path.write_text('{"body": "a"}\n'),
        "latin1.jsonl": lambda path, snap: path.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1")),
        "garbage.parquet": lambda path, snap: path.write_bytes(b"PAR1 not parquet"),
        "blank.jsonl": lambda path, snap: path.write_text("\n"),
        "prepared": lambda path, snap: _prepared(path),
    }
)
PREPARE = ("prepare", "--out", "shards")
CASES.update(
    {
        "shard-bad-magic": Case(
            (*TRAIN, "--input", "badmagic"), 1, r"train_000000\.bin is not a token shard: its header starts with 2024"
        ),
        "shard-count-disagrees": Case(
            (*TRAIN, "--input", "truncated"), 1, r"train_000000\.bin is damaged: its header says 200 tokens"
        ),
        "prepare-malformed-json": Case((*PREPARE, "malformed.jsonl"), 1, r"malformed\.jsonl line 2 is not valid JSON"),
        "prepare-missing-field": Case(
            (*PREPARE, "nofield.jsonl"), 1, r"nofield\.jsonl line 1 has no field 'text' \(its fields: body\)"
        ),
        "prepare-not-utf8": Case((*PREPARE, "latin1.jsonl"), 1, r"latin1\.jsonl line 1 is not UTF-8 text"),
        "prepare-bad-parquet": Case((*PREPARE, "garbage.parquet"), 1, r"cannot read garbage\.parquet as Parquet \("),
        "prepare-empty": Case((*PREPARE, "blank.jsonl"), 1, r"the inputs \(blank\.jsonl\) hold no documents"),
        "prepare-other-shards": Case(
            ("prepare", "text.txt", "--out", "prepared"),
            1,
            r"prepared holds the shards of another prepare \(inputs .*; --shard-tokens 100, not 100000000\)",
        ),
        "prepare-no-out": Case(("prepare", "text.txt"), 2, r"the following arguments are required: --out"),
    }
)


# The cases run as real processes: every train.py form, and the console-script form of the cases that have both (the
# program itself is what they test); the FIFOs (a regression that opened the pipe would block, and only a process can
# be timed out). The others run in this process: a real process would prove nothing more.
SUBPROCESS = {name for name, case in CASES.items() if "train.py" in case.forms}
SUBPROCESS |= {"input-fifo", "resume-fifo", "generate-fifo"}


def _params() -> list:
    params = []
    for name, (argv, code, message, forms) in CASES.items():
        for form in forms:
            marks = ()
            if name == "device-cuda-absent":
                marks = (pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present"),)
            process = form == "train.py" or name in SUBPROCESS
            params.append(pytest.param(form, argv, code, message, process, id=f"{name}[{form}]", marks=marks))
    return params


@pytest.fixture(scope="module")
def snapshot(trained_snapshot: Path) -> Path:
    return trained_snapshot


def run(
    *args: str, cwd: Path, process: bool, script: str | None = None, env: dict | None = None
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``gpt2-scratch ARGS`` (or ``python SCRIPT ARGS``) in ``cwd``: in a process of
    its own if ``process``, else through ``cli.main`` in this one."""
    if not process:
        return run_main(*args, cwd=cwd, env=env)
    result = run_cli(*args, cwd=cwd, timeout=120, script=script, env=env)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize(("form", "argv", "code", "message", "process"), _params())
def test_bad_input_is_one_line_and_an_exit_code(
    form: str, argv: tuple[str, ...], code: int, message: str, process: bool, snapshot: Path, tmp_path: Path
) -> None:
    for arg in argv:
        name = arg.split("/")[0]
        if name in FILES and not (tmp_path / name).exists():
            FILES[name](tmp_path / name, snapshot)
    args = argv[1:] if form == "train.py" else argv
    before = files_of(tmp_path)
    returncode, stdout, stderr = run(*args, cwd=tmp_path, process=process, script=FORMS[form])
    output = stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert "internal error" not in stderr, "a user's mistake reported as a bug of ours: " + stderr
    assert len(lines) == 1, f"stderr should be one line:\n{stderr}"
    assert re.search(message, lines[0]), lines[0]
    assert returncode == code, lines[0]
    assert not (tmp_path / "pwned").exists()
    after = files_of(tmp_path)
    assert {name: after.get(name) for name in before} == before, "a refused command changed or deleted a file"


def files_of(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under ``folder``, but the lock (which a run takes over: pid written in it)."""
    return {str(p): digest(p) for p in folder.rglob("*") if p.is_file() and p.name != ".gpt2scratch.lock"}


# Issue 16, item 4: the environment is read inside the error handling; only training is distributed.
ENV_CASES = {
    "world-size-not-a-number": ({"WORLD_SIZE": "abc"}, TRAIN, 2, r"WORLD_SIZE='abc' in the environment is not a"),
    "rank-missing": ({"WORLD_SIZE": "2"}, TRAIN, 2, r"WORLD_SIZE=2 is set but RANK is not; .*torchrun"),
    "no-rendezvous": ({"WORLD_SIZE": "2", "RANK": "1"}, TRAIN, 2, r"could not join the other 1 process\(es\)"),
    "generate-ignores-it": (
        {"WORLD_SIZE": "abc"},
        ("generate", "--checkpoint", "snap.pt", "--max-new-tokens", "2"),
        0,
        "",
    ),
    "export-ignores-it": ({"WORLD_SIZE": "2"}, ("export", "snap.pt", "exported"), 0, ""),
    # the sweep: libgomp printed two lines of its own, and the command went on
    "omp-threads-not-a-number": (
        {"OMP_NUM_THREADS": "abc"},
        ("generate", "--checkpoint", "snap.pt"),
        2,
        r"^error: OMP_NUM_THREADS='abc' in the environment is not a number of threads",
    ),
    "omp-threads-empty": ({"OMP_NUM_THREADS": ""}, TRAIN, 2, r"OMP_NUM_THREADS='' in the environment"),
}


# In a process of their own: OMP_NUM_THREADS is read by torch's OpenMP library as it loads, and no-rendezvous tries to
# join a process group. The others are checked before anything distributed starts.
ENV_SUBPROCESS = {"no-rendezvous", "omp-threads-not-a-number", "omp-threads-empty"}


@pytest.mark.parametrize("case", list(ENV_CASES))
def test_torchrun_variables_are_checked_in_one_line(case: str, snapshot: Path, tmp_path: Path) -> None:
    env, argv, code, message = ENV_CASES[case]
    for name in ("text.txt", "snap.pt"):
        FILES[name](tmp_path / name, snapshot)
    returncode, stdout, stderr = run(*argv, cwd=tmp_path, process=case in ENV_SUBPROCESS, env=env)
    assert "Traceback" not in stdout + stderr and "internal error" not in stderr, stderr
    assert returncode == code, stderr
    if code:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and re.search(message, lines[0]), stderr


def test_resuming_into_another_run_changes_none_of_its_files(snapshot: Path, tmp_path: Path) -> None:
    """Issue 16, item 1: the victim's metrics were cut from 30 lines to 8 and its new snapshot pruned at once."""
    FILES["text.txt"](tmp_path / "text.txt", snapshot)
    FILES["victim"](tmp_path / "victim", snapshot)
    victim = tmp_path / "victim"
    before = {p: digest(p) for p in victim.rglob("*") if p.is_file() and p.name != ".gpt2scratch.lock"}
    base = tmp_path / "base.pt"
    shutil.copyfile(snapshot, base)
    code, _, err = run_main(
        *RESUME[:-4], "--resume", str(base), "--max-steps", "8", "--out-dir", "victim", cwd=tmp_path
    )
    assert code == 1 and "holds another run" in err, err
    after = {p: digest(p) for p in victim.rglob("*") if p.is_file() and p.name != ".gpt2scratch.lock"}
    assert after == before


def test_a_process_entry_ignores_stop_signals_once_its_exit_code_is_decided(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The sweep's consolidate/SIGTERM: a SIGTERM landing while Python tore down after a finished command killed the
    process (-15) instead of letting it exit 0. As the process's entry (no argv given), main ignores stop signals
    once it returns; called with an argv, as here and by other code, it leaves the handlers as they were."""
    import logging
    import signal

    from gpt2scratch.cli import main
    from gpt2scratch.signals import SIGNALS

    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main configures the root logger, as a process's entry does
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["train", "--print-plan"]) == 0
        assert {sig: signal.getsignal(sig) for sig in SIGNALS} == before
        monkeypatch.setattr(sys, "argv", ["gpt2-scratch", "train", "--print-plan"])
        assert main() == 0
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        root.handlers[:] = handlers
        root.setLevel(level)
    assert "tokens per step" in capsys.readouterr().out
