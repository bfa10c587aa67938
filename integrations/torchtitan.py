"""torchtitan (0.3.x) MoE models on relibra: swap ``MoE`` modules for ReLibraMoE, convert checkpoints.

Legend: E experts, D model dim, F expert hidden dim, K top-k.

torchtitan's ``torchtitan.models.common.moe.MoE`` and its ReLibraMoE counterpart, name by name
(``p`` is the module's prefix, e.g. ``layers.3.moe``)::

    torchtitan                                      relibra (ReLibraMoE)
    p.router.gate.weight              [E, D]        p.gate.weight              [E, D]
    p.expert_bias_E                   [E]           p.gate.e_score_correction_bias [E]   (when kept)
    p.routed_experts.inner_experts.w1_EFD [E, F, D] \\
    p.routed_experts.inner_experts.w3_EFD [E, F, D]  > p.experts.gate_up_proj  [E, 2F, D] = cat(w1, w3)
    p.routed_experts.inner_experts.w2_EDF [E, D, F]   p.experts.down_proj     [E, D, F]
    p.shared_experts.*  (FeedForward w1/w2/w3)      p.shared_experts.*  (the same module)

Routing maps one to one: ``score_func`` (softmax / sigmoid), ``route_norm`` ->
``norm_topk_prob``, ``route_scale``, node-limited groups (``num_expert_groups`` /
``num_limited_groups`` -> ``num_expert_groups`` / ``topk_groups``), and the expert bias (used for
the choice only, as torchtitan does). :func:`to_relibra_state_dict` and
:func:`to_torchtitan_state_dict` convert whole state dicts (torchtitan checkpoints load into a
swapped model after the first, and go back with the second; exact, no arithmetic).

Two differences to know:

- torchtitan's ``GroupedExperts`` computes the experts in bf16 whatever the parameter dtype
  (``x.bfloat16()`` and ``w.bfloat16()`` into ``torch._grouped_mm``); ReLibraMoE computes in the
  parameter dtype. An fp32 model swapped therefore agrees with torchtitan to bf16 precision,
  not bit for bit (the routing itself agrees exactly).
- torchtitan's auxiliary-loss-free balancing (``load_balance_coeff``: an optimizer pre-hook
  nudges ``expert_bias_E`` from ``tokens_per_expert_E``) is not carried over: ReLibraMoE keeps the
  bias fixed. With replayed routes (R3) the bias has no effect at all (the recorded routes decide
  the experts, the weights come from the unbiased scores). A model built with it is refused
  unless ``freeze_expert_bias=True``; the swapped layers report ``load_balance_coeff = None`` so
  torchtitan's optimizer hook leaves them alone.

After the swap the model is a relibra model: :class:`relibra.integrations.replay.RouteRecorder`
records its routes, :class:`relibra.Balancer` finds its layers in ``model.modules()`` order (the
``layers`` order of the decoder) and replays the routes given to ``plan_step``.

    model = model_config.build(); model.init_states()     # torchtitan Decoder with MoE layers
    swap_moe_modules(model, mesh)                         # before parallelize / the optimizer
    balancer = relibra.Balancer(model, mesh=mesh, optimizer=optimizer)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["find_moe_modules", "moe_options", "swap_moe_modules", "to_relibra_state_dict",
           "to_torchtitan_state_dict", "SUPPORTED"]

SUPPORTED = "torchtitan 0.3 (torchtitan.models.common.moe.MoE)"

_W1, _W2, _W3 = ("routed_experts.inner_experts.w1_EFD", "routed_experts.inner_experts.w2_EDF",
                 "routed_experts.inner_experts.w3_EFD")


def _moe_class() -> type:
    """torchtitan's MoE class; ValueError naming what is missing when torchtitan is not 0.3.x."""
    try:
        from torchtitan.models.common.moe import MoE
    except ImportError as exc:
        raise ValueError(f"relibra.integrations.torchtitan needs {SUPPORTED}: {exc}") from None
    return MoE


def find_moe_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, MoE module)`` of every torchtitan MoE in ``model``, in module order."""
    MoE = _moe_class()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def moe_options(moe: nn.Module, name: str = "moe", freeze_expert_bias: bool = False) -> dict[str, Any]:
    """ReLibraMoE constructor arguments reproducing torchtitan MoE ``moe`` (positional ones included).

    Raises ValueError naming ``name`` for what ReLibraMoE does not compute: a router gate with a
    bias, debug round-robin routing, expert weights of unexpected shapes, or bias updates
    (``load_balance_coeff``) without ``freeze_expert_bias``.
    """
    router, inner = moe.router, moe.routed_experts.inner_experts
    gate = router.gate
    if getattr(gate, "bias", None) is not None:
        raise ValueError(f"{name}: the router gate has a bias; ReLibraMoE's router is a plain [E, D] projection")
    if getattr(router, "_debug_force_load_balance", False):
        raise ValueError(f"{name}: _debug_force_load_balance routing is not reproduced by ReLibraMoE")
    E, D = gate.weight.shape
    w1, w2, w3 = inner.w1_EFD, inner.w2_EDF, inner.w3_EFD
    F = w1.shape[1]
    for label, w, want in (("w1_EFD", w1, (E, F, D)), ("w3_EFD", w3, (E, F, D)), ("w2_EDF", w2, (E, D, F))):
        if tuple(w.shape) != want:
            raise ValueError(f"{name}: routed_experts.inner_experts.{label} has shape {tuple(w.shape)}, "
                             f"expected {list(want)}")
    if moe.load_balance_coeff is not None and not freeze_expert_bias:
        raise ValueError(
            f"{name}: load_balance_coeff={moe.load_balance_coeff} (torchtitan updates expert_bias_E from the "
            "token counts before every optimizer step); ReLibraMoE keeps the bias fixed. Pass "
            "freeze_expert_bias=True to accept that (with replayed routes the bias has no effect), or build "
            "the model with load_balance_coeff=None")
    groups = router.num_expert_groups
    opts: dict[str, Any] = dict(dim=D, hidden_dim=F, num_experts=E, top_k=int(router.top_k),
                                score_func=router.score_func, norm_topk_prob=bool(router.route_norm),
                                route_scale=float(router.route_scale),
                                score_correction_bias=moe.expert_bias_E is not None)
    if groups is not None:
        opts.update(num_expert_groups=int(groups), topk_groups=int(router.num_limited_groups))
    return opts


def _moe_prefixes(state_dict: dict[str, Any], suffix: str) -> list[str]:
    return [k[: -len(suffix)] for k in state_dict if k.endswith(suffix)]


def to_relibra_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A torchtitan state dict with every MoE's names and tensors as a swapped model holds them.

    Keys of other modules pass unchanged; ``tokens_per_expert_E`` (a counter) is dropped.
    """
    out = dict(state_dict)
    for p in _moe_prefixes(state_dict, _W1):
        w1, w2, w3 = (out.pop(p + k) for k in (_W1, _W2, _W3))
        out[p + "experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        out[p + "experts.down_proj"] = w2
        out[p + "gate.weight"] = out.pop(p + "router.gate.weight")
        if p + "expert_bias_E" in out:
            out[p + "gate.e_score_correction_bias"] = out.pop(p + "expert_bias_E")
        out.pop(p + "tokens_per_expert_E", None)
    return out


def to_torchtitan_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`to_relibra_state_dict` (every MoE back under torchtitan's names)."""
    out = dict(state_dict)
    for p in _moe_prefixes(state_dict, "experts.gate_up_proj"):
        if p + "gate.weight" not in out:
            continue
        gate_up = out.pop(p + "experts.gate_up_proj")
        w1, w3 = gate_up.chunk(2, dim=1)
        out[p + _W1], out[p + _W3] = w1.contiguous(), w3.contiguous()
        out[p + _W2] = out.pop(p + "experts.down_proj")
        out[p + "router.gate.weight"] = out.pop(p + "gate.weight")
        if p + "gate.e_score_correction_bias" in out:
            out[p + "expert_bias_E"] = out.pop(p + "gate.e_score_correction_bias")
    return out


def _build(moe: nn.Module, name: str, mesh, freeze_expert_bias: bool, extra: dict[str, Any]) -> nn.Module:
    from relibra.runtime.layer import ReLibraMoE

    from .shared_experts import SharedExpertsMoE

    opts = moe_options(moe, name, freeze_expert_bias)
    ref = moe.routed_experts.inner_experts.w1_EFD
    device = extra.pop("device", None)
    if device is None:
        device = ref.device if mesh is None else torch.device(mesh.device_type)
    cls = SharedExpertsMoE if moe.shared_experts is not None else ReLibraMoE
    dim, hidden, E, K = (opts.pop(k) for k in ("dim", "hidden_dim", "num_experts", "top_k"))
    layer = cls(dim, hidden, E, K, mesh, dtype=ref.dtype, device=device, **opts, **extra)
    if moe.shared_experts is not None:
        layer.shared_experts = moe.shared_experts  # the original module, names and weights as they were
    state = to_relibra_state_dict({k: v.detach() for k, v in moe.state_dict().items()})
    missing, unexpected = layer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{name}: torchtitan names do not map 1:1 onto ReLibraMoE "
                         f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
    layer.train(moe.training)
    layer.load_balance_coeff = None  # torchtitan's bias-update hook reads it: nothing to update here
    return layer


def swap_moe_modules(model: nn.Module, mesh=None, *, freeze_expert_bias: bool = False, **opts: Any) -> list[str]:
    """Replace every torchtitan MoE of ``model`` (in place) by the equivalent ReLibraMoE.

    Args:
        model: a torchtitan model (e.g. a ``Decoder`` whose blocks have ``moe``), before
            ``parallelize`` and before the optimizer is built.
        mesh: the expert-parallel DeviceMesh (``(node, gpu)``) or None for the single-process layer.
        freeze_expert_bias: accept MoEs built with ``load_balance_coeff`` (the bias stays fixed).
        **opts: passed to every ReLibraMoE (e.g. ``spare_slots_per_gpu=1``).
    Returns:
        The qualified names of the swapped modules, in module order (the Balancer's layer order).
    Raises:
        ValueError naming the module when one cannot be reproduced (see :func:`moe_options`);
        nothing is swapped then (every layer is built before any is installed).
    """
    built = [(name, _build(moe, name, mesh, freeze_expert_bias, dict(opts))) for name, moe in find_moe_modules(model)]
    if not built:
        raise ValueError(f"{type(model).__name__} holds no torchtitan MoE module ({SUPPORTED})")
    for name, layer in built:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    if mesh is not None:
        from .ddp import guard_bare_ddp

        guard_bare_ddp(model)
    return [name for name, _ in built]
