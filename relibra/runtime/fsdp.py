"""FSDP2 for models with ReLibraMoE layers: experts over expert-data-parallel, the rest over DP.

Legend: E experts, H = E/G home slots per rank, F = 2*hidden_dim, D = dim, I = hidden_dim.
G ranks of one expert-parallel (EP) group, R expert-data-parallel (EDP) replicas, so the
data-parallel world is R*G ranks, each with its own tokens::

    world mesh (edp=R, ep=G)                 rank = edp_index * G + ep_index
      ep  dim: one EP group = all E experts, H home slots per rank   (the layers' mesh)
      edp dim: ranks holding the same home slots; FSDP2 shards them over this dim
      dp  = the whole world (edp x ep flattened): FSDP2 shards every other parameter here

:func:`apply_fsdp` wraps, per ReLibraMoE layer, its dense parts (router, shared expert) with
``fully_shard`` on ``dp_mesh`` and then the layer itself on ``edp_mesh`` (so it manages only the
expert weights); finally the model root on ``dp_mesh``. Expert weights ``gate_up_proj [H, F, D]``
and ``down_proj [H, D, I]`` (DTensors ``Shard(0)`` on the EP mesh) are sharded by FSDP along dim
``expert_shard_dim`` (>= 1): the local shard keeps all H home rows, which is what lets
:class:`relibra.Balancer` migrate experts (weights, grads, AdamW state) under FSDP.

Gradient scaling. An expert's gradient on its home rank already sums the contributions of
every token of its EP group (they arrived by all-to-all); FSDP then reduces over the R EDP
replicas. Dense gradients are reduced over all R*G ranks. So:

- ``reduce="mean"`` (FSDP's default for dense): dense grads are divided by R*G, and experts get
  ``set_gradient_divide_factor(R*G)`` too (FSDP's default would divide them by R only, making
  expert gradients G times too large relative to the dense ones).
- ``reduce="sum"``: every gradient is the plain sum over all ranks (divide factor 1), the same
  as one process running the loss summed over all ranks' tokens.

On gloo, custom divide factors need ``set_force_sum_reduction_for_comms(True)``; it is set for
every wrapped module when the group's backend is gloo.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from ..plan import Placement, Plan
from ..topology import Topology
from .comm import broadcast_
from .layer import ReLibraMoE

__all__ = ["apply_fsdp", "expert_data_parallel_mesh", "fsdp_layers", "edp_plan"]


def _mesh_size(mesh, what: str) -> int:
    if mesh is None or not hasattr(mesh, "ndim"):
        raise ValueError(f"{what} must be a 1-D DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"{what} must be a 1-D DeviceMesh, got {mesh.ndim} dimensions {tuple(mesh.shape)}")
    return int(mesh.size())


def expert_data_parallel_mesh(edp: int, ep: int, device_type: str = "cpu"):
    """A ``(edp, ep)`` world mesh and its three views: ``(world, dp_mesh, edp_mesh, ep_mesh)``.

    ``ep_mesh`` (1-D, G = ``ep`` ranks, read as one node) is what the ReLibraMoE layers are built
    with; ``edp_mesh`` shards the experts; ``dp_mesh`` (all ``edp * ep`` ranks) the rest.
    For a multi-node EP group build the mesh yourself as ``(edp, node, gpu)`` and pass
    ``world["node", "gpu"]`` to the layers.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if edp < 1 or ep < 1:
        raise ValueError(f"edp and ep must be >= 1, got edp={edp}, ep={ep}")
    world = init_device_mesh(device_type, (edp, ep), mesh_dim_names=("edp", "ep"))
    return world, world._flatten("dp"), world["edp"], world["ep"]


def _is_gloo(mesh) -> bool:
    return "gloo" in str(dist.get_backend(mesh.get_group())).lower()


def apply_fsdp(model: nn.Module, dp_mesh, edp_mesh, *, reduce: Literal["mean", "sum"] = "mean",
               expert_shard_dim: int = 1, reshard_after_forward: bool = True,
               mp_policy=None) -> nn.Module:
    """Shard ``model`` in place with FSDP2 (see the module doc) and return it.

    Args:
        model: holds ReLibraMoE layers built with an expert-parallel mesh (G ranks).
        dp_mesh: 1-D mesh over all R*G data-parallel ranks (dense parameters).
        edp_mesh: 1-D mesh over the R ranks that hold the same home slots as this rank.
        reduce: "mean" (gradients averaged over the R*G data-parallel ranks) or "sum".
        expert_shard_dim: dim of the expert weights FSDP shards, >= 1 (dim 0 is the home slot
            axis, already sharded by EP; sharding it again would interleave home rows).
        reshard_after_forward, mp_policy: passed to every ``fully_shard``.
    Raises:
        ValueError: no ReLibraMoE layer, a layer without a mesh, meshes whose sizes do not
            multiply up (``dp == edp * G``), a bad ``reduce`` or ``expert_shard_dim``, or a
            model already wrapped.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import Shard

    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    layers = [m for m in model.modules() if isinstance(m, ReLibraMoE)]
    if not layers:
        raise ValueError("apply_fsdp: model holds no ReLibraMoE layer")
    dp, edp = _mesh_size(dp_mesh, "dp_mesh"), _mesh_size(edp_mesh, "edp_mesh")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("apply_fsdp: model is already (partly) wrapped with fully_shard")
    for i, layer in enumerate(layers):
        if layer.mesh is None:
            raise ValueError(f"apply_fsdp: MoE layer {i} has no expert-parallel mesh (built with mesh=None)")
        G = layer.topology.num_gpus
        if dp != edp * G:
            raise ValueError(f"apply_fsdp: dp_mesh has {dp} ranks but edp_mesh ({edp}) x expert-parallel "
                             f"group of layer {i} ({G}) = {edp * G}")
        for name in ("gate_up_proj", "down_proj"):
            nd = getattr(layer.experts, name).dim()
            if not 1 <= expert_shard_dim < nd:
                raise ValueError(f"apply_fsdp: expert_shard_dim must be in [1, {nd}) for experts.{name} "
                                 f"(dim 0 holds the home slots), got {expert_shard_dim}")
    kw = dict(reshard_after_forward=reshard_after_forward)
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    gloo = _is_gloo(dp_mesh)

    def _factor(module: FSDPModule, factor: float) -> None:
        if gloo:
            module.set_force_sum_reduction_for_comms(True)
        module.set_gradient_divide_factor(factor)

    dense_factor = float(dp) if reduce == "mean" else 1.0
    expert_factor = float(dp) if reduce == "mean" else 1.0
    shard = Shard(expert_shard_dim)
    for layer in layers:
        for sub in (layer.gate, layer.shared_expert, layer.shared_expert_gate):
            if sub is not None and any(True for _ in sub.parameters()):
                fully_shard(sub, mesh=dp_mesh, **kw)
                _factor(sub, dense_factor)
        # the layer now manages only the expert weights; its forward unshards them
        fully_shard(layer, mesh=edp_mesh, shard_placement_fn=lambda p: shard, **kw)
        _factor(layer, expert_factor)
        layer.edp_mesh = edp_mesh
    fully_shard(model, mesh=dp_mesh, **kw)
    _factor(model, dense_factor)
    return model


# ---------------------------------------------------------------------------- used by the Balancer
def fsdp_layers(layers: list[ReLibraMoE], edp_mesh=None):
    """``(any layer wrapped by fully_shard, EDP process group or None)`` for a Balancer.

    ``edp_mesh`` defaults to the layers' ``edp_mesh`` (set by :func:`apply_fsdp`). The group is
    None when there is one replica. Raises ValueError for a wrapping the Balancer cannot run:
    ``layer.experts`` wrapped on its own (its forward never runs, so FSDP would never unshard
    it), or layers wrapped with fully_shard and no ``edp_mesh`` known.
    """
    from torch.distributed.fsdp import FSDPModule

    wrapped = [isinstance(layer, FSDPModule) for layer in layers]
    for i, layer in enumerate(layers):
        if isinstance(layer.experts, FSDPModule) and not wrapped[i]:
            raise ValueError(f"MoE layer {i}: fully_shard the ReLibraMoE layer, not layer.experts (its "
                             "forward is never called, so FSDP would never unshard the experts); "
                             "use relibra.runtime.fsdp.apply_fsdp")
    meshes = {id(m): m for m in (getattr(layer, "edp_mesh", None) for layer in layers) if m is not None}
    if edp_mesh is None and len(meshes) > 1:
        raise ValueError("MoE layers are sharded over different edp_mesh objects; pass edp_mesh=")
    edp_mesh = edp_mesh if edp_mesh is not None else next(iter(meshes.values()), None)
    if any(wrapped) and edp_mesh is None:
        raise ValueError("MoE layers are wrapped with fully_shard: pass edp_mesh= (the mesh their "
                         "experts are sharded over) or wrap with relibra.runtime.fsdp.apply_fsdp")
    if edp_mesh is None:
        return any(wrapped), None
    if getattr(edp_mesh, "ndim", None) != 1:
        raise ValueError(f"edp_mesh must be a 1-D DeviceMesh, got {type(edp_mesh).__name__}")
    return any(wrapped), (edp_mesh.get_group() if edp_mesh.size() > 1 else None)


def edp_plan(plan: Plan | None, error: str, loads_MLE: torch.Tensor, topology: Topology,
             policy_name: str, group, replan: Callable[..., Plan] | None = None) -> tuple[Plan | None, str]:
    """One placement for every EDP replica; each EP group splits its own tokens on it.

    Called by EP rank 0 of every replica (collective over ``group``, the EDP group). EDP rank 0
    broadcasts its ``plan``'s placement (planned on the loads summed over replicas) or its
    ``error``; every caller then builds its plan for its own ``loads_MLE [M, L, E]``: with
    ``replan(loads_MLE, placement, topology)`` (the policy's own replica planner on a fixed
    placement, e.g. ``replicate``'s) when rank 0's plan had replicas and ``replan`` is given,
    no replicas otherwise. Returns ``(plan, error)``; never raises.
    """
    L, E = plan_shape = (loads_MLE.shape[1], topology.num_experts)
    buf = torch.zeros(2 + L * E, dtype=torch.int64)
    if dist.get_rank(group) == 0:
        buf[0] = 1 if error else 0
        if not error:
            buf[1] = int(bool((plan.replicas() > 0).any()))
            buf[2:] = plan.placement.home_experts.reshape(-1)
    broadcast_(buf, 0, group)
    if int(buf[0]):
        return None, error or f"policy {policy_name!r} failed on expert-data-parallel rank 0"
    try:
        placement = Placement(buf[2:].view(plan_shape).clone())
        if int(buf[1]) and topology.spare_slots_per_gpu and replan is not None:
            local = replan(loads_MLE, placement, topology)
        else:
            local = Plan.without_replicas(placement, loads_MLE, topology, policy_name)
        local.validate(topology, loads_MLE)
        return local, ""
    except Exception as exc:  # noqa: BLE001 - shared with every rank by the caller
        return None, f"planning on the shared placement failed: {type(exc).__name__}: {exc}"
