"""The training state: what a checkpoint holds is exactly ``TrainState.state_dict()``, and ``load_state_dict`` puts a
run back where that left it. Checkpoint format 1 is a contract: files written by earlier versions must still resume."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import new_state, take_steps

from gpt2scratch.checkpoint.format import FORMAT_VERSION, read_checkpoint
from gpt2scratch.config import TrainConfig
from gpt2scratch.data.corpus import Corpus
from gpt2scratch.data.shards import ShardLoader, ShardSet
from gpt2scratch.distributed.world import World
from gpt2scratch.errors import CheckpointError, UsageError
from gpt2scratch.training.optim import make_optimizer
from gpt2scratch.training.state import TrainState, check_identity

# The keys of a format-1 checkpoint, as every version since the first wrote them (and the original README's resume
# recipe reads model_state_dict and optimizer_state_dict): changing them needs a new FORMAT_VERSION.
FORMAT_1_KEYS = {"format_version", "kind", "model_state_dict", "optimizer_state_dict", "scaler", "config", "step"}
FORMAT_1_KEYS |= {"loss", "rng", "rng_per_rank", "loader", "train_args", "metadata"}


def shard_state(seed: int) -> TrainState:
    """new_state, reading two shards (issue 12) instead of one stream of tokens."""
    state = new_state(seed)
    tokens = ShardSet([Path("train_000000.bin"), Path("train_000001.bin")], [state.corpus.train[:2000]] * 2)
    state.corpus = Corpus(tokens, None, "test", "1" * 64)
    state.loader = ShardLoader(tokens, 2, 8)
    return state


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("make", "place"),
    [(new_state, {"position": 3 * 2 * 8}), (shard_state, {"shard": 0, "offset": 3 * 2 * 8, "epoch": 0})],
    ids=["tokens", "shards"],
)
def test_state_dict_is_format_1_and_restores_a_run_exactly(make: Callable[[int], TrainState], place: dict) -> None:
    first = make(0)
    take_steps(first, 3)
    saved = copy.deepcopy(first.state_dict())
    assert set(saved) == FORMAT_1_KEYS and saved["format_version"] == FORMAT_VERSION == 1
    assert (saved["step"], saved["loader"]) == (3, place)
    expected = take_steps(first, 4)  # the uninterrupted run

    second = make(1)  # other initial weights, RNG and position: all must be replaced
    second.load_state_dict(saved)
    assert (second.step, second.loss) == (3, saved["loss"])
    assert torch.equal(torch.get_rng_state(), saved["rng"]["cpu"])  # dropout would continue its stream
    assert take_steps(second, 4) == expected
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], tensor), name


def test_a_format_1_file_from_an_earlier_version_resumes(trained_snapshot: Path) -> None:
    """The session's snapshot, rewritten with only what format 1 held: the keys a version before TrainState wrote."""
    old = {key: value for key, value in read_checkpoint(trained_snapshot).items() if key in FORMAT_1_KEYS}
    state = new_state(seed=3)
    state.load_state_dict(old)
    assert state.step == 2 and state.loader.position == old["loader"]["position"]
    assert torch.equal(state.model.transformer.wte.weight, old["model_state_dict"]["transformer.wte.weight"])


@pytest.mark.parametrize("missing", ["optimizer_state_dict", "loader", "rng"])
def test_a_checkpoint_without_what_resume_needs_is_refused(missing: str) -> None:
    saved = new_state(seed=0).state_dict()
    del saved[missing]
    with pytest.raises(CheckpointError, match=rf"the file lacks {missing}, so training cannot resume") as failure:
        new_state(seed=1).load_state_dict(saved, "the file")
    assert "--init-from" in str(failure.value)


def test_a_checkpoint_of_another_shape_names_the_tensor() -> None:
    saved = new_state(seed=0).state_dict()
    saved["model_state_dict"]["transformer.wpe.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"transformer\.wpe\.weight has shape \(3, 3\)"):
        new_state(seed=1).load_state_dict(saved)


# Issue 16, item 6: each malformed field of a snapshot is a one-line CheckpointError naming it, never our bug.
MALFORMED = {
    "step-text": ({"step": "12"}, "step is '12'"),
    "step-none": ({"step": None}, "step is None"),
    "step-negative": ({"step": -5}, "step is -5"),
    "step-bool": ({"step": True}, "step is True"),
    "loss-text": ({"loss": "low"}, "loss is 'low'"),
    "loss-inf": ({"loss": float("inf")}, "loss is inf"),
    "loader-none": ({"loader": None}, "loader position is None"),
    "loader-huge": ({"loader": {"position": 10**15}}, "loader position is 1000000000000000"),
    "loader-negative": ({"loader": {"position": -64}}, "loader position is -64"),
    "optimizer-empty": ({"optimizer_state_dict": {}}, "optimizer_state_dict holds no optimizer state"),
    "optimizer-other-model": (
        {"optimizer_state_dict": {"state": {}, "param_groups": [{"params": [0], "lr": 1.0}]}},
        "optimizer_state_dict does not fit",
    ),
    "rng-none": ({"rng": None, "rng_per_rank": None}, "rng is not a random generator state"),
    "rng-wrong-size": (
        {"rng": {"cpu": torch.zeros(3, dtype=torch.uint8)}, "rng_per_rank": None},
        "rng is not a random generator state",
    ),
    "weights-missing": ({"model_state_dict": {}}, "does not match a GPT-2 of this config: missing"),
    "weights-not-tensors": ({"model_state_dict": None}, "weights are not a dict of tensors"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_fields_are_one_line_checkpoint_errors(case: str) -> None:
    saved = new_state(seed=0)
    take_steps(saved, 1)
    changes, message = MALFORMED[case]
    state = {**saved.state_dict(), **changes}
    with pytest.raises(CheckpointError, match=re.escape(message)) as failure:
        new_state(seed=1).load_state_dict(state, "snapshot.pt")
    assert "\n" not in str(failure.value) and str(failure.value).startswith("snapshot.pt")


def _set(key: str, value: object, index: int = 0):
    return lambda optimizer: optimizer["state"][index].__setitem__(key, value)


# The sweep: moments of another shape were accepted (the fused AdamW then ran on them; smaller ones crashed the
# process with a segfault), and a malformed step or a missing moment was an internal error at the first step.
OPTIMIZER_DAMAGE = {
    "moment-smaller": (_set("exp_avg", torch.zeros(3)), "parameter 0's exp_avg is a tensor (float32, shape (3,))"),
    "moment-larger": (_set("exp_avg_sq", torch.zeros(2 * 50257 * 32)), "parameter 0's exp_avg_sq is a tensor"),
    "moment-transposed": (_set("exp_avg", torch.zeros(32, 50257)), "shape (32, 50257)), the parameter is (50257, 32)"),
    "moment-integers": (_set("exp_avg", torch.zeros(50257, 32, dtype=torch.int64)), "exp_avg is a tensor (int64"),
    "moment-missing": (lambda opt: opt["state"][3].pop("exp_avg_sq"), "parameter 3 has the state {exp_avg, step}"),
    "step-two-values": (_set("step", torch.tensor([1.0, 2.0])), "parameter 0's step is a tensor (float32, shape (2,))"),
    "step-text": (_set("step", "x"), "parameter 0's step is 'x', not a count of steps in [0, 1]"),
    "step-beyond": (_set("step", torch.tensor(7.0)), "step is a tensor (float32, shape (), value 7), not a count"),
    "step-nan": (_set("step", torch.tensor(float("nan"))), "value nan), not a count of steps"),
    "unknown-parameter": (
        lambda opt: opt["state"].__setitem__(999, {"step": torch.tensor(1.0)}),
        "it holds state for parameters that none of its groups lists",
    ),
    "ids-not-integers": (
        lambda opt: opt["param_groups"][1].__setitem__("params", [0.5] * len(opt["param_groups"][1]["params"])),
        "parameter group 1 does not list",
    ),
    "names-unknown": (  # keyed by name, as a sharded snapshot's state is, but by names its state does not use
        lambda opt: opt["param_groups"][1].__setitem__("params", ["a"] * len(opt["param_groups"][1]["params"])),
        "its state names parameters that none of its groups lists",
    ),
}


@pytest.mark.parametrize("case", list(OPTIMIZER_DAMAGE))
def test_optimizer_state_that_does_not_fit_the_model_is_one_line(case: str) -> None:
    saved = new_state(seed=0)
    take_steps(saved, 1)
    state = copy.deepcopy(saved.state_dict())
    damage, message = OPTIMIZER_DAMAGE[case]
    damage(state["optimizer_state_dict"])
    with pytest.raises(CheckpointError, match=re.escape(message)) as failure:
        new_state(seed=1).load_state_dict(state, "snapshot.pt")
    text = str(failure.value)
    assert "\n" not in text and text.startswith("snapshot.pt is damaged: its optimizer_state_dict does not fit"), text


def test_a_resumed_optimizer_keeps_this_run_s_settings() -> None:
    """torch's load_state_dict also replaces the groups' settings by the checkpoint's: resuming with
    --allow-changed weight_decay kept the old weight decay while the run recorded the new one."""
    saved = new_state(seed=0)
    take_steps(saved, 2)
    state = copy.deepcopy(saved.state_dict())
    resumed = new_state(seed=1)
    resumed.optimizer = make_optimizer(resumed.model, lr=1e-3, weight_decay=0.5)
    resumed.load_state_dict(state)
    assert [group["weight_decay"] for group in resumed.optimizer.param_groups] == [0.5, 0.0]
    assert resumed.optimizer.param_groups[0]["lr"] == 1e-3
    first = resumed.optimizer.param_groups[0]["params"][0]
    assert torch.equal(resumed.optimizer.state[first]["exp_avg"], state["optimizer_state_dict"]["state"][0]["exp_avg"])


@pytest.mark.parametrize(
    ("loader", "message"),
    [
        ({"position": 48}, "its loader shard is None, not one of the input's 2 shards"),
        ({"shard": 0, "offset": 2000, "epoch": 0}, "its loader offset is 2000, not a place in train_000000.bin's 2000"),
        ({"shard": 1, "offset": 16, "epoch": "1"}, "its loader epoch is '1', not a whole number >= 0"),
    ],
)
def test_a_shard_place_that_is_not_one_is_a_one_line_checkpoint_error(loader: dict, message: str) -> None:
    state = {**shard_state(seed=0).state_dict(), "loader": loader}
    with pytest.raises(CheckpointError, match=re.escape(message)) as failure:
        shard_state(seed=1).load_state_dict(state, "snapshot.pt")
    assert "\n" not in str(failure.value) and str(failure.value).startswith("snapshot.pt is damaged")


# ---- issue 13: the same global batch split over another number of processes is the same run ----


def saved_run(batch_size: int, grad_accum: int, world_size: int) -> dict:
    """What check_identity reads of a checkpoint written with this split of the batch."""
    args = TrainConfig(batch_size=batch_size, grad_accum=grad_accum).to_dict()
    return {"train_args": args, "metadata": {"world_size": world_size}}


@pytest.mark.parametrize(
    ("saved", "now", "changed"),
    [
        ((2, 1, 2), (4, 1, 1), {"batch_size": [2, 4], "world_size": [2, 1]}),  # 2 ranks x B=2, then 1 x B=4
        ((4, 1, 1), (1, 2, 2), {"batch_size": [4, 1], "grad_accum": [1, 2], "world_size": [1, 2]}),
    ],
)
def test_the_same_global_batch_on_another_number_of_processes_resumes(saved: tuple, now: tuple, changed: dict) -> None:
    batch_size, grad_accum, world_size = now
    cfg = TrainConfig(batch_size=batch_size, grad_accum=grad_accum)
    changes = check_identity(cfg, saved_run(*saved), Path("s"), World(0, 0, world_size), None, set())
    assert changes == changed  # allowed, and returned to be recorded


def test_another_global_batch_on_another_number_of_processes_is_refused() -> None:
    refused = r"the number of processes 1, the checkpoint's 2; .*--allow-changed world_size"
    with pytest.raises(UsageError, match=refused):
        check_identity(TrainConfig(batch_size=2), saved_run(2, 1, 2), Path("s"), World(), None, set())
    allowed = check_identity(TrainConfig(batch_size=2), saved_run(2, 1, 2), Path("s"), World(), None, {"world_size"})
    assert allowed == {"world_size": [2, 1]}


# ---- issue 23: AdamW's settings are part of the run ----


def test_another_adam_setting_is_refused_on_resume_unless_allowed() -> None:
    saved = {"train_args": TrainConfig(adam_beta2=0.95).to_dict(), "metadata": {"world_size": 1}}
    refused = r"--adam-beta2 0\.999, the checkpoint's 0\.95; .*--allow-changed adam_beta2"
    with pytest.raises(UsageError, match=refused):
        check_identity(TrainConfig(), saved, Path("s"), World(), None, set())
    assert check_identity(TrainConfig(adam_beta2=0.95), saved, Path("s"), World(), None, set()) == {}
    changes = check_identity(TrainConfig(adam_eps=1e-6, adam_beta2=0.95), saved, Path("s"), World(), None, {"adam_eps"})
    assert changes == {"adam_eps": [1e-8, 1e-6]}


def test_a_checkpoint_from_before_the_adam_settings_trained_with_torch_s_defaults() -> None:
    args = {k: v for k, v in TrainConfig().to_dict().items() if not k.startswith("adam_")}
    saved = {"train_args": args, "metadata": {"world_size": 1}}
    assert check_identity(TrainConfig(), saved, Path("s"), World(), None, set()) == {}
    with pytest.raises(UsageError, match=r"--adam-beta2 0\.95, the checkpoint's 0\.999"):
        check_identity(TrainConfig(adam_beta2=0.95), saved, Path("s"), World(), None, set())


def test_the_decay_fraction_is_the_run_s_only_under_wsd() -> None:
    def saved(cfg: TrainConfig) -> dict:
        return {"train_args": cfg.to_dict(), "metadata": {"world_size": 1}}

    cosine = TrainConfig(lr_schedule="cosine", max_steps=10)
    assert check_identity(TrainConfig(lr_schedule="cosine", max_steps=10, decay_fraction=0.5), saved(cosine), Path("s"),
                          World(), None, set()) == {}  # fmt: skip
    wsd = TrainConfig(lr_schedule="wsd", max_steps=10)
    with pytest.raises(UsageError, match=r"--decay-fraction 0\.5, the checkpoint's 0\.2"):
        check_identity(TrainConfig(lr_schedule="wsd", max_steps=10, decay_fraction=0.5), saved(wsd), Path("s"),
                       World(), None, set())  # fmt: skip


def test_the_optimizer_is_made_with_the_run_s_adam_settings() -> None:
    from gpt2scratch.training.optim import optimizer_for

    state = new_state(0)
    cfg = TrainConfig(adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6, weight_decay=0.1, lr=1e-3)
    optimizer = optimizer_for(state.model, cfg)
    for group in optimizer.param_groups:
        assert (group["betas"], group["eps"], group["lr"]) == ((0.8, 0.95), 1e-6, 1e-3)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
