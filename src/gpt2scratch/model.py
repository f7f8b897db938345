"""GPT-2, as in "Language Models are Unsupervised Multitask Learners" (Radford et al., 2019).

A decoder-only Transformer: token + learned position embeddings, a stack of pre-LayerNorm blocks (causal multi-head
self-attention, then a GELU MLP, each added to the residual stream), a final LayerNorm, and an output head that shares
its weight with the token embedding. Parameter names follow OpenAI's checkpoint (wte, wpe, h, ln_1, attn.c_attn, ...)
so that weight conversion is a short list of transposes (see checkpoint/hf.py).

Shape letters: B batch, T time (sequence), C channels (n_embd), nh heads, hs head size (C // nh), V vocabulary,
P past tokens held in the KV cache, S = P + T keys an attention sees.
"""

from __future__ import annotations

import math
import os
from typing import Protocol, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2scratch.config import GPTConfig
from gpt2scratch.ops.head_loss import head_loss


class Cache(Protocol):
    """What the model asks of a KV cache (inference/engine.py's ``SlotBatch``: each row at its own position). One
    forward pass calls ``positions`` once, ``update`` once per layer, then ``advance``."""

    def positions(self, T: int) -> torch.Tensor:
        """Positions of the T new tokens: (T,) shared by all rows or (B, T) per row; ValueError past the cache."""
        ...

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this layer's new keys/values (B, nh, T, hs); return every key and value (B, nh, S, hs) and the keys
        each new token may see: a boolean mask (B, 1, T, S), or None when the T new tokens are the last T keys of
        every row (the plain causal case)."""
        ...

    def advance(self, T: int) -> None:
        """The new tokens went through every layer: count them as held."""
        ...


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask = None  # None: causal, the T queries being the last T of the keys
        if cache is not None:
            k, v, mask = cache.update(layer, k, v)  # (B, nh, S, hs); mask (B, 1, T, S) where rows differ in length
        dropout_p = self.dropout if self.training else 0.0
        S = k.size(2)
        if mask is None and S == T:  # the whole sequence is new: plain causal mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, T, hs)
        elif T == 1 and mask is None:  # one new token may look at everything before it
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, nh, 1, hs)
        else:  # new tokens see the past and the new tokens up to themselves
            if mask is None:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation of GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """GPT-2's body: embeddings, the stack of blocks and the final LayerNorm (checkpoint prefix ``transformer.``)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)

    def forward(self, idx: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """Hidden states (B, T, C) after ln_f for token ids ``idx`` (B, T): at positions 0 to T-1, or, with a
        ``cache``, right after the tokens it holds (each row's own); the cache then holds these too."""
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device) if cache is None else cache.positions(T)  # (T,) or (B, T)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)


Model = TypeVar("Model", bound="GPT")  # GPT or a subclass: from_pretrained builds the class it is called on


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf, 2017), as GPT-2 does
        self.head_rows = config.vocab_size  # rows of the output head's matmul: see pad_head
        self.apply(self._init_weights)
        # GPT-2 paper, section 2.3: scale the weights of residual projections by 1/sqrt(N), N = 2 per block
        # (attention and MLP each add to the residual stream once).
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # GPT-2's initialiser range
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_pretrained(cls: type[Model], source: str | os.PathLike[str]) -> Model:
        """A GPT with published or saved weights: ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (through
        huggingface_hub), a transformers model directory, or a checkpoint of ours: a final model or a snapshot, as
        a file or a sharded directory. Fp32, on the CPU. Raises CheckpointError (ConfigError for a config this
        model does not implement)."""
        from gpt2scratch.checkpoint.load import load_model  # weight formats live apart from the architecture

        return load_model(cls, source)

    def pad_head(self, rows: int) -> None:
        """Compute the output head over ``rows`` >= vocab_size rows: the tied weight with zero rows after GPT-2's
        50,257, a shape GPU matmuls prefer (50,304 = 786 x 64). The padded logits are cut off before any loss or
        output, so the loss, the logits, the gradients and the weights (and every file) are those of the unpadded
        model; the padding exists only inside the matmul."""
        assert rows >= self.config.vocab_size
        self.head_rows = rows

    def head_weight(self) -> torch.Tensor:
        """The output head's weight, (head_rows, C): the token embedding, padded with zero rows if asked."""
        weight = self.lm_head.weight
        extra = self.head_rows - weight.size(0)
        return F.pad(weight, (0, 0, 0, extra)) if extra > 0 else weight

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, the tied embedding/head counted once; without wpe if ``non_embedding``."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: Cache | None = None,
        last_only: bool = False,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, V) for token ids ``idx`` (B, T), and the mean cross-entropy against ``targets`` if given.

        Targets equal to -1 are ignored. With a ``cache``, ``idx`` continues the tokens already in it. With
        ``last_only``, logits are computed for the last position alone: (B, 1, V). Training passes
        ``return_logits=False``: the loss alone, computed with the head without keeping the logits (ops/head_loss.py).
        Raises ValueError if the sequence would be longer than ``config.block_size``.
        """
        length, block = idx.size(1), self.config.block_size
        if cache is None and length > block:
            raise ValueError(f"sequence of {length} tokens is longer than the model's block size ({block})")
        x = self.transformer(idx, cache)  # (B, T, C); a cache checks that its positions stay within the block
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        V = self.config.vocab_size
        if targets is not None and not return_logits:
            return None, head_loss(x, self.head_weight(), targets, vocab_size=V)
        logits = self.lm_head(x) if self.head_rows == V else F.linear(x, self.head_weight())[..., :V]  # (B, T, V)
        loss = None
        if targets is not None:
            # The loss in fp32 whatever the compute dtype: bf16 logits lose too much in the log-sum-exp.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        eos_token: int | None = None,
        use_cache: bool = True,
        static: bool | None = None,
    ) -> torch.Tensor:
        """The prompts ``idx`` (B, T) followed by up to ``max_new_tokens`` sampled tokens: (B, T + n). A shortcut to
        ``inference.engine.generate``, the decoding loop that every command shares (see there for the arguments)."""
        from gpt2scratch.inference.engine import (
            generate,  # inference/engine.py builds on this module, so it is imported when used
        )

        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, generator, eos_token, use_cache, static)
