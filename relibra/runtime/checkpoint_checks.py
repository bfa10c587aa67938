"""What a checkpoint load checks before it changes anything (:mod:`relibra.runtime.checkpoint`).

Every function here computes a fault as text ("" when all is well) without communicating, so
the callers can agree on it across ranks and raise the same ValueError everywhere. Each names
the key at fault: ``model key 'moe1.experts.gate_up_proj'``, ``optimizer state key ...``,
``balancer state key 'placement'``.

Legend: L MoE layers, E experts.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from ..plan import Placement
from ..topology import Topology

__all__ = ["BALANCER_KEYS", "EXPERT_PARAMS", "state_fault", "balancer_state_fault", "expert_param_names",
           "per_expert", "is_dtensor", "encode_state", "decode_state"]

#: keys of ``Balancer.state_dict()`` (version 1)
BALANCER_KEYS = ("version", "policy", "policy_state", "placement", "topology", "layers", "top_k", "steps_planned")
#: the per-expert parameters of every ReLibraMoE layer's ``experts``
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def state_fault(model, optimizer, balancer, state: Any, template: dict | None, strict: bool) -> str:
    """Why ``state`` cannot be loaded ("" if it can); no communication besides the model's
    state dict (which every rank builds, fault or not)."""
    expected_model = get_model_state_dict(model)
    if not isinstance(state, dict):
        return f"a checkpoint state must be a dict with 'model', 'optimizer', 'balancer', got {type(state).__name__}"
    needed = ["model", "balancer"] + (["optimizer"] if optimizer is not None else [])
    for key in needed:
        if key not in state:
            return f"key {key!r} is missing from the checkpoint"
    for key in state:
        if key not in needed and (strict or key != "optimizer"):
            return f"key {key!r} of the checkpoint is unexpected" + (
                " (no optimizer was given; strict=False ignores it)" if key == "optimizer" else "")
    fault = _model_fault(expected_model, state["model"], strict)
    if not fault and optimizer is not None:
        fault = _optimizer_fault(template, state["optimizer"], expert_param_names(optimizer, balancer, template))
    if fault:
        return fault
    bal = state["balancer"]
    if isinstance(bal, bytes):
        try:
            bal = decode_state(bal)
        except Exception as exc:  # noqa: BLE001 - reported as the fault
            return f"key 'balancer' holds bytes that are not a balancer state: {type(exc).__name__}: {exc}"
    return balancer_state_fault(balancer, bal, strict)


def _model_fault(expected: dict, saved: Any, strict: bool) -> str:
    if not isinstance(saved, dict):
        return f"key 'model' must be a model state_dict (a dict), got {type(saved).__name__}"
    for key, value in expected.items():
        if key not in saved:
            if strict:
                return f"model key {key!r} is missing from the checkpoint"
            continue
        got = saved[key]
        if isinstance(value, torch.Tensor):
            if not isinstance(got, torch.Tensor):
                return f"model key {key!r} is a {type(got).__name__} in the checkpoint, not a tensor"
            if tuple(got.shape) != tuple(value.shape):
                return (f"model key {key!r} has shape {tuple(got.shape)} in the checkpoint, {tuple(value.shape)} "
                        f"in this model")
    if strict:
        for key in saved:
            if key not in expected:
                return f"model key {key!r} of the checkpoint is not in this model (a checkpoint from another model?)"
    return ""


def _optimizer_fault(template: dict, saved: Any, experts: dict[str, nn.Parameter]) -> str:
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        return "key 'optimizer' must be an optimizer state dict by parameter name ({'state', 'param_groups'})"
    groups, want = saved["param_groups"], template["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(want):
        n = len(groups) if isinstance(groups, list) else type(groups).__name__
        return f"optimizer key 'param_groups': the checkpoint has {n} groups, this optimizer {len(want)}"
    for i, (group, mine) in enumerate(zip(groups, want)):
        names = group.get("params") if isinstance(group, dict) else None
        if not isinstance(names, list):
            return f"optimizer key 'param_groups'[{i}] has no list of parameter names"
        extra = [n for n in names if n not in mine["params"]]
        missing = [n for n in mine["params"] if n not in names]
        if extra or missing:
            return (f"optimizer key 'param_groups'[{i}]: parameter {extra[0]!r} of the checkpoint is not in this "
                    f"optimizer" if extra else f"optimizer key 'param_groups'[{i}]: this optimizer's parameter "
                    f"{missing[0]!r} is not in the checkpoint")
    if not isinstance(saved["state"], dict):
        return f"optimizer key 'state' must be a dict by parameter name, got {type(saved['state']).__name__}"
    for fqn, entry in saved["state"].items():
        if fqn not in template["state"]:
            return f"optimizer state key {fqn!r} is not a parameter of this optimizer"
        if not isinstance(entry, dict):
            return f"optimizer state key {fqn!r} must be a dict of state tensors, got {type(entry).__name__}"
        param = experts.get(fqn)
        for key, value in entry.items() if param is not None else ():
            if not per_expert(value):
                continue
            if tuple(value.shape) != tuple(param.shape):
                return (f"optimizer state key '{fqn}.{key}' has shape {tuple(value.shape)}, its parameter "
                        f"{tuple(param.shape)}: only per-expert state shaped like its parameter can be reordered")
            if is_dtensor(value) and (not is_dtensor(param) or value.device_mesh != param.device_mesh
                                       or tuple(value.placements) != tuple(param.placements)):
                return (f"optimizer state key '{fqn}.{key}' is a DTensor with another mesh or placements than its "
                        f"parameter: load DCP checkpoints into get_state(..., full=False) of these objects")
    return ""


def balancer_state_fault(balancer, state: Any, strict: bool) -> str:
    """Why ``state`` cannot be loaded into ``balancer`` ("" if it can). No communication."""
    try:
        return _balancer_fault(balancer, state, strict)
    except Exception as exc:  # noqa: BLE001 - any local fault must reach every rank as text
        return f"balancer state: {type(exc).__name__}: {exc}"


def _balancer_fault(balancer, state: Any, strict: bool) -> str:
    if not isinstance(state, dict):
        return f"the balancer state must be a dict, got {type(state).__name__}"
    for key in BALANCER_KEYS:
        if key not in state:
            return f"balancer state key {key!r} is missing"
    for key in state:
        if key not in BALANCER_KEYS:
            return f"balancer state key {key!r} is unexpected"
    if state["version"] != 1:
        return f"balancer state key 'version' is {state['version']!r}; this relibra reads version 1"
    names, layers = balancer.layer_names, state["layers"]
    if not isinstance(layers, list) or len(layers) != len(names):
        return (f"balancer state key 'layers': the checkpoint has MoE layers {layers!r}, this model "
                f"{len(names)} ({names})")
    for i, (a, b) in enumerate(zip(layers, names)):
        if a != b:
            return (f"balancer state key 'layers': MoE layer {i} is {a!r} in the checkpoint, {b!r} in this "
                    f"model (a checkpoint from another model?)")
    if state["top_k"] != balancer.K:
        return f"balancer state key 'top_k' is {state['top_k']!r}, this model routes to {balancer.K} experts"
    try:
        if not isinstance(state["topology"], dict):
            raise ValueError("must be a dict of Topology fields")
        saved = Topology(**state["topology"])
    except (TypeError, ValueError) as exc:
        return f"balancer state key 'topology': {exc}"
    if saved.num_experts != balancer.E:
        return f"balancer state key 'topology' has {saved.num_experts} experts per layer, this model {balancer.E}"
    home = state["placement"]
    if not isinstance(home, torch.Tensor) or home.dim() != 2 or home.shape[0] != balancer.L:
        got = tuple(home.shape) if isinstance(home, torch.Tensor) else type(home).__name__
        return f"balancer state key 'placement' must be [{balancer.L}, {balancer.E}] (layers, experts), got {got}"
    try:
        Placement(home.detach().cpu()).validate(saved)
    except ValueError as exc:
        return f"balancer state key 'placement': {exc}"
    steps = state["steps_planned"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        return f"balancer state key 'steps_planned' must be an int >= 0, got {steps!r}"
    return _policy_fault(balancer, state["policy"], state["policy_state"], strict)


def _policy_fault(balancer, policy: Any, policy_state: Any, strict: bool) -> str:
    """Whether this Balancer's policy can take the saved policy state (tried on a copy)."""
    if not isinstance(policy_state, dict):
        return f"balancer state key 'policy_state' must be a dict, got {type(policy_state).__name__}"
    if policy != balancer.policy_name:
        return (f"balancer state key 'policy': the checkpoint was saved by policy {policy!r}, this Balancer "
                f"runs {balancer.policy_name!r} (load with strict=False to start it fresh)") if strict else ""
    if not hasattr(balancer.policy, "load_state_dict"):
        return (f"balancer state key 'policy_state': policy {policy!r} has no load_state_dict() for its "
                f"saved state") if (strict and policy_state) else ""
    try:
        copy.deepcopy(balancer.policy).load_state_dict(policy_state)
    except Exception as exc:  # noqa: BLE001 - reported as the fault
        return f"balancer state key 'policy_state': {exc if isinstance(exc, ValueError) else repr(exc)}"
    return ""


def expert_param_names(optimizer, balancer, osd: dict) -> dict[str, nn.Parameter]:
    """Name -> parameter of every expert weight the optimizer holds, named as in ``osd`` (torch's
    FQN-keyed optimizer state dict lists each group's names in its parameters' order)."""
    experts = {id(getattr(layer.experts, n)) for layer in balancer.layers for n in EXPERT_PARAMS}
    out = {}
    for group, names in zip(optimizer.param_groups, (g["params"] for g in osd["param_groups"])):
        for p, fqn in zip(group["params"], names):
            if id(p) in experts:
                out[fqn] = p
    return out


def per_expert(value: Any) -> bool:
    """A state tensor with one row per expert (not AdamW's 0-dim ``step``)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0


def is_dtensor(t: Any) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def encode_state(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def decode_state(payload: bytes) -> Any:
    return torch.load(io.BytesIO(payload), weights_only=True)
