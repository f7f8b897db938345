"""The one home of shared test helpers and fixtures: tiny corpora and configs, running the real CLI (and torchrun) or
its ``main`` in this process, random models and token ids, llm.c shards written with numpy, a session-wide trained
snapshot and FSDP runs, a tiny training state, reading metrics, comparing runs, one-line error checks, a file size
limit, a process group of one, and a malicious pickle. The tests are laid out as the package is (tests/data/ for
gpt2scratch/data/, ...), with end-to-end runs of the command line in tests/e2e/; no two test files share a name."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gpt2scratch.config import GPTConfig, TrainConfig

if typing.TYPE_CHECKING:
    from gpt2scratch.model import GPT
    from gpt2scratch.training.state import TrainState

REPO = Path(__file__).resolve().parent.parent

# A model small enough to train to a low loss in seconds on a 2-core CPU (the vocabulary stays GPT-2's).
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)

# Flags that make `train` use a tiny model on a tiny corpus, fast and deterministic.
TINY_TRAIN_FLAGS = ["--preset", "tiny", "--n-embd", "32", "--block-size", "64", "-B", "4", "-T", "16", "--lr", "3e-3",
                    "--dtype", "float32", "--device", "cpu", "--no-sample", "--no-plot"]  # fmt: skip

SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
    "All:\nWe know't, we know't.\n\nFirst Citizen:\nLet us kill him, and we'll have corn at our own price.\n"
)


# One thread per CLI run: the test machine has two cores shared with other work, and a second OpenMP thread that waits
# for a busy core makes a tiny model's step several times slower. Runs compared with each other use the same count.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run many small ops, several times faster on one thread than on two of a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small UTF-8 text file (about 500 tokens)."""
    path = tmp_path / "input.txt"
    path.write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    return path


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process we start: ours, with this checkout's ``src`` on PYTHONPATH, then ``extra``."""
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), **(extra or {})}


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
            script: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``gpt2-scratch ARGS`` (or ``python SCRIPT ARGS``) as a user would; capture its output."""
    command = [sys.executable, script, *args] if script else [sys.executable, "-m", "gpt2scratch", *args]
    full_env = child_env({"OMP_NUM_THREADS": "2", **(env or {})})
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def run_main(*args: str, cwd: Path | None = None, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    """``gpt2-scratch ARGS`` in this process, through ``gpt2scratch.cli.main``: (exit code, stdout, stderr), in ``cwd``
    (else here) with ``env`` on top of our environment (None unsets a variable). Warnings it raises are added to
    stderr as Python would print them in a process of its own. What the command changes in this process is put back:
    the directory and environment, the root logger it configures, the stop signals' handlers, torch's global RNG and
    float32 matmul precision. Not for what needs a fresh process: OMP_NUM_THREADS (read as torch loads), start-up,
    signals, and anything that could hang."""
    import io
    import logging
    import warnings

    from gpt2scratch.cli import main
    from gpt2scratch.signals import SIGNALS

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    handlers_of = {sig: signal.getsignal(sig) for sig in SIGNALS}
    precision = torch.get_float32_matmul_precision()
    with contextlib.ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        if cwd is not None:
            patch.chdir(cwd)
        for name, value in (env or {}).items():
            if value is None:
                patch.delenv(name, raising=False)
            else:
                patch.setenv(name, value)
        stack.enter_context(torch.random.fork_rng(devices=[]))
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("default")  # Python's own filters: what a user's terminal would show
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse: usage errors, --help, --version
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
            for sig, handler in handlers_of.items():
                signal.signal(sig, handler)
            torch.set_float32_matmul_precision(precision)
    shown = (warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    return code, out.getvalue(), err.getvalue() + "".join(shown)


def skip_without(module: str) -> pytest.MarkDecorator:
    """Skip a test when an optional package is not installed."""
    import importlib.util

    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs {module}")


def tiny_config(*flags: str) -> TrainConfig:
    """The TrainConfig that ``gpt2-scratch train`` builds from the tiny flags and then ``flags`` (later flags win)."""
    from gpt2scratch.cli.dispatch import build_parser
    from gpt2scratch.cli.flags import from_args

    return from_args(TrainConfig, build_parser().parse_args(["train", *TINY_TRAIN_FLAGS, *flags]))


@pytest.fixture(scope="session")
def trained_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last snapshot (step 2) of one 2-step tiny run, trained in this process once per session and shared by the
    test modules: copy it, never change it. Its out dir is ``trained_snapshot.parent.parent``."""
    import torch

    from gpt2scratch.training.loop import train

    folder = tmp_path_factory.mktemp("trained")
    (folder / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    flags = ["--input", str(folder / "input.txt"), "--out-dir", str(folder / "out"), "--target-loss", "0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config(*flags, "--max-steps", "2", "--snapshot-interval", "2")
        # its loss.png is checked in training/test_plot.py
        return train(dataclasses.replace(cfg, no_plot=False)).model_path
    finally:
        torch.set_num_threads(threads)


def make_model(config: GPTConfig, scale: float, dtype: torch.dtype | None = None, seed: int = 0) -> GPT:
    """A model of ``config`` in eval mode, its weights from ``seed`` plus Gaussian noise of ``scale`` (larger than the
    0.02 init, so logits are spread out and greedy picks are clear), then cast to ``dtype`` if one is given."""
    from gpt2scratch.model import GPT

    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)
    return model if dtype is None else model.to(dtype)


def random_ids(vocab_size: int, B: int, T: int, seed: int = 1) -> torch.Tensor:
    """(B, T) token ids below ``vocab_size`` from their own generator seeded with ``seed``."""
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def numpy_shard(path: Path, tokens: Any, magic: int = 20240520, version: int = 1, count: int | None = None) -> Path:
    """A shard in llm.c's format as its fineweb.py (or modded-nanogpt's cached FineWeb) writes one, with numpy alone
    (not our writer): a 256-int32 header (magic, version, token count), then the tokens as uint16."""
    import numpy as np

    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes())
    return path


def metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The records of ``OUT/metrics.jsonl``, one per step."""
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(code: int, err: str, expected_code: int, *fragments: str) -> None:
    """A user's mistake: exit code ``expected_code`` and one line ``error: ...`` holding every fragment, no
    traceback, and not an ``internal error`` (a bug of ours)."""
    assert code == expected_code, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temporaries(folder: Path) -> list[Path]:
    """Our temporary files (``.NAME.tmp-PID``) anywhere under ``folder``."""
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """RLIMIT_FSIZE on this process with SIGXFSZ ignored: a write past ``nbytes`` fails with EFBIG, as on a quota.

    Only the soft limit moves, so it can be lifted again afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


class RunsCommand:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


# ---- several processes: torchrun, the FSDP runs the parallel and sharded tests share, comparing runs ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(options: list[str], *flags: str) -> list[str]:
    """``torchrun OPTIONS train.py FLAGS`` as ``python -m torch.distributed.run``."""
    return [sys.executable, "-m", "torch.distributed.run", *options, str(REPO / "train.py"), *flags]


def torchrun(*flags: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 train.py FLAGS`` in ``cwd``, one thread per rank."""
    command = torchrun_command(["--nproc_per_node=2", f"--master_port={free_port()}"], *flags)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=child_env(ONE_THREAD))


def train_py(*flags: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python train.py FLAGS`` in ``cwd``, one thread."""
    return run_cli(*flags, script=str(REPO / "train.py"), cwd=cwd, env=ONE_THREAD)


def assert_ran(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr


def assert_close_losses(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Two runs' metrics records: the same steps, losses within 1e-5."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)


def assert_close_weights(a: Path, b: Path) -> None:
    """Two checkpoints (files or sharded snapshots) hold the same weights to 1e-5."""
    from gpt2scratch.checkpoint.load import read_state

    wa, wb = read_state(a)["model_state_dict"], read_state(b)["model_state_dict"]
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-5, msg=name)


# The flags of the FSDP runs: a snapshot at steps 5 and 10, none pruned. Runs compared with each other differ only in
# how the batch of 4 sequences a step is split (and in the options a test adds). --lr 1e-3: the key biases get no
# gradient but rounding noise, which AdamW turns into steps of up to the learning rate, different for each split of
# the batch; at 3e-3 they drifted 8.5e-6 apart in 10 steps (DDP as FSDP), at 1e-3 3.5e-6, well inside the 1e-5 asked.
FSDP_FLAGS = [*TINY_TRAIN_FLAGS, "--lr", "1e-3", "--target-loss", "0", "--snapshot-interval", "5",
              "--keep-snapshots", "0", "--max-steps", "10"]  # fmt: skip


@pytest.fixture(scope="session")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference runs of the FSDP tests, trained once per session in a folder holding input.txt: ``one/`` (one
    process, -B 4) and ``fsdp/`` (two ranks under --parallel fsdp, -B 2), 10 steps each, snapshots at 5 and 10."""
    cwd = tmp_path_factory.mktemp("fsdp")
    (cwd / "input.txt").write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    assert_ran(train_py(*FSDP_FLAGS, "-B", "4", "--out-dir", "one", cwd=cwd))
    assert_ran(torchrun(*FSDP_FLAGS, "-B", "2", "--parallel", "fsdp", "--out-dir", "fsdp", cwd=cwd))
    return cwd


# ---- one process: a process group of its own (FSDP and DCP in this process), a tiny training state ----


@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A gloo process group of this process alone (rank 0 of 1), so FSDP and DCP run in the test's process."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path_factory.mktemp("process_group") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def new_state(seed: int, sharded: bool = False) -> TrainState:
    """A tiny model's training state on 4,000 tokens (-B 2 -T 8), its weights from ``seed``; with ``sharded``, FSDP2
    over the ``process_group`` fixture's one rank."""
    import numpy as np

    from gpt2scratch.data.corpus import Corpus, TokenLoader
    from gpt2scratch.distributed.parallelize import shard
    from gpt2scratch.distributed.world import World
    from gpt2scratch.model import GPT
    from gpt2scratch.training.optim import make_optimizer
    from gpt2scratch.training.state import TrainState

    torch.manual_seed(seed)
    model = GPT(TINY)
    cpu = torch.device("cpu")
    if sharded:
        shard(model, World(0, 0, 1), cpu, torch.float32)
    tokens = np.arange(4000, dtype=np.uint16) % TINY.vocab_size
    return TrainState(
        cfg=TrainConfig(preset="tiny", batch_size=2, seq_len=8),
        model=model,
        optimizer=make_optimizer(model),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loader=TokenLoader(tokens, 2, 8),
        corpus=Corpus(tokens, None, "test", "0" * 64),
        world=World(),
        device=cpu,
        dtype=torch.float32,
    )


def take_steps(state: TrainState, n: int) -> list[float]:
    """``n`` optimizer steps of ``state``; their losses."""
    losses = []
    for _ in range(n):
        x, y = state.loader.next_batch()
        _, loss = state.model(x, y)
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.step += 1
        state.loss = loss.item()
        losses.append(state.loss)
        torch.rand(1)  # the RNG moves on, as dropout would move it
    return losses


# ---- a server of ours in a subprocess (serve/test_app.py, eval/test_harness.py) ----

KEY = "test-key-0123456789"


class Server:
    """``gpt2-scratch serve`` in a subprocess on 127.0.0.1 and a port it picks; its output goes to ``log``."""

    def __init__(self, model_dir: Path, log: Path, *flags: str, env: dict[str, str] | None = None):
        self.log = log
        command = [sys.executable, "-m", "gpt2scratch", "serve", "--pretrained", str(model_dir), "--port", "0",
                   "--device", "cpu", *flags]  # fmt: skip
        full_env = child_env({"OMP_NUM_THREADS": "1", **(env or {})})
        with log.open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=full_env)
        self.url = ""

    def wait_ready(self, timeout: float = 120) -> Server:
        import httpx

        deadline = time.monotonic() + timeout
        while not self.url:
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            if found := re.search(r"on (http://127\.0\.0\.1:\d+)", self.log.read_text()):
                self.url = found.group(1)
            time.sleep(0.05)
        while True:
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def client(self, key: str = KEY) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.url}/health").json()

    def metric(self, name: str) -> float:
        import httpx

        text = httpx.get(f"{self.url}/metrics").text
        return float(re.search(rf"^{name} (\S+)$", text, flags=re.MULTILINE).group(1))  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def save_model(folder: Path, config: GPTConfig) -> Path:
    """A random model whose next-token distributions are spread out, exported as a transformers directory."""
    from gpt2scratch.checkpoint.hf import export
    from gpt2scratch.model import GPT

    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)  # spread out the next-token distribution
    export(model, folder)
    return folder


@pytest.fixture
def in_process(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Run ``train`` here on one thread, and give back the global torch state it sets (seed, matmul precision)."""
    threads, precision, rng = torch.get_num_threads(), torch.get_float32_matmul_precision(), torch.get_rng_state()
    torch.set_num_threads(1)
    caplog.set_level(logging.INFO, logger="gpt2scratch")
    yield
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(precision)
    torch.set_rng_state(rng)
