"""The optimizer and the learning-rate schedules.

Each schedule is a pure function of the step: a linear warm-up over ``warmup`` steps to ``lr`` (the rate of step
``s < warmup`` is ``lr * (s + 1) / warmup``), then

- ``constant``: ``lr``;
- ``cosine``: from ``lr`` down to ``min_lr`` along half a cosine, reaching it at ``max_steps``;
- ``linear``: from ``lr`` down to ``min_lr`` in a straight line, reaching it at ``max_steps``;
- ``wsd`` (warm-up, stable, decay): ``lr`` held, then a straight line to ``min_lr`` over the last ``decay_fraction``
  of ``max_steps`` (a run that stops early or is extended changes only where the decay starts).

Without ``max_steps`` a run's length is unknown and every schedule stays at ``lr`` after the warm-up.
"""

from __future__ import annotations

import math

import torch

from gpt2scratch.config import TrainConfig


def make_optimizer(
    model: torch.nn.Module,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases or LayerNorm gains), fused where supported.

    Two parameter groups, matrices then the rest: the layout of ``optimizer_state_dict`` in our checkpoints. The
    fused kernel does the whole update in one pass over memory; the model's device decides whether it is used.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = params[0].device.type in ("cuda", "cpu", "mps")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def optimizer_for(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """The optimizer of a run: ``make_optimizer`` with the run's settings."""
    return make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps)


def scheduled_lr(
    step: int,
    schedule: str,
    lr: float,
    min_lr: float = 0.0,
    warmup: int = 0,
    max_steps: int | None = None,
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under ``schedule`` (see the module's docstring)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or max_steps is None:
        return lr
    if schedule == "wsd":
        start = max(warmup, max_steps - round(decay_fraction * max_steps))  # the decay never eats the warm-up
        if step < start:
            return lr
        progress = min(1.0, (step - start) / max(1, max_steps - start))
        return lr + (min_lr - lr) * progress
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    assert schedule == "cosine", schedule
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` of the run ``cfg`` describes."""
    return scheduled_lr(step, cfg.lr_schedule, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.decay_fraction)
