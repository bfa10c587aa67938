"""The policy contract every balancing policy follows.

A policy turns the exact loads of the coming step into a :class:`~relibra.plan.Plan`::

    plan = policy.plan(loads_MLE, topology)

``loads_MLE`` is an int64 tensor ``[M, L, E]``: token copies routed to each logical expert of
each MoE layer in each of the step's M micro-batches (known before the step starts thanks to
rollout routing replay). A policy may keep state between calls (load history, the previous
placement): ``plan`` is called once per step, in step order, identically on every rank.

A policy whose plans hold replicas may also offer ``replan(loads_MLE, placement, topology) ->
Plan``: the replicas and token split of ``loads_MLE`` on a placement it did not choose. The
Balancer uses it under expert data parallelism, where one replica's placement serves every
expert-parallel group and each group splits its own tokens on it; without it those groups run
that placement without replicas.

A policy that remembers its placement may also offer ``placement_kept(placement)``: the
Balancer calls it when it did not adopt the policy's new placement because the move would not
pay (``Balancer(placement_min_gain=...)``), so the next plan starts from where the experts are.

A policy that keeps state may also offer ``state_dict() -> dict`` and ``load_state_dict(state)``
(as ``reorder``, ``hybrid`` and ``eplb`` do): the state as plain tensors, numbers, strings,
None, lists and dicts (``torch.load(weights_only=True)`` must read it back), and a load that
checks everything before it changes anything, raising ValueError that names the key. The
Balancer saves them with its own state (``Balancer.state_dict``) and restores them for the
same policy, so a resumed run plans exactly as the uninterrupted one; a policy without them
starts fresh after a resume.

Memory is the same for every policy: ``E / G`` home slots per GPU plus the topology's spare
slots. ``eplb`` fills spare slots once for the whole step, ``replicate`` and ``hybrid`` refill
them every micro-batch, ``static`` and ``reorder`` leave them empty.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..plan import Plan, as_loads
from ..topology import Topology

__all__ = ["BalancingPolicy", "check_loads"]


@runtime_checkable
class BalancingPolicy(Protocol):
    """Anything with ``plan(loads [M, L, E], topology) -> Plan``."""

    def plan(self, loads: torch.Tensor, topology: Topology) -> Plan: ...


def check_loads(loads: Any, topology: Topology) -> torch.Tensor:
    """Validate a step's loads against a topology; return them as int64 ``[M, L, E]``."""
    loads = as_loads(loads)
    if loads.shape[2] != topology.num_experts:
        raise ValueError(
            f"loads have {loads.shape[2]} experts in their last dimension, "
            f"the topology has {topology.num_experts}"
        )
    if loads.shape[0] == 0 or loads.shape[1] == 0:
        raise ValueError(f"loads must hold at least one micro-batch and one layer, got shape {tuple(loads.shape)}")
    return loads
