"""DeepSeek's EPLB as a plain per-layer Python loop: the specification the fast one must match.

Written from the algorithm description in REFERENCE.md (group packing onto nodes, replicas
to the expert with most load per copy, longest-first packing of physical experts onto GPUs),
with the tie rules of :mod:`relibra.policies.eplb_algorithm`: stable sorts, heaviest first
with ties by index; the lowest-numbered pack / expert wins a tie. Arithmetic is in Python
floats (IEEE double, like the fast float64), sums taken left to right.

It is deliberately slow and obvious: lists, one layer at a time. Each function is the
one-row version of a step of :mod:`relibra.policies.eplb_algorithm`:

    balanced_packing    <->  pack_rows          (longest-first packing)
    replicate_experts   <->  replicate_rows     (extra slots to the most load per copy)
    rebalance_layer     <->  one layer of rebalance_experts
    rebalance_experts_loop  the whole contract, one layer at a time

Used by the tests and by the planning benchmarks as the "before" number.
"""

from __future__ import annotations

import torch

__all__ = ["balanced_packing", "replicate_experts", "rebalance_layer", "rebalance_experts_loop"]


def balanced_packing(weights: list[float], num_packs: int) -> tuple[list[int], list[int]]:
    """Longest-first packing of ``len(weights)`` items into equal-count packs: ``(pack, rank in pack)``
    of every item. Items heaviest first (ties by index), each to the lightest pack with room
    (the lowest-numbered among equals); one item per pack is the identity."""
    n = len(weights)
    per_pack = n // num_packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    order = sorted(range(n), key=lambda i: -weights[i])  # stable: ties keep index order
    pack_weight = [0.0] * num_packs
    pack_count = [0] * num_packs
    pack_of = [-1] * n
    rank_of = [-1] * n
    for item in order:
        best = -1
        for p in range(num_packs):
            if pack_count[p] < per_pack and (best < 0 or pack_weight[p] < pack_weight[best]):
                best = p
        pack_of[item] = best
        rank_of[item] = pack_count[best]
        pack_count[best] += 1
        pack_weight[best] += weights[item]
    return pack_of, rank_of


def replicate_experts(weights: list[float], num_phy: int) -> tuple[list[int], list[int], list[int]]:
    """Slots ``0..n-1`` hold the experts; each extra slot goes to the expert with the most load per
    copy (the lowest-numbered among equals). Returns ``(expert, copy rank)`` of every slot and the
    copies of every expert."""
    n = len(weights)
    phy2log = list(range(n))
    rank = [0] * n
    count = [1] * n
    for _ in range(n, num_phy):
        best = 0
        for e in range(1, n):
            if weights[e] / count[e] > weights[best] / count[best]:
                best = e
        phy2log.append(best)
        rank.append(count[best])
        count[best] += 1
    return phy2log, rank, count


def rebalance_layer(w: list[float], num_phy: int, num_groups: int, num_nodes: int, num_gpus: int):
    """Hierarchical EPLB of one layer: ``(phy2log, copy rank, logcnt)`` as lists."""
    E = len(w)
    group_size = E // num_groups
    experts_per_node = E // num_nodes
    phy_per_node = num_phy // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_phy // num_gpus

    group_load = []
    for g in range(num_groups):
        total = 0.0
        for e in range(g * group_size, (g + 1) * group_size):
            total += w[e]
        group_load.append(total)
    group_node, group_slot = balanced_packing(group_load, num_nodes)

    node_experts = [[-1] * experts_per_node for _ in range(num_nodes)]  # local index -> expert
    for g in range(num_groups):
        base = group_slot[g] * group_size
        for j in range(group_size):
            node_experts[group_node[g]][base + j] = g * group_size + j

    phy2log = [-1] * num_phy
    phyrank = [-1] * num_phy
    logcnt = [0] * E
    for node in range(num_nodes):
        experts = node_experts[node]
        local_w = [w[e] for e in experts]
        slot_expert, slot_rank, count = replicate_experts(local_w, phy_per_node)
        for j, e in enumerate(experts):
            logcnt[e] = count[j]
        per_copy = [local_w[slot_expert[s]] / count[slot_expert[s]] for s in range(phy_per_node)]
        gpu_of, pos_of = balanced_packing(per_copy, gpus_per_node)
        for s in range(phy_per_node):
            slot = node * phy_per_node + gpu_of[s] * phy_per_gpu + pos_of[s]
            phy2log[slot] = experts[slot_expert[s]]
            phyrank[slot] = slot_rank[s]
    return phy2log, phyrank, logcnt


def rebalance_experts_loop(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """Same contract as :func:`relibra.policies.eplb_algorithm.rebalance_experts`, one layer at a time.

    Returns ``phy2log [L, P]``, ``log2phy [L, E, X]`` (-1 padded) and ``logcnt [L, E]``, int64.
    """
    rows = torch.as_tensor(weight).to(torch.float64).tolist()
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    phy2log, phyrank, logcnt = [], [], []
    for w in rows:
        p, r, c = rebalance_layer(w, num_replicas, num_groups, num_nodes, num_gpus)
        phy2log.append(p)
        phyrank.append(r)
        logcnt.append(c)
    E = len(rows[0]) if rows else 0
    X = max((max(c) for c in logcnt), default=1)
    log2phy = [[[-1] * X for _ in range(E)] for _ in rows]
    for layer, (p, r) in enumerate(zip(phy2log, phyrank)):
        for slot, (e, k) in enumerate(zip(p, r)):
            log2phy[layer][e][k] = slot
    as_t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return as_t(phy2log), as_t(log2phy).view(len(rows), E, X), as_t(logcnt)
