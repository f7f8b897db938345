"""The optimizer and the learning-rate schedule: which parameters are decayed, that a step matches a hand-built
AdamW, that its state survives a save and load (the resume recipe), and the warm-up, constant and cosine schedules."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from gpt2scratch import GPT, GPTConfig
from gpt2scratch.config import TrainConfig
from gpt2scratch.training.optim import lr_at, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=97)


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(SMALL)


def split_params(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The matrices and the 1-D parameters (biases, LayerNorm gains), in the model's order."""
    params = [p for _, p in model.named_parameters()]
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


def test_matrices_are_decayed_and_the_rest_is_not() -> None:
    model = small_model()
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    matrices = {name for name, p in model.named_parameters() if p.dim() >= 2}
    vectors = {name for name, p in model.named_parameters() if p.dim() < 2}
    assert "transformer.wte.weight" in matrices and "transformer.ln_f.weight" in vectors

    decayed, plain = optimizer.param_groups
    assert {names[id(p)] for p in decayed["params"]} == matrices
    assert {names[id(p)] for p in plain["params"]} == vectors
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert decayed["lr"] == plain["lr"] == 1e-3

    in_groups = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(in_groups) == len(set(in_groups))  # the tied wte/lm_head weight only once
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}
    assert optimizer.defaults["fused"] is True


def test_one_step_matches_a_hand_built_adamw() -> None:
    model = small_model()
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    matrices, vectors = split_params(reference)
    expected = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}], lr=1e-2, fused=False
    )
    make_optimizer(model, lr=1e-2, weight_decay=0.1).step()
    expected.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}")


def test_with_zero_gradients_only_matrices_shrink() -> None:
    model = small_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    lr, wd = 0.1, 0.5
    make_optimizer(model, lr=lr, weight_decay=wd).step()
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * wd))
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_state_dict_loads_into_a_fresh_optimizer() -> None:
    """The resume recipe: a new model of the same shape, make_optimizer, load_state_dict."""
    first = small_model(seed=0)
    optimizer = make_optimizer(first)
    torch.manual_seed(2)
    for p in first.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()

    second = small_model(seed=3)
    resumed = make_optimizer(second)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for p, q in zip(first.parameters(), second.parameters(), strict=True):
        saved, loaded = optimizer.state[p], resumed.state[q]
        assert saved["exp_avg"].abs().sum() > 0
        assert torch.equal(loaded["exp_avg"], saved["exp_avg"])
        assert torch.equal(loaded["exp_avg_sq"], saved["exp_avg_sq"])
        assert loaded["step"].item() == saved["step"].item() == 1
    assert [g["weight_decay"] for g in resumed.param_groups] == [0.01, 0.0]


LR, MIN_LR = 6e-4, 6e-5


def cosine_cfg(warmup: int = 10, max_steps: int | None = 110) -> TrainConfig:
    return TrainConfig(lr=LR, min_lr=MIN_LR, lr_schedule="cosine", warmup_steps=warmup, max_steps=max_steps)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_warmup_is_linear(schedule: str) -> None:
    cfg = TrainConfig(lr=LR, min_lr=MIN_LR, lr_schedule=schedule, warmup_steps=8, max_steps=100)
    assert lr_at(0, cfg) == pytest.approx(LR / 8)
    assert lr_at(7, cfg) == pytest.approx(LR)
    assert [lr_at(s, cfg) for s in range(8)] == pytest.approx([LR * k / 8 for k in range(1, 9)])


def test_constant_schedule_stays_at_lr_after_warmup() -> None:
    cfg = TrainConfig(lr=LR, min_lr=MIN_LR, lr_schedule="constant", warmup_steps=5, max_steps=50)
    assert all(lr_at(s, cfg) == LR for s in range(5, 200))


def test_cosine_goes_from_lr_to_min_lr() -> None:
    cfg = cosine_cfg(warmup=10, max_steps=110)
    assert lr_at(10, cfg) == pytest.approx(LR)
    assert lr_at(35, cfg) == pytest.approx(MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(60, cfg) == pytest.approx((LR + MIN_LR) / 2)
    for step in (110, 111, 500):
        assert lr_at(step, cfg) == pytest.approx(MIN_LR)
    after = [lr_at(s, cfg) for s in range(10, 130)]
    assert all(a >= b for a, b in itertools.pairwise(after))
    assert after[0] > after[-1]


def test_cosine_without_max_steps_is_constant() -> None:
    cfg = cosine_cfg(warmup=4, max_steps=None)
    assert all(lr_at(s, cfg) == LR for s in range(4, 1000, 7))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_no_warmup_starts_at_lr(schedule: str) -> None:
    cfg = TrainConfig(lr=LR, min_lr=MIN_LR, lr_schedule=schedule, warmup_steps=0, max_steps=100)
    assert lr_at(0, cfg) == pytest.approx(LR)
    assert lr_at(1, cfg) <= LR


# ---- issue 23: linear and warm-up-stable-decay; each schedule as its formula ----


def expected_lr(step: int, schedule: str, warmup: int, max_steps: int, fraction: float = 0.2) -> float:
    """Each schedule's rate, written out here from its definition (README, training/optim.py's docstring)."""
    if step < warmup:
        return LR * (step + 1) / warmup
    done = min(1.0, (step - warmup) / (max_steps - warmup))
    if schedule == "constant":
        return LR
    if schedule == "cosine":
        return MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * done)) / 2
    if schedule == "linear":
        return LR - (LR - MIN_LR) * done
    decay_steps = round(fraction * max_steps)
    start = max(warmup, max_steps - decay_steps)
    return LR if step < start else LR - (LR - MIN_LR) * min(1.0, (step - start) / (max_steps - start))


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "wsd"])
@pytest.mark.parametrize(("warmup", "max_steps", "fraction"), [(0, 40, 0.2), (5, 40, 0.2), (3, 17, 0.5), (2, 10, 1.0)])
def test_every_schedule_follows_its_formula_at_every_step(
    schedule: str, warmup: int, max_steps: int, fraction: float
) -> None:
    cfg = TrainConfig(lr=LR, min_lr=MIN_LR, lr_schedule=schedule, warmup_steps=warmup, max_steps=max_steps,
                      decay_fraction=fraction)  # fmt: skip
    for step in range(max_steps + 3):
        assert lr_at(step, cfg) == pytest.approx(expected_lr(step, schedule, warmup, max_steps, fraction)), step


def test_wsd_holds_the_peak_then_decays_over_the_last_fraction() -> None:
    cfg = TrainConfig(lr=LR, min_lr=MIN_LR, lr_schedule="wsd", warmup_steps=10, max_steps=100, decay_fraction=0.2)
    assert all(lr_at(s, cfg) == LR for s in range(9, 81))  # stable from the warm-up's end to the decay's start
    assert lr_at(90, cfg) == pytest.approx((LR + MIN_LR) / 2)
    assert lr_at(100, cfg) == pytest.approx(MIN_LR) and lr_at(99, cfg) > MIN_LR
    decay = [lr_at(s, cfg) for s in range(80, 101)]
    steps = [a - b for a, b in itertools.pairwise(decay)]
    assert steps == pytest.approx([steps[0]] * len(steps))  # a straight line


def test_linear_is_a_straight_line_from_lr_to_min_lr() -> None:
    cfg = TrainConfig(lr=LR, min_lr=MIN_LR, lr_schedule="linear", warmup_steps=0, max_steps=50)
    assert lr_at(0, cfg) == LR and lr_at(25, cfg) == pytest.approx((LR + MIN_LR) / 2)
    assert lr_at(50, cfg) == pytest.approx(MIN_LR) and lr_at(75, cfg) == pytest.approx(MIN_LR)


def test_adam_settings_reach_the_optimizer() -> None:
    optimizer = make_optimizer(small_model(), lr=1e-3, betas=(0.85, 0.95), eps=1e-7)
    assert all(g["betas"] == (0.85, 0.95) and g["eps"] == 1e-7 for g in optimizer.param_groups)
    default = make_optimizer(small_model())
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in default.param_groups)  # torch's, as before
