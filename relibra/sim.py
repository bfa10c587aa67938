"""Step simulator: run balancing policies over a trace and price their plans with the cost model.

Legend: ``S`` steps, ``M`` micro-batches, ``L`` MoE layers, ``E`` experts, ``G`` GPUs.

Every policy gets a fresh object and sees the steps in order (``policy.plan(loads[s])``). The
first ``warmup_steps`` steps only warm up history-based policies: they are planned and their
placement carried forward, but every reported number averages the later (steady) steps.
``ideal`` is the cost model's idealised run (every GPU at the mean, nothing moved).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .cost import CostConfig, StepCost, ideal_step_cost, step_cost
from .plan import Placement
from .policies import get_policy
from .topology import Topology

__all__ = ["DEFAULT_POLICIES", "PolicyResult", "policy_factory", "simulate"]

DEFAULT_POLICIES = ("static", "eplb-history", "eplb-oracle", "reorder", "replicate", "hybrid", "ideal")

# bench names that map to one registered policy with options
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "eplb-history": ("eplb", {"source": "history"}),
    "eplb-oracle": ("eplb", {"source": "oracle"}),
}


def policy_factory(name: str) -> Callable[[], Any]:
    """A zero-argument builder of a fresh policy named ``name`` (aliases resolved).

    Raises ValueError (unknown policy) or TypeError (option not taken) from the registry.
    """
    base, options = _ALIASES.get(name, (name, {}))
    get_policy(base, **options)  # fail now, not mid-simulation
    return lambda: get_policy(base, **options)


@dataclass
class PolicyResult:
    """Steady-state numbers of one policy (means over steady steps)."""

    name: str
    step_time_s: float = 0.0
    tokens_per_s: float = 0.0
    speedup_vs_static: float | None = None
    speedup_vs_eplb_oracle: float | None = None
    gap_to_ideal: float | None = None
    imbalance_mean: float = 1.0
    imbalance_worst: float = 1.0
    bytes_moved: float = 0.0
    bytes_moved_reorder: float = 0.0
    bytes_moved_replicas: float = 0.0
    planning_time_s: float = 0.0
    breakdown_s: dict = field(default_factory=dict)
    skipped: str | None = None
    gpu_loads_LG: Any = field(default=None, repr=False)  # one steady micro-batch, for plots

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("gpu_loads_LG")
        d.pop("name")
        if self.skipped is None:
            d.pop("skipped")
        return d


def _mean_cost(costs: list[StepCost]) -> dict[str, float]:
    keys = ("expert_compute_s", "non_moe_s", "a2a_s", "replica_s", "reorder_s", "extra_s")
    return {k: float(np.mean([getattr(c, k) for c in costs])) for k in keys}


def simulate(loads_SMLE: Any, topology: Topology, cfg: CostConfig,
             policies: Iterable[str] = DEFAULT_POLICIES, warmup_steps: int = 1,
             progress: Callable[[str], None] | None = None) -> dict[str, PolicyResult]:
    """Simulate every policy over the steps of ``loads_SMLE`` ``[S, M, L, E]``.

    Returns results by name; a policy missing from the registry comes back with ``skipped``
    set to the reason. Raises ValueError for a trace that does not fit the topology/config.
    """
    loads = torch.as_tensor(np.asarray(loads_SMLE)).to(torch.int64)
    if loads.dim() != 4:
        raise ValueError(f"trace loads must be [steps, M, L, E], got shape {tuple(loads.shape)}")
    S, M, L, E = loads.shape
    if E != topology.num_experts or E != cfg.num_experts:
        raise ValueError(f"trace has {E} experts; topology has {topology.num_experts}, "
                         f"cost config {cfg.num_experts} (pick the matching --preset)")
    if not 0 <= warmup_steps < S:
        raise ValueError(f"warmup_steps={warmup_steps} must leave at least one of the {S} steps")
    steady = range(warmup_steps, S)
    results: dict[str, PolicyResult] = {}
    for name in policies:
        res = PolicyResult(name)
        results[name] = res
        if progress:
            progress(name)
        if name == "ideal":
            costs = [ideal_step_cost(loads[s], topology, cfg) for s in steady]
            res.step_time_s = float(np.mean([c.total_s for c in costs]))
            res.tokens_per_s = float(np.mean([c.tokens for c in costs])) / res.step_time_s
            res.breakdown_s = _mean_cost(costs)
            G = topology.num_gpus
            mean = loads[steady[0], 0].to(torch.float64).sum(-1, keepdim=True) / G
            res.gpu_loads_LG = mean.expand(L, G).numpy()
            continue
        try:
            make = policy_factory(name)
        except (ValueError, TypeError) as exc:
            res.skipped = f"policy {name!r} unavailable: {exc}"
            continue
        policy = make()
        previous = Placement.contiguous(topology, L)
        costs, plan_times, imb, imb_worst = [], [], [], []
        for s in range(S):
            t0 = time.perf_counter()
            plan = policy.plan(loads[s], topology)
            elapsed = time.perf_counter() - t0
            cost = step_cost(plan, loads[s], cfg, previous=previous)
            previous = plan.placement
            if s < warmup_steps:
                continue
            plan_times.append(elapsed)
            costs.append(cost)
            ratio = plan.imbalance(loads[s])
            imb.append(float(ratio.mean()))
            imb_worst.append(float(ratio.max()))
            if res.gpu_loads_LG is None:
                res.gpu_loads_LG = plan.gpu_loads()[0].numpy()
        res.step_time_s = float(np.mean([c.total_s for c in costs]))
        res.tokens_per_s = float(np.mean([c.tokens for c in costs])) / res.step_time_s
        res.imbalance_mean = float(np.mean(imb))
        res.imbalance_worst = float(np.max(imb_worst))
        res.bytes_moved_reorder = float(np.mean([c.reorder_bytes for c in costs]))
        res.bytes_moved_replicas = float(np.mean([c.replica_bytes for c in costs]))
        res.bytes_moved = res.bytes_moved_reorder + res.bytes_moved_replicas
        res.planning_time_s = float(np.mean(plan_times))
        res.breakdown_s = _mean_cost(costs)
    _relative(results)
    return results


def _relative(results: dict[str, PolicyResult]) -> None:
    def ref(name: str) -> float | None:
        r = results.get(name)
        return None if r is None or r.skipped else r.step_time_s

    static, oracle, ideal = ref("static"), ref("eplb-oracle"), ref("ideal")
    for r in results.values():
        if r.skipped:
            continue
        r.speedup_vs_static = static / r.step_time_s if static else None
        r.speedup_vs_eplb_oracle = oracle / r.step_time_s if oracle else None
        r.gap_to_ideal = r.step_time_s / ideal - 1.0 if ideal else None
