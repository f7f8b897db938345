"""The model: shapes, loss, causality, the block-size limit, and that importing it stays light (decoding with the KV
cache: inference/test_engine.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY, make_model, random_ids

from gpt2scratch.config import GPTConfig
from gpt2scratch.model import GPT

# A small shape with a small vocabulary (logits far apart, tests in milliseconds), as in inference/test_engine.py.
CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=97)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model(CONFIG, 0.2)


# --- forward -----------------------------------------------------------------------------------------------------


def test_forward_shapes(model: GPT) -> None:
    idx = random_ids(model.config.vocab_size, 3, 10)
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 97) and logits.dtype == torch.float32
    assert loss is None
    last, _ = model(idx, last_only=True)
    assert last.shape == (3, 1, 97)
    torch.testing.assert_close(last, logits[:, -1:])


def test_tiny_config_forward() -> None:
    torch.manual_seed(0)
    tiny = GPT(TINY).eval()
    logits, loss = tiny(random_ids(TINY.vocab_size, 2, 64), random_ids(TINY.vocab_size, 2, 64, seed=2))
    assert logits.shape == (2, 64, 50257)
    assert loss is not None and abs(loss.item() - torch.log(torch.tensor(50257.0)).item()) < 0.5  # ~uniform at init


def test_loss_is_cross_entropy(model: GPT) -> None:
    idx, targets = random_ids(model.config.vocab_size, 2, 12), random_ids(model.config.vocab_size, 2, 12, seed=2)
    logits, loss = model(idx, targets)
    assert loss is not None and loss.shape == ()
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_targets_of_minus_one_are_ignored(model: GPT) -> None:
    idx, targets = random_ids(model.config.vocab_size, 2, 12), random_ids(model.config.vocab_size, 2, 12, seed=2)
    targets[:, 8:] = -1
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, :8].reshape(-1, logits.size(-1)), targets[:, :8].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_causal(model: GPT) -> None:
    idx = random_ids(model.config.vocab_size, 1, 16)
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % model.config.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # a position never sees the tokens after it
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_weights_are_tied(model: GPT) -> None:
    assert model.lm_head.weight is model.transformer.wte.weight


def test_sequence_longer_than_block_size_is_a_value_error(model: GPT) -> None:
    model(random_ids(model.config.vocab_size, 1, 32))  # exactly the block size is fine
    with pytest.raises(ValueError, match=r"sequence of 33 tokens is longer than the model's block size \(32\)"):
        model(random_ids(model.config.vocab_size, 1, 33))


# --- imports -----------------------------------------------------------------------------------------------------


def test_importing_the_model_does_not_import_transformers() -> None:
    code = textwrap.dedent(
        """
        import sys
        import gpt2scratch
        import gpt2scratch.model
        import gpt2scratch.checkpoint.hf
        import gpt2scratch.inference.text
        import gpt2scratch.tokenizer
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "huggingface_hub"))
        print("HEAVY:", heavy)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "HEAVY: []" in result.stdout
