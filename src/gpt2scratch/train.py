"""The training loop: from a TrainConfig to snapshots, metrics and a final model.

``train`` is one plain function that reads top to bottom: set-up, then per step the learning rate, micro-batches,
clipping, the optimizer step, logging, evaluation, stopping and snapshots. Small helpers beside it build the pieces.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, checkpoint, corpus, data, distributed
from . import device as devices
from .config import GPTConfig, TrainConfig
from .convert import load_model, model_from_state
from .distributed import DistInfo
from .errors import CheckpointError, DataError, Interrupted, OutDirError, TrainingDiverged
from .model import GPT
from .optim import lr_at, make_optimizer

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int
    loss: float
    reached_target: bool
    model_path: Path  # final_model.pt if the target was reached, else the last snapshot
    device: torch.device
    dtype: torch.dtype


@dataclass
class Corpus:
    train: np.ndarray
    val: np.ndarray | None
    source: str  # what the user gave: paths or builtin:NAME
    sha256: str


def prepare_corpus(cfg: TrainConfig, out_dir: Path, info: DistInfo, progress: data.Progress | None) -> Corpus:
    """Tokenize the input once (rank 0; the others wait), memmap it, and split off the validation tail."""
    cache = out_dir / "cache"
    if cfg.data is not None:
        text_path = cache / f"{cfg.data}.txt"
        if info.is_main:
            text = corpus.builtin_text(cfg.data)
            if not text_path.is_file() or text_path.read_text(encoding="utf-8") != text:
                cache.mkdir(parents=True, exist_ok=True)
                tmp = text_path.with_name(f".{text_path.name}.tmp-{os.getpid()}")
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, text_path)
        distributed.barrier(info)
        files, source = [text_path], f"builtin:{cfg.data}"
    else:
        files = data.resolve_inputs(cfg.input)
        source = ", ".join(str(p) for p in files[:5]) + (f" (+{len(files) - 5} more)" if len(files) > 5 else "")
    sha = data.content_hash(files)
    token_path = cache / f"tokens-{sha[:20]}.u16"
    if info.is_main and not token_path.is_file():
        log.info("tokenizing %s ...", source)
        count = data.tokenize_files(files, token_path, progress)
        log.info("tokenized: %d tokens -> %s", count, token_path)
    distributed.barrier(info)
    tokens = data.load_tokens(token_path)
    if cfg.max_tokens is not None:
        tokens = tokens[: cfg.max_tokens]
    n_val = int(len(tokens) * cfg.val_fraction)
    train_tokens, val_tokens = tokens[: len(tokens) - n_val], (tokens[len(tokens) - n_val :] if n_val else None)
    if val_tokens is not None and len(val_tokens) < cfg.batch_size * cfg.seq_len + 1:
        raise DataError(f"--val-fraction {cfg.val_fraction} leaves {len(val_tokens)} tokens, less than one batch")
    return Corpus(train_tokens, val_tokens, source, sha)


def check_out_dir(out_dir: Path) -> None:
    """OutDirError unless ``out_dir`` can be created and written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutDirError(f"cannot write to --out-dir {out_dir}: {err.strerror or err}") from None


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(model: torch.nn.Module) -> bool:
    """Whether no weight is NaN or inf. Sums first: one pass, 20x cheaper than isfinite, and finite weights only
    sum to inf when they are astronomically large, in which case the exact check decides."""
    params = [p.detach() for p in model.parameters()]
    if bool(torch.stack([p.sum() for p in params]).isfinite().all()):
        return True
    return all(bool(torch.isfinite(p).all()) for p in params)


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second one exits at once.

    Exiting at once is safe: every file is written under a temporary name and renamed into place.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            os._exit(130)
        self.requested = signal.Signals(signum).name
        log.warning("%s received: stopping after this step (again to exit at once)", self.requested)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            if self.requested is None:  # once stopping, a further signal must still exit at once, until the end
                for sig, handler in self._previous.items():
                    signal.signal(sig, handler)


def initial_model(cfg: TrainConfig, resume: dict[str, Any] | None) -> GPT:
    """The model to train: from the resumed checkpoint, from --init-from weights, or freshly initialised."""
    if resume is not None:
        wanted = cfg.model_config()
        saved = GPTConfig.from_dict(resume["config"])
        if cfg.init_from is None and {**saved.to_dict(), "dropout": 0} != {**wanted.to_dict(), "dropout": 0}:
            raise CheckpointError(
                f"the checkpoint holds a model of shape {_shape(saved)}, this run asks for {_shape(wanted)}; "
                "give the same --preset/--n-layer/--n-head/--n-embd/--block-size as the run that wrote it"
            )
        config = GPTConfig.from_dict({**resume["config"], "dropout": cfg.dropout})
        return model_from_state(config, resume["model_state_dict"], "the checkpoint to resume")
    if cfg.init_from is not None:
        pretrained, _ = load_model(cfg.init_from)
        config = GPTConfig.from_dict({**pretrained.config.to_dict(), "dropout": cfg.dropout})
        model = GPT(config)
        model.load_state_dict(pretrained.state_dict())
        log.info("initialised from %s (%s)", cfg.init_from, _shape(config))
        return model
    return GPT(cfg.model_config())


def _shape(config: GPTConfig) -> str:
    return (
        f"n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
        f"block_size={config.block_size} vocab_size={config.vocab_size}"
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, tokens: np.ndarray, cfg: TrainConfig, dev: torch.device, dtype: torch.dtype
) -> float:
    """Mean loss over the first ``eval_batches`` windows of the validation tokens."""
    loader = data.TokenLoader(tokens, cfg.batch_size, cfg.seq_len)
    model.eval()
    total = torch.zeros((), device=dev)
    for _ in range(cfg.eval_batches):
        x, y = loader.next_batch()
        with devices.autocast(dev, dtype):
            _, loss = model(x.to(dev), y.to(dev), return_logits=False)
        total += loss
    model.train()
    return total.item() / cfg.eval_batches


def train(cfg: TrainConfig, info: DistInfo | None = None, progress: data.Progress | None = None) -> TrainResult:
    """Train until the loss reaches ``cfg.target_loss`` (or ``cfg.max_steps``); return where the model went.

    Raises DataError, CheckpointError, OutDirError, TrainingDiverged or Interrupted (after a snapshot) for the
    failures a user can cause; all are one-line messages.
    """
    info = info or DistInfo()
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    dev = distributed.init(info, devices.pick_device(cfg.device))
    dtype = devices.pick_dtype(cfg.dtype, dev)
    devices.configure_matmul(dev)
    if dev.type == "cpu":
        devices.keep_freed_memory()
    lock = checkpoint.OutDirLock(out_dir)
    if info.is_main:
        check_out_dir(out_dir)
        lock.acquire()
        checkpoint.remove_stale_temporaries(out_dir)
    try:
        return _train(cfg, info, progress, out_dir, dev, dtype)
    finally:
        lock.release()
        distributed.shutdown(info)


def _train(
    cfg: TrainConfig,
    info: DistInfo,
    progress: data.Progress | None,
    out_dir: Path,
    dev: torch.device,
    dtype: torch.dtype,
) -> TrainResult:
    # ---- set-up: checkpoint to resume, data, model, optimizer ----
    resume = None
    if cfg.resume is None and info.is_main:
        refuse_to_overwrite(out_dir)
    if cfg.resume is not None:
        resume_path = checkpoint.find_latest(out_dir) if cfg.resume == "auto" else Path(cfg.resume)
        resume = checkpoint.load_resumable(resume_path)
        log.info("resuming from %s (step %d)", resume_path, resume["step"])
    corpus_ = prepare_corpus(cfg, out_dir, info, progress)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = initial_model(cfg, resume).to(dev)
    optimizer = make_optimizer(model, cfg, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=(dtype == torch.float16))  # fp16 only: bf16 needs no scaling
    loader = data.TokenLoader(corpus_.train, cfg.batch_size, cfg.seq_len, info.rank, info.world_size)
    run = RunState(step=0, loss=float("nan"))
    torch.manual_seed(cfg.seed + info.rank)  # dropout differs between ranks
    if resume is not None:
        run = RunState(step=int(resume["step"]), loss=float(resume["loss"]))
        optimizer.load_state_dict(resume["optimizer_state_dict"])
        loader.load_state_dict(resume["loader"])
        per_rank = resume.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == info.world_size:
            set_rng_state(per_rank[info.rank], dev)  # each rank continues its own dropout stream
        elif info.is_main:
            set_rng_state(resume["rng"], dev)
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
    ddp = distributed.wrap(model, info, dev)
    runner = torch.compile(ddp) if cfg.compile else ddp
    if cfg.compile:
        log.info("compiling the model (the first step takes ~20-30 s longer)")
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.world_size
    writer = checkpoint.SnapshotWriter(out_dir, cfg.keep_snapshots)
    metrics = MetricsLog(out_dir / "metrics.jsonl" if info.is_main else None, after_step=run.step)
    started, first_step = time.perf_counter(), run.step

    def state(kind: str, rngs: list[Any]) -> dict[str, Any]:
        """Everything resume needs, plus what a reader of the file wants to know."""
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "kind": kind,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "config": model.config.to_dict(),
            "step": run.step,
            "loss": run.loss,
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "loader": loader.state_dict(),
            "train_args": cfg.to_dict(),
            "metadata": {
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "tokens_seen": run.step * tokens_per_step,
                "wall_seconds": round(time.perf_counter() - started, 3),
                "target_loss": cfg.target_loss,
                "input": corpus_.source,
                "input_sha256": corpus_.sha256,
                "device": str(dev),
                "dtype": str(dtype).removeprefix("torch."),
                "world_size": info.world_size,
                "gpt2scratch_version": __version__,
                "torch_version": str(torch.__version__),
            },
        }

    def save_snapshot(rngs: list[Any], background: bool = True) -> Path:
        """Snapshot of this step (rank 0 only); never of weights that hold NaN or inf."""
        if not all_finite(model):
            raise TrainingDiverged(
                f"the weights hold NaN/inf at step {run.step}; not saving them (last good: {run.last_snapshot})"
            )
        path = checkpoint.snapshot_path(out_dir, run.step)
        if path != run.last_snapshot:
            writer.submit(state("snapshot", rngs), path, background=background)
            run.last_snapshot = path
        elif not background:
            writer.wait()  # this step's snapshot may still be in flight: the caller needs it on disk, or its error
        return path

    stop = StopSignals()
    try:
        with stop.installed():
            while cfg.max_steps is None or run.step < cfg.max_steps:
                # ---- one optimizer step: learning rate, micro-batches, clip, update ----
                t0 = time.perf_counter()
                lr = lr_at(run.step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=dev)
                for micro in range(cfg.grad_accum):
                    x, y = loader.next_batch()
                    sync = distributed.gradient_sync(ddp, sync=micro == cfg.grad_accum - 1)
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    with sync, devices.autocast(dev, dtype):
                        _, loss = runner(x, y, return_logits=False)  # the loss alone: see loss.py
                    scaler.scale(loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                run.step += 1
                # ---- agree across ranks on the loss and on stopping (any rank's signal stops all) ----
                wants_stop = torch.tensor(float(stop.requested is not None), device=dev)
                agreed = distributed.mean(torch.stack([loss_sum / cfg.grad_accum, wants_stop]), info)
                run.loss, stop_requested = agreed[0].item(), agreed[1].item() > 0
                if not math.isfinite(run.loss):
                    raise TrainingDiverged(
                        f"the loss became {run.loss} at step {run.step}; last good snapshot: "
                        f"{run.last_snapshot or 'none'}; lower --lr or set --grad-clip 1.0"
                    )
                # ---- log, evaluate ----
                record = {
                    "step": run.step,
                    "loss": round(run.loss, 6),
                    "lr": lr,
                    "tokens_per_sec": round(tokens_per_step / (time.perf_counter() - t0), 1),
                    "elapsed": round(time.perf_counter() - started, 3),  # seconds since this process started training
                }
                if info.is_main and corpus_.val is not None and run.step % cfg.eval_interval == 0:
                    record["val_loss"] = round(evaluate(model, corpus_.val, cfg, dev, dtype), 6)
                metrics.write(record)
                if info.is_main and (run.step % cfg.log_interval == 0 or "val_loss" in record):
                    elapsed = time.perf_counter() - started
                    log.info(progress_line(record, elapsed, run.step - first_step, cfg))
                # ---- stop at the target, snapshot, or stop on a signal ----
                if run.loss <= cfg.target_loss:
                    break
                if cfg.snapshot_interval and run.step % cfg.snapshot_interval == 0:
                    rngs = distributed.gather_objects(rng_state(dev), info)  # every rank's, for an exact resume
                    if info.is_main:
                        save_snapshot(rngs)
                if stop_requested:
                    rngs = distributed.gather_objects(rng_state(dev), info)
                    if info.is_main:
                        save_snapshot(rngs, background=False)
                    distributed.barrier(info)
                    raise Interrupted(str(run.last_snapshot))
        # ---- the end: a final model at the target, else the last step as a snapshot ----
        reached = run.loss <= cfg.target_loss
        model_path = out_dir / checkpoint.FINAL_NAME
        rngs = distributed.gather_objects(rng_state(dev), info)
        if info.is_main:
            writer.wait()
            if reached:
                if not all_finite(model):
                    raise TrainingDiverged(f"the weights hold NaN/inf at step {run.step}; no final model written")
                writer.submit(state("final", rngs), model_path, background=False, checksums=True)
                log.info(
                    "reached loss %.6f <= %g at step %d; final model: %s",
                    run.loss,
                    cfg.target_loss,
                    run.step,
                    model_path,
                )
            else:
                model_path = save_snapshot(rngs, background=False)
                log.info(
                    "stopped at --max-steps %d with loss %.6f, above the target %g; last step saved as %s",
                    run.step,
                    run.loss,
                    cfg.target_loss,
                    model_path,
                )
        distributed.barrier(info)
        return TrainResult(run.step, run.loss, reached, model_path, dev, dtype)
    finally:
        metrics.close()
        with contextlib.suppress(Exception):
            writer.close()


@dataclass
class RunState:
    """Where the run is: the last completed step, its loss, and the newest snapshot written."""

    step: int
    loss: float
    last_snapshot: Path | None = None


class MetricsLog:
    """``metrics.jsonl``: one JSON object per step, appended (so a resumed run continues the file). Rank 0 only."""

    def __init__(self, path: Path | None, after_step: int = 0):
        self._file = None
        if path is None:
            return
        if path.exists():  # a resumed run replaces what the run it continues logged after its snapshot
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= after_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a")  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn or foreign line: drop it


def refuse_to_overwrite(out_dir: Path) -> None:
    """OutDirError if a fresh run would write over (and prune away) the results of an earlier run."""
    earlier = [p.name for p in (out_dir / checkpoint.FINAL_NAME,) if p.exists()]
    earlier += [p.name for _, p in checkpoint.list_snapshots(out_dir)]
    if earlier:
        raise OutDirError(
            f"{out_dir} already holds an earlier run ({', '.join(earlier[-2:])}); continue it with --resume auto, "
            "or start afresh with another --out-dir (or delete that one)"
        )


def progress_line(record: dict[str, Any], elapsed: float, steps_done: int, cfg: TrainConfig) -> str:
    """The live line: step, loss, lr, tokens/s, elapsed, and the ETA when --max-steps is set."""
    line = (
        f"step {record['step']:>6} | loss {record['loss']:.6f} | lr {record['lr']:.2e} | "
        f"{record['tokens_per_sec']:>8.1f} tok/s | {_clock(elapsed)} elapsed"
    )
    if cfg.max_steps is not None:
        line += f" | ETA {_clock(elapsed / max(1, steps_done) * (cfg.max_steps - record['step']))}"
    if "val_loss" in record:
        line += f" | val loss {record['val_loss']:.6f}"
    return line


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
