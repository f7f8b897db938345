"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from gpt2scratch.config import TrainConfig


def make_optimizer(model: torch.nn.Module, lr: float = 3e-4, weight_decay: float = 0.01) -> torch.optim.AdamW:
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
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then constant or cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant" or cfg.max_steps is None:
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
