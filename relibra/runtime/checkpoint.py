"""Checkpoints that survive any placement: model, optimizer and Balancer in logical expert order.

Legend: L MoE layers, E experts, G ranks of the expert-parallel (EP) group, H = E/G home slots
per rank.

Reorder keeps every expert's weights and optimizer state in its home slot, so the rows of an
expert tensor (``experts.gate_up_proj``, its AdamW ``exp_avg``, ...) follow the placement, not
the expert id. ``ReLibraMoE.state_dict()`` already writes weights in logical order; this module
does the same for the optimizer's per-expert state and adds the Balancer's state, so a
checkpoint saved under one placement and world loads into any other::

    state = get_state(model, optimizer, balancer)             # collective; every tensor whole
    {"model":     get_model_state_dict(model),                # experts [E, ...], logical order
     "optimizer": {"state": {fqn: {"step": 0-dim, "exp_avg": [E, ...] logical, ...}},
                   "param_groups": [{..., "params": [fqn, ...]}]},   # torch's FQN-keyed form
     "balancer":  balancer.state_dict()}                      # placement, policy state, steps
    set_state(model, optimizer, balancer, state)              # checks, then loads everything

``get_state(..., full=False)`` is the form for ``torch.distributed.checkpoint`` (DCP): every
expert's optimizer state is a DTensor with its parameter's mesh and placements whose rows are in
logical order (rank r holds experts ``r*H .. r*H+H-1``; an all-to-all builds it), so DCP writes
shards and reshards them on load into any world or a single process; the Balancer's state is
one serialized blob (``bytes``, read back with ``weights_only=True``) because DCP matches
nested keys against the loading side's state, whose policy state may differ. Load DCP
checkpoints with :class:`SafeLoadPlanner` (DCP's default unpickles non-tensor entries).

Limits: experts are gathered whole on every rank by ``model.state_dict()`` (ReLibraMoE's
logical order); models wrapped with ``apply_fsdp`` save (both forms) but :func:`set_state`
refuses to load into them (their checkpoints load into models without FSDP); only optimizer
state shaped like its parameter (AdamW, SGD momentum, ...) is reordered.
"""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..plan import Placement
from ..topology import Topology
from .checkpoint_checks import (
    EXPERT_PARAMS,
    decode_state,
    encode_state,
    expert_param_names,
    is_dtensor,
    per_expert,
    state_fault,
)
from .comm import broadcast_, first_error
from .layer import ReLibraMoE
from .migration import migrate_experts

__all__ = ["get_state", "set_state", "SafeLoadPlanner", "restored_placement", "planner_policy_state", "agree_fault"]


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor entries are read with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if not self.flatten_state_dict:
            self.state_dict[read_item.dest_index.fqn] = obj
            return
        *parents, last = self.mappings[read_item.dest_index.fqn]  # the entry's path in the nested state
        container = self.original_state_dict
        for key in parents:
            container = container[key]
        container[last] = obj


# ---------------------------------------------------------------------------------- public API
def get_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, balancer, *, full: bool = True) -> dict:
    """The checkpoint state of ``model``, ``optimizer`` and ``balancer`` in logical expert order.

    Collective over the balancer's EP (and EDP) group: call it on every rank. ``full=True``:
    plain tensors, the same on every rank (save rank 0's with ``torch.save``). ``full=False``:
    the DCP form (see the module doc), for ``dcp.save``, or as the state ``dcp.load`` fills
    before :func:`set_state`. Every tensor is a copy: ``dcp.load`` writing into the state
    changes nothing live, only :func:`set_state` does. A fresh optimizer gets zero state first
    (torch's ``get_optimizer_state_dict`` does that). ``optimizer`` must be the balancer's.
    """
    _check_objects(model, optimizer, balancer)
    balancer.complete_migration()  # the optimizer state of the last move, if still in flight
    options = StateDictOptions(full_state_dict=full)
    state: dict[str, Any] = {"model": _copied(get_model_state_dict(model, options=options))}
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer, options=options)
        logical = _reorder_optimizer_state(osd, expert_param_names(optimizer, balancer, osd), balancer,
                                           to_logical=True, placement=balancer.placement)
        state["optimizer"] = _copied(logical)
    bal = balancer.state_dict()
    state["balancer"] = bal if full else encode_state(bal)
    return state


def set_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, balancer, state: dict, *,
              strict: bool = True) -> None:
    """Load :func:`get_state`'s output (either form) into ``model``, ``optimizer`` and ``balancer``.

    Collective over the balancer's EP (and EDP) group. Everything is checked first on every
    rank (top-level keys; model keys and shapes; optimizer parameter names, groups and
    per-expert shapes; the Balancer's state, see :meth:`relibra.Balancer.load_state_dict`), the
    verdict agreed, and a fault raises the same ValueError naming the key on every rank with
    nothing changed. Then the optimizer's per-expert state is put in the order of the placement
    the Balancer will have (the saved one on the same topology, else the current one), the
    Balancer loads (moving experts), the model loads (``load_state_dict(strict=strict)``), and
    the optimizer. ``strict=False`` allows missing or unexpected model keys, a checkpoint with
    an optimizer when ``optimizer`` is None, and another policy (which then starts fresh).
    """
    _check_objects(model, optimizer, balancer)
    balancer.complete_migration()
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(layer, FSDPModule) for layer in balancer.layers):  # the same on every rank
        raise ValueError("set_state: the MoE layers are wrapped with fully_shard (apply_fsdp), and ReLibraMoE's "
                         "load_state_dict takes whole experts, not FSDP shards; loading into FSDP2 models is not "
                         "supported (their checkpoints load into models without FSDP)")
    fresh_optimizer = optimizer is not None and not optimizer.state
    template = None if optimizer is None else get_optimizer_state_dict(model, optimizer)
    fault = state_fault(model, optimizer, balancer, state, template, strict)
    try:
        agree_fault(balancer, fault, "set_state")
    except ValueError:
        if fresh_optimizer:  # the template gave it zero state; leave it as it was
            optimizer.state.clear()
        raise
    bal = state["balancer"] if isinstance(state["balancer"], dict) else decode_state(state["balancer"])
    osd = None
    if optimizer is not None:  # named as this optimizer names its parameters (the template)
        target = restored_placement(balancer, bal) or balancer.placement
        osd = _reorder_optimizer_state(state["optimizer"], expert_param_names(optimizer, balancer, template), balancer,
                                       to_logical=False, placement=target)
    balancer.load_state_dict(bal, strict=strict)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=strict))
    if osd is not None:
        set_optimizer_state_dict(model, optimizer, osd)


# ---------------------------------------------------------------------------------- the Balancer
def planner_policy_state(balancer) -> dict:
    """The policy's ``state_dict()`` as the planning rank holds it, on every rank.

    Only EP rank 0 of EDP replica 0 runs ``policy.plan``, so only its policy state moved on; it
    is broadcast (collective over the EP and EDP groups). ``{}`` for a policy without
    ``state_dict``. Raises ValueError on every rank if the state is not plain data.
    """
    save = getattr(balancer.policy, "state_dict", None)
    try:
        payload = encode_state(save() if callable(save) else {})
    except Exception:  # noqa: BLE001 - told to every rank below as an empty payload
        payload = b""
    if balancer.edp_group is not None and balancer.rank == 0:
        payload = _broadcast_bytes(payload, balancer.edp_group)
    if balancer.group is not None:
        payload = _broadcast_bytes(payload, balancer.group)
    what = f"policy {balancer.policy_name!r}: its state_dict() on the planning rank"
    if not payload:
        raise ValueError(f"{what} could not be serialized with torch.save")
    try:
        return decode_state(payload)
    except Exception as exc:  # noqa: BLE001 - the same bytes, the same error, on every rank
        raise ValueError(f"{what} is not plain data (tensors, numbers, strings, lists, dicts): "
                         f"{type(exc).__name__}: {exc}") from None


def restored_placement(balancer, state: dict) -> Placement | None:
    """The placement ``balancer.load_state_dict(state)`` moves the experts to: the saved one when
    the checkpoint's topology has this one's nodes and GPUs per node, else None (kept)."""
    saved = Topology(**state["topology"])
    t = balancer.topology
    if (saved.num_nodes, saved.gpus_per_node) != (t.num_nodes, t.gpus_per_node):
        return None
    return Placement(state["placement"].detach().cpu().clone())


def agree_fault(balancer, fault: str, what: str) -> None:
    """Raise the same ValueError on every rank of the balancer's EP and EDP groups if any rank
    has a ``fault`` (one small all-reduce per group when none has)."""
    if balancer.edp_group is not None:  # every replica must reach the same verdict
        found = first_error(fault, balancer.edp_group)
        fault = fault or ("" if found is None else f"expert-data-parallel replica {found[0]}: {found[1]}")
    if balancer.group is None:
        if fault:
            raise ValueError(f"{what}: {fault} (nothing was changed)")
        return
    found = first_error(fault, balancer.group)
    if found is not None:
        raise ValueError(f"{what}: rank {found[0]}: {found[1]} (nothing was changed on any rank)")


# ---------------------------------------------------------------------------------- the objects
def _check_objects(model: nn.Module, optimizer, balancer) -> None:
    """The three objects belong together (the same on every rank, so raised right away)."""
    layers = [m for m in model.modules() if isinstance(m, ReLibraMoE)]
    if len(layers) != len(balancer.layers) or any(a is not b for a, b in zip(layers, balancer.layers)):
        raise ValueError("the Balancer was built for another model (its MoE layers are not this model's)")
    if optimizer is not balancer.optimizer:
        raise ValueError("the optimizer is not the Balancer's (Balancer(..., optimizer=)): reorders did not move "
                         "its per-expert state, so its rows are not in any known order")


# ---------------------------------------------------------------------------------- reordering
def _reorder_optimizer_state(osd: dict, experts: dict[str, nn.Parameter], balancer, *, to_logical: bool,
                             placement: Placement) -> dict:
    """``osd`` with the per-expert state of every parameter in ``experts`` (name -> parameter)
    taken from ``placement``'s slot order to logical order (``to_logical``) or back; ``osd``
    itself is not changed (torch's optimizer state dict holds the optimizer's live
    per-parameter dicts). Plain tensors ``[E, ...]`` are indexed; DTensors are sharded
    logical-order state (rank r: experts ``r*H ..``), moved by an all-to-all
    (:func:`migrate_experts` between ``placement`` and the contiguous placement)."""
    osd = {**osd, "state": {fqn: dict(entry) for fqn, entry in osd["state"].items()}}
    layer_of = {id(getattr(layer.experts, n)): l for l, layer in enumerate(balancer.layers) for n in EXPERT_PARAMS}
    sharded: list[tuple[dict, str, nn.Parameter, int, int]] = []  # (entry, key, param, layer, index)
    per_layer: list[list[torch.Tensor]] = [[] for _ in balancer.layers]  # local rows, moved in place
    for fqn, param in experts.items():
        entry = osd["state"].get(fqn, {})
        home_E = placement.home_experts[layer_of[id(param)]]
        for key, value in list(entry.items()):
            if not per_expert(value):
                continue
            if tuple(value.shape) != tuple(param.shape):  # the same on every rank, before any collective
                raise ValueError(f"optimizer state '{fqn}.{key}' has shape {tuple(value.shape)}, its parameter "
                                 f"{tuple(param.shape)}: only per-expert state shaped like its parameter can be "
                                 f"put in logical expert order")
            if is_dtensor(value):
                rows = per_layer[layer_of[id(param)]]
                sharded.append((entry, key, param, layer_of[id(param)], len(rows)))
                rows.append(value.to_local().detach().clone())
            elif to_logical:
                logical = torch.empty_like(value)
                logical[home_E.to(value.device)] = value
                entry[key] = logical
            elif is_dtensor(param):  # a whole logical tensor for a sharded parameter
                from torch.distributed.tensor import distribute_tensor

                entry[key] = distribute_tensor(value[home_E.to(value.device)], param.device_mesh, param.placements,
                                               src_data_rank=None)
            else:
                entry[key] = value[home_E.to(value.device)]
    if not sharded:
        return osd
    from torch.distributed.tensor import DTensor

    contiguous = Placement.contiguous(balancer.topology, balancer.L)
    old, new = (placement, contiguous) if to_logical else (contiguous, placement)
    migrate_experts(per_layer, None, old, new, balancer.topology, group=balancer.group,
                    agree_group=balancer.edp_group)
    for entry, key, param, layer, index in sharded:
        entry[key] = DTensor.from_local(per_layer[layer][index], param.device_mesh, param.placements,
                                        shape=param.shape, stride=param.stride())
    return osd


# ---------------------------------------------------------------------------------- helpers
def _copied(obj: Any) -> Any:
    """``obj`` (nested dicts, lists, tuples) with every tensor cloned."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copied(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copied(v) for v in obj)
    return obj


def _broadcast_bytes(payload: bytes, group) -> bytes:
    """Group rank 0's ``payload`` on every rank of ``group`` (two broadcasts, no pickle)."""
    size = torch.tensor([len(payload)], dtype=torch.int64)
    broadcast_(size, 0, group)
    buf = torch.zeros(int(size), dtype=torch.uint8)
    if int(size):
        if dist.get_rank(group) == 0:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        broadcast_(buf, 0, group)
    return buf.numpy().tobytes()
