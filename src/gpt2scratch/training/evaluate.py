"""What a run measures and shows as it goes, every so many steps: the validation loss, the multiple-choice accuracy
(HellaSwag) and samples of text, each for the step's record in ``metrics.jsonl``."""

from __future__ import annotations

import logging

import numpy as np
import torch

from gpt2scratch.config.commands import SamplingConfig
from gpt2scratch.data.corpus import make_loader
from gpt2scratch.data.shards import ShardSet
from gpt2scratch.device import autocast
from gpt2scratch.eval.scoring import Choice, multiple_choice
from gpt2scratch.inference.text import generate_text
from gpt2scratch.training.state import TrainState

log = logging.getLogger(__name__)


def sample_interval(state: TrainState, sharded: bool) -> int:
    """The steps between samples on this rank: --sample-interval on the first process, 0 (none) elsewhere and under
    FSDP, where the weights are spread over the ranks (said once; the samples after training are drawn)."""
    if sharded and state.cfg.sample_interval and state.world.is_main:
        log.warning("--sample-interval: no samples during training under --parallel fsdp, only after it")
    return state.cfg.sample_interval if state.world.is_main and not sharded else 0


def samples_now(state: TrainState) -> list[str]:
    """The end-of-run samples (5 of 30 tokens, top-k 50, seed 42) of the model as it is now, in fp32 and with
    their own random generator, so that drawing them changes nothing in the run; printed as they are drawn."""
    model = state.model
    model.eval()
    try:
        # The slot engine, not a CUDA graph: capturing one empties the allocator's caches, every few steps.
        texts = generate_text(model, state.cfg.sample_prompt, SamplingConfig(), static=False)
    finally:
        model.train()
    log.info("samples at step %d:\n%s", state.step, "\n".join(f"> {text}" for text in texts))
    return texts


def evaluate_now(state: TrainState, questions: list[Choice] | None) -> dict[str, float]:
    """The validation loss and the multiple-choice accuracy, whichever this run measures, for the metrics record."""
    results = {}
    if state.corpus.val is not None:
        results["val_loss"] = round(validation_loss(state.model, state.corpus.val, state), 6)
    if questions is not None:
        scored = multiple_choice(state.model, questions, state.cfg.batch_size, state.dtype)
        results.update(hellaswag_acc=round(scored.acc, 6), hellaswag_acc_norm=round(scored.acc_norm, 6))
    state.model.train()
    return results


@torch.no_grad()
def validation_loss(model: torch.nn.Module, tokens: np.ndarray | ShardSet, state: TrainState) -> float:
    """Mean loss over the first ``eval_batches`` windows of the validation tokens (or shards)."""
    cfg = state.cfg
    loader = make_loader(tokens, cfg.batch_size, cfg.seq_len)
    model.eval()
    total = torch.zeros((), device=state.device)
    for _ in range(cfg.eval_batches):
        x, y = loader.next_batch()
        with autocast(state.device, state.dtype):
            _, loss = model(x.to(state.device), y.to(state.device), return_logits=False)
        total += loss
    return total.item() / cfg.eval_batches
