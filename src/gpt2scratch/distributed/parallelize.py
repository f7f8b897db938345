"""How the model is spread over the processes of a run: data parallel (DDP) or fully sharded (FSDP2), activation
checkpointing, and the pieces of a step that must see every rank's shard (gradient norm, finiteness, state dicts).

Applied to an unchanged model from outside, as torchtitan does: ``parallelize`` before the optimizer is made (FSDP
shards the parameters in place, so the optimizer must see the shards), ``wrap`` before the first step (DDP). With one
process, or with DDP, every state dict here is the module's and the optimizer's own, so checkpoints keep their format.

Under FSDP each block is its own unit (its weights are gathered just before it runs and freed after), then the root
holds the rest: the token embedding, which is also the output head (one parameter, so it stays tied), the position
embedding and the final LayerNorm.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gpt2scratch.checkpoint.format import all_finite, check_weights, load_weights
from gpt2scratch.config import TrainConfig
from gpt2scratch.distributed.world import World
from gpt2scratch.errors import UsageError

if TYPE_CHECKING:
    from gpt2scratch.model import GPT

log = logging.getLogger(__name__)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` was sharded by FSDP2 (``parallelize`` with --parallel fsdp and several processes)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported, nothing sharded: one process skips the import
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def parallelize(
    model: GPT, cfg: TrainConfig, world: World, device: torch.device, dtype: torch.dtype, compiled: bool = False
) -> GPT:
    """Activation checkpointing if asked, then, with --parallel fsdp and several processes, FSDP2 in place (with
    ``compiled`` each block is compiled before it is sharded). Call before the optimizer is made; returns ``model``."""
    if cfg.activation_checkpointing:
        for block in model.transformer.h:
            recompute_in_backward(block)
    if cfg.parallel == "fsdp" and world.enabled:
        if dtype == torch.float16:
            raise UsageError(
                "--parallel fsdp does not train in float16 (its gradient scaler would need every rank's shard); "
                "use --dtype bfloat16 or float32"
            )
        shard(model, world, device, dtype, compile_blocks=compiled)
    return model


def recompute_in_backward(block: torch.nn.Module) -> None:
    """Keep only the block's input in forward and recompute its activations in backward (non-reentrant
    checkpointing; dropout masks are replayed from the saved RNG state, so the gradients are unchanged).

    The block's own ``forward`` is wrapped rather than the block itself, so parameter names stay the same and
    checkpoints do not change."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    def recomputed(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed  # type: ignore[method-assign]


def shard(model: GPT, world: World, device: torch.device, dtype: torch.dtype, compile_blocks: bool = False) -> None:
    """FSDP2 over all ranks: each block, then the root. On CUDA with bf16 the gathered weights are bf16 and the
    gradients are reduced in fp32; elsewhere everything stays fp32 (autocast still computes in ``dtype``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    if device.type == "cuda" and dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.transformer.h:
        if compile_blocks:
            block.compile()  # per block, before sharding: FSDP's hooks stay outside the compiled graphs
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    log.info("FSDP: %d blocks and the root sharded over %d ranks", len(model.transformer.h), world.size)


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The module to run the steps through: DistributedDataParallel with several processes, unless the model is
    sharded already (FSDP); the model itself with one process."""
    if not world.enabled or is_sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction across ranks unless ``sync`` (gradient accumulation reduces on the last
    micro-batch only): DDP's ``no_sync``; FSDP's switch, which every micro-batch sets."""
    from torch.nn.parallel import DistributedDataParallel

    if is_sharded(model):
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]
        return contextlib.nullcontext()
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The norm of all gradients (over every rank's shards under FSDP), before clipping them to ``max_norm`` (0:
    no clipping), as a plain tensor."""
    if not is_sharded(model):
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    # The shards' sums of squares, added across ranks, in float64. An fp32 norm of wte's gradient (a few large rows,
    # ~10^6 tiny values from the output head) drops the tiny squares against the large running sum: off by ~3e-4
    # relative, differently for each way of cutting the tensor (one process's own figure has the same error).
    grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]  # views: scaling them scales the grads
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]).square().sum()
    dist.all_reduce(squares)
    norm = squares.sqrt().float()
    if max_norm > 0:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))  # as torch's clip_grad_norm_ scales
    return norm


def weights_finite(model: torch.nn.Module, world: World) -> bool:
    """Whether no weight is NaN or inf: under FSDP every rank checks its shards and all must agree (every rank
    calls it then); otherwise the module's own weights."""
    if not is_sharded(model):
        return all_finite(model)
    local = all_finite(_local(p) for p in model.parameters())
    finite = torch.tensor(float(local), device=next(model.parameters()).device)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item() > 0)


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """{second name: first name} of every parameter reachable under two names (the output head is the token
    embedding)."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


# ---- state dicts: the module's own with one process or DDP; under FSDP, whole (gathered) or sharded ----


def model_state_dict(model: torch.nn.Module, full: bool = True) -> dict[str, Any]:
    """The weights. Under FSDP with ``full``, gathered whole onto rank 0's CPU (empty on the other ranks), with a
    tied weight stored once as in a one-process checkpoint; without ``full``, this rank's shards (DTensors)."""
    if not is_sharded(model) or not full:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name, first in tied_names(model).items():
        if name in state:
            state[name] = state[first]
    return state


def optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, full: bool = True) -> dict[str, Any]:
    """The optimizer's state. Under FSDP with ``full``, gathered onto rank 0's CPU (empty elsewhere) and keyed by
    parameter index, the layout of ``optimizer.state_dict()``; without ``full``, this rank's shards keyed by
    parameter name (what resharding needs)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    return by_index(state) if full and state else state


def load_model_state_dict(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Put ``state`` into ``model``: whole weights (checked as ``load_weights`` checks them), or, under FSDP, the
    shards a sharded snapshot was read into. CheckpointError naming a missing or mismatched tensor."""
    if not is_sharded(model):
        load_weights(model, state, source)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = not any(_is_dtensor(t) for t in state.values())
    if full:
        check_weights(model, state, source)
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=full))


def load_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put ``state`` (keyed by index, or under FSDP by name as ``optimizer_state_dict`` makes it) into
    ``optimizer``; torch's errors (ValueError, KeyError, ...) for a state that does not fit."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not _keyed_by_name(state):
        state = by_name(state, parameter_names(model, optimizer))
    full = not any(_is_dtensor(t) for values in state["state"].values() for t in values.values())
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=full))


def parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of the optimizer's parameters, in the order of its indices (a tied one by its first name)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name, keyed by index instead: the i-th name listed in the parameter
    groups is index i, as ``torch.optim.Optimizer.state_dict`` numbers them."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[name]: values for name, values in state["state"].items()}, "param_groups": groups}


def by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state keyed by index, keyed by the parameters' ``names`` instead (the inverse of ``by_index``)."""
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
    return {"state": {names[i]: values for i, values in state["state"].items()}, "param_groups": groups}


def _keyed_by_name(state: dict[str, Any]) -> bool:
    return any(isinstance(name, str) for group in state["param_groups"] for name in group["params"])


def _is_dtensor(tensor: torch.Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # as in is_sharded: no import where nothing is sharded
    return module is not None and isinstance(tensor, module.DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the tensor itself otherwise), detached."""
    return tensor.to_local().detach() if _is_dtensor(tensor) else tensor.detach()  # type: ignore[attr-defined]
