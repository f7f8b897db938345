"""How the model is spread over ranks: FSDP2 keeps the tied weight one parameter, gathers whole state dicts in the
one-process format, reduces gradients on the last micro-batch only and measures their norm over every shard;
activation checkpointing keeps fewer activations for the same gradients. Then, under torchrun: two FSDP ranks compute
what one process computes with the same global batch (also with activation checkpointing and gradient accumulation),
and two launchers as two nodes compute what one launcher does.

The unit tests run FSDP in this process over a process group of one rank (the ``process_group`` fixture).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    FSDP_FLAGS,
    ONE_THREAD,
    TINY,
    assert_close_losses,
    assert_close_weights,
    assert_ran,
    child_env,
    free_port,
    metrics,
    new_state,
    take_steps,
    tiny_config,
    torchrun,
    torchrun_command,
)

from gpt2scratch.checkpoint.load import read_state
from gpt2scratch.distributed import parallelize as parallel
from gpt2scratch.distributed.world import World
from gpt2scratch.errors import UsageError
from gpt2scratch.model import GPT

CPU = torch.device("cpu")


def batch(seed: int, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY.vocab_size, (rows, 17), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


# ---- in this process ----


@pytest.mark.usefixtures("process_group", "one_thread")
def test_fsdp_keeps_the_tied_embedding_and_head_one_parameter() -> None:
    plain = GPT(TINY)
    model = GPT(TINY)
    parallel.shard(model, World(0, 0, 1), CPU, torch.float32)
    assert parallel.is_sharded(model) and not parallel.is_sharded(plain)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert len(list(model.parameters())) == len(list(plain.parameters()))
    assert parallel.tied_names(model) == {"lm_head.weight": "transformer.wte.weight"}


@pytest.mark.usefixtures("process_group", "one_thread")
def test_whole_state_dicts_under_fsdp_are_the_one_process_format() -> None:
    """final_model.pt under FSDP: the same keys, a tied weight stored once, the optimizer state keyed by index."""
    plain, sharded = new_state(seed=0), new_state(seed=0, sharded=True)
    assert take_steps(sharded, 2) == pytest.approx(take_steps(plain, 2), abs=1e-6)
    weights, expected = parallel.model_state_dict(sharded.model), plain.model.state_dict()
    assert weights.keys() == expected.keys()
    assert weights["lm_head.weight"] is weights["transformer.wte.weight"]
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    optimizer, expected_optimizer = (
        parallel.optimizer_state_dict(sharded.model, sharded.optimizer),
        plain.optimizer.state_dict(),
    )
    assert optimizer["param_groups"] == expected_optimizer["param_groups"]
    assert optimizer["state"].keys() == expected_optimizer["state"].keys()
    for index, values in expected_optimizer["state"].items():
        for key, tensor in values.items():
            torch.testing.assert_close(optimizer["state"][index][key], tensor, rtol=0, atol=1e-6)


def test_optimizer_state_by_name_and_by_index_round_trip() -> None:
    state = new_state(seed=0)
    take_steps(state, 1)
    by_index = state.optimizer.state_dict()
    names = parallel.parameter_names(state.model, state.optimizer)
    assert names[0] == "transformer.wte.weight" and "lm_head.weight" not in names  # the tied one by its first name
    by_name = parallel.by_name(by_index, names)
    assert list(by_name["state"]) == [names[i] for i in by_index["state"]]
    back = parallel.by_index(by_name)
    assert back["param_groups"] == by_index["param_groups"]
    assert back["state"].keys() == by_index["state"].keys()
    assert all(back["state"][i]["exp_avg"] is by_index["state"][i]["exp_avg"] for i in by_index["state"])


@pytest.mark.usefixtures("process_group", "one_thread")
def test_gradient_accumulation_reduces_on_the_last_micro_batch_only() -> None:
    plain, model = GPT(TINY), GPT(TINY)
    model.load_state_dict(plain.state_dict())
    parallel.shard(model, World(0, 0, 1), CPU, torch.float32)
    for micro, seed in enumerate((1, 2)):
        last = micro == 1
        x, y = batch(seed)
        with parallel.gradient_sync(model, sync=last):
            model(x, y)[1].backward()
        plain(x, y)[1].backward()
        if not last:  # kept unsharded on the rank, not reduced: no sharded gradient yet
            assert all(p.grad is None for p in model.parameters())
    for (name, p), expected in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad.full_tensor(), expected.grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.usefixtures("process_group", "one_thread")
def test_the_gradient_norm_under_fsdp_covers_every_shard_and_clips() -> None:
    plain, model = GPT(TINY), GPT(TINY)
    model.load_state_dict(plain.state_dict())
    parallel.shard(model, World(0, 0, 1), CPU, torch.float32)
    x, y = batch(3)
    for m in (plain, model):
        m(x, y)[1].backward()
    exact = torch.stack([p.grad.double().norm() for p in plain.parameters()]).norm().item()
    norm = parallel.clip_grad_norm(model, exact / 2)
    assert isinstance(norm, torch.Tensor) and not hasattr(norm, "full_tensor")  # a plain tensor, for the metrics
    assert norm.item() == pytest.approx(exact, rel=1e-6)
    clipped = torch.stack([p.grad.full_tensor().double().norm() for p in model.parameters()]).norm().item()
    assert clipped == pytest.approx(exact / 2, rel=1e-5)


def activations_and_gradients(recompute: bool) -> tuple[int, list[torch.Tensor]]:
    """How many tensors autograd keeps for backward in one forward pass (dropout 0.1), and the gradients."""
    torch.manual_seed(0)
    model = GPT(TINY.__class__(**{**TINY.to_dict(), "dropout": 0.1}))
    if recompute:
        for block in model.transformer.h:
            parallel.recompute_in_backward(block)
    kept: list[torch.Size] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        _, loss = model(*batch(4), return_logits=False)
    loss.backward()
    return len(kept), [p.grad for p in model.parameters()]


@pytest.mark.usefixtures("one_thread")
def test_activation_checkpointing_keeps_fewer_activations_for_the_same_gradients() -> None:
    """With dropout: the recomputation must replay the same masks, or the gradients would differ."""
    kept, grads = activations_and_gradients(recompute=False)
    kept_recomputing, grads_recomputing = activations_and_gradients(recompute=True)
    assert kept_recomputing < kept / 3, (kept_recomputing, kept)  # each block keeps its input alone
    for plain, recomputed in zip(grads, grads_recomputing, strict=True):
        assert torch.equal(plain, recomputed)


def test_fsdp_refuses_float16_and_one_process_ignores_it() -> None:
    cfg = tiny_config("--parallel", "fsdp")
    with pytest.raises(UsageError, match="--parallel fsdp does not train in float16"):
        parallel.parallelize(GPT(TINY), cfg, World(0, 0, 2), CPU, torch.float16)
    model = parallel.parallelize(GPT(TINY), cfg, World(), CPU, torch.float32)
    assert not parallel.is_sharded(model)


# ---- under torchrun (2 processes, gloo, fp32) ----


@pytest.mark.slow
@pytest.mark.distributed
def test_two_fsdp_ranks_compute_what_one_process_computes(fsdp_runs: Path) -> None:
    one, fsdp = fsdp_runs / "one", fsdp_runs / "fsdp"
    assert_close_losses(metrics(fsdp), metrics(one))  # 10 steps, one line each: rank 0 alone writes metrics
    assert_close_weights(fsdp / "snapshots" / "snapshot_step_10", one / "snapshots" / "snapshot_step_10.pt")
    assert sorted(p.name for p in (fsdp / "snapshots").iterdir()) == ["snapshot_step_10", "snapshot_step_5"]
    snapshot = read_state(fsdp / "snapshots" / "snapshot_step_10", weights=False)
    assert snapshot["metadata"]["world_size"] == 2 and len(snapshot["rng_per_rank"]) == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_with_activation_checkpointing_and_accumulation_computes_the_same(fsdp_runs: Path, tmp_path: Path) -> None:
    """2 ranks x 2 micro-batches x 1 sequence, each block recomputed in backward: the same 4 sequences a step."""
    out = tmp_path / "out"
    flags = ["-B", "1", "--grad-accum", "2", "--activation-checkpointing", "--parallel", "fsdp", "--out-dir", str(out)]
    assert_ran(torchrun(*FSDP_FLAGS, *flags, cwd=fsdp_runs))
    assert_close_losses(metrics(out), metrics(fsdp_runs / "one"))
    assert_close_weights(
        out / "snapshots" / "snapshot_step_10", fsdp_runs / "one" / "snapshots" / "snapshot_step_10.pt"
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_two_launchers_as_two_nodes_compute_what_one_launcher_computes(fsdp_runs: Path, tmp_path: Path) -> None:
    """Two torchrun launchers joined by a c10d rendezvous, one rank each, as two nodes sharing a filesystem would."""
    out = tmp_path / "out"
    options = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "two-nodes"]  # fmt: skip
    command = torchrun_command(options, *FSDP_FLAGS, "-B", "2", "--parallel", "fsdp", "--out-dir", str(out))
    env = child_env(ONE_THREAD)
    nodes = [
        subprocess.Popen(command, cwd=fsdp_runs, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for node in nodes:
        stdout, stderr = node.communicate(timeout=300)
        assert_ran(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    assert [(r["step"], r["loss"]) for r in metrics(out)] == [
        (r["step"], r["loss"]) for r in metrics(fsdp_runs / "fsdp")
    ]
    assert_close_weights(out / "snapshots" / "snapshot_step_10", fsdp_runs / "fsdp" / "snapshots" / "snapshot_step_10")
