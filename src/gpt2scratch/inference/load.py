"""A model made ready for inference, the one way every command does it: the device and dtype picked, matmul
settings made, the vocabulary checked, the weights cast once and, on a CPU, prepacked or quantized."""

from __future__ import annotations

import torch

from gpt2scratch.config import QUANTIZE
from gpt2scratch.device import configure_matmul, on_huge_pages, pick_device, pick_dtype
from gpt2scratch.errors import UsageError
from gpt2scratch.model import GPT
from gpt2scratch.ops.prepack import pack_linears
from gpt2scratch.ops.quantize import quantize_int8
from gpt2scratch.tokenizer import check_vocabulary


def load_for_inference(source: str, device: str = "auto", dtype: str = "auto", quantize: str = "none") -> GPT:
    """``GPT.from_pretrained(source)`` ready for inference on ``device`` in ``dtype`` (names as ``--device`` and
    ``--dtype`` take them), with ``quantize`` none or int8. The device and dtype are checked before the weights are
    read; CheckpointError if its vocabulary is not our tokenizer's. Raises UsageError, DeviceError, CheckpointError."""
    if quantize not in QUANTIZE:
        raise UsageError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    where = pick_device(device)
    precision = pick_dtype(dtype, where)
    model = GPT.from_pretrained(source)
    check_vocabulary(model.config.vocab_size, source)
    return for_inference(model, where, precision, quantize)


def for_inference(model: GPT, device: torch.device, dtype: torch.dtype, quantize: str = "none") -> GPT:
    """The model moved (in place) to ``device`` with its weights in ``dtype``, in eval mode, for generation only.

    Casting the weights once, instead of autocast casting them at every token, halves the memory each decoding step
    reads in bf16; LayerNorm and softmax still accumulate in fp32 inside their kernels, and sampling is done in fp32.
    On a CPU the Linear layers are then prepacked for oneDNN (ops/prepack.py), or with ``quantize="int8"`` stored in
    int8 (ops/quantize.py; UsageError off the CPU): either way they no longer have a backward.
    """
    configure_matmul(device)
    with on_huge_pages(device):  # the weights' new copies: on 2 MB pages, where Linux gives them
        model = model.to(device=device, dtype=dtype).eval()
        if quantize == "int8":
            quantize_int8(model, dtype)
        elif device.type == "cpu":
            pack_linears(model)
    return model
