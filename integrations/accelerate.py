"""relibra under Hugging Face accelerate: :class:`RelibraPlugin` + :func:`prepare`.

    from accelerate import Accelerator
    from relibra.integrations.accelerate import RelibraPlugin, prepare

    accelerator = Accelerator(cpu=True)                 # CPU: gloo, distributed_type MULTI_GPU + use_cpu
    model = Qwen3MoeForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters())
    balancer = prepare(accelerator, model, optimizer)   # swap MoE blocks, mesh, DDP exclusions
    model, optimizer = accelerator.prepare(model, optimizer)
    ...
    balancer.plan_step(routes_per_micro_batch)          # once a step (recorded routes, R3)
    for m, batch in enumerate(micro_batches):
        with balancer.micro_batch(m):
            accelerator.backward(loss_fn(model(batch)))

Call :func:`prepare` BEFORE ``accelerator.prepare``: it replaces parameters (the optimizer is
re-pointed to the new ones, by name) and marks the expert parameters so DDP leaves them alone.
Expert parameters are DTensors sharded over the expert-parallel mesh; their gradients already
sum every rank's tokens (the all-to-all carries them back), so they must not be all-reduced;
they are scaled by ``1 / data-parallel world`` so they match DDP's averaged replicated
gradients (the objective is the mean of the ranks' losses).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from .ddp import exclude_experts_from_ddp, expert_parameter_names
from .plugin import RelibraPlugin

__all__ = ["RelibraPlugin", "prepare", "build_mesh", "expert_parameter_names"]


def build_mesh(accelerator: Any, plugin: RelibraPlugin):
    """The expert-parallel ``(node, gpu)`` DeviceMesh for ``accelerator``'s processes.

    Uses ``accelerator.torch_device_mesh`` when accelerate built one (its ``ep`` dimension, or
    the whole mesh when 1-D). Otherwise builds ``(num_nodes, world / num_nodes)``: ``num_nodes``
    from the plugin, else 1 on CPU and ``world / LOCAL_WORLD_SIZE`` on GPUs. A single process
    gets None (the single-process reference layer).
    """
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        names = tuple(mesh.mesh_dim_names or ())
        if "ep" in names:
            return mesh["ep"]
        if mesh.ndim == 1:
            return mesh
        raise ValueError(f"accelerator.torch_device_mesh has dimensions {names}; relibra needs an 'ep' "
                         "dimension or a 1-D mesh")
    world = int(accelerator.num_processes)
    if world == 1:
        return None
    device_type = torch.device(accelerator.device).type
    if plugin.num_nodes is not None:
        nodes = plugin.num_nodes
    elif device_type == "cpu":
        nodes = 1
    else:
        nodes = max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if world % nodes:
        raise ValueError(f"RelibraPlugin.num_nodes={nodes} does not divide the {world} processes")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (nodes, world // nodes), mesh_dim_names=("node", "gpu"))


def _rebind_optimizer(optimizer: torch.optim.Optimizer, old: dict[str, nn.Parameter],
                      new: dict[str, nn.Parameter]) -> None:
    """Point ``optimizer``'s param groups at the swapped parameters, by name."""
    name_of = {id(p): n for n, p in old.items()}
    replaced = [p for g in optimizer.param_groups for p in g["params"]
                if id(p) in name_of and new.get(name_of[id(p)]) is not p]
    stateful = [name_of[id(p)] for p in replaced if optimizer.state.get(p)]
    if stateful:
        raise ValueError(f"optimizer already holds state for {stateful[:3]}...; call prepare before the first step")
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            name = name_of.get(id(p))
            if name is not None and name not in new:
                raise ValueError(f"optimizer parameter {name!r} disappeared in the MoE swap")
            params.append(new[name] if name is not None else p)
        group["params"] = params


def _is_wrapped(model: nn.Module) -> bool:
    return type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel") or hasattr(model, "module")


def prepare(accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            plugin: RelibraPlugin | None = None):
    """Make ``model`` a relibra model under ``accelerator``; return its :class:`relibra.Balancer`.

    Swaps the sparse MoE blocks (:func:`relibra.integrations.transformers.swap_moe_blocks`) with
    experts sharded over :func:`build_mesh`'s mesh, re-points ``optimizer`` at the new parameters,
    keeps the expert parameters out of DDP (``_ddp_params_and_buffers_to_ignore``) and FSDP
    (the plugin's ``ignored_modules``), scales their gradients by ``1 / world``, sets the dispatch
    kernels' backend (``RELIBRA_KERNEL_BACKEND``) to ``plugin.kernel_backend``, and builds the
    Balancer with the plugin's policy. Returns None when ``plugin.enabled`` is false.

    Raises ValueError (before changing anything) for an already wrapped model, a model without
    a swappable MoE block, or a mesh that does not fit the experts.
    """
    plugin = RelibraPlugin() if plugin is None else plugin
    if not plugin.enabled:
        return None
    if _is_wrapped(model):
        raise ValueError("relibra prepare: call it on the bare model, before accelerator.prepare(model, ...)")
    from relibra.runtime.balancer import Balancer

    from .transformers import find_moe_blocks, swap_moe_blocks

    if not find_moe_blocks(model):
        raise ValueError(f"relibra prepare: {type(model).__name__} has no sparse MoE block relibra can swap")
    mesh = build_mesh(accelerator, plugin)
    from relibra.kernels import ENV_VAR as KERNEL_BACKEND_ENV

    os.environ[KERNEL_BACKEND_ENV] = plugin.kernel_backend  # the dispatch kernels read it on every call
    old = dict(model.named_parameters())
    swap_moe_blocks(model, mesh, spare_slots_per_gpu=plugin.spare_slots_per_gpu)
    new = dict(model.named_parameters())
    if optimizer is not None:
        _rebind_optimizer(optimizer, old, new)
    if mesh is not None:
        exclude_experts_from_ddp(model, int(accelerator.num_processes))  # see relibra.integrations.ddp
        fsdp = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
        if fsdp is not None:
            from relibra.runtime.layer import ReLibraMoE

            experts = [m.experts for m in model.modules() if isinstance(m, ReLibraMoE)]
            fsdp.ignored_modules = list(getattr(fsdp, "ignored_modules", None) or []) + experts
    return Balancer(model, mesh=mesh, policy=plugin.policy, optimizer=optimizer,
                    spare_slots_per_gpu=plugin.spare_slots_per_gpu if mesh is not None else 0,
                    policy_options=plugin.policy_options)
