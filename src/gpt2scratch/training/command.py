"""``gpt2-scratch train`` (and ``python train.py``): the run, then samples from the final model loaded back; or, with
--print-plan, the plan alone."""

from __future__ import annotations

from gpt2scratch.config import SamplingConfig, TrainConfig
from gpt2scratch.config.commands import Console
from gpt2scratch.device import pick_device, pick_dtype
from gpt2scratch.distributed.world import from_env
from gpt2scratch.errors import DeviceError
from gpt2scratch.inference.load import for_inference
from gpt2scratch.inference.text import generate_text
from gpt2scratch.model import GPT
from gpt2scratch.training import fast, flops, plan
from gpt2scratch.training.loop import train


def run(cfg: TrainConfig, console: Console) -> None:
    """Train (as one of torchrun's processes when started by it), then, on the first process, print the original
    script's samples from the model just written."""
    world = from_env()
    if cfg.print_plan:
        if world.is_main:
            console.say(plan.describe(cfg, world.size, planned_peak(cfg)))
        return
    with console.progress("tokenizing") as bar:
        result = train(cfg, world, progress=bar if world.is_main else None, at_exit=bar.close)
    if cfg.no_sample or not world.is_main:
        return
    model = for_inference(GPT.from_pretrained(result.model_path), result.device, result.dtype)  # as a user would
    sampling = SamplingConfig()
    console.say(f"\nsamples from {result.model_path} (top-k {sampling.top_k}, seed {sampling.seed}):")
    for i, text in enumerate(generate_text(model, cfg.sample_prompt, sampling), 1):
        console.say(f"--- sample {i} ---\n{text}")


def planned_peak(cfg: TrainConfig) -> float | None:
    """The peak FLOP/s the plan assumes: --peak-flops, or that of the device the run would pick, where known."""
    if cfg.peak_flops is not None:
        return cfg.peak_flops
    try:
        device = pick_device(cfg.device)
        fast.configure_cuda(device)  # TF32 for fp32 matmuls, as training sets it: the peak is TF32's
        return flops.peak_flops(device, pick_dtype(cfg.dtype, device))
    except DeviceError:
        if cfg.device.split(":")[0] in ("cuda", "mps"):  # a plan made on another machine: its peak is unknown here
            return None
        raise
