"""Planning rank to every rank: the plan (or the planner's failure), and the replicas worth their traffic.

Legend: M micro-batches, L MoE layers, E experts, V spare slots of the group, P physical slots.

Rank 0 of the expert-parallel group plans; :func:`share_plan` broadcasts the plan, or the
policy's error with its traceback, or the news that planning was interrupted (KeyboardInterrupt,
SystemExit: re-raised on rank 0, RuntimeError elsewhere), so every rank gets the same plan or
raises. :func:`drop_idle_replicas` empties the spare slots of micro-batch layers where replicas
buy too little to pay their weight copies; :func:`move_pays` says whether a new placement buys
enough to pay moving the experts.
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING

import torch

from ..plan import Placement, Plan
from ..topology import Topology
from .comm import all_gather_text, broadcast_

if TYPE_CHECKING:
    from ..sim.cost_config import CostConfig

__all__ = ["share_plan", "drop_idle_replicas", "move_pays", "failure_text"]

_PLANNED, _FAILED, _INTERRUPTED = 0, 1, 2  # what rank 0 tells the EP group after planning


def _with_note(text: str, note: str) -> str:
    """``text`` with ``note`` at the end of its first line (a traceback may follow)."""
    first, newline, rest = text.partition("\n")
    return f"{first} {note}{newline}{rest}"


def failure_text(what: str, exc: BaseException) -> str:
    """``what failed: Type: message`` and, below it, the exception's traceback (shared with every rank)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    return f"{what} failed: {type(exc).__name__}: {exc}\ntraceback on rank 0:\n{tb}"


def share_plan(plan: Plan | None, error: str, failure: BaseException | None, M: int, t_plan: float, *, group,
               rank: int, topology: Topology, num_layers: int, policy_name: str, what: str = "Balancer.plan_step"
               ) -> Plan:
    """Rank 0's plan of ``M`` micro-batches on every rank (collective over ``group``; None: one process);
    or its ``error`` raised on every rank.

    A policy's exception (``failure``, rank 0 only) travels as its text and traceback and is
    chained on rank 0; an interruption (KeyboardInterrupt, SystemExit) is announced to the
    other ranks, which raise RuntimeError, and re-raised as it was on rank 0.
    """
    t, L = topology, num_layers
    interrupted = failure is not None and not isinstance(failure, Exception)
    if group is None:
        if interrupted:
            raise failure
        if error:
            raise ValueError(f"{what}: {_with_note(error, '(nothing was changed)')}") from failure
        return plan
    sizes = (L * t.num_experts, M * L * t.num_spare_slots, M * L * t.num_physical_slots)
    head = torch.zeros(4, dtype=torch.int64)
    if rank == 0:
        head[0] = _INTERRUPTED if interrupted else _FAILED if error else _PLANNED
        head[1] = int(plan.intra_node_replicas) if plan is not None else 0
        head[2] = int(t_plan * 1e9)
    broadcast_(head, 0, group)
    if int(head[0]) != _PLANNED:
        text = all_gather_text(error if rank == 0 else "", group)[0]
        if int(head[0]) == _INTERRUPTED:
            if rank == 0:
                raise failure
            raise RuntimeError(f"{what}: {text}; stopping this rank too (nothing was changed on any rank)")
        raise ValueError(f"{what}: {_with_note(text, '(nothing was changed on any rank)')}") from failure
    body = torch.zeros(sum(sizes), dtype=torch.int64)
    if rank == 0:
        body = torch.cat([plan.placement.home_experts.reshape(-1), plan.spare_experts.reshape(-1),
                          plan.slot_tokens.reshape(-1)])
    broadcast_(body, 0, group)
    if rank == 0:
        return plan
    he, sp, st = torch.split(body, sizes)
    return Plan(t, Placement(he.view(L, t.num_experts).clone()), sp.view(M, L, t.num_spare_slots).clone(),
                st.view(M, L, t.num_physical_slots).clone(), bool(head[1]), policy_name)


def drop_idle_replicas(plan: Plan, loads_MLE: torch.Tensor, topology: Topology, min_gain: float) -> Plan:
    """``plan`` with the spare slots of (micro-batch, layer)s emptied where replicas lower the busiest
    GPU by less than ``min_gain`` (a fraction) against the same placement without replicas."""
    t = topology
    if min_gain <= 0 or t.spare_slots_per_gpu == 0:
        return plan
    base = Plan.without_replicas(plan.placement, loads_MLE, t)
    busiest, base_busiest = plan.gpu_loads().amax(-1), base.gpu_loads().amax(-1)
    idle = (plan.replicas() > 0) & (busiest.double() >= base_busiest.double() * (1 - min_gain))
    if not bool(idle.any()):
        return plan
    spare, tokens = plan.spare_experts.clone(), plan.slot_tokens.clone()
    spare[idle] = -1
    tokens[idle] = base.slot_tokens[idle]
    out = Plan(t, plan.placement, spare, tokens, plan.intra_node_replicas, plan.policy, dict(plan.info))
    out.info["replicas_dropped"] = int(plan.replicas()[idle].sum())
    out.validate(t, loads_MLE)
    return out


def move_pays(moved: Plan, stay: Plan, loads_MLE: torch.Tensor, min_gain: float,
              cost_model: "CostConfig | None" = None) -> bool:
    """Whether ``moved`` (a new placement) beats ``stay`` (the same loads' plan on the current
    placement) by at least ``min_gain`` (a fraction).

    Without ``cost_model``: the step's busiest GPUs, summed over its micro-batches and layers.
    Moving experts carries their weights and optimizer state; when the loads are already
    balanced on the current placement (uniform routes, or replicas that balance it) the move
    buys nothing and costs a migration. With ``cost_model``
    (:class:`~relibra.sim.cost_config.CostConfig` of this model and machine): the modelled step
    times, the move's migration from ``stay``'s placement included, so a move is made where
    the machine's links make it pay."""
    if cost_model is None:
        moved_busiest = float(moved.gpu_loads(loads_MLE).amax(-1).double().sum())
        stay_busiest = float(stay.gpu_loads(loads_MLE).amax(-1).double().sum())
        return moved_busiest < stay_busiest * (1.0 - min_gain)
    from ..sim.cost import step_cost  # the model prices only here: the runtime does not need it otherwise

    moved_s = step_cost(moved, loads_MLE, cost_model, previous=stay.placement).total_s
    stay_s = step_cost(stay, loads_MLE, cost_model, previous=stay.placement).total_s
    return moved_s < stay_s * (1.0 - min_gain)
