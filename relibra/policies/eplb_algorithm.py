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
loop handles all layers (and nodes) at once, so only the loops over items remain. The work
is done on NumPy arrays (a handful of calls per step on ``[B]`` / ``[B, packs]`` arrays;
torch's per-call dispatch costs several times more at these sizes), converted from and to
torch only at the public boundary. Closed forms replace the loop where the greedy admits
one: one item per pack is the identity, one pack takes everything in sorted order, and the
first ``packs`` items of a row whose heaviest ``packs - 1`` items are positive land in packs
``0, 1, ...`` in turn.

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


def weight_array(weight: Any, name: str = "weight") -> np.ndarray:
    """``weight [L, E]`` (tensor, ndarray, nested list) as a float64 ndarray, checked finite and >= 0."""
    if isinstance(weight, torch.Tensor):
        if weight.is_complex() or weight.dtype == torch.bool:
            raise ValueError(f"{name} must be a real integer or floating tensor, got dtype {weight.dtype}")
        weight = weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            weight = np.asarray(weight)
        except Exception as exc:
            raise ValueError(f"{name} cannot be read as an array: {exc}") from exc
        if weight.dtype == np.bool_ or weight.dtype.kind not in "iuf":
            raise ValueError(f"{name} must be a real integer or floating tensor, got dtype {weight.dtype}")
    if weight.ndim != 2:
        raise ValueError(f"{name} must have shape [layers, experts], got shape {tuple(weight.shape)}")
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    if not np.isfinite(weight).all():
        raise ValueError(f"{name} contains NaN or inf")
    if weight.size and weight.min() < 0:
        layer, expert = (int(i) for i in np.argwhere(weight < 0)[0])
        raise ValueError(f"{name} has a negative load at layer {layer}, expert {expert}")
    return weight + 0.0  # a fresh array; -0.0 becomes 0.0


def as_weight(weight: Any, name: str = "weight") -> torch.Tensor:
    """``weight [L, E]`` (tensor, ndarray, nested list) as float64 CPU, checked finite and >= 0."""
    return torch.from_numpy(weight_array(weight, name))


def inverse_perm(perm_BN: np.ndarray) -> np.ndarray:
    """Inverse of a batch of permutations ``[B, n]``."""
    B, n = perm_BN.shape
    inv = np.empty_like(perm_BN)
    inv[np.arange(B)[:, None], perm_BN] = np.arange(n)
    return inv


def _left_sum(x: np.ndarray) -> np.ndarray:
    """Sum over the last dimension strictly left to right (bit-identical to Python's ``sum``).

    Integer-valued float64 sums below 2**53 are exact in any order, so they take ``sum``;
    other values take a cumulative sum, which NumPy accumulates sequentially.
    """
    if (x == np.round(x)).all() and float(x.sum()) < 2.0**53:
        return x.sum(-1)
    return np.cumsum(x, axis=-1)[..., -1]


def stable_order_desc(weight_BN: np.ndarray) -> np.ndarray:
    """``order [B, n]``: each row's indices by descending weight, ties by index (a stable sort).

    Fast path: one integer sort per row of keys holding the weight's IEEE bits (of a value
    >= 0 they order like the value) above the index; a few low mantissa bits make room for
    the index, so two weights differing only there could come out misordered. The result
    is checked (exact weights non-increasing along each row) and, in that rare case,
    replaced by NumPy's stable argsort.
    """
    B, n = weight_BN.shape
    if n <= 1:
        return np.zeros((B, n), dtype=np.int64)
    idx_bits = int(n - 1).bit_length()
    bits = (weight_BN + 0.0).view(np.int64)  # + 0.0: -0.0 -> 0.0; finite >= 0 -> [0, 2**63 - 2**52]
    key = ((np.int64(0x7FF0000000000000) - bits) >> idx_bits) << idx_bits
    key |= np.arange(n)
    key.sort(axis=1)
    order = key & ((1 << idx_bits) - 1)
    flat = order + (np.arange(B) * n)[:, None]
    ordered = weight_BN.reshape(-1).take(flat)
    if not (ordered[:, :-1] >= ordered[:, 1:]).all():
        order = np.argsort(-weight_BN, axis=1, kind="stable")
    return order


def pack_array(weight_BN: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`balanced_packing` on a float64 ndarray (>= 0); returns int64 ndarrays."""
    B, n = weight_BN.shape
    if n % num_packs:
        raise ValueError(f"balanced_packing: {n} items do not split evenly into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:  # the reference's shortcut: item i in pack i
        return np.broadcast_to(np.arange(n), (B, n)).copy(), np.zeros((B, n), dtype=np.int64)
    order = stable_order_desc(weight_BN)  # heaviest first, ties by index
    order_flat = (order + (np.arange(B) * n)[:, None]).reshape(-1)
    if num_packs == 1:  # one pack takes every item, in sorted order
        rank = np.empty(B * n, dtype=np.int64)
        rank[order_flat] = np.tile(np.arange(n), B)
        return np.zeros((B, n), dtype=np.int64), rank.reshape(B, n)
    columns = weight_BN.reshape(-1).take(order_flat).reshape(B, n).T.copy()  # [n, B] packing order
    # The loop keeps one float per pack: its weight while it has room, +inf once full.
    key = np.zeros(B * num_packs)
    key_BP = key.reshape(B, num_packs)
    count = np.zeros(B * num_packs, dtype=np.int64)
    base = np.arange(B, dtype=np.int64) * num_packs
    fills = np.zeros(per_pack + 1)
    fills[per_pack - 1] = np.inf  # added with the item that fills a pack
    sorted_flat = np.empty((n, B), dtype=np.int64)  # base + pack of each sorted item
    sorted_rank = np.empty((n, B), dtype=np.int64)
    first = 0
    if (columns[num_packs - 2] > 0).all():
        # every row's num_packs - 1 heaviest items are positive: item i lands in empty pack i
        key_BP[:] = columns[:num_packs].T
        count[:] = 1
        sorted_flat[:num_packs] = base + np.arange(num_packs)[:, None]
        sorted_rank[:num_packs] = 0
        first = num_packs
    for i in range(first, n):
        flat = np.add(key_BP.argmin(axis=1), base, out=sorted_flat[i])  # first minimum wins ties
        c = count[flat]
        sorted_rank[i] = c
        count[flat] = c + 1
        key[flat] += columns[i] + fills[c]
    pack_index = np.empty(B * n, dtype=np.int64)
    rank_in_pack = np.empty(B * n, dtype=np.int64)
    pack_index[order_flat] = (sorted_flat - base).T.reshape(-1)
    rank_in_pack[order_flat] = sorted_rank.T.reshape(-1)
    return pack_index.reshape(B, n), rank_in_pack.reshape(B, n)


def balanced_packing(weight_BN: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``n`` items into ``num_packs`` packs of ``n / num_packs`` items each, per row.

    Longest first: items in stable descending order of weight, each to the lightest pack
    that still has room (the lowest-numbered among equally light ones). As in the
    reference, one item per pack is the identity.

    Args:
        weight_BN: ``[B, n]`` item weights (>= 0); ``n`` divisible by ``num_packs``.
        num_packs: packs per row.
    Returns:
        ``pack_index [B, n]`` (pack of each item) and ``rank_in_pack [B, n]`` (its position
        in the pack, in packing order), both int64.
    """
    w = torch.as_tensor(weight_BN).detach().to(device="cpu", dtype=torch.float64).numpy() + 0.0
    pack, rank = pack_array(w, num_packs)
    return torch.from_numpy(pack), torch.from_numpy(rank)


def replicate_array(
    weight_BN: np.ndarray, num_phy: int, max_copies: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`replicate_experts` on a float64 ndarray; returns int64 ndarrays."""
    B, n = weight_BN.shape
    if num_phy < n:
        raise ValueError(f"replicate_experts: {num_phy} physical slots cannot hold {n} experts")
    if max_copies is not None and max_copies < 1:
        raise ValueError(f"replicate_experts: max_copies must be >= 1, got {max_copies}")
    extra = num_phy - n
    weight_flat = np.ascontiguousarray(weight_BN, dtype=np.float64).reshape(-1)
    score = weight_flat.copy()  # load per copy; -inf once capped
    score_BN = score.reshape(B, n)
    count = np.ones(B * n)  # float copies: exact, and divides like the reference
    base = np.arange(B, dtype=np.int64) * n
    picks = np.empty((extra, B), dtype=np.int64)  # base + expert of each extra slot
    ranks = np.empty((extra, B), dtype=np.int64)
    capped = max_copies is not None
    if capped and max_copies <= 1:
        score[:] = -np.inf
    for i in range(extra):
        flat = np.add(score_BN.argmax(axis=1), base, out=picks[i])  # first maximum wins ties
        c = count[flat]
        if not capped:
            ranks[i] = c
            c += 1.0
            count[flat] = c
            score[flat] = weight_flat[flat] / c
        else:
            ok = score[flat] > -np.inf  # False: every expert of the row is capped
            ranks[i] = np.where(ok, c, -1)
            c = c + ok
            count[flat] = c
            per_copy = np.where(c >= max_copies, -np.inf, weight_flat[flat] / c)
            score[flat] = np.where(ok, per_copy, score[flat])
            picks[i] = np.where(ok, flat, base - 1)
    phy2log = np.empty((B, num_phy), dtype=np.int64)
    phy2log[:, :n] = np.arange(n)
    phy2log[:, n:] = (picks - base).T  # -1 where no expert could take the slot
    rank = np.zeros((B, num_phy), dtype=np.int64)
    rank[:, n:] = ranks.T
    return phy2log, rank, count.reshape(B, n).astype(np.int64)


def replicate_experts(
    weight_BN: torch.Tensor, num_phy: int, max_copies: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give ``num_phy - n`` extra slots, one at a time, to the expert with most load per copy.

    Args:
        weight_BN: ``[B, n]`` expert loads (>= 0).
        num_phy: physical slots per row (>= n); slots ``0..n-1`` hold experts ``0..n-1``,
            slot ``n + i`` the ``i``-th extra copy given out.
        max_copies: optional cap on the copies of one expert (DeepSeek's algorithm has
            none; the policy caps at the GPUs an expert may use). A slot for which every
            expert is capped stays empty (-1).
    Returns:
        ``phy2log [B, num_phy]`` (expert of each slot, -1 empty), ``rank [B, num_phy]``
        (copy number of the slot's expert, -1 empty) and ``logcnt [B, n]``, all int64.
    """
    w = torch.as_tensor(weight_BN).detach().to(device="cpu", dtype=torch.float64).numpy()
    return tuple(torch.from_numpy(a) for a in replicate_array(w, num_phy, max_copies))  # type: ignore[return-value]


def group_node_map(weight_LE: np.ndarray, num_groups: int, num_nodes: int) -> np.ndarray:
    """Step 1: ``log2mlog [L, E]``, each expert's index in node-major order.

    Node ``n`` owns the "middle-logical" indices ``n*E/N .. (n+1)*E/N - 1``; its groups sit
    there in packing order, the experts of a group contiguous and in id order.
    """
    L, E = weight_LE.shape
    group_size = E // num_groups
    if num_groups == num_nodes:  # one group per node: the reference keeps group g on node g
        return np.broadcast_to(np.arange(E), (L, E)).copy()
    tokens_per_group = _left_sum(weight_LE.reshape(L, num_groups, group_size))
    group_pack, group_rank = pack_array(tokens_per_group, num_nodes)
    first = (group_pack * (num_groups // num_nodes) + group_rank) * group_size
    return (first[:, :, None] + np.arange(group_size)).reshape(L, E)


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
    weight_LE = weight_array(weight)
    L, E = weight_LE.shape
    _check_sizes(L, E, num_replicas, num_groups, num_nodes, num_gpus)
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1  # global: one group on one node
    phy2log, phyrank, logcnt = _rebalance_hierarchical(weight_LE, num_replicas, num_groups, num_nodes, num_gpus)
    X = max(int(logcnt.max()), 1) if L else 1
    log2phy = np.full((L, E * X), -1, dtype=np.int64)
    log2phy[np.arange(L)[:, None], phy2log * X + phyrank] = np.arange(num_replicas)
    as_t = torch.from_numpy
    return as_t(phy2log), as_t(log2phy).view(L, E, X), as_t(logcnt)


def _rebalance_hierarchical(
    weight_LE: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three steps for all layers; returns ``phy2log [L, R]``, ``phyrank [L, R]``, ``logcnt [L, E]``.

    Rows ``B = L * num_nodes`` are (layer, node) pairs; gathers and scatters go through flat
    indices (``np.take`` / ``put``), several times cheaper than 2-D fancy indexing.
    """
    L, E = weight_LE.shape
    per_node = E // num_nodes
    phy_per_node = num_phy // num_nodes
    phy_per_gpu = num_phy // num_gpus
    B = L * num_nodes
    log2mlog = group_node_map(weight_LE, num_groups, num_nodes)  # step 1
    identity = num_groups == num_nodes  # node-major order is expert order
    mlog2log = log2mlog if identity else inverse_perm(log2mlog)
    w_mlog = (weight_LE if identity else np.take_along_axis(weight_LE, mlog2log, 1)).reshape(B, per_node)
    phy2mlog, phyrank, mlogcnt = replicate_array(w_mlog, phy_per_node)  # step 2
    # node-major slot -> index into the flat [B * per_node] expert arrays
    phy2flat = phy2mlog + (np.arange(B) * per_node)[:, None]
    per_copy = (w_mlog / mlogcnt).reshape(-1).take(phy2flat)
    pack, rank = pack_array(per_copy, num_gpus // num_nodes)  # step 3
    # slot (in node-major order) each physical expert moves to, then its contents
    dest = pack * phy_per_gpu + rank + (np.arange(B) * phy_per_node)[:, None]
    pphy2mlog = np.empty(B * phy_per_node, dtype=np.int64)
    pphy2mlog[dest] = phy2flat  # flat expert index = layer * E + node-major expert
    pphyrank = np.empty(B * phy_per_node, dtype=np.int64)
    pphyrank[dest] = phyrank
    pphy2mlog = pphy2mlog.reshape(L, num_phy)
    logcnt = mlogcnt.reshape(L, E)
    if identity:
        phy2log = pphy2mlog - (np.arange(L) * E)[:, None]
    else:
        phy2log = mlog2log.reshape(-1).take(pphy2mlog)
        logcnt = np.take_along_axis(logcnt, log2mlog, 1)
    return phy2log, pphyrank.reshape(L, num_phy), logcnt
