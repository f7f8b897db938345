"""The training loop: from a TrainConfig to snapshots, metrics and a final model.

``train`` sets the run up (device, out dir, data, model, optimizer, the state to resume) and ``train_loop`` reads
like a table of contents: per step the update, the agreement across ranks, logging and evaluation, then the target,
snapshots and stop signals, each a call to a small helper beside it. What a checkpoint holds is ``TrainState``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2scratch.checkpoint import sharded
from gpt2scratch.checkpoint.format import checkpoint_config
from gpt2scratch.checkpoint.load import read_state
from gpt2scratch.config import GPTConfig, TrainConfig
from gpt2scratch.config.commands import SamplingConfig
from gpt2scratch.data.corpus import Progress, load_corpus, make_loader
from gpt2scratch.device import (
    attention_kernels,
    autocast,
    check_model_fits,
    configure_matmul,
    keep_freed_memory,
    pick_device,
    pick_dtype,
)
from gpt2scratch.distributed import parallelize as parallel
from gpt2scratch.distributed import world as distributed
from gpt2scratch.distributed.world import World
from gpt2scratch.errors import CheckpointError, Interrupted, TrainingDiverged, UsageError
from gpt2scratch.eval.scoring import read_choices
from gpt2scratch.files import OutDirLock, check_free_space
from gpt2scratch.inference.text import prompt_ids
from gpt2scratch.model import GPT
from gpt2scratch.signals import StopSignals
from gpt2scratch.tokenizer import check_vocabulary
from gpt2scratch.training import fast, flops, plot, rundir
from gpt2scratch.training.checkpoints import Checkpoints
from gpt2scratch.training.evaluate import evaluate_now, sample_interval, samples_now
from gpt2scratch.training.metrics import MetricsLog, progress_line
from gpt2scratch.training.optim import lr_at, optimizer_for
from gpt2scratch.training.state import TrainState, allowed_changes, check_identity

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int
    loss: float
    reached_target: bool
    model_path: Path  # final_model.pt if the target was reached, else the last snapshot
    device: torch.device
    dtype: torch.dtype


def train(
    cfg: TrainConfig,
    world: World | None = None,
    progress: Progress | None = None,
    at_exit: Callable[[], None] | None = None,
) -> TrainResult:
    """Train until the loss reaches ``cfg.target_loss`` (or ``cfg.max_steps``); return where the model went.

    ``progress(done, total)`` is called while the input is tokenized; ``at_exit()`` before a second stop signal ends
    the process at once (the CLI ends its progress bar's line there). Raises DataError, CheckpointError,
    OutDirError, TrainingDiverged, Stopped or Interrupted (after a snapshot) for the failures a user can cause; all
    are one-line messages.
    """
    world = world or World()
    cfg = cfg.for_world(world.size)  # --batch-tokens: the accumulation of this number of processes
    out_dir = Path(cfg.out_dir)
    device = distributed.init(world, pick_device(cfg.device))
    dtype = pick_dtype(cfg.dtype, device)
    configure_matmul(device)
    fast.configure_cuda(device)
    if device.type == "cpu":
        keep_freed_memory()
    lock = OutDirLock(out_dir)
    if world.is_main:
        rundir.check_writable(out_dir)
        lock.acquire()
        rundir.remove_temporaries(out_dir)
    stop = StopSignals(at_exit=functools.partial(_exit_at_once, out_dir, at_exit))
    try:
        with stop.installed():
            state = set_up(cfg, world, device, dtype, progress)  # a signal here stops at once (signals.py)
            stop.training = True
            return train_loop(state, stop)
    finally:
        lock.release()
        distributed.shutdown(world)


def _exit_at_once(out_dir: Path, at_exit: Callable[[], None] | None) -> None:
    """What a second stop signal does before the process ends at once: the caller's ``at_exit``, then the removal of
    the temporary files this process was writing (a snapshot, the token cache)."""
    if at_exit is not None:
        at_exit()
    rundir.remove_temporaries(out_dir, os.getpid())


def set_up(
    cfg: TrainConfig, world: World, device: torch.device, dtype: torch.dtype, progress: Progress | None
) -> TrainState:
    """The state of step 0, or of the checkpoint to resume (read once), after every check that can be made before
    the first step: the out dir, the run's identity, the sample prompt, the disk space."""
    out_dir = Path(cfg.out_dir)
    allowed = allowed_changes(cfg)
    fsdp = cfg.parallel == "fsdp" and world.enabled
    resume_path, resume = find_resume(cfg, world, weights=not fsdp)  # FSDP reads a sharded snapshot's shards later
    if resume is not None:
        check_identity(cfg, resume, resume_path, world, None, allowed)  # the flags now, the input once hashed
    shape = cfg.model_config() if resume is None else checkpoint_config(resume, f"the checkpoint {resume_path}")
    purpose = "to train (weights, gradients and AdamW state in fp32"
    purpose += f", split over {world.size} ranks)" if fsdp else ")"
    check_model_fits(shape, device, 16, purpose, "choose a smaller shape", shards=world.size if fsdp else 1)
    corpus = load_corpus(cfg, out_dir / rundir.CACHE_DIR, world, progress)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = initial_model(cfg, resume).to(device)
    if world.is_main:
        check_before_training(cfg, model)
    speed = fast.choose(cfg, device, sharded=fsdp)
    if speed.pad.on:
        model.pad_head(fast.padded(model.config.vocab_size))
    if world.is_main:
        log.info("%s", speed)
    model = parallel.parallelize(model, cfg, world, device, dtype, speed.compile.on)  # FSDP shards: before AdamW
    state = TrainState(
        cfg=cfg,
        model=model,
        optimizer=optimizer_for(model, cfg),
        scaler=torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16)),  # bf16 needs no scaling
        loader=make_loader(
            corpus.train, cfg.batch_size, cfg.seq_len, world.rank, world.size, cfg.seed if cfg.shuffle_shards else None
        ),
        corpus=corpus,
        world=world,
        device=device,
        dtype=dtype,
        speed=speed,
    )
    torch.manual_seed(cfg.seed + world.rank)  # dropout differs between ranks
    if resume is not None:
        changes = check_identity(cfg, resume, resume_path, world, corpus.sha256, allowed)
        if "input" in changes:
            resume = {**resume, "loader": state.loader.state_dict()}  # another input: start at its beginning
        if "model_state_dict" not in resume:  # a sharded snapshot under FSDP: each rank reads the parts it holds
            assert resume_path is not None
            resume = {**resume, **sharded.load_into(resume_path, state.model, state.optimizer)}
        state.load_state_dict(resume, f"the checkpoint {resume_path}")
        if changes:
            state.changes.append({"step": state.step, "changed": changes})
            log.info("resuming with changed %s (allowed)", ", ".join(changes))
        log.info("resuming from %s (step %d)", resume_path, state.step)
    return state


def find_resume(cfg: TrainConfig, world: World, weights: bool = True) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to continue and its path (None, None for a fresh run), after the out-dir checks: a fresh run
    never writes over an earlier run, and a resumed one never over another run or over its own later files.
    ``weights`` False: a sharded snapshot is read without its model and optimizer states."""
    out_dir = Path(cfg.out_dir)
    if cfg.resume is None:
        if world.is_main:
            rundir.refuse_to_overwrite(out_dir, plot=not cfg.no_plot)
        return None, None
    if cfg.resume == "auto":
        path, checkpoint = rundir.latest_snapshot(out_dir, weights)
    else:
        path = Path(cfg.resume)
        checkpoint = read_state(path, weights)
    step = checkpoint.get("step")
    if type(step) is int and world.is_main:
        rundir.refuse_to_resume_over(out_dir, path, step)
    if type(step) is int and cfg.max_steps is not None and cfg.max_steps <= step:
        raise UsageError(f"--max-steps {cfg.max_steps} is not beyond the checkpoint's step {step}; raise it to go on")
    return path, checkpoint


def check_before_training(cfg: TrainConfig, model: GPT) -> None:
    """What would otherwise fail only after some training: the sample prompt, and the disk space of one checkpoint."""
    if not cfg.no_sample or cfg.sample_interval:
        prompt_ids(model, cfg.sample_prompt, SamplingConfig())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    check_free_space(Path(cfg.out_dir), 3 * weights)  # weights and AdamW's two moments, in fp32


def initial_model(cfg: TrainConfig, resume: dict[str, Any] | None) -> GPT:
    """The model to train, freshly initialised: of the resumed checkpoint's shape (its weights are loaded with the
    rest of the state), with --init-from's weights, or of the configured shape."""
    if resume is not None:
        wanted = cfg.model_config()
        saved = checkpoint_config(resume, "the checkpoint to resume")
        if cfg.init_from is None and {**saved.to_dict(), "dropout": 0} != {**wanted.to_dict(), "dropout": 0}:
            raise CheckpointError(
                f"the checkpoint holds a model of shape {_shape(saved)}, this run asks for {_shape(wanted)}; "
                "give the same --preset/--n-layer/--n-head/--n-embd/--block-size as the run that wrote it"
            )
        return GPT(dataclasses.replace(saved, dropout=cfg.dropout))
    if cfg.init_from is not None:
        pretrained = GPT.from_pretrained(cfg.init_from)
        check_vocabulary(pretrained.config.vocab_size, f"--init-from {cfg.init_from}")  # the data is GPT-2's ids
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


def train_loop(state: TrainState, stop: StopSignals) -> TrainResult:
    """Step until the target loss, --max-steps or a stop signal; snapshot on the way; write the final model."""
    cfg, world = state.cfg, state.world
    out_dir = Path(cfg.out_dir)
    sharded_model = parallel.is_sharded(state.model)
    wrapped = parallel.wrap(state.model, world, state.device)  # DDP with several processes, else the model
    forward = fast.CompiledOrEager(wrapped) if state.speed.compile.on and not sharded_model else wrapped
    checkpoints = Checkpoints.of_run(state, sharded_model)
    evaluates = world.is_main or sharded_model  # under FSDP a forward pass needs every rank
    metrics = MetricsLog.of_run(cfg, state.step, world.is_main)
    first_step = state.step
    questions = read_choices(cfg.hellaswag, cfg.hellaswag_limit) if cfg.hellaswag and evaluates else None
    note = {"changed_on_resume": state.changes[-1]["changed"]} if state.changes else {}  # on the first record
    utilization = flops.Utilization(state)
    samples = sample_interval(state, sharded_model)
    try:
        while cfg.max_steps is None or state.step < cfg.max_steps:
            started = time.perf_counter()
            lr = lr_at(state.step, cfg)
            loss, grad_norm = train_step(state, wrapped, forward, lr)
            state.loss, stopping, writing = agree(loss, stop.requested, checkpoints, state)
            record = {
                "step": state.step,
                "loss": round(state.loss, 6),
                "lr": lr,
                "grad_norm": round(float(grad_norm), 6),
                "tokens": state.step * state.tokens_per_step,
                "tokens_per_sec": round(state.tokens_per_step / (time.perf_counter() - started), 1),
                "elapsed": round(time.perf_counter() - state.started, 3),  # seconds since training started
                **utilization.of(state.tokens_per_step / (time.perf_counter() - started)),
                **note,
            }
            note = {}
            if evaluates and state.step % cfg.eval_interval == 0:
                record.update(evaluate_now(state, questions))
            if samples and state.step % samples == 0:
                record["samples"] = samples_now(state)
            metrics.write(record)
            evaluated = "val_loss" in record or "hellaswag_acc" in record
            if world.is_main and (state.step % cfg.log_interval == 0 or evaluated):
                log.info(
                    progress_line(record, time.perf_counter() - state.started, state.step - first_step, cfg.max_steps)
                )
            if state.loss <= cfg.target_loss:
                break
            checkpoints.due(state, writing)
            if stopping:
                checkpoints.save(state, background=False)
                distributed.barrier(world)
                raise Interrupted(str(checkpoints.last))
        return finish(state, checkpoints)
    finally:
        metrics.close()
        if world.is_main and (achieved := checkpoints.summary()):
            log.info(achieved)
        if world.is_main and not cfg.no_plot:
            plot.write_run_plot(out_dir)  # also after a stop by a signal or a NaN; a failure is only a warning
        checkpoints.close()


def train_step(
    state: TrainState, wrapped: torch.nn.Module, forward: Callable[..., Any], lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step at learning rate ``lr``: micro-batches, clipping, update. Returns this rank's mean loss
    and the gradient norm (before clipping)."""
    cfg, optimizer, scaler = state.cfg, state.optimizer, state.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=state.device)
    for micro in range(cfg.grad_accum):
        x, y = state.loader.next_batch()
        sync = parallel.gradient_sync(wrapped, sync=micro == cfg.grad_accum - 1)
        x, y = x.to(state.device, non_blocking=True), y.to(state.device, non_blocking=True)
        with sync, autocast(state.device, state.dtype), attention_kernels(state.device):
            _, loss = forward(x, y, return_logits=False)  # the loss alone: see ops/head_loss.py
        scaler.scale(loss / cfg.grad_accum).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)  # the true gradients, to clip and to log (a no-op without fp16's scaler)
    norm = parallel.clip_grad_norm(state.model, cfg.grad_clip)  # the norm before clipping, over every shard
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return loss_sum / cfg.grad_accum, norm


def agree(
    loss: torch.Tensor, stop_requested: object, checkpoints: Checkpoints, state: TrainState
) -> tuple[float, bool, bool]:
    """What every rank must agree on after a step, in one all-reduce: the loss averaged over ranks, whether any rank
    was asked to stop (one stops all), and whether rank 0 is still writing a snapshot. TrainingDiverged if the loss
    is not finite."""
    flags = torch.tensor([float(stop_requested is not None), float(checkpoints.writing)], device=state.device)
    agreed = distributed.mean(torch.cat([loss.reshape(1), flags]), state.world).tolist()
    mean_loss, stopping, writing = agreed[0], agreed[1] > 0, agreed[2] > 0
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(
            f"the loss became {mean_loss} at step {state.step}; last good snapshot: "
            f"{checkpoints.last or 'none'}; lower --lr or set --grad-clip 1.0"
        )
    return mean_loss, stopping, writing


def finish(state: TrainState, checkpoints: Checkpoints) -> TrainResult:
    """The end: a final model at the target, else the last step as a snapshot."""
    cfg = state.cfg
    reached = state.loss <= cfg.target_loss
    if reached:
        path = checkpoints.save_final(state)
        if state.world.is_main:
            log.info(
                "reached loss %.6f <= %g at step %d; final model: %s", state.loss, cfg.target_loss, state.step, path
            )
    else:
        path = checkpoints.save(state, background=False)
        if state.world.is_main:
            log.info(
                "stopped at --max-steps %d with loss %.6f, above the target %g; last step saved as %s",
                state.step,
                state.loss,
                cfg.target_loss,
                path,
            )
    distributed.barrier(state.world)
    return TrainResult(state.step, state.loss, reached, path, state.device, state.dtype)
