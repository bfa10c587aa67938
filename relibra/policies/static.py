"""``static``: Megatron-LM's fixed contiguous placement, no replicas."""

from __future__ import annotations

import torch

from ..plan import Placement, Plan
from ..topology import Topology
from .base import check_loads

__all__ = ["StaticPolicy"]


class StaticPolicy:
    """GPU ``g`` homes experts ``g*H .. g*H+H-1`` in every layer; spare slots stay empty."""

    def plan(self, loads: torch.Tensor, topology: Topology) -> Plan:
        loads = check_loads(loads, topology)
        placement = Placement.contiguous(topology, loads.shape[1])
        return Plan.without_replicas(placement, loads, topology, policy="static")
