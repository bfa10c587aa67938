"""The Balancer's per-step metrics: what it planned, what it moved, what the dispatch computed.

Legend: M micro-batches of the step (every pass's, in schedule order), L MoE layers, G ranks of
the expert-parallel group.

:func:`planned_metrics` is recorded by ``plan_step`` (and completed when a step's placement is
planned in the background, :meth:`relibra.Balancer.prepare_training`); :func:`realised_metrics`
is gathered on request by ``Balancer.metrics(gather_realised=True)``; :func:`plain` turns the
tables into nested lists a logger takes as they are. Balance per micro-batch and layer is
reported three ways over the GPUs: ``imbalance`` (max / mean), ``max_vio`` ((max - mean) /
mean, verl's) and ``balancedness`` (mean / max, vLLM's); :mod:`relibra.balance_metrics`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..balance_metrics import balancedness, max_vio
from ..plan import Placement, Plan
from ..topology import Topology

__all__ = ["planned_metrics", "realised_metrics", "plain"]


def _balance(gpu_loads_MLG: torch.Tensor, prefix: str) -> dict[str, Any]:
    """``{prefix}max_vio`` / ``{prefix}balancedness`` ``[M, L]`` tables and their means."""
    vio, bal = max_vio(gpu_loads_MLG), balancedness(gpu_loads_MLG)
    return {f"{prefix}max_vio": vio, f"{prefix}max_vio_mean": float(vio.mean()) if vio.numel() else 0.0,
            f"{prefix}balancedness": bal, f"{prefix}balancedness_mean": float(bal.mean()) if bal.numel() else 1.0}


def planned_metrics(policy: str, parts: list[tuple[Plan, torch.Tensor]], topology: Topology, migration: Any,
                    bytes_per_expert: int, planning_seconds: float, plan_step_seconds: float,
                    passes: list[tuple[str, int]]) -> dict[str, Any]:
    """What was planned for the step: ``parts`` are ``(plan, its loads [M_i, L, E])`` of the planned
    passes in schedule order (a step's passes may run on two placements: the one before the
    move and the step's own); ``passes`` their ``(phase, micro-batches)``, so the rows of the
    tables are theirs in turn. ``migration`` is the report of the experts' move (None: nothing
    moved)."""
    loads = torch.cat([loads_MLE for _, loads_MLE in parts])
    static = Plan.without_replicas(Placement.contiguous(topology, loads.shape[1]), loads, topology)
    planned = torch.cat([plan.gpu_loads() for plan, _ in parts])
    imbalance = torch.cat([plan.imbalance() for plan, _ in parts])
    return {
        "policy": policy,
        "pass_phases": [name for name, _ in passes],
        "pass_micro_batches": [M for _, M in passes],
        "planned_gpu_loads": planned,  # [M, L, G]
        "planned_imbalance": float(imbalance.mean()),
        "planned_imbalance_max": float(imbalance.max()),
        **_balance(planned, "planned_"),
        "static_imbalance": float(static.imbalance().mean()),
        "experts_moved": 0 if migration is None else int(migration.experts_moved),
        "migration_bytes_sent": 0 if migration is None else int(migration.bytes_sent),
        "replica_bytes": float(sum(float(plan.replicas().sum()) for plan, _ in parts)) * bytes_per_expert,
        "planning_seconds": planning_seconds,
        "plan_step_seconds": plan_step_seconds,
    }


def realised_metrics(rows_MLG: torch.Tensor) -> dict[str, Any]:
    """What every rank's dispatch computed: ``rows_MLG`` its rows per micro-batch, layer and rank."""
    g = rows_MLG.to(torch.float64)
    mean = g.mean(-1)
    imbalance = torch.where(mean > 0, g.amax(-1) / mean.clamp(min=1e-30), torch.ones_like(mean))
    return {"realised_gpu_loads": rows_MLG, "realised_imbalance": float(imbalance.mean()),
            **_balance(rows_MLG, "realised_")}


def plain(metrics: dict[str, Any], as_tensors: bool = False) -> dict[str, Any]:
    """``metrics`` with every tensor as nested Python lists (``as_tensors``: the tensors kept)."""
    if as_tensors:
        return dict(metrics)
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
