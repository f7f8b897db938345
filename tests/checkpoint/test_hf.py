"""Weights to and from transformers: same logits and loss as GPT2LMHeadModel, exact round trips, clear refusals."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY,
    assert_one_line_error,
    digest,
    file_size_limit,
    random_ids,
    run_cli,
    skip_without,
    temporaries,
)

from gpt2scratch.checkpoint.format import FORMAT_VERSION
from gpt2scratch.checkpoint.hf import export
from gpt2scratch.config import GPTConfig
from gpt2scratch.errors import CheckpointError, ConfigError, GPT2ScratchError, OutDirError, Stopped
from gpt2scratch.model import GPT
from gpt2scratch.signals import stopping_at_once
from gpt2scratch.tokenizer import encode

needs_transformers = skip_without("transformers")

# (n_layer, n_head, n_embd, n_positions, vocab_size)
SHAPES = [(2, 2, 64, 128, 50257), (3, 4, 96, 64, 50257), (1, 3, 48, 32, 50257), (2, 2, 32, 48, 1000)]

ENGLISH = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\tYou are all resolved rather to die than to famish?  It's 1,000 times so.\n"
)
EMOJI = "emoji 🤗🙂👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ and CJK 日本語 한국어"


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_model(shape: tuple[int, ...], seed: int = 0):
    """A randomly initialised GPT2LMHeadModel whose every parameter (biases and LayerNorms too) is non-trivial."""
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_head, n_embd, n_positions, vocab_size = shape
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=vocab_size,
        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def assert_same_outputs(hf, ours: GPT, idx: torch.Tensor) -> None:
    """Logits within 1e-4 and the next-token loss within 1e-5 of transformers'."""
    with torch.no_grad():
        expected = hf(idx, labels=idx)
        targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1)  # shifted; -1 is ignored
        logits, loss = ours(idx, targets)
    assert logits.shape == expected.logits.shape
    assert (logits - expected.logits).abs().max().item() <= 1e-4
    assert loss is not None and abs(loss.item() - expected.loss.item()) <= 1e-5


def random_model(config: GPTConfig) -> GPT:
    """A GPT of ours whose every parameter is non-trivial: non-zero biases, non-unit LayerNorms."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def write_checkpoint(model: GPT, path: Path) -> None:
    """A checkpoint of ours, as train writes it (the parts that loading a model reads)."""
    torch.save(
        {"format_version": FORMAT_VERSION, "config": model.config.to_dict(), "model_state_dict": model.state_dict()},
        path,
    )


# --- from transformers -------------------------------------------------------------------------------------------


@needs_transformers
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}H{}C{}T{}V{}".format(*s))
def test_logits_and_loss_match_transformers(shape: tuple[int, ...], tmp_path: Path) -> None:
    hf = hf_model(shape)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    n_layer, n_head, n_embd, n_positions, vocab_size = shape
    assert ours.config == GPTConfig(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=n_positions, vocab_size=vocab_size
    )
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert_same_outputs(hf, ours, random_ids(vocab_size, 2, n_positions))  # the whole block
    assert_same_outputs(hf, ours, random_ids(vocab_size, 3, 5, seed=2))


def save_as_pytorch_model_bin(hf, directory: Path) -> None:
    """The older format: transformers' save_pretrained(safe_serialization=False) where it still exists."""
    try:
        hf.save_pretrained(directory, safe_serialization=False)
    except TypeError:
        directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "pytorch_model.bin").is_file():  # transformers >= 5 writes safetensors regardless
        (directory / "model.safetensors").unlink(missing_ok=True)
        hf.config.save_pretrained(directory)
        torch.save(hf.state_dict(), directory / "pytorch_model.bin")


@needs_transformers
def test_pytorch_model_bin_directory_loads(tmp_path: Path) -> None:
    hf = hf_model(SHAPES[1])
    save_as_pytorch_model_bin(hf, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_outputs(hf, GPT.from_pretrained(str(tmp_path)).eval(), random_ids(50257, 2, 64))


@needs_transformers
def test_old_buffers_and_bare_gpt2model_keys_load(tmp_path: Path) -> None:
    """Older transformers saved attn.bias/attn.masked_bias buffers; GPT2Model saves keys without 'transformer.'."""
    hf = hf_model(SHAPES[2])
    hf.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32, dtype=torch.bool))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_outputs(hf, GPT.from_pretrained(str(tmp_path)).eval(), random_ids(50257, 2, 32))


# --- to transformers and back ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, Path]:
    """A checkpoint of ours with random weights, and its export through the real `gpt2-scratch export`."""
    tmp = tmp_path_factory.mktemp("export")
    model = random_model(TINY)
    write_checkpoint(model, tmp / "model.pt")
    result = run_cli("export", str(tmp / "model.pt"), str(tmp / "hf"))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "GPT2LMHeadModel.from_pretrained" in result.stdout
    return model, tmp / "hf"


def test_export_writes_a_transformers_directory(exported: tuple[GPT, Path]) -> None:
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"]) == (2, 2, 32, 64)
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu_new"
    assert config["bos_token_id"] == config["eos_token_id"] == 50256  # <|endoftext|>, in GPT-2's vocabulary
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == generation["eos_token_id"] == 50256


def test_export_round_trip_without_transformers_is_exact(exported: tuple[GPT, Path]) -> None:
    model, out = exported
    back = GPT.from_pretrained(str(out)).eval()
    assert back.config == model.config
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    idx = random_ids(TINY.vocab_size, 2, TINY.block_size)
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])


@needs_transformers
def test_export_loads_in_transformers_and_comes_back_bit_identical(exported: tuple[GPT, Path], tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    model, out = exported
    hf, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # The same numbers, in transformers' Conv1D layout: (in, out) where nn.Linear has (out, in).
    ours = model.state_dict()
    for key, tensor in hf.state_dict().items():
        expected = ours[key]
        if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            expected = expected.t()
        assert torch.equal(tensor, expected), key
    assert_same_outputs(hf, model, random_ids(TINY.vocab_size, 2, TINY.block_size))
    # ... and back from transformers' own save: the very same weights and logits as the model we started from.
    hf.save_pretrained(tmp_path)
    back = GPT.from_pretrained(str(tmp_path)).eval()
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    idx = random_ids(TINY.vocab_size, 2, 20)
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])


@needs_transformers
@pytest.mark.parametrize("text", [ENGLISH, EMOJI, ENGLISH + "<|endoftext|>" + EMOJI])
def test_exported_tokenizer_gives_our_ids(exported: tuple[GPT, Path], text: str) -> None:
    from transformers import AutoTokenizer

    _, out = exported
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer(text)["input_ids"] == encode(text)
    assert hf_tokenizer.eos_token_id == 50256
    assert hf_tokenizer.decode(encode(text)) == text


def test_export_refuses_a_directory(tmp_path: Path) -> None:
    result = run_cli("export", str(tmp_path), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "is a directory" in result.stderr


def test_exported_files_have_the_mode_of_ordinary_files(exported: tuple[GPT, Path], tmp_path: Path) -> None:
    """safetensors' save_file made model.safetensors 0600 while the other files got 0666 minus the umask."""
    _, out = exported
    (tmp_path / "ordinary").write_bytes(b"")
    ordinary = stat.S_IMODE((tmp_path / "ordinary").stat().st_mode)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, ordinary)


# --- issue 16: vocabularies other than GPT-2's, existing targets, full disks ------------------------------------

OTHER_VOCABULARY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=1000)
SMALL = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=100)


def test_export_of_another_vocabulary_claims_no_tokenizer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """GPT-2's tokenizer files beside "vocab_size": 1000 would tokenize into ids the model does not have."""
    with caplog.at_level(logging.WARNING, logger="gpt2scratch.checkpoint.hf"):
        export(random_model(OTHER_VOCABULARY), tmp_path / "hf")
    out = tmp_path / "hf"
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "generation_config.json"}
    assert "1,000 tokens" in caplog.text and "no tokenizer files" in caplog.text
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 1000
    assert config["bos_token_id"] is None and config["eos_token_id"] is None  # not 50256, which does not exist
    generation = json.loads((out / "generation_config.json").read_text())
    assert "bos_token_id" not in generation and "eos_token_id" not in generation


@needs_transformers
def test_export_of_another_vocabulary_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    model = random_model(OTHER_VOCABULARY)
    export(model, tmp_path / "hf")
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.eos_token_id is None and hf.generation_config.eos_token_id is None
    assert_same_outputs(hf.eval(), model, random_ids(1000, 2, 48))


def test_export_refuses_a_non_empty_directory_unless_forced(tmp_path: Path) -> None:
    model = random_model(SMALL)
    export(model, tmp_path / "empty")  # an empty directory is no one's: fine without --force
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"another": "model"}')
    (out / "README.md").write_text("another model\n")
    with pytest.raises(OutDirError, match=r"hf is not empty; .*--force"):
        export(model, out)
    assert (out / "config.json").read_text() == '{"another": "model"}'
    export(model, out, force=True)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "generation_config.json"}
    for directory in (out, tmp_path / "empty"):
        assert torch.equal(GPT.from_pretrained(str(directory)).transformer.wte.weight, model.transformer.wte.weight)
    assert not temporaries(tmp_path)


def test_force_replaces_only_a_model_directory(tmp_path: Path) -> None:
    """--force on a training run's directory (no config.json) would delete its checkpoints: refused."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "final_model.pt").write_bytes(b"weights")
    with pytest.raises(OutDirError, match=r"run is not a model directory \(it has no config\.json\)"):
        export(random_model(SMALL), run, force=True)
    assert [p.name for p in run.iterdir()] == ["final_model.pt"]
    with pytest.raises(OutDirError, match=r"final_model\.pt is a file"):
        export(random_model(SMALL), run / "final_model.pt", force=True)


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): digest(p) for p in folder.rglob("*") if p.is_file()}


def test_force_does_not_delete_a_working_directory_holding_a_config_json(tmp_path: Path) -> None:
    """The sweep: `export CK . --force` in a training run's directory that held a config.json replaced the whole
    directory (final_model.pt, input.txt, snapshots/ deleted)."""
    (tmp_path / "snapshots").mkdir()
    for name in ("config.json", "final_model.pt", "input.txt", "snapshots/snapshot_step_10.pt"):
        (tmp_path / name).write_text(name)
    write_checkpoint(random_model(SMALL), tmp_path / "final_model.pt")
    before = _files(tmp_path)
    result = run_cli("export", "final_model.pt", ".", "--force", cwd=tmp_path)
    assert_one_line_error(result.returncode, result.stderr, 1, "holds files an export does not write")
    assert "final_model.pt, input.txt, snapshots" in result.stderr
    assert _files(tmp_path) == before


def test_force_does_not_delete_the_checkpoint_being_exported(tmp_path: Path) -> None:
    """The sweep: `export hf/final_model.pt hf --force` deleted the checkpoint it exported. Also under a name that a
    model directory may hold (pytorch_model.bin), which the list of a model's files alone would let through."""
    hf = tmp_path / "hf"
    export(random_model(SMALL), hf)
    for name in ("final_model.pt", "pytorch_model.bin"):
        write_checkpoint(random_model(SMALL), hf / name)
        before = _files(hf)
        result = run_cli("export", f"hf/{name}", "hf", "--force", cwd=tmp_path)
        assert result.returncode == 1 and _files(hf) == before, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        (hf / name).unlink()
    assert "holds the checkpoint being exported (hf/pytorch_model.bin)" in result.stderr
    assert "holds files an export does not write (final_model.pt)" not in result.stderr


def test_force_replaces_a_model_directory_but_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf = tmp_path / "hf"
    export(random_model(SMALL), hf)
    (hf / "special_tokens_map.json").write_text("{}")  # what save_pretrained adds: still a model directory
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"shard")
    model = random_model(OTHER_VOCABULARY)
    monkeypatch.chdir(hf)
    with pytest.raises(OutDirError, match=r"\. is the working directory, which --force would delete"):
        export(model, Path("."), force=True)
    assert (hf / "special_tokens_map.json").exists()
    monkeypatch.chdir(tmp_path)
    export(model, Path("hf"), force=True)
    assert {p.name for p in hf.iterdir()} == {"config.json", "model.safetensors", "generation_config.json"}
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 1000
    assert not temporaries(tmp_path)


def test_an_export_stopped_while_it_writes_leaves_nothing(tmp_path: Path) -> None:
    """A SIGTERM while the weights are written (a real signal, sent once the temporary directory holds them):
    neither the target nor a temporary directory is left. The handler is the command line's (signals.py)."""
    model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=256, block_size=64))  # 52 MB of weights: ~0.1 s or more
    out = tmp_path / "hf"
    weights = tmp_path / f".hf.tmp-{os.getpid()}" / "model.safetensors"

    def stop_once_writing() -> None:
        while not weights.exists():
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    thread = threading.Thread(target=stop_once_writing, daemon=True)
    try:
        with pytest.raises(Stopped, match="stopped by SIGTERM"), stopping_at_once():
            thread.start()
            export(model, out)
            time.sleep(1)  # finished before the signal came: it is handled here, and the checks below fail
    finally:
        for sig, handler in previous.items():  # a stop leaves them ignored
            signal.signal(sig, handler)
    assert not out.exists(), "the export was not stopped while it wrote"
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_export_on_a_full_disk_changes_nothing(tmp_path: Path) -> None:
    """A write that fails (here past a file size limit) is one OutDirError; no half-written directory is left under
    the final name or a temporary one, and a directory that --force would replace is still the old one."""
    out = tmp_path / "hf"
    export(random_model(SMALL), out)
    before = {p.name: digest(p) for p in out.iterdir()}
    big = GPT(TINY)  # 6.5 MB of weights
    with file_size_limit(1 << 20):
        with pytest.raises(OutDirError, match=r"could not write .*hf: the file is larger than allowed") as failure:
            export(big, out, force=True)
        with pytest.raises(OutDirError, match=r"could not write .*new: the file is larger than allowed"):
            export(big, tmp_path / "new")
    assert "\n" not in str(failure.value)
    assert {p.name: digest(p) for p in out.iterdir()} == before
    assert not (tmp_path / "new").exists()
    assert not temporaries(tmp_path)


# --- refusals ----------------------------------------------------------------------------------------------------


def tiny_hf_config(**changes) -> dict:
    config = {
        "model_type": "gpt2", "vocab_size": 100, "n_positions": 16, "n_embd": 8, "n_layer": 1, "n_head": 2,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "n_inner": None,
    }  # fmt: skip
    return {**config, **changes}


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("activation_function", "relu"),
        ("scale_attn_by_inverse_layer_idx", True),
        ("reorder_and_upcast_attn", True),
        ("layer_norm_epsilon", 1e-6),
        ("scale_attn_weights", False),
        ("add_cross_attention", True),
        ("n_inner", 64),
        ("model_type", "gpt_neo"),
        ("tie_word_embeddings", False),  # our head always shares the token embedding
    ],
)
def test_unsupported_transformers_options_are_refused(option: str, value: object, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config(**{option: value})))
    with pytest.raises(ConfigError, match=option):
        GPT.from_pretrained(str(tmp_path))


@needs_transformers
def test_unsupported_option_in_a_real_save_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=16, vocab_size=100, activation_function="relu")
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="activation_function='relu'"):
        GPT.from_pretrained(str(tmp_path))


@needs_transformers
def test_untied_head_is_not_loaded_into_a_tied_model(tmp_path: Path) -> None:
    """A separate lm_head cannot live in our tied model: refuse it rather than overwrite the embedding with it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=100, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.add_(torch.randn_like(hf.lm_head.weight) * 0.1)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    hf.save_pretrained(tmp_path)
    with pytest.raises(GPT2ScratchError, match=r"tie_word_embeddings|lm_head"):
        GPT.from_pretrained(str(tmp_path))


def test_supported_spellings_are_accepted(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from gpt2scratch.checkpoint.hf import state_dict_to_hf

    # gelu_pytorch_tanh is the same function as gelu_new; n_inner = 4 * n_embd is the default written out.
    config = tiny_hf_config(activation_function="gelu_pytorch_tanh", n_inner=32)
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=100))
    save_file(state_dict_to_hf(model.state_dict()), tmp_path / "model.safetensors")
    loaded = GPT.from_pretrained(str(tmp_path))
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_directory_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        GPT.from_pretrained(str(tmp_path))


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config()))
    with pytest.raises(CheckpointError, match=r"neither model.safetensors nor pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path))


def test_invalid_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", r"config\.json holds an array, not a JSON object of settings"),
        ('"gpt2"', r"config\.json holds a string, not a JSON object"),
        (json.dumps(tiny_hf_config(n_embd=None)), r"config\.json: model config: n_embd must be a positive integer"),
        (json.dumps(tiny_hf_config(n_layer="2")), r"config\.json: model config: n_layer must be a positive integer"),
    ],
    ids=["array", "string", "n_embd-null", "n_layer-text"],
)
def test_a_config_json_that_is_not_settings_is_one_error(content: str, message: str, tmp_path: Path) -> None:
    """The sweep: a config.json holding a list was an internal AttributeError, a null n_embd a TypeError."""
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(GPT2ScratchError, match=message) as failure:
        GPT.from_pretrained(str(tmp_path))
    assert isinstance(failure.value, (CheckpointError, ConfigError)) and "\n" not in str(failure.value)


def test_truncated_safetensors(tmp_path: Path) -> None:
    export(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=100)), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        GPT.from_pretrained(str(tmp_path))


def test_weights_of_another_shape(tmp_path: Path) -> None:
    export(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=100)), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config(n_layer=2)))
    with pytest.raises(CheckpointError, match=r"missing \['transformer.h.1"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config(n_positions=32)))
    with pytest.raises(CheckpointError, match=r"wpe.weight has shape \(16, 8\), the config needs \(32, 8\)"):
        GPT.from_pretrained(str(tmp_path))


def test_weights_without_the_token_embedding(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config()))
    save_file({"transformer.wpe.weight": torch.zeros(16, 8)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not match a GPT-2 of this config: missing \['"):
        GPT.from_pretrained(str(tmp_path))


def test_missing_source_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither a file, a directory nor a published model"):
        GPT.from_pretrained(str(tmp_path / "nothing-here"))


def test_published_name_offline_without_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub reads its settings at import, so the attempt runs in a fresh process with this environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    script = tmp_path / "load_gpt2.py"
    script.write_text(
        "from gpt2scratch import GPT\n"
        "from gpt2scratch.errors import CheckpointError\n"
        "try:\n"
        "    GPT.from_pretrained('gpt2')\n"
        "except CheckpointError as err:\n"
        "    print(f'CheckpointError: {err}')\n"
    )
    result = run_cli(script=str(script), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("CheckpointError: ")
    assert len(result.stdout.strip().splitlines()) == 1
    assert "'gpt2'" in result.stdout
    assert not (tmp_path / "hf-home" / "hub" / "models--openai-community--gpt2" / "snapshots").exists()
