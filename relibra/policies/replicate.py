"""``replicate``: every micro-batch, fill spare slots with replicas and split tokens.

The placement is given (contiguous by default, or the one ``reorder`` chose, see ``hybrid``);
only the spare slots and the token split change from one micro-batch to the next. Every
(micro-batch, layer, node) is one intra-node problem (:mod:`relibra.policies.replica_problems`),
solved by :mod:`relibra.policies.replica_solve`: greedy rules choose replicas inside the node
(:mod:`relibra.policies.replica_greedy`), and the split is the exact integer min-max split for
them (:mod:`relibra.policies.replica_split`).

Replicas stay in their expert's home node (fast links) unless a node cannot absorb its hot
experts: then, where the cost model's price of a cross-node replica (its weight fetch and
gradient return over the slow link, half hidden) is less than what it takes off the busiest
GPU, they also go to other nodes' empty spare slots (:mod:`relibra.policies.replica_cross`).
Where none is chosen the plan is the intra-node one, bit for bit (and ``intra_node_replicas``
stays True); one with a cross-node replica sets it False, and the runtime fetches replicas over
the whole expert-parallel group. This is what MoonEP and Megatron-Core's virtual-expert balancer
do inside one NVLink domain, planned ahead from replayed routes instead of live.
"""

from __future__ import annotations

import functools
import time

import torch

from ..plan import Placement, Plan
from ..topology import Topology
from .base import check_loads
from .replica_cross import DEEPSEEK_V3_H100, cross_node_price, plan_with_cross_node
from .replica_greedy import GREEDY_VARIANTS
from .replica_problems import assemble, node_problems
from .replica_solve import solve_node_problems
from .replica_stickiness import sticky_plan

__all__ = ["ReplicatePolicy", "replicate_on", "resolve_price", "check_cross_node_options", "check_stickiness"]


def replicate_on(loads_MLE: torch.Tensor, placement: Placement, topology: Topology,
                 policy: str = "replicate", variants: tuple[tuple[bool, ...], ...] = GREEDY_VARIANTS,
                 cross_node_price: float | None = None) -> Plan:
    """Plan replicas and the optimal split of ``loads_MLE [M, L, E]`` on ``placement``.

    Intra-node replicas everywhere; with ``cross_node_price`` (token copies on the busiest GPU
    that one cross-node replica costs, see :func:`~relibra.policies.replica_cross.cross_node_price`)
    also cross-node replicas in the (micro-batch, layer)s where they lower the busiest GPU by more
    than they cost (:mod:`relibra.policies.replica_cross`); elsewhere the plan is the intra-node
    one, bit for bit. None: intra-node replicas only. A plan with a cross-node replica has
    ``intra_node_replicas=False``.

    The busiest GPU of every micro-batch and layer is never above the same placement without
    replicas. Deterministic. ``variants``: the greedy rules ``(equalise, best_fit[, overshoot])``
    tried in order, best kept per problem (see :func:`~relibra.policies.replica_greedy.best_of_greedy`).
    """
    loads_MLE = check_loads(loads_MLE, topology)
    M, L, _ = loads_MLE.shape
    if placement.num_layers != L:
        raise ValueError(f"placement has {placement.num_layers} layers, loads have {L}")
    placement.validate(topology)
    N, Gn, S = topology.num_nodes, topology.gpus_per_node, topology.spare_slots_per_gpu
    start = time.perf_counter()
    hshare_all = node_problems(loads_MLE, placement.home_experts, N, Gn)
    if cross_node_price is None or N == 1 or S == 0:
        h, rep, x, rounds = solve_node_problems(hshare_all, S, variants)
        spare, tokens = assemble(h, rep, x, placement.home_experts, M, L, N, Gn, S)
        info: dict = dict(split_rounds=rounds, budget_cut="")
    else:
        solve = functools.partial(solve_node_problems, S=S, variants=variants)
        spare, tokens, info = plan_with_cross_node(hshare_all.numpy(), placement.home_experts, M, L, N, S,
                                                   float(cross_node_price), solve)
    plan = Plan(topology, placement, spare, tokens, intra_node_replicas=info.get("cross_node_replicas", 0) == 0,
                policy=policy)
    plan.info.update(replicate_seconds=time.perf_counter() - start, **info)
    return plan


def resolve_price(cross_node: bool, price: float | None, topology: Topology) -> float | None:
    """The cross-node price a policy plans with: None (intra-node only) when ``cross_node`` is off or
    there is one node; ``price`` when given; else :func:`~relibra.policies.replica_cross.cross_node_price`
    for a DeepSeek-V3 expert on H100-class GPUs over the topology's inter-node link."""
    if not cross_node or topology.num_nodes < 2:
        return None
    if price is not None:
        return float(price)
    return cross_node_price(topology.num_nodes, topology.gpus_per_node, topology.inter_node_bandwidth,
                            **DEEPSEEK_V3_H100)


def check_cross_node_options(policy: str, cross_node: bool, price: float | None) -> None:
    """ValueError naming the option when ``cross_node`` is not a bool or ``price`` not None or a number >= 0."""
    if not isinstance(cross_node, bool):
        raise ValueError(f"{policy} option cross_node must be True or False, got {cross_node!r}")
    if price is not None and (isinstance(price, bool) or not isinstance(price, (int, float)) or not price >= 0):
        raise ValueError(f"{policy} option cross_node_price must be None or a number >= 0 (token copies), "
                         f"got {price!r}")


def check_stickiness(value: float | str | None) -> float | str | None:
    """The ``replica_stickiness`` option: None, ``"auto"`` or a number >= 0 (ValueError naming it
    otherwise); see :func:`~relibra.policies.replica_stickiness.sticky_plan`."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"replica_stickiness must be None, 'auto' or a finite number >= 0, got {value!r}")
    return float(value)


class ReplicatePolicy:
    """Intra-batch replication on a fixed placement.

    Args:
        placement: the home placement to replicate on; ``None`` (default) is contiguous
            (Megatron-LM's). Its layer count must match the loads.
        cross_node: also place replicas in other nodes' spare slots where they pay (default True).
        cross_node_price: token copies on the busiest GPU that one cross-node replica costs
            (:func:`relibra.sim.cost.cross_node_price` prices it for a cost model; ``relibra bench``
            passes it); None: priced for a DeepSeek-V3 expert on H100-class GPUs over the
            topology's inter-node bandwidth. ``inf`` never pays.
        replica_stickiness: None (default): every micro-batch's replicas afresh. A number
            ``t >= 0``: a node keeps the micro-batch before's replicas when their best split
            leaves it at most ``t`` x the layer's mean GPU load above the layer's busiest GPU
            (:mod:`relibra.policies.replica_stickiness`; 0 never slows a layer down). ``"auto"``:
            0 with one spare slot per GPU, None with more (what ``hybrid`` does by default).
    """

    def __init__(self, placement: Placement | None = None, cross_node: bool = True,
                 cross_node_price: float | None = None, replica_stickiness: float | str | None = None) -> None:
        if placement is not None and not isinstance(placement, Placement):
            raise ValueError(f"replicate option placement must be a relibra.Placement or None, "
                             f"got {type(placement).__name__}")
        check_cross_node_options("replicate", cross_node, cross_node_price)
        self.placement = placement
        self.cross_node, self.cross_node_price = cross_node, cross_node_price
        self.replica_stickiness = check_stickiness(replica_stickiness)

    def plan(self, loads: torch.Tensor, topology: Topology) -> Plan:
        loads = check_loads(loads, topology)
        placement = self.placement or Placement.contiguous(topology, loads.shape[1])
        return self.replan(loads, placement, topology)

    def replan(self, loads: torch.Tensor, placement: Placement, topology: Topology) -> Plan:
        """Replicas and split of ``loads`` on a placement chosen elsewhere (see the contract)."""
        price = resolve_price(self.cross_node, self.cross_node_price, topology)
        plan = replicate_on(loads, placement, topology, policy="replicate", cross_node_price=price)
        return sticky_plan(plan, loads, self.replica_stickiness)
