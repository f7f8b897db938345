"""``gpt2-scratch eval``: a model's perplexity on a text and its accuracy on multiple-choice questions, as a table
and, with ``--output``, as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpt2scratch.config import EvalConfig
from gpt2scratch.config.commands import Console
from gpt2scratch.data.corpus import resolve_inputs
from gpt2scratch.errors import UsageError
from gpt2scratch.eval import scoring
from gpt2scratch.inference.load import load_for_inference
from gpt2scratch.model import GPT

Row = tuple[str, str, str]  # (task, metric, value)


def run(cfg: EvalConfig, console: Console) -> None:
    model = load_for_inference(cfg.model.name, cfg.device, cfg.dtype)
    results: dict[str, dict[str, Any]] = {}
    rows: list[Row] = []
    if cfg.perplexity is not None:
        results["perplexity"], found = perplexity(model, cfg, console)
        rows += found
    if cfg.hellaswag is not None:
        results["multiple_choice"], found = multiple_choice(model, cfg, console)
        rows += found
    weight = model.transformer.wte.weight
    console.say(f"{cfg.model.name} ({str(weight.dtype).removeprefix('torch.')}, {weight.device})")
    width = max(len(a) for a, _, _ in rows)
    for task, metric, value in rows:
        console.say(f"  {task:<{width}}  {metric:<18} {value:>10}")
    if cfg.output is not None:
        try:
            Path(cfg.output).write_text(json.dumps({"model": cfg.model.name, **results}, indent=2) + "\n")
        except OSError as err:
            raise UsageError(f"cannot write --output {cfg.output}: {err.strerror or err}") from None


def perplexity(model: GPT, cfg: EvalConfig, console: Console) -> tuple[dict[str, Any], list[Row]]:
    assert cfg.perplexity is not None
    texts = list(scoring.read_texts(resolve_inputs(cfg.perplexity)))
    dtype = model.transformer.wte.weight.dtype
    with console.progress("perplexity", "window", least=50) as bar:
        result = scoring.perplexity(
            model, [t for t, _ in texts], sum(n for _, n in texts), cfg.context, cfg.stride, cfg.batch_size, dtype, bar
        )
    rows = [
        ("perplexity", "loss (nats/token)", f"{result.loss:.4f}"),
        ("", "perplexity", f"{result.perplexity:.3f}"),
        ("", "bits per byte", f"{result.bits_per_byte:.4f}"),
        ("", "tokens predicted", f"{result.predicted_tokens:,}"),
    ]
    return {"source": cfg.perplexity, **scoring.describe(result)}, rows


def multiple_choice(model: GPT, cfg: EvalConfig, console: Console) -> tuple[dict[str, Any], list[Row]]:
    assert cfg.hellaswag is not None
    choices = scoring.read_choices(cfg.hellaswag, cfg.limit)
    with console.progress("questions", "ending", least=200) as bar:
        scored = scoring.multiple_choice(model, choices, cfg.batch_size, model.transformer.wte.weight.dtype, bar)
    rows = [
        ("multiple choice", "acc", f"{scored.acc:.4f}"),
        ("", "acc_norm", f"{scored.acc_norm:.4f}"),
        ("", "questions", f"{scored.n:,}"),
    ]
    return {"source": cfg.hellaswag, **scoring.describe(scored)}, rows
