"""gpt2-scratch: GPT-2 from scratch in PyTorch — train it on your text, resume it, sample from it, trust it."""

from __future__ import annotations

import typing

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "__version__"]

if typing.TYPE_CHECKING:
    from gpt2scratch.config import GPTConfig
    from gpt2scratch.model import GPT


def __getattr__(name: str) -> typing.Any:
    """``GPT`` and ``GPTConfig`` on first use: importing the package (as the command line does first) must not
    import torch, so that the command can take over the stop signals before the second it takes to load."""
    if name == "GPT":
        from gpt2scratch.model import GPT

        return GPT
    if name == "GPTConfig":
        from gpt2scratch.config import GPTConfig

        return GPTConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
