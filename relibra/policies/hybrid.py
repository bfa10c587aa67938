"""``hybrid`` (ReLibra): ``reorder`` once a step, then ``replicate`` every micro-batch on top.

Reordering balances each micro-batch across nodes (slow links, moved once a step);
replication then balances the GPUs inside every node with spare-slot replicas (fast links,
refilled every micro-batch), and, where a node cannot absorb its hot experts and the cost model
says it pays, puts replicas in other nodes' spare slots (:mod:`relibra.policies.replica_cross`).
Replicas never raise a GPU above the reordered placement without replicas, so ``hybrid`` is
never worse than ``reorder`` alone. Its planning time is bounded: reorder's searches by a
deterministic work budget (opt-in: wall-clock seconds), the cross-node exports by a round
count; ``plan.info["budget_cut"]`` says when a bound stopped one.
"""

from __future__ import annotations

import time

import torch

from ..plan import Placement, Plan
from ..topology import Topology
from .base import check_loads
from .budget import check_budget_options
from .reorder import WORK_BUDGET, ReorderPolicy
from .replica_stickiness import sticky_plan
from .replicate import check_cross_node_options, check_stickiness, replicate_on, resolve_price

__all__ = ["HybridPolicy"]


class HybridPolicy:
    """ReLibra: inter-batch reordering plus intra-batch replication (cross-node where it pays).

    Args:
        migration_weight: as for ``reorder``, but 0.005 by default (``reorder``'s is 0.02). A
            move costs the step only its weights' bytes (2 of 16 a parameter) when the Balancer
            defers the optimizer state (``defer_optimizer_state``, its default on GPUs), and in the cost
            model 0.0025-0.005 is the optimum for ``hybrid`` (routes-packed RL traces at
            concentration 16 and 64: +2.5 % and +1.9 % of ideal against +3.0 % and +2.3 % at 0.02;
            the default trace +2.1 % against +2.7 %); docs/results.md has the sweep. Moving the
            state with the weights (``defer_optimizer_state=False``), use 0.02.
        max_swaps, work_budget, time_budget_s: as for ``reorder`` (the budgets bound its
            searches; a plan one cut short says so in ``plan.info["budget_cut"]``).
        cross_node, cross_node_price: as for ``replicate``.
        replica_stickiness: as for ``replicate``, but ``"auto"`` by default: with one spare slot per
            GPU a node keeps the micro-batch before's replicas wherever that slows no layer (a replica
            kept in its slot costs no copy and no gradient return), which cuts the replica traffic
            by a third on RL traces (docs/rl-step.md, "Sticky replicas"); with more spare slots the
            exact split of kept replicas costs about a second of planning a step for almost no gain,
            so replicas are planned afresh there (as with None).
    """

    def __init__(self, migration_weight: float = 0.005, max_swaps: int = 200, cross_node: bool = True,
                 cross_node_price: float | None = None, work_budget: float = WORK_BUDGET,
                 time_budget_s: float | None = None, replica_stickiness: float | str | None = "auto") -> None:
        check_cross_node_options("hybrid", cross_node, cross_node_price)
        check_budget_options("hybrid", work_budget, time_budget_s)
        self.reorder = ReorderPolicy(migration_weight=migration_weight, max_swaps=max_swaps, work_budget=work_budget,
                                     time_budget_s=time_budget_s)
        self.cross_node, self.cross_node_price = cross_node, cross_node_price
        self.replica_stickiness = check_stickiness(replica_stickiness)

    @property
    def placement(self):
        """The placement of the last step (None before the first)."""
        return self.reorder.placement

    def plan(self, loads: torch.Tensor, topology: Topology) -> Plan:
        loads = check_loads(loads, topology)
        start = time.perf_counter()
        budget = self.reorder.budget()
        placement = self.reorder.next_placement(loads, topology, budget)
        reordered = time.perf_counter()
        plan = self.replan(loads, placement, topology)
        cut = "; ".join(filter(None, (budget.cut, plan.info.get("budget_cut", ""))))
        plan.info.update(reorder_seconds=reordered - start, plan_seconds=time.perf_counter() - start,
                         reorder_work=budget.spent, budget_cut=cut)
        return plan

    def placement_kept(self, placement: Placement) -> None:
        """The Balancer kept the experts on ``placement`` (see :meth:`ReorderPolicy.placement_kept`)."""
        self.reorder.placement_kept(placement)

    def replan(self, loads: torch.Tensor, placement: Placement, topology: Topology) -> Plan:
        """Replicas and split of ``loads`` on a placement chosen elsewhere (see the contract)."""
        price = resolve_price(self.cross_node, self.cross_node_price, topology)
        plan = replicate_on(loads, placement, topology, policy="hybrid", cross_node_price=price)
        return sticky_plan(plan, loads, self.replica_stickiness)

    def state_dict(self) -> dict:
        """``{"reorder": ...}``: the reorder stage's state (:meth:`ReorderPolicy.state_dict`);
        the replicas are planned afresh every micro-batch and keep none."""
        return {"reorder": self.reorder.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (ValueError naming the key, policy unchanged)."""
        if not isinstance(state, dict) or set(state) != {"reorder"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"hybrid state must be a dict with the one key 'reorder', got {got}")
        self.reorder.load_state_dict(state["reorder"])
