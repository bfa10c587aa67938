"""``snake``: deal experts to GPUs in snake-draft order, hottest first, once a step.

Legend: M micro-batches, L MoE layers, E logical experts, G GPUs.

Experts sorted by the step's summed load go to GPUs 0, 1, ..., G-1, G-1, ..., 1, 0, 0, 1, ...
so every GPU gets a mix of hot and cold experts, exactly ``E / G`` of them. No replicas.
Deterministic, as every policy must be (every rank plans the same step): the sort is stable,
so experts with equal loads keep their id order on every rank.
"""

from __future__ import annotations

import torch

from relibra import Placement, Plan, Topology
from relibra.policies import check_loads

__all__ = ["SnakePolicy"]


class SnakePolicy:
    """Snake-draft placement of the step's experts by their summed load; spare slots stay empty."""

    def plan(self, loads: torch.Tensor, topology: Topology) -> Plan:
        loads_MLE = check_loads(loads, topology)
        L, E, G = loads_MLE.shape[1], topology.num_experts, topology.num_gpus
        hottest_first_LE = loads_MLE.sum(0).argsort(dim=1, descending=True, stable=True)
        turn = torch.arange(E) % (2 * G)
        gpu_of_pick = torch.where(turn < G, turn, 2 * G - 1 - turn)  # 0..G-1, then back G-1..0
        home_gpu_LE = torch.empty(L, E, dtype=torch.int64).scatter_(1, hottest_first_LE, gpu_of_pick.expand(L, E))
        placement = Placement.from_home_gpu(home_gpu_LE, topology)
        return Plan.without_replicas(placement, loads_MLE, topology, policy="snake")
