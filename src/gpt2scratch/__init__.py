"""gpt2-scratch: GPT-2 from scratch in PyTorch — train it on your text, resume it, sample from it, trust it."""

__version__ = "0.1.0"

from .config import GPTConfig
from .model import GPT

__all__ = ["GPT", "GPTConfig", "__version__"]
