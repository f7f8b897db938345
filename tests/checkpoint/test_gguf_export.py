"""checkpoint/gguf_export.py and ``export --format gguf``: the file llama.cpp's own converter writes from our
transformers export, key for key and tensor for tensor (names, types, shapes, bytes), in f32, f16, bf16 and q8_0;
where llama-cpp-python imports, llama.cpp decodes the tokens we decode; mistakes are one line.

The converter ships in llama-cpp-python's source archive, not in any wheel: .ci/run fetches it and points
GPT2SCRATCH_LLAMA_CONVERTER at ``vendor/llama.cpp/convert_hf_to_gguf.py``; without it those tests skip."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_one_line_error, run_main, skip_without

from gpt2scratch.checkpoint.format import FORMAT_VERSION
from gpt2scratch.checkpoint.hf import export
from gpt2scratch.config import GPTConfig
from gpt2scratch.model import GPT

pytestmark = skip_without("gguf")
CONVERTER = os.environ.get("GPT2SCRATCH_LLAMA_CONVERTER", "")
needs_converter = pytest.mark.skipif(
    not Path(CONVERTER).is_file(),
    reason="needs llama.cpp's convert_hf_to_gguf.py: set GPT2SCRATCH_LLAMA_CONVERTER (.ci/run fetches it from "
    "llama-cpp-python's source archive)",
)
SHAPE = GPTConfig(n_layer=11, n_head=2, n_embd=64, block_size=128)  # 11 blocks: h.10 sorts before h.2


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random model as a checkpoint of ours and as its transformers export (a directory named gpt2-tiny)."""
    folder = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    model = GPT(SHAPE)
    checkpoint = folder / "model.pt"
    torch.save({"format_version": FORMAT_VERSION, "model_state_dict": model.state_dict(),
                "config": model.config.to_dict()}, checkpoint)  # fmt: skip
    export(model, folder / "gpt2-tiny")
    return {"checkpoint": checkpoint, "hf": folder / "gpt2-tiny", "folder": folder}


def read(path: Path) -> tuple[dict[str, Any], list[tuple[str, str, list[int], bytes]]]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {name: (field.types, field.contents()) for name, field in reader.fields.items()}
    tensors = [(t.name, t.tensor_type.name, t.shape.tolist(), t.data.tobytes()) for t in reader.tensors]
    return fields, tensors


@needs_converter
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_our_gguf_is_what_llama_cpp_s_converter_writes(model_files: dict[str, Path], outtype: str) -> None:
    theirs = model_files["folder"] / f"converted-{outtype}.gguf"
    converted = subprocess.run([sys.executable, CONVERTER, str(model_files["hf"]), "--outfile", str(theirs),
                                "--outtype", outtype], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-3000:]
    ours = model_files["folder"] / "out" / "gpt2-tiny.gguf"  # named as the converter names it: after the stem
    code, out, err = run_main("export", str(model_files["checkpoint"]), str(ours), "--format", "gguf",
                              "--outtype", outtype, "--force")  # fmt: skip
    assert code == 0, err
    assert f"wrote {ours} ({outtype};" in out
    (our_fields, our_tensors), (their_fields, their_tensors) = read(ours), read(theirs)
    assert list(our_fields) == list(their_fields)  # the same keys, in the same order
    assert our_fields == their_fields
    assert [t[:3] for t in our_tensors] == [t[:3] for t in their_tensors]  # names, types, shapes, order
    assert our_tensors == their_tensors  # and every byte
    types = {name: kind for name, kind, _, _ in our_tensors}
    assert types["position_embd.weight"] == types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == outtype.upper()


def test_gguf_metadata_says_what_the_model_is(model_files: dict[str, Path]) -> None:
    ours = model_files["folder"] / "meta" / "gpt2-tiny.gguf"
    code, _, err = run_main("export", str(model_files["checkpoint"]), str(ours), "--format", "gguf")
    assert code == 0, err
    fields, tensors = read(ours)
    value = {name: contents for name, (_, contents) in fields.items()}
    assert value["general.architecture"] == "gpt2" and value["general.file_type"] == 0  # f32 by default
    assert (value["gpt2.block_count"], value["gpt2.context_length"], value["gpt2.embedding_length"]) == (11, 128, 64)
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    assert len(value["tokenizer.ggml.tokens"]) == 50257 and value["tokenizer.ggml.tokens"][-1] == "<|endoftext|>"
    assert value["tokenizer.ggml.eos_token_id"] == value["tokenizer.ggml.bos_token_id"] == 50256
    assert len(tensors) == 11 * 12 + 4 and "output.weight" not in {t[0] for t in tensors}  # the head is tied


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python (pip install -e .[bench])"
)
def test_llama_cpp_decodes_the_greedy_tokens_we_decode(model_files: dict[str, Path]) -> None:
    import llama_cpp

    path = model_files["folder"] / "run" / "gpt2-tiny.gguf"
    assert run_main("export", str(model_files["checkpoint"]), str(path), "--format", "gguf")[0] == 0
    prompt = [464, 3290, 318]
    model = GPT.from_pretrained(model_files["checkpoint"]).eval()
    ours = model.generate(torch.tensor([prompt]), 20, temperature=0)[0, 3:].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False, logits_all=False)
    theirs = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        theirs.append(token)
        if len(theirs) == 20:
            break
    assert theirs == ours


@pytest.mark.parametrize(
    ("flags", "code", "fragment"),
    [
        (["--format", "onnx"], 2, "invalid choice: 'onnx'"),
        (["--outtype", "q8_0"], 2, "--outtype applies to --format gguf"),
        (["--format", "gguf", "--outtype", "q4_0"], 2, "invalid choice: 'q4_0'"),
    ],
)
def test_bad_export_flags_are_one_line(model_files: dict[str, Path], tmp_path: Path, flags: list[str], code: int,
                                       fragment: str) -> None:  # fmt: skip
    result, _, err = run_main("export", str(model_files["checkpoint"]), str(tmp_path / "out.gguf"), *flags)
    assert result == code and fragment in err and len(err.strip().splitlines()) == 1, err


def test_an_unwritable_or_existing_gguf_output_is_one_line(model_files: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = str(model_files["checkpoint"])
    (tmp_path / "taken.gguf").write_bytes(b"keep me")
    code, _, err = run_main("export", checkpoint, str(tmp_path / "taken.gguf"), "--format", "gguf")
    assert_one_line_error(code, err, 2, "taken.gguf exists; give another path, or --force")
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep me"
    (tmp_path / "folder").mkdir()
    code, _, err = run_main("export", checkpoint, str(tmp_path / "folder"), "--format", "gguf", "--force")
    assert_one_line_error(code, err, 2, "is a directory; give a file name such as model.gguf")
    code, _, err = run_main("export", checkpoint, checkpoint, "--format", "gguf", "--force")
    assert_one_line_error(code, err, 2, "is the checkpoint being exported")
    (tmp_path / "locked").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        code, _, err = run_main("export", checkpoint, str(tmp_path / "locked" / "m.gguf"), "--format", "gguf")
        assert_one_line_error(code, err, 1, "could not write")
    code, _, err = run_main("export", checkpoint, "/proc/m.gguf", "--format", "gguf")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
