"""Prepacked Linear layers for CPU inference (ops/prepack.py) against the plain model."""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2scratch import GPT, GPTConfig
from gpt2scratch.inference.load import for_inference
from gpt2scratch.ops.prepack import PackedLinear, pack_linears

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=300)

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"), reason="this torch has no oneDNN weight prepacking"
)


def models(dtype: torch.dtype) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    plain = GPT(CONFIG).to(dtype).eval()
    packed = GPT(CONFIG).to(dtype).eval()
    packed.load_state_dict(plain.state_dict())
    return plain, packed


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
def test_packed_model_gives_the_same_logits(dtype: torch.dtype, tol: float) -> None:
    plain, packed = models(dtype)
    if pack_linears(packed) == 0:
        pytest.skip("oneDNN prepacking is not usable on this CPU")
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 4 * CONFIG.n_layer + 1
    assert packed.lm_head.weight is packed.transformer.wte.weight  # still tied
    idx = torch.randint(0, CONFIG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = plain(idx)
        got, _ = packed(idx)
        assert got.dtype == dtype
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
        greedy_plain = plain.generate(idx[:, :5], 10, temperature=0)
        greedy_packed = packed.generate(idx[:, :5], 10, temperature=0)
    if dtype == torch.float32:
        assert torch.equal(greedy_plain, greedy_packed)


def test_training_models_are_not_packed() -> None:
    model = GPT(CONFIG).train()
    assert pack_linears(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_for_inference_packs_on_the_cpu_and_generates_the_same_tokens() -> None:
    torch.manual_seed(0)
    plain = GPT(CONFIG).eval()
    model = for_inference(copy.deepcopy(plain), torch.device("cpu"), torch.float32)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not packed:
        pytest.skip("oneDNN prepacking is not usable on this CPU")
    assert not any(type(m) is torch.nn.Linear for m in model.modules()), "some Linear layers were not packed"
    idx = torch.zeros(2, 3, dtype=torch.long)
    want = plain.generate(idx, 6, temperature=0)  # greedy: the same logits give the same tokens
    assert torch.equal(model.generate(idx, 6, temperature=0), want)


def test_packed_layers_follow_weight_changes_and_give_gradients() -> None:
    _, packed = models(torch.float32)
    if pack_linears(packed) == 0:
        pytest.skip("oneDNN prepacking is not usable on this CPU")
    idx = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    other = GPT(CONFIG).eval()
    packed.load_state_dict(other.state_dict())  # in place: the packed copies are stale now
    with torch.no_grad():
        want, _ = other(idx)
        got, _ = packed(idx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    _, loss = packed(idx, idx)  # grad mode: plain F.linear, so backward reaches every weight
    loss.backward()
    assert all(p.grad is not None for p in packed.parameters())
    packed.to(torch.bfloat16)  # cast after packing: still runs
    with torch.no_grad():
        logits, _ = packed(idx)
    assert logits.dtype == torch.bfloat16


def test_bf16_fuses_the_gelu_into_c_fc_and_keeps_it_when_the_packed_op_cannot_serve() -> None:
    plain, packed = models(torch.bfloat16)
    if pack_linears(packed) == 0:
        pytest.skip("oneDNN prepacking is not usable on this CPU")
    mlps = [block.mlp for block in packed.transformer.h]
    assert all(mlp.c_fc.gelu and isinstance(mlp.gelu, torch.nn.Identity) for mlp in mlps)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused, _ = packed(idx)
        want, _ = plain.float()(idx)  # the same bf16-rounded weights, computed in fp32
        scale = want.abs().max()
        assert (fused.float() - want).abs().max() <= 2e-2 * scale  # bf16 activations
        got, _ = packed.float()(idx)  # cast after packing: the plain path, which must still apply the GELU
    torch.testing.assert_close(got, want, atol=1e-5 * float(scale), rtol=1e-5)


def test_fp32_keeps_the_gelu_apart() -> None:
    _, packed = models(torch.float32)
    if pack_linears(packed) == 0:
        pytest.skip("oneDNN prepacking is not usable on this CPU")
    assert not any(block.mlp.c_fc.gelu for block in packed.transformer.h)
    assert all(isinstance(block.mlp.gelu, torch.nn.GELU) for block in packed.transformer.h)
