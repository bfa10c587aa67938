"""DeepSeek's EPLB (expert-parallel load balancer), vectorised across layers.

Legend:

    L  layers                 E  logical experts per layer      R  physical slots (num_replicas)
    N  nodes                  G  GPUs                           X  most copies of one expert
    B  independent rows of a packing problem (layers, or layers x nodes)

The algorithm is the one of DeepSeek's reference ``eplb.py`` (hierarchical when
``num_groups % num_nodes == 0``, else global, i.e. the same with one group and one node):

1. sum each expert group's load and pack groups onto nodes, longest first, each group to
   the lightest node that still has room (every node takes ``num_groups / num_nodes``);
2. inside each node, give every extra physical slot, one at a time, to the expert with
   the highest load per copy;
3. pack each node's physical experts (load per copy) onto its GPUs the same longest-first
   way, every GPU taking ``R / G`` of them.

Tie-breaking, which decides the exact output: sorts are stable, heaviest first with ties
by index; the lightest pack with room is the lowest-numbered among equals; the expert with
the highest load per copy is the lowest-numbered among equals. With these rules the public
test vector (REFERENCE.md) is reproduced exactly.

The reference loops over layers in Python; here each step of a packing or replication
loop handles all layers (and nodes) at once, so only the loops over items remain.

Dtype: ``weight`` may be any real integer or floating tensor (or array / nested list); it
is converted to float64 on the CPU, so integer loads are exact up to 2**53 and every sum is
taken left to right in a fixed order (the reference works in float32, which rounds group
sums above 2**24 tokens: on such loads ties can break differently). Results are int64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["rebalance_experts", "balanced_packing", "replicate_experts", "as_weight"]


def as_weight(weight: Any, name: str = "weight") -> torch.Tensor:
    """``weight [L, E]`` (tensor, ndarray, nested list) as float64 CPU, checked finite and >= 0."""
    if not isinstance(weight, torch.Tensor):
        try:
            weight = torch.as_tensor(weight)
        except Exception as exc:
            raise ValueError(f"{name} cannot be read as a tensor: {exc}") from exc
    if weight.dim() != 2:
        raise ValueError(f"{name} must have shape [layers, experts], got shape {tuple(weight.shape)}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise ValueError(f"{name} must be a real integer or floating tensor, got dtype {weight.dtype}")
    weight = weight.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name} contains NaN or inf")
    if weight.numel() and bool((weight < 0).any()):
        layer, expert = (int(i) for i in (weight < 0).nonzero()[0])
        raise ValueError(f"{name} has a negative load at layer {layer}, expert {expert}")
    return weight


def _inverse(perm_BN: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of permutations ``[B, n]``."""
    inv = torch.empty_like(perm_BN)
    inv.scatter_(1, perm_BN, torch.arange(perm_BN.shape[1]).expand_as(perm_BN))
    return inv


def _left_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension strictly left to right (bit-identical to Python's ``sum``).

    Integer-valued float64 sums below 2**53 are exact in any order, so they take ``sum``.
    """
    if bool((x == x.round()).all()) and float(x.sum()) < 2.0**53:
        return x.sum(-1)
    acc = torch.zeros(x.shape[:-1], dtype=x.dtype)
    for j in range(x.shape[-1]):
        acc = acc + x[..., j]
    return acc


def balanced_packing(weight_BN: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``n`` items into ``num_packs`` packs of ``n / num_packs`` items each, per row.

    Longest first: items in stable descending order of weight, each to the lightest pack
    that still has room (the lowest-numbered among equally light ones). As in the
    reference, one item per pack is the identity.

    Args:
        weight_BN: ``[B, n]`` float64 item weights; ``n`` divisible by ``num_packs``.
        num_packs: packs per row.
    Returns:
        ``pack_index [B, n]`` (pack of each item) and ``rank_in_pack [B, n]`` (its position
        in the pack, in packing order), both int64.
    """
    B, n = weight_BN.shape
    if n % num_packs:
        raise ValueError(f"balanced_packing: {n} items do not split evenly into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:
        pack_index = torch.arange(n, dtype=torch.int64).expand(B, n).clone()
        return pack_index, torch.zeros_like(pack_index)
    order_BN = torch.sort(weight_BN, dim=-1, descending=True, stable=True).indices
    sorted_w = weight_BN.to(torch.float64).gather(1, order_BN)
    # The loop runs on NumPy views: each step is a handful of operations on [B] and
    # [B, num_packs] arrays, where torch's per-call dispatch would cost ~10x more.
    columns = sorted_w.t().contiguous().numpy()  # [n, B]
    key = np.zeros((B, num_packs))  # a pack's weight while it has room, +inf once full
    count = np.zeros(B * num_packs, dtype=np.int64)
    key_flat = key.reshape(-1)
    base = np.arange(B, dtype=np.int64) * num_packs
    sorted_pack = np.empty((n, B), dtype=np.int64)
    sorted_rank = np.empty((n, B), dtype=np.int64)
    first = 0
    if n >= num_packs and bool((columns[num_packs - 1] > 0).all()):
        # every row's num_packs heaviest items are positive: item i lands in empty pack i
        key[:] = columns[:num_packs].T
        count[:] = 1
        sorted_pack[:num_packs] = np.arange(num_packs)[:, None]
        sorted_rank[:num_packs] = 0
        first = num_packs
    for i in range(first, n):
        pack = key.argmin(axis=1)  # first minimum: lowest index among ties
        sorted_pack[i] = pack
        flat = base + pack
        c = count[flat]
        sorted_rank[i] = c
        c += 1
        count[flat] = c
        key_flat[flat] = np.where(c == per_pack, np.inf, key_flat[flat] + columns[i])
    sorted_pack_t = torch.from_numpy(sorted_pack.T.copy())
    sorted_rank_t = torch.from_numpy(sorted_rank.T.copy())
    pack_index = torch.empty_like(sorted_pack_t).scatter_(1, order_BN, sorted_pack_t)
    rank_in_pack = torch.empty_like(sorted_rank_t).scatter_(1, order_BN, sorted_rank_t)
    return pack_index, rank_in_pack


def replicate_experts(
    weight_BN: torch.Tensor, num_phy: int, max_copies: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give ``num_phy - n`` extra slots, one at a time, to the expert with most load per copy.

    Args:
        weight_BN: ``[B, n]`` float64 expert loads.
        num_phy: physical slots per row (>= n); slots ``0..n-1`` hold experts ``0..n-1``,
            slot ``n + i`` the ``i``-th extra copy given out.
        max_copies: optional cap on the copies of one expert (DeepSeek's algorithm has
            none; the policy caps at the GPUs an expert may use). A slot for which every
            expert is capped stays empty (-1).
    Returns:
        ``phy2log [B, num_phy]`` (expert of each slot, -1 empty), ``rank [B, num_phy]``
        (copy number of the slot's expert, -1 empty) and ``logcnt [B, n]``, all int64.
    """
    B, n = weight_BN.shape
    if num_phy < n:
        raise ValueError(f"replicate_experts: {num_phy} physical slots cannot hold {n} experts")
    if max_copies is not None and max_copies < 1:
        raise ValueError(f"replicate_experts: max_copies must be >= 1, got {max_copies}")
    extra = num_phy - n
    weight_flat = weight_BN.to(torch.float64).contiguous().numpy().reshape(-1)
    score = weight_flat.copy().reshape(B, n)  # load per copy; -inf once capped
    score_flat = score.reshape(-1)
    count = np.ones(B * n)  # float copies: exact, and divides like the reference
    base = np.arange(B, dtype=np.int64) * n
    picks = np.empty((extra, B), dtype=np.int64)
    ranks = np.empty((extra, B), dtype=np.int64)
    if max_copies is not None and max_copies <= 1:
        score[:] = -np.inf
    for i in range(extra):
        best = score.argmax(axis=1)  # first maximum: lowest index among ties
        flat = base + best
        c = count[flat]
        if max_copies is None:
            picks[i] = best
            ranks[i] = c
            c += 1.0
            count[flat] = c
            score_flat[flat] = weight_flat[flat] / c
        else:
            ok = score_flat[flat] > -np.inf  # False: every expert of the row is capped
            picks[i] = np.where(ok, best, -1)
            ranks[i] = np.where(ok, c, -1)
            c = c + ok
            count[flat] = c
            per_copy = np.where(c >= max_copies, -np.inf, weight_flat[flat] / c)
            score_flat[flat] = np.where(ok, per_copy, score_flat[flat])
    phy2log = torch.cat([torch.arange(n).expand(B, n), torch.from_numpy(picks.T.copy())], dim=1)
    rank = torch.cat([torch.zeros(B, n, dtype=torch.int64), torch.from_numpy(ranks.T.copy())], dim=1)
    logcnt = torch.from_numpy(count.reshape(B, n)).to(torch.int64)
    return phy2log, rank, logcnt


def group_node_map(weight_LE: torch.Tensor, num_groups: int, num_nodes: int) -> torch.Tensor:
    """Step 1: ``log2mlog [L, E]``, each expert's index in node-major order.

    Node ``n`` owns the "middle-logical" indices ``n*E/N .. (n+1)*E/N - 1``; its groups sit
    there in packing order, the experts of a group contiguous and in id order.
    """
    L, E = weight_LE.shape
    group_size = E // num_groups
    if num_groups == num_nodes:  # one group per node: the reference keeps group g on node g
        return torch.arange(E, dtype=torch.int64).expand(L, E).clone()
    tokens_per_group = _left_sum(weight_LE.view(L, num_groups, group_size))
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    first = (group_pack * (num_groups // num_nodes) + group_rank) * group_size
    return (first.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)


def _check_sizes(L: int, E: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups),
                        ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"rebalance_experts: {name} must be a positive int, got {value!r}")
    if E == 0:
        raise ValueError("rebalance_experts: weight has no experts")
    if num_replicas < E:
        raise ValueError(f"rebalance_experts: num_replicas={num_replicas} < {E} logical experts")
    if E % num_groups:
        raise ValueError(f"rebalance_experts: num_groups={num_groups} does not divide {E} experts")
    if num_gpus % num_nodes:
        raise ValueError(f"rebalance_experts: num_nodes={num_nodes} does not divide num_gpus={num_gpus}")
    if num_replicas % num_gpus:
        raise ValueError(f"rebalance_experts: num_gpus={num_gpus} does not divide num_replicas={num_replicas}")


def rebalance_experts(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek EPLB: replicate and place experts so every GPU gets a similar load.

    Args:
        weight: ``[L, E]`` load of every logical expert (integer or float; see the module
            docstring on dtypes).
        num_replicas: R physical slots per layer, a multiple of ``num_gpus``, >= E.
        num_groups: expert groups (group-limited routing); must divide E.
        num_nodes: nodes; hierarchical when it divides ``num_groups``, else global.
        num_gpus: GPUs, a multiple of ``num_nodes``. GPU ``g`` holds slots
            ``g*R/G .. (g+1)*R/G - 1``.
    Returns:
        ``phy2log [L, R]`` logical expert of every physical slot, ``log2phy [L, E, X]``
        physical slots of every expert (by copy number, -1 padded, ``X = logcnt.max()``)
        and ``logcnt [L, E]`` copies of every expert; all int64 on the CPU.
    """
    weight_LE = as_weight(weight)
    L, E = weight_LE.shape
    _check_sizes(L, E, num_replicas, num_groups, num_nodes, num_gpus)
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1  # global: one group on one node
    phy2log, phyrank, logcnt = _rebalance_hierarchical(weight_LE, num_replicas, num_groups, num_nodes, num_gpus)
    X = max(int(logcnt.max()), 1) if L else 1
    log2phy = torch.full((L, E * X), -1, dtype=torch.int64)
    log2phy.scatter_(1, phy2log * X + phyrank, torch.arange(num_replicas).expand(L, -1).clone())
    return phy2log, log2phy.view(L, E, X), logcnt


def _rebalance_hierarchical(
    weight_LE: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three steps for all layers; returns ``phy2log [L, R]``, ``phyrank [L, R]``, ``logcnt [L, E]``."""
    L, E = weight_LE.shape
    per_node = E // num_nodes
    phy_per_node = num_phy // num_nodes
    phy_per_gpu = num_phy // num_gpus
    log2mlog = group_node_map(weight_LE, num_groups, num_nodes)  # step 1
    mlog2log = _inverse(log2mlog)
    w_mlog = weight_LE.gather(1, mlog2log).view(L * num_nodes, per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(w_mlog, phy_per_node)  # step 2
    per_copy = (w_mlog / mlogcnt.to(w_mlog.dtype)).gather(1, phy2mlog)
    pack, rank = balanced_packing(per_copy, num_gpus // num_nodes)  # step 3
    pphy2phy = _inverse(pack * phy_per_gpu + rank)
    pphy2mlog = phy2mlog.gather(1, pphy2phy).view(L, num_nodes, phy_per_node)
    pphy2mlog = (pphy2mlog + (torch.arange(num_nodes) * per_node).view(1, -1, 1)).flatten(-2)
    phy2log = mlog2log.gather(1, pphy2mlog)
    pphyrank = phyrank.gather(1, pphy2phy).view(L, num_phy)
    logcnt = mlogcnt.view(L, E).gather(1, log2mlog)
    return phy2log, pphyrank, logcnt
