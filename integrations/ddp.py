"""Plain ``DistributedDataParallel`` for models holding ReLibraMoE layers: :func:`wrap_ddp`.

The rule. A ReLibraMoE built with a mesh keeps its expert weights (``experts.gate_up_proj``,
``experts.down_proj``) as DTensors sharded over the expert-parallel (EP) group: every rank holds
different experts, the all-to-all already brings every token's gradient to the expert's home,
and :class:`relibra.Balancer` moves them between ranks. So DDP must not all-reduce them (and a
bare DDP cannot: its bucketing fails on DTensors with ``aten.cat.default got mixed torch.Tensor
and DTensor``). The router, shared experts, attention and embeddings are replicated and DDP
averages their gradients as usual.

What :func:`wrap_ddp` does:

- lists the expert parameters in ``model._ddp_params_and_buffers_to_ignore`` (what
  ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` sets), so DDP leaves
  them alone;
- divides their gradients by the DDP world size (a gradient hook per parameter): an expert's
  gradient sums the contributions of every rank's tokens, DDP averages the replicated ones, so
  both become the gradient of the mean of the ranks' losses - exactly one process running all
  ranks' tokens with the mean loss;
- refuses (ValueError) a process group other than the layers' EP group: with expert-data
  parallelism (several EP groups) the expert gradients must also be reduced across the groups,
  which is what FSDP2 through :func:`relibra.runtime.fsdp.apply_fsdp` does.

:func:`relibra.integrations.transformers.swap_moe_blocks` with a mesh puts a guard in
``model._ddp_params_and_buffers_to_ignore``, so a bare ``DistributedDataParallel(model)`` fails
when it is built with a ValueError that says to use :func:`wrap_ddp` instead of the DTensor
error. ``relibra.integrations.accelerate.prepare`` applies the same exclusion for accelerate.

    model = Qwen3MoeForCausalLM(config)
    swap_moe_blocks(model, mesh)                 # experts sharded over the EP mesh
    ddp_model = wrap_ddp(model)                  # instead of DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters())
    balancer = relibra.Balancer(model, mesh=mesh, optimizer=optimizer)
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
import torch.nn as nn

__all__ = ["wrap_ddp", "expert_parameter_names", "exclude_experts_from_ddp", "guard_bare_ddp"]

_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"  # read by DistributedDataParallel.__init__
_DIVISOR_ATTR = "_relibra_grad_divisor"


def _sharded_layers(model: nn.Module) -> list[tuple[str, Any]]:
    from relibra.runtime.layer import ReLibraMoE

    return [(n, m) for n, m in model.named_modules() if isinstance(m, ReLibraMoE) and m.mesh is not None]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of the sharded expert parameters of every ReLibraMoE built with a mesh."""
    out = []
    for name, _ in _sharded_layers(model):
        prefix = f"{name}.experts." if name else "experts."
        out += [prefix + "gate_up_proj", prefix + "down_proj"]
    return out


class _UseWrapDDP:
    """Stands in ``model._ddp_params_and_buffers_to_ignore`` until :func:`wrap_ddp` (or prepare) runs.

    ``DistributedDataParallel.__init__`` iterates this attribute first thing; iterating the guard
    raises the ValueError that says what to do.
    """

    def __init__(self, expert_names: list[str], kept: list[str]) -> None:
        self.expert_names, self.kept = list(expert_names), list(kept)

    def __iter__(self):
        raise ValueError(
            f"relibra: this model's ReLibraMoE expert parameters ({self.expert_names[0]}, ... "
            f"{len(self.expert_names)} in all) are DTensors sharded over the expert-parallel mesh: a bare "
            "DistributedDataParallel would all-reduce them. Wrap the model with "
            "relibra.integrations.ddp.wrap_ddp(model, ...) instead (it keeps the experts out of DDP and "
            "scales their gradients by 1/world), call relibra.integrations.accelerate.prepare before "
            "accelerator.prepare, or shard with FSDP2 (relibra.runtime.fsdp.apply_fsdp)")

    def __repr__(self) -> str:
        return f"<relibra guard: wrap with relibra.integrations.ddp.wrap_ddp ({len(self.expert_names)} experts)>"


def _kept_ignores(model: nn.Module) -> list[str]:
    """Names the user (or accelerate) already asked DDP to ignore, without relibra's guard."""
    current = getattr(model, _IGNORE_ATTR, None)
    if current is None:
        return []
    if isinstance(current, _UseWrapDDP):
        return current.kept
    return list(current)


def guard_bare_ddp(model: nn.Module) -> None:
    """Make a bare ``DistributedDataParallel(model)`` raise a ValueError naming :func:`wrap_ddp`.

    No-op for a model without sharded experts (``mesh=None`` layers are replicated and DDP
    averages them like any other parameter).
    """
    names = expert_parameter_names(model)
    if names:
        setattr(model, _IGNORE_ATTR, _UseWrapDDP(names, _kept_ignores(model)))


def exclude_experts_from_ddp(model: nn.Module, world: int) -> list[str]:
    """Keep the sharded expert parameters out of DDP and divide their gradients by ``world``.

    Returns their names. Idempotent for one ``world``; a second call with another ``world``
    raises ValueError (the gradients would be divided twice).
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    names = expert_parameter_names(model)
    params = dict(model.named_parameters())
    for name in names:
        p = params[name]
        divisor = getattr(p, _DIVISOR_ATTR, None)
        if divisor is not None and divisor != world:
            raise ValueError(f"{name}: gradients are already divided by {divisor}; cannot divide by {world} as well")
        if divisor is None and world > 1:
            p.register_hook(lambda g, w=world: g / w)
        setattr(p, _DIVISOR_ATTR, world)
    kept = _kept_ignores(model)
    setattr(model, _IGNORE_ATTR, kept + [n for n in names if n not in kept])
    return names


def wrap_ddp(model: nn.Module, process_group=None, **ddp_kwargs: Any):
    """``DistributedDataParallel(model, process_group=..., **ddp_kwargs)`` with the experts left out.

    Args:
        model: the bare model (not yet wrapped) holding ReLibraMoE layers, e.g. after
            :func:`relibra.integrations.transformers.swap_moe_blocks`.
        process_group: DDP's group (default: the world); must be the ranks of the layers'
            expert-parallel group.
        **ddp_kwargs: passed to ``DistributedDataParallel`` (``find_unused_parameters``, ...).
    Raises:
        ValueError: ``model`` is already wrapped, the process group is not initialised, or DDP's
            ranks are not the layers' expert-parallel group (use FSDP2 for expert-data parallelism).
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) or hasattr(model, "module"):
        raise ValueError("wrap_ddp: pass the bare model, not one already wrapped (it has a .module)")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("wrap_ddp: torch.distributed is not initialised (call dist.init_process_group first)")
    group = process_group if process_group is not None else dist.group.WORLD
    ddp_ranks = sorted(dist.get_process_group_ranks(group))
    for name, layer in _sharded_layers(model):
        ep_ranks = sorted(dist.get_process_group_ranks(layer.ep_group))
        if ep_ranks != ddp_ranks:
            raise ValueError(
                f"wrap_ddp: MoE layer {name} shards its experts over ranks {ep_ranks}, but DDP's process group is "
                f"ranks {ddp_ranks}; plain DDP needs one expert-parallel group spanning DDP's ranks. For "
                "expert-data parallelism (several EP groups) use relibra.runtime.fsdp.apply_fsdp")
    exclude_experts_from_ddp(model, len(ddp_ranks))
    return DistributedDataParallel(model, process_group=process_group, **ddp_kwargs)
