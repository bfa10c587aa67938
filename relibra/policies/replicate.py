"""``replicate``: every micro-batch, fill spare slots with intra-node replicas and split tokens.

The placement is given (contiguous by default, or the one ``reorder`` chose, see ``hybrid``);
only the spare slots and the token split change from one micro-batch to the next. Replicas
stay in their expert's home node (fast links), and the split is the exact integer min-max
split for the chosen replicas. Every (micro-batch, layer, node) is one problem
(:mod:`relibra.policies.replica_problems`).

Replica choice (:mod:`relibra.policies.replica_greedy`): greedy rules
(:data:`~relibra.policies.replica_greedy.GREEDY_VARIANTS`), tried in order on every problem.
First the overshoot rule: the busiest GPU copies its hottest expert to the lightest GPU and
fills it up to the node mean, past its own excess while its own spare slot is still free, so a
donor can end below the mean and take a replica from a second busy GPU (a node with one very
hot GPU needs every light GPU as well as the donor's own slot for the next one). Only where
that misses the lower bound ``ceil(node mean)`` do the direct rule (the receiver at most to the
mean) and the chain rule (the receiver may go above the mean and pass its own experts on) run
too. Each rule's replicas are scored by their exact optimal level and the best kept per problem
(ties to the earlier rule), so the result is never worse than any rule alone.

Split (:mod:`relibra.policies.replica_split`): with one spare slot per GPU the two-sweep forest
split, about ``2 * (depth + 1)`` rounds, and augmenting rounds only for the rare node with two
replica cycles; otherwise augmenting rounds aimed at the known level. Every round is a fixed
number of NumPy operations over a pass of up to :data:`PROBLEMS_PER_PASS` problems, so the cost
is mostly per-operation overhead (``python benchmarks/planners.py`` measures it).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..plan import Placement, Plan
from ..topology import Topology
from .base import check_loads
from .replica_greedy import GREEDY_VARIANTS, best_of_greedy
from .replica_problems import assemble, node_problems, problem_first, problem_last
from .replica_split import forest_split, optimal_split, resplit

__all__ = ["ReplicatePolicy", "replicate_on"]


def replicate_on(loads_MLE: torch.Tensor, placement: Placement, topology: Topology,
                 policy: str = "replicate", variants: tuple[tuple[bool, ...], ...] = GREEDY_VARIANTS) -> Plan:
    """Plan intra-node replicas and the optimal split of ``loads_MLE [M, L, E]`` on ``placement``.

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
    chunks = [_solve(h_c, S, variants) for h_c in hshare_all.split(PROBLEMS_PER_PASS)]
    h, rep, x = chunks[0][:3] if len(chunks) == 1 else (np.concatenate([c[i] for c in chunks], 1) for i in range(3))
    spare, tokens = assemble(h, rep, x, placement.home_experts, M, L, N, Gn, S)
    plan = Plan(topology, placement, spare, tokens, intra_node_replicas=True, policy=policy)
    plan.info.update(replicate_seconds=time.perf_counter() - start, split_rounds=sum(c[3] for c in chunks))
    return plan


#: (micro-batch, layer, node) problems solved per pass: one micro-batch of the DeepSeek-V3 shape
#: is 464; much larger passes fall out of the cache (best_level builds ``[2**Gn, 2 * problems]``)
PROBLEMS_PER_PASS = 2048


def _solve(hshare: torch.Tensor, S: int, variants: tuple[tuple[bool, ...], ...]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Replicas and exact split of ``hshare [B, Gn, H]`` problems.

    Returns problem-last NumPy arrays ``hshare [Gn*H, B]`` (tokens each home copy keeps), ``rep
    [Sn, B]``, ``x [Sn, B]`` and the number of augmenting rounds.
    """
    B, Gn, H = hshare.shape
    w = problem_last(hshare.reshape(B, Gn * H))
    rep, x, made, level, chain = best_of_greedy(w, Gn, S, variants)
    if level is not None and S == 1:  # exact split in two sweeps over the replica forest
        h, x, ok = forest_split(w, rep, level)
        bad = np.flatnonzero(~ok)
        if bad.size:  # two replica cycles in one node: replay and augment these problems
            bad_t = torch.from_numpy(bad)
            rep_b, level_b = problem_first(rep[:, bad]), torch.from_numpy(level[bad])
            h_b, x_b = resplit(hshare[bad_t], rep_b, problem_first(made[:, bad]), level_b, S,
                               torch.from_numpy(chain[bad]))
            optimal_split(h_b, rep_b, x_b, S, level_B=level_b)
            h[:, bad], x[:, bad] = problem_last(h_b.reshape(bad.size, Gn * H)), problem_last(x_b)
        return h, rep, x, int(bad.size)
    rep, x, made, chain = problem_first(rep), problem_first(x), problem_first(made), torch.from_numpy(chain)
    level = None if level is None else torch.from_numpy(level)
    if level is not None:  # start the exact split from the greedy moves replayed at the optimum
        hshare, x = resplit(hshare, rep, made, level, S, chain)
    else:  # wide nodes: the first rule's own split, made exact by the augmenting rounds
        hshare = hshare - _scatter_x(hshare, rep, x)
    rounds = optimal_split(hshare, rep, x, S, level_B=level)
    return problem_last(hshare.reshape(B, Gn * H)), problem_last(rep), problem_last(x), rounds


def _scatter_x(hshare_BGH: torch.Tensor, rep_BSn: torch.Tensor, x_BSn: torch.Tensor) -> torch.Tensor:
    """``[B, Gn, H]`` tokens each home slot gave to its replicas."""
    B, Gn, H = hshare_BGH.shape
    out = torch.zeros(B, Gn * H + 1, dtype=torch.int64)
    out.scatter_add_(1, torch.where(rep_BSn >= 0, rep_BSn, Gn * H), x_BSn)
    return out[:, :-1].view(B, Gn, H)


class ReplicatePolicy:
    """Intra-batch replication on a fixed placement.

    Args:
        placement: the home placement to replicate on; ``None`` (default) is contiguous
            (Megatron-LM's). Its layer count must match the loads.
    """

    def __init__(self, placement: Placement | None = None) -> None:
        if placement is not None and not isinstance(placement, Placement):
            raise ValueError(f"replicate option placement must be a relibra.Placement or None, "
                             f"got {type(placement).__name__}")
        self.placement = placement

    def plan(self, loads: torch.Tensor, topology: Topology) -> Plan:
        loads = check_loads(loads, topology)
        placement = self.placement or Placement.contiguous(topology, loads.shape[1])
        return replicate_on(loads, placement, topology, policy="replicate")

    def replan(self, loads: torch.Tensor, placement: Placement, topology: Topology) -> Plan:
        """Replicas and split of ``loads`` on a placement chosen elsewhere (see the contract)."""
        return replicate_on(loads, placement, topology, policy="replicate")
