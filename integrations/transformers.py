"""Swap the sparse MoE blocks of transformers 5.x models for :class:`relibra.ReLibraMoE`.

Families that share the ``block.gate`` (router, ``weight [E, D]``) + ``block.experts``
(fused ``gate_up_proj [E, 2I, D]``, ``down_proj [E, D, I]``) layout, and what each router does
(read from ``transformers/models/<family>/modeling_<family>.py``, transformers 5.24):

    family       scores   choice                                   weights                     extra
    qwen3_moe    softmax  topk(scores)                             norm if norm_topk_prob      -
    olmoe        softmax  topk(scores)                             norm if norm_topk_prob      -
    mixtral      softmax  topk(scores)                             always normalised           jitter (must be 0)
    qwen2_moe    softmax  topk(scores)                             norm if norm_topk_prob      gated shared_expert
    deepseek_v3  sigmoid  topk(scores + e_score_correction_bias),  scores at ids, norm, times   shared_experts (ungated)
                          group-limited (n_group, topk_group)      routed_scaling_factor

All of these are the ReLibraMoE router contract with the options below; the parameter and
buffer names stay those of the checkpoint (``mlp.gate.weight``, ``mlp.experts.gate_up_proj``,
``mlp.shared_expert.*``, ``mlp.shared_experts.*``, ``mlp.gate.e_score_correction_bias``), so a
state dict saved before the swap loads after it one to one, and back.

DeepSeek-V3 names its ungated shared MLP ``shared_experts``: :class:`SharedExpertsMoE` keeps the
original module under that name and adds its output.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from relibra.runtime.layer import ReLibraMoE

from .shared_experts import SharedExpertsMoE

__all__ = ["swap_moe_blocks", "moe_options", "SharedExpertsMoE", "FAMILY_ROUTERS", "find_moe_blocks"]

#: router class name -> family; blocks whose gate is of another class are left alone.
FAMILY_ROUTERS: dict[str, str] = {
    "Qwen3MoeTopKRouter": "qwen3_moe",
    "Qwen2MoeTopKRouter": "qwen2_moe",
    "MixtralTopKRouter": "mixtral",
    "OlmoeTopKRouter": "olmoe",
    "DeepseekV3TopkRouter": "deepseek_v3",
}


def _is_moe_block(module: nn.Module) -> bool:
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (
        gate is not None
        and experts is not None
        and isinstance(getattr(gate, "weight", None), torch.Tensor)
        and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
    )


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, block, family)`` of every swappable sparse MoE block, in module order."""
    out = []
    for name, module in model.named_modules():
        if _is_moe_block(module):
            family = FAMILY_ROUTERS.get(type(module.gate).__name__)
            if family is not None:
                out.append((name, module, family))
    return out


def _check_silu(block: nn.Module, name: str) -> None:
    act = getattr(block.experts, "act_fn", None)
    if act is not None and not isinstance(act, nn.SiLU) and type(act).__name__ not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"{name}: experts use activation {type(act).__name__}; ReLibraMoE computes silu gated MLPs")


def moe_options(block: nn.Module, family: str, name: str = "block") -> dict[str, Any]:
    """ReLibraMoE constructor arguments reproducing ``block`` exactly (positional ones included).

    Raises ValueError naming ``name`` when the block uses something ReLibraMoE does not compute
    (a non-silu activation, Mixtral router jitter).
    """
    _check_silu(block, name)
    gate, experts = block.gate, block.experts
    E, D = gate.weight.shape
    if tuple(experts.gate_up_proj.shape[::2]) != (E, D) or experts.gate_up_proj.shape[1] % 2:
        raise ValueError(
            f"{name}: experts.gate_up_proj has shape {tuple(experts.gate_up_proj.shape)}, expected [{E}, 2*hidden, {D}]"
        )
    hidden = experts.gate_up_proj.shape[1] // 2
    if tuple(experts.down_proj.shape) != (E, D, hidden):
        raise ValueError(
            f"{name}: experts.down_proj has shape {tuple(experts.down_proj.shape)}, expected [{E}, {D}, {hidden}]"
        )
    opts: dict[str, Any] = dict(dim=D, hidden_dim=hidden, num_experts=E, top_k=int(gate.top_k))
    if family == "mixtral":
        if getattr(block, "jitter_noise", 0) and block.jitter_noise > 0:
            raise ValueError(
                f"{name}: Mixtral router_jitter_noise={block.jitter_noise} is not reproduced by ReLibraMoE; set it to 0"
            )
        opts.update(score_func="softmax", norm_topk_prob=True)
    elif family in ("qwen3_moe", "olmoe", "qwen2_moe"):
        opts.update(score_func="softmax", norm_topk_prob=bool(gate.norm_topk_prob))
    elif family == "deepseek_v3":
        opts.update(
            score_func="sigmoid",
            norm_topk_prob=bool(gate.norm_topk_prob),
            route_scale=float(gate.routed_scaling_factor),
            num_expert_groups=int(gate.num_group),
            topk_groups=int(gate.topk_group),
            score_correction_bias=True,
        )
    else:
        raise ValueError(f"{name}: unknown MoE family {family!r}; known: {sorted(set(FAMILY_ROUTERS.values()))}")
    if family == "qwen2_moe":
        shared = block.shared_expert
        opts.update(shared_expert_hidden_dim=int(shared.gate_proj.weight.shape[0]), shared_expert_gate=True)
        _check_silu_mlp(shared, name + ".shared_expert")
    if family == "deepseek_v3":
        _check_silu_mlp(block.shared_experts, name + ".shared_experts")
    return opts


def _check_silu_mlp(mlp: nn.Module, name: str) -> None:
    act = getattr(mlp, "act_fn", None)
    if act is not None and type(act).__name__ not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"{name}: activation {type(act).__name__} is not silu")


def _build(block: nn.Module, family: str, name: str, mesh, extra: dict[str, Any]) -> nn.Module:
    opts = moe_options(block, family, name)
    ref = block.experts.gate_up_proj
    device = extra.pop("device", None)
    if device is None:
        device = ref.device if mesh is None else torch.device(mesh.device_type)
    cls = SharedExpertsMoE if family == "deepseek_v3" else ReLibraMoE
    dim, hidden, E, K = (opts.pop(k) for k in ("dim", "hidden_dim", "num_experts", "top_k"))
    layer = cls(dim, hidden, E, K, mesh, dtype=ref.dtype, device=device, **opts, **extra)
    if family == "deepseek_v3":
        layer.shared_experts = block.shared_experts  # the original module, names and weights as they were
    state = {k: v.detach() for k, v in block.state_dict().items()}
    missing, unexpected = layer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{name}: checkpoint names do not map 1:1 onto ReLibraMoE "
            f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )
    layer.train(block.training)
    layer.relibra_family = family
    return layer


def swap_moe_blocks(
    model: nn.Module,
    mesh=None,
    *,
    families: set[str] | None = None,
    on_swap: Callable[[str, nn.Module, nn.Module], None] | None = None,
    **opts: Any,
) -> list[str]:
    """Replace every sparse MoE block of ``model`` (in place) by an equivalent ReLibraMoE.

    Args:
        model: a transformers model (any module holding MoE blocks of a family in
            :data:`FAMILY_ROUTERS`).
        mesh: the expert-parallel DeviceMesh (``(node, gpu)``) or None for the single-process
            reference layer.
        families: only swap these families (default: all known).
        on_swap: called as ``on_swap(name, old_block, new_layer)`` after each swap.
        **opts: passed to every ReLibraMoE (e.g. ``spare_slots_per_gpu=1``).
    Returns:
        The qualified names of the swapped blocks, in module order (the Balancer's layer order).
    Raises:
        ValueError naming the block when a block cannot be reproduced exactly; nothing is
        swapped then (all blocks are built before any is installed).

    The swapped gates hand transformers their router logits when a forward asks for them
    (``output_router_logits=True``), so the aux loss is the unswapped model's
    (:mod:`relibra.integrations.router_logits`). With a ``mesh``, the expert parameters are
    sharded DTensors: wrap the model for data parallelism with
    :func:`relibra.integrations.ddp.wrap_ddp` (or FSDP2, :mod:`relibra.runtime.fsdp`), not with a
    bare ``DistributedDataParallel`` (which refuses it, saying so).
    """
    from .router_logits import record_router_logits

    blocks = [b for b in find_moe_blocks(model) if families is None or b[2] in families]
    built = [(name, old, _build(old, fam, name, mesh, dict(opts))) for name, old, fam in blocks]
    record_router_logits(model, [(name, old, new, fam) for (name, old, new), (_, _, fam) in zip(built, blocks)])
    for name, old, new in built:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        if on_swap is not None:
            on_swap(name, old, new)
    if mesh is not None:
        from .ddp import guard_bare_ddp

        guard_bare_ddp(model)
    return [name for name, _, _ in built]
