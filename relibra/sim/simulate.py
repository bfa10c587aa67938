"""Step simulator: run balancing policies over a trace and price their plans with the cost model.

Legend: ``S`` steps, ``M`` micro-batches, ``L`` MoE layers, ``E`` experts, ``G`` GPUs.

Every policy gets a fresh object and sees the steps in order (``policy.plan(loads[s])``). The
first ``warmup_steps`` steps only warm up history-based policies: they are planned and their
placement carried forward, but every reported number averages the later (steady) steps.
``ideal`` is the cost model's idealised run (every GPU at the mean, nothing moved).

A step may be packed anew for every policy (``packer``: the loads of step ``s`` given the
placement it starts on, :class:`relibra.sim.rl_step.StepPacker`) and priced over several passes
(``phases``: forward-only log-prob passes, training epochs; :mod:`relibra.sim.rl_step`). By
default the trace's loads are priced as one training pass, as they always were.

Planning time (``planning_time_s``) is the process CPU time of ``policy.plan`` alone, per step
(all micro-batches of the step), averaged over steady steps, measured with torch on ONE
intra-op thread (``torch.set_num_threads(1)`` around the call, the caller's setting restored
after). Why: on a shared machine a multi-threaded torch op waits for busy cores (OpenMP
workers spin), which on the 2-core development machines turned ~0.02 s of static planning
into 0.3-0.8 s and ~0.4 s of hybrid into 2-12 s; wall time also counts other processes.
One thread and CPU time measure the planner's own work, comparable to
``benchmarks/planners.py``. Cost-model pricing is never inside the timing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..balance_metrics import balancedness, max_vio
from ..plan import Placement
from ..registry import get_policy
from ..topology import Topology
from .cost import CostConfig, StepCost, cross_node_price, ideal_step_cost, step_cost
from .rl_step import ideal_phase_cost, phase_step_cost

__all__ = ["DEFAULT_POLICIES", "LIVE_ROWS", "ROW_SYSTEMS", "PolicyResult", "policy_factory", "policy_options",
           "timed_plan", "simulate", "gap_breakdown"]

DEFAULT_POLICIES = ("static", "eplb-history", "eplb-oracle", "eplb-oracle-global", "reorder", "replicate",
                    "replicate-live", "hybrid", "ideal")

# bench names that map to one registered policy with options. ``eplb-oracle`` keeps EPLB's own
# choice (hierarchical when the expert groups divide over the nodes: with DeepSeek-V3's 8 groups
# on 8 nodes every node gets one whole group, so no load moves between nodes);
# ``eplb-oracle-global`` forces the global mode, which may.
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "eplb-history": ("eplb", {"source": "history"}),
    "eplb-oracle": ("eplb", {"source": "oracle"}),
    "eplb-oracle-global": ("eplb", {"source": "oracle", "mode": "global"}),
    "replicate-live": ("replicate", {"cross_node": False}),
    "hybrid-intra": ("hybrid", {"cross_node": False}),
}
#: rows whose plans are made at run time from the live router output: priced with
#: ``CostConfig.live_planning_s`` per micro-batch and MoE layer on the critical path
LIVE_ROWS = ("replicate-live",)
#: built-in policies with a ``cross_node_price`` option: ``simulate`` passes the cost model's
#: price (:func:`relibra.sim.cost.cross_node_price`) unless the row's options set it
_PRICED = ("replicate", "hybrid")

#: which system each bench row stands for (printed under ``relibra bench``'s table)
ROW_SYSTEMS: dict[str, str] = {
    "static": "Megatron-LM: contiguous placement, no replicas",
    "eplb-history": "DeepSeek EPLB (vLLM, SGLang) on earlier steps' loads",
    "eplb-oracle": "DeepSeek EPLB on the step's own loads (hierarchical where groups divide over nodes)",
    "eplb-oracle-global": "DeepSeek EPLB on the step's own loads, global",
    "reorder": "ReLibra's once-a-step reordering alone",
    "replicate": "MoonEP / Megatron-Core virtual-expert balancer, planned ahead from replayed routes "
                 "(+ priced cross-node replicas)",
    "replicate-live": "MoonEP / Megatron-Core virtual-expert balancer as they run: planned live from the router "
                      "output, inside NVLink domains",
    "hybrid": "ReLibra: reorder + replicate (cross-node replicas where they pay)",
    "hybrid-intra": "ReLibra with replicas inside nodes only",
    "ideal": "a bound: every GPU at the mean load, nothing moved",
}


def policy_options(name: str, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``(registered name, options)`` of bench row ``name``: its alias options, then ``options``."""
    base, alias = _ALIASES.get(name, (name, {}))
    return base, {**alias, **(options or {})}


def policy_factory(name: str, options: dict[str, Any] | None = None) -> Callable[[], Any]:
    """A zero-argument builder of a fresh policy named ``name`` (aliases resolved, ``options`` added).

    Raises ValueError (unknown policy, bad option value) or TypeError (option not taken) from
    the registry.
    """
    base, opts = policy_options(name, options)
    get_policy(base, **opts)  # fail now, not mid-simulation
    return lambda: get_policy(base, **opts)


def timed_plan(policy: Any, loads_MLE: torch.Tensor, topology: Topology) -> tuple[Any, float]:
    """``(policy.plan(loads_MLE, topology), process CPU seconds)`` on one torch thread.

    The caller's thread count is restored afterwards, also when ``plan`` raises.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.process_time()
        plan = policy.plan(loads_MLE, topology)
        elapsed = time.process_time() - t0
    finally:
        torch.set_num_threads(threads)
    return plan, elapsed


@dataclass
class PolicyResult:
    """Steady-state numbers of one policy (means over steady steps)."""

    name: str
    step_time_s: float = 0.0
    tokens_per_s: float = 0.0
    speedup_vs_static: float | None = None
    speedup_vs_eplb_oracle: float | None = None
    speedup_vs_eplb_oracle_global: float | None = None
    gap_to_ideal: float | None = None
    imbalance_mean: float = 1.0
    imbalance_worst: float = 1.0
    max_vio: float = 0.0  # mean over micro-batches and layers of (max - mean) / mean GPU load (verl's)
    balancedness: float = 1.0  # mean over micro-batches and layers of mean / max GPU load (vLLM's)
    bytes_moved: float = 0.0
    bytes_moved_reorder: float = 0.0
    bytes_moved_replicas: float = 0.0
    planning_time_s: float = 0.0
    breakdown_s: dict = field(default_factory=dict)
    plan_info: dict = field(default_factory=dict)  # numeric plan.info entries (not timings), steady-step means
    budget_cuts: int = 0  # steady steps whose plan a search budget cut short (plan.info["budget_cut"])
    options: dict = field(default_factory=dict)  # registered policy name and options used
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
    keys = ("expert_compute_s", "non_moe_s", "a2a_s", "replica_s", "reorder_s", "extra_s", "optimizer_s", "overhead_s",
            "planning_s")
    return {k: float(np.mean([getattr(c, k) for c in costs])) for k in keys}


def _mean_info(infos: list[dict]) -> tuple[dict[str, float], int]:
    """Steady-step means of the plans' numeric ``info`` entries (timings, ``*_seconds``, left out)
    and how many plans a budget cut short."""
    keys = sorted({k for i in infos for k, v in i.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and not k.endswith("seconds")})
    means = {k: float(np.mean([i.get(k, 0.0) for i in infos])) for k in keys}
    return means, sum(1 for i in infos if i.get("budget_cut"))


def simulate(loads_SMLE: Any, topology: Topology, cfg: CostConfig,
             policies: Iterable[str] = DEFAULT_POLICIES, warmup_steps: int = 1,
             progress: Callable[[str], None] | None = None,
             options: dict[str, dict[str, Any]] | None = None,
             packer: Callable[[int, Placement], torch.Tensor] | None = None,
             phases: tuple[str, ...] | None = None, overlap: bool = True,
             overlap_micro_batches: int | None = 1) -> dict[str, PolicyResult]:
    """Simulate every policy over the steps of ``loads_SMLE`` ``[S, M, L, E]``.

    ``options`` maps a bench row name to extra policy options (``{"hybrid": {"migration_weight":
    0.5}}``); they must be accepted by the policy (else TypeError/ValueError from the registry).
    ``packer(s, placement)`` gives step ``s``'s loads packed for the placement it starts on
    (None: ``loads_SMLE[s]``); ``phases`` the passes of a step (None: one training pass), each
    phase's mean seconds then in ``breakdown_s["phases_s"]``; ``overlap`` and
    ``overlap_micro_batches``: how many forward-only micro-batches run on the step before's
    placement (:func:`relibra.sim.rl_step.phase_step_cost`).
    Returns results by name; a policy missing from the registry comes back with ``skipped``
    set to the reason. Raises ValueError for a trace that does not fit the topology/config.
    """
    options = options or {}
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
        if name == "ideal":  # no packing changes it: the per-micro-batch means add up to the step's
            priced = [(ideal_step_cost(loads[s], topology, cfg), None) if phases is None else
                      ideal_phase_cost(loads[s], topology, cfg, phases) for s in steady]
            costs = [c for c, _ in priced]
            res.step_time_s = float(np.mean([c.total_s for c in costs]))
            res.tokens_per_s = float(np.mean([c.tokens for c in costs])) / res.step_time_s
            res.breakdown_s = _mean_cost(costs)
            if phases is not None:
                res.breakdown_s["phases_s"] = _phase_means(phases, [p for _, p in priced])
            G = topology.num_gpus
            mean = loads[steady[0], 0].to(torch.float64).sum(-1, keepdim=True) / G
            res.gpu_loads_LG = mean.expand(L, G).numpy()
            continue
        asked = dict(options.get(name) or {})
        base, opts = policy_options(name, asked)
        if base in _PRICED and "cross_node_price" not in opts:
            asked["cross_node_price"] = opts["cross_node_price"] = cross_node_price(cfg, topology)
        res.options = {"policy": base, **opts}
        if name in options:  # asked-for options must work: no silent skip
            make = policy_factory(name, asked)
        else:
            try:
                make = policy_factory(name, asked)
            except (ValueError, TypeError) as exc:
                res.skipped = f"policy {name!r} unavailable: {exc}"
                continue
        policy = make()
        previous = Placement.contiguous(topology, L)
        costs, plan_times, imb, imb_worst, infos, vio, bal, per_phase = [], [], [], [], [], [], [], []
        for s in range(S):
            step_loads = loads[s] if packer is None else packer(s, previous)
            plan, elapsed = timed_plan(policy, step_loads, topology)
            if phases is None:
                cost = step_cost(plan, step_loads, cfg, previous=previous, live_planning=name in LIVE_ROWS)
            else:
                cost, seconds = phase_step_cost(plan, step_loads, cfg, previous, phases, policy, overlap,
                                                live_planning=name in LIVE_ROWS,
                                                overlap_micro_batches=overlap_micro_batches)
                per_phase.append(seconds)
            previous = plan.placement
            if s < warmup_steps:
                continue
            plan_times.append(elapsed)
            costs.append(cost)
            infos.append(plan.info)
            ratio = plan.imbalance(step_loads)
            imb.append(float(ratio.mean()))
            imb_worst.append(float(ratio.max()))
            gpu_loads = plan.gpu_loads()
            vio.append(float(max_vio(gpu_loads).mean()))
            bal.append(float(balancedness(gpu_loads).mean()))
            if res.gpu_loads_LG is None:
                res.gpu_loads_LG = gpu_loads[0].numpy()
        res.step_time_s = float(np.mean([c.total_s for c in costs]))
        res.tokens_per_s = float(np.mean([c.tokens for c in costs])) / res.step_time_s
        res.imbalance_mean = float(np.mean(imb))
        res.imbalance_worst = float(np.max(imb_worst))
        res.max_vio, res.balancedness = float(np.mean(vio)), float(np.mean(bal))
        res.bytes_moved_reorder = float(np.mean([c.reorder_bytes for c in costs]))
        res.bytes_moved_replicas = float(np.mean([c.replica_bytes for c in costs]))
        res.bytes_moved = res.bytes_moved_reorder + res.bytes_moved_replicas
        res.planning_time_s = float(np.mean(plan_times))
        res.breakdown_s = _mean_cost(costs)
        res.plan_info, res.budget_cuts = _mean_info(infos)
        if phases is not None:
            res.breakdown_s["phases_s"] = _phase_means(phases, per_phase[warmup_steps:])
    _relative(results)
    return results


def _phase_means(phases: tuple[str, ...], seconds: list[list[float]]) -> list[dict[str, Any]]:
    """``[{"phase": name, "seconds": mean over steps}]`` in the schedule's order."""
    return [{"phase": name, "seconds": float(np.mean([step[i] for step in seconds]))}
            for i, name in enumerate(phases)]


def _relative(results: dict[str, PolicyResult]) -> None:
    def ref(name: str) -> float | None:
        r = results.get(name)
        return None if r is None or r.skipped else r.step_time_s

    static, oracle, ideal = ref("static"), ref("eplb-oracle"), ref("ideal")
    oracle_global = ref("eplb-oracle-global")
    for r in results.values():
        if r.skipped:
            continue
        r.speedup_vs_static = static / r.step_time_s if static else None
        r.speedup_vs_eplb_oracle = oracle / r.step_time_s if oracle else None
        r.speedup_vs_eplb_oracle_global = oracle_global / r.step_time_s if oracle_global else None
        r.gap_to_ideal = r.step_time_s / ideal - 1.0 if ideal else None


def gap_breakdown(results: dict[str, PolicyResult], name: str) -> dict[str, float] | None:
    """Policy ``name``'s gap to ``ideal`` split by part, each a fraction of ideal's step time.

    ``compute``: expert compute above the mean (residual imbalance); ``a2a``: token all-to-all
    above ideal's uniform traffic; ``replicas``: replica weight copies and gradient reductions;
    ``migration``: reorder's expert moves; ``planning`` (live rows only): planning on the critical
    path. Non-MoE and dense parts are equal in both, so the parts add up to ``gap_to_ideal``.
    None when either row is missing or skipped.
    """
    r, i = results.get(name), results.get("ideal")
    if r is None or i is None or r.skipped or i.skipped or not i.step_time_s:
        return None
    a, b, T = r.breakdown_s, i.breakdown_s, i.step_time_s
    parts = {"compute": (a["expert_compute_s"] - b["expert_compute_s"]) / T, "a2a": (a["a2a_s"] - b["a2a_s"]) / T,
             "replicas": a["replica_s"] / T, "migration": a["reorder_s"] / T}
    if a.get("planning_s", 0.0) > 0:
        parts["planning"] = a["planning_s"] / T
    return parts
