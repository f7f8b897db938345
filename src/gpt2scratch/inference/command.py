"""``gpt2-scratch generate``: samples from a model, printed whole or streamed as they come."""

from __future__ import annotations

import dataclasses

from gpt2scratch.config import GenerateConfig
from gpt2scratch.config.commands import SEEDS, Console
from gpt2scratch.inference.load import load_for_inference
from gpt2scratch.inference.text import generate_text, stream_text


def run(cfg: GenerateConfig, console: Console) -> None:
    model = load_for_inference(cfg.model.name, cfg.device, cfg.dtype, cfg.quantize)
    sampling = cfg.sampling
    if not cfg.stream:
        for i, text in enumerate(generate_text(model, cfg.prompt, sampling), 1):
            console.say(f"--- sample {i} ---\n{text}")
        return
    for i in range(sampling.num_samples):
        console.say(f"--- sample {i + 1} ---")
        one = dataclasses.replace(sampling, num_samples=1, seed=(sampling.seed + i) % SEEDS)
        for piece in stream_text(model, cfg.prompt, one):
            console.say(piece, end="")
        console.say()
