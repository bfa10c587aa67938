"""``hybrid`` (ReLibra): ``reorder`` once a step, then ``replicate`` every micro-batch on top.

Reordering balances each micro-batch across nodes (slow links, moved once a step);
replication then balances the GPUs inside every node with spare-slot replicas (fast links,
refilled every micro-batch). Replicas never raise a GPU above the reordered placement without
replicas, so ``hybrid`` is never worse than ``reorder`` alone.
"""

from __future__ import annotations

import time

import torch

from ..plan import Placement, Plan
from ..topology import Topology
from .base import check_loads
from .reorder import ReorderPolicy
from .replicate import replicate_on

__all__ = ["HybridPolicy"]


class HybridPolicy:
    """ReLibra: inter-batch reordering plus intra-batch, intra-node replication.

    Args:
        migration_weight: as for ``reorder``.
        max_swaps: as for ``reorder``.
    """

    def __init__(self, migration_weight: float = 0.02, max_swaps: int = 200) -> None:
        self.reorder = ReorderPolicy(migration_weight=migration_weight, max_swaps=max_swaps)

    @property
    def placement(self):
        """The placement of the last step (None before the first)."""
        return self.reorder.placement

    def plan(self, loads: torch.Tensor, topology: Topology) -> Plan:
        loads = check_loads(loads, topology)
        start = time.perf_counter()
        placement = self.reorder.next_placement(loads, topology)
        reordered = time.perf_counter()
        plan = replicate_on(loads, placement, topology, policy="hybrid")
        plan.info.update(reorder_seconds=reordered - start, plan_seconds=time.perf_counter() - start)
        return plan

    def replan(self, loads: torch.Tensor, placement: Placement, topology: Topology) -> Plan:
        """Replicas and split of ``loads`` on a placement chosen elsewhere (see the contract)."""
        return replicate_on(loads, placement, topology, policy="hybrid")

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
