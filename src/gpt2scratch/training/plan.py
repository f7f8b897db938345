"""``train --print-plan``: the settings a run resolved to (as a TOML file that repeats them) and what the run will
cost, worked out from the settings alone: nothing is read or written."""

from __future__ import annotations

from gpt2scratch.config import TrainConfig
from gpt2scratch.config.runfile import NOT_IN_FILES, to_toml
from gpt2scratch.training import flops
from gpt2scratch.training.metrics import clock

PLANNED_MFU = 0.4  # the utilization the time estimate assumes


def settings_toml(cfg: TrainConfig) -> str:
    """The run's settings as a ``--config`` file: every field but the ones a file cannot set."""
    values = {name: value for name, value in cfg.to_dict().items() if name not in NOT_IN_FILES}
    source = f"recipe {cfg.recipe}" if cfg.recipe else "the defaults"
    source += f", {cfg.config}" if cfg.config else ""
    header = f"gpt2-scratch train settings: {source} and the flags given\nrepeat with: gpt2-scratch train --config FILE"
    return to_toml(values, header)


def plan(cfg: TrainConfig, world_size: int, peak: float | None) -> str:
    """The plan of ``cfg`` on ``world_size`` processes, each of dense peak ``peak`` FLOP/s (None: unknown)."""
    resolved = cfg.for_world(world_size)
    shape = cfg.model_config()
    counted = flops.counted_parameters(shape)
    params = counted + shape.block_size * shape.n_embd  # with the position embeddings
    per_token = flops.flops_per_token(shape, cfg.seq_len)
    per_step = cfg.batch_size * cfg.seq_len * resolved.grad_accum * world_size
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    rows = [
        ("model", f"{cfg.preset}: {shape.n_layer} layers, {shape.n_head} heads, {shape.n_embd} wide, "
                  f"block {shape.block_size}, vocabulary {shape.vocab_size}: {params:,} parameters"),
        ("tokens per step", f"{per_step:,} = -B {cfg.batch_size} x -T {cfg.seq_len} x {processes} x "
                            f"{resolved.grad_accum} micro-batch{'es' if resolved.grad_accum > 1 else ''}"),
    ]  # fmt: skip
    if cfg.batch_tokens is not None:
        rows.append(("accumulation", _accumulation(cfg)))
    clip = f"clip {cfg.grad_clip:g}" if cfg.grad_clip else "no clipping"
    rows.append(("optimizer", f"AdamW betas {cfg.adam_beta1:g}/{cfg.adam_beta2:g}, eps {cfg.adam_eps:g}, "
                              f"weight decay {cfg.weight_decay:g} (matrices), {clip}"))  # fmt: skip
    rows.append(("FLOPs per token", f"{per_token:.3e} (6N + 12LCT with N = {counted:,}, T = {cfg.seq_len})"))
    if cfg.max_steps is None:
        rows.append(("steps", f"until a step's loss is <= {cfg.target_loss:g} (no --max-steps)"))
    else:
        total = cfg.max_steps * per_step
        rows += [
            ("steps", f"{cfg.max_steps:,}, schedule {_schedule(cfg)}"),
            ("tokens in all", f"{total:,} ({total / 1e9:.2f}B)"),
            ("FLOPs in all", f"{total * per_token:.3e}"),
        ]
        if peak is not None:
            seconds = total * per_token / (PLANNED_MFU * peak * world_size)
            rows.append((f"time at {PLANNED_MFU:.0%} MFU", f"{clock(seconds)} on {processes} of {peak:.3g} FLOP/s"))
    if peak is None:
        rows.append(("time", "unknown: no peak FLOP/s for this device; give --peak-flops (e.g. 989e12)"))
    width = max(len(name) for name, _ in rows)
    return "plan:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in rows)


def _accumulation(cfg: TrainConfig) -> str:
    """The micro-batches per process that --batch-tokens gives on 1, 2, 4 and 8 processes, where it divides."""
    counts = []
    for processes in (1, 2, 4, 8):
        unit = cfg.batch_size * cfg.seq_len * processes
        if cfg.batch_tokens is not None and cfg.batch_tokens % unit == 0:
            counts.append(f"{cfg.batch_tokens // unit} on {processes}")
    return "micro-batches per process: " + (", ".join(counts) or "-") + " process(es)"


def _schedule(cfg: TrainConfig) -> str:
    warmup = f"{cfg.warmup_steps} warm-up steps, then " if cfg.warmup_steps else ""
    if cfg.lr_schedule == "constant":
        return f"{warmup}constant at {cfg.lr:g}"
    tail = f" over the last {cfg.decay_fraction:g} of the steps" if cfg.lr_schedule == "wsd" else ""
    return f"{warmup}{cfg.lr_schedule} from {cfg.lr:g} to {cfg.min_lr:g}{tail}"


def describe(cfg: TrainConfig, world_size: int, peak: float | None) -> str:
    """What --print-plan prints: the settings, then the plan."""
    return settings_toml(cfg) + "\n" + plan(cfg, world_size, peak)
