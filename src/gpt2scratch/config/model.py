"""The shape of a GPT-2 model (``GPTConfig``) and its named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gpt2scratch.errors import ConfigError


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 model. Defaults are the 124M model of the GPT-2 paper."""

    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    def num_params(self) -> int:
        """The parameters of a model of this shape (the tied head counted once), known before one is built."""
        C, biases = self.n_embd, 1 + self.bias  # a LayerNorm has a gain, and a bias where Linears have them
        block = 12 * C * C + (9 * C if self.bias else 0) + 2 * biases * C  # attention, MLP, two LayerNorms
        return (self.vocab_size + self.block_size) * C + self.n_layer * block + biases * C

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {', '.join(unknown)}")
        return cls(**values)


PRESETS: dict[str, GPTConfig] = {
    # The four published GPT-2 sizes.
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # Small shapes that train in minutes on a laptop CPU.
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "mini": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128),
}


def preset(name: str) -> GPTConfig:
    """The named preset, or a ConfigError listing the known names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
