"""``gpt2-scratch train`` (and ``python train.py``): the run, then samples from the final model loaded back."""

from __future__ import annotations

from gpt2scratch.config import SamplingConfig, TrainConfig
from gpt2scratch.config.commands import Console
from gpt2scratch.distributed.world import from_env
from gpt2scratch.inference.load import for_inference
from gpt2scratch.inference.text import generate_text
from gpt2scratch.model import GPT
from gpt2scratch.training.loop import train


def run(cfg: TrainConfig, console: Console) -> None:
    """Train (as one of torchrun's processes when started by it), then, on the first process, print the original
    script's samples from the model just written."""
    world = from_env()
    with console.progress("tokenizing") as bar:
        result = train(cfg, world, progress=bar if world.is_main else None, at_exit=bar.close)
    if cfg.no_sample or not world.is_main:
        return
    model = for_inference(GPT.from_pretrained(result.model_path), result.device, result.dtype)  # as a user would
    sampling = SamplingConfig()
    console.say(f"\nsamples from {result.model_path} (top-k {sampling.top_k}, seed {sampling.seed}):")
    for i, text in enumerate(generate_text(model, cfg.sample_prompt, sampling), 1):
        console.say(f"--- sample {i} ---\n{text}")
