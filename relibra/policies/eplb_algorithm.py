"""DeepSeek's EPLB (expert-parallel load balancer): its three steps as NumPy functions over rows.

Legend:

    L  layers                 E  logical experts per layer       P  physical slots per layer
    N  nodes                  G  GPUs                            X  most copies of one expert
    B  independent rows of one step (layers, or layers x nodes)  n  items per row

The algorithm of DeepSeek's reference ``eplb.py``, hierarchical when ``num_groups % num_nodes
== 0``, else global (the same with one group and one node):

1. :func:`node_major_order`: sum each expert group's load and pack the groups onto nodes,
   longest first (each node takes ``num_groups / N`` of them);
2. :func:`replicate_rows`: inside each node, give every extra physical slot, one at a time,
   to the expert with the highest load per copy;
3. :func:`pack_rows`: pack each node's physical copies (load per copy) onto its GPUs the same
   longest-first way, every GPU taking ``P / G`` of them.

:func:`rebalance_experts` composes them with DeepSeek's contract; the ``eplb`` policy composes
the same three steps for relibra's memory model (:mod:`.eplb_placement`). Each step works on
all rows at once, in NumPy (torch's per-call cost is several times NumPy's on these small
arrays; torch only at the public boundary). The plain per-layer loop version the tests hold
this to is :mod:`.eplb_reference`.

Tie-breaking, which decides the exact output: sorts are stable, heaviest first with ties by
index; the lightest pack with room is the lowest-numbered among equals; the expert with the
highest load per copy is the lowest-numbered among equals. With these rules the public test
vector (REFERENCE.md) is reproduced exactly.

Dtype: ``weight`` may be any real integer or floating tensor (or array, or nested list); it is
converted to float64 on the CPU, so integer loads are exact up to 2**53 and every sum is taken
left to right in a fixed order (the reference works in float32, which rounds group sums above
2**24 tokens: on such loads ties can break differently). Results are int64.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import torch

__all__ = ["rebalance_experts", "expert_weight", "node_major_order", "replicate_rows", "pack_rows",
           "sorted_desc", "pack_sorted_row"]

_INF_BITS = np.int64(0x7FF0000000000000)  # the bits of +inf; finite floats >= +0.0 lie below


def rebalance_experts(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek EPLB: replicate and place experts so every GPU gets a similar load.

    Args:
        weight: ``[L, E]`` load of every logical expert (integer or float; see the module
            docstring on dtypes).
        num_replicas: P physical slots per layer, a multiple of ``num_gpus``, >= E.
        num_groups: expert groups (group-limited routing); must divide E where the path is
            hierarchical (the global path ignores them, as DeepSeek's does).
        num_nodes: nodes; hierarchical when it divides ``num_groups``, else global.
        num_gpus: GPUs, a multiple of ``num_nodes``. GPU ``g`` holds slots
            ``g*P/G .. (g+1)*P/G - 1``.
    Returns:
        ``phy2log [L, P]`` logical expert of every physical slot, ``log2phy [L, E, X]``
        physical slots of every expert (by copy number, -1 padded, ``X = logcnt.max()``)
        and ``logcnt [L, E]`` copies of every expert; all int64 on the CPU.
    """
    weight_LE = expert_weight(weight)
    L, E = weight_LE.shape
    _check_sizes(E, num_replicas, num_groups, num_nodes, num_gpus)
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1  # global: one group on one node
    if L == 0:
        empty = torch.zeros(0, num_replicas, dtype=torch.int64)
        return empty, torch.zeros(0, E, 1, dtype=torch.int64), torch.zeros(0, E, dtype=torch.int64)
    phy2log, log2phy, logcnt = _rebalance(weight_LE, num_replicas, num_groups, num_nodes, num_gpus)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)


def _rebalance(
    weight_LE: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three steps for all layers: ``phy2log [L, P]``, ``log2phy [L, E, X]``, ``logcnt [L, E]``.

    Rows ``b = layer * N + node`` hold a node's ``n = E / N`` experts in node-major order and
    its ``P / N`` physical copies: copy ``s < n`` is expert ``s``'s first, copy ``n + i`` the
    ``i``-th extra copy of step 2. Step 3 gives every copy its slot on the node (``GPU * P / G +
    place on the GPU``). The outputs are scatters through flat indices (``layer * size + i``),
    several times cheaper than NumPy's 2-D fancy indexing at these sizes.
    """
    L, E = weight_LE.shape
    N = num_nodes
    n, phy_per_node, B = E // N, num_phy // N, L * N
    layer_expert0 = np.arange(0, L * E, E)[:, None]  # flat index of every layer's expert 0
    order_LE = node_major_order(weight_LE, num_groups, N)  # step 1
    weight_Bn = weight_LE.reshape(-1)[order_LE + layer_expert0].reshape(B, n)
    copy_expert, copy_rank, count_Bn = replicate_rows(weight_Bn, phy_per_node)  # step 2: [B, P/N] each
    copy_flat = copy_expert + np.arange(0, B * n, n)[:, None]  # the copy's expert in weight_Bn, flat
    per_copy = (weight_Bn / count_Bn).reshape(-1)[copy_flat]
    slot = pack_rows(per_copy, num_gpus // N)  # step 3: slot on the node of every copy
    slot += (np.arange(B) % N * phy_per_node)[:, None]  # slot in the layer
    slot_LP = slot.reshape(L, num_phy)
    expert_LP = order_LE.reshape(-1)[copy_flat].reshape(L, num_phy)  # logical expert of every copy
    phy2log = np.empty((L, num_phy), dtype=np.int64)
    phy2log.reshape(-1)[slot_LP + np.arange(0, L * num_phy, num_phy)[:, None]] = expert_LP
    X = int(count_Bn.max())
    log2phy = np.full((L, E, X), -1, dtype=np.int64)
    log2phy.reshape(-1)[(expert_LP + layer_expert0) * X + copy_rank.reshape(L, num_phy)] = slot_LP
    logcnt = np.empty((L, E), dtype=np.int64)
    logcnt.reshape(-1)[order_LE + layer_expert0] = count_Bn.reshape(L, E)
    return phy2log, log2phy, logcnt


def expert_weight(weight: Any, name: str = "weight") -> np.ndarray:
    """``weight [L, E]`` (tensor, ndarray, nested list) as a new float64 ndarray, checked finite and >= 0."""
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().cpu().numpy()
    else:
        try:
            weight = np.asarray(weight)
        except Exception as exc:  # ragged lists and other non-arrays: say what the input was
            raise ValueError(f"{name} cannot be read as an array: {exc}") from exc
    if weight.dtype == np.bool_ or weight.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a real integer or floating tensor, got dtype {weight.dtype}")
    if weight.ndim != 2:
        raise ValueError(f"{name} must have shape [layers, experts], got shape {tuple(weight.shape)}")
    weight = weight.astype(np.float64)  # a fresh array
    if not np.isfinite(weight).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (weight < 0).any():
        layer, expert = (int(i) for i in np.argwhere(weight < 0)[0])
        raise ValueError(f"{name} has a negative load at layer {layer}, expert {expert}")
    return weight


def _check_sizes(E: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    for name, value in (
        ("num_replicas", num_replicas),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
        ("num_gpus", num_gpus),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"rebalance_experts: {name} must be a positive int, got {value!r}")
    if E == 0:
        raise ValueError("rebalance_experts: weight has no experts")
    if num_replicas < E:
        raise ValueError(f"rebalance_experts: num_replicas={num_replicas} < {E} logical experts")
    if num_groups % num_nodes == 0 and E % num_groups:  # the global path ignores groups, as DeepSeek's
        raise ValueError(f"rebalance_experts: num_groups={num_groups} does not divide {E} experts")
    if num_gpus % num_nodes:
        raise ValueError(f"rebalance_experts: num_nodes={num_nodes} does not divide num_gpus={num_gpus}")
    if num_replicas % num_gpus:
        raise ValueError(f"rebalance_experts: num_gpus={num_gpus} does not divide num_replicas={num_replicas}")


def node_major_order(weight_LE: np.ndarray, num_groups: int, num_nodes: int) -> np.ndarray:
    """Step 1: ``order_LE``, the experts of every layer in node-major order.

    Node ``k`` gets ``order_LE[:, k*E/N : (k+1)*E/N]``: the groups packed onto it (group
    loads, longest first, :func:`pack_rows`) in packing order, a group's experts contiguous and
    in id order. With one group per node the reference keeps group ``g`` on node ``g``: the
    identity.
    """
    L, E = weight_LE.shape
    if num_groups == num_nodes:
        return np.broadcast_to(np.arange(E), (L, E)).copy()
    group_size = E // num_groups
    group_load = _left_sum(weight_LE.reshape(L, num_groups, group_size))
    group_place = pack_rows(group_load, num_nodes)  # [L, groups]: node * groups per node + rank
    first = group_place * group_size + np.arange(0, L * E, E)[:, None]
    order = np.empty((L, E), dtype=np.int64)
    order.reshape(-1)[(first[:, :, None] + np.arange(group_size)).reshape(-1)] = np.tile(np.arange(E), L)
    return order


def _left_sum(x: np.ndarray) -> np.ndarray:
    """Sum over the last dimension strictly left to right (bit-identical to Python's ``sum``).

    Integer-valued float64 sums below 2**53 are exact in any order, so they take ``sum``;
    other values take a cumulative sum, which NumPy accumulates sequentially.
    """
    if (x == np.round(x)).all() and float(x.sum()) < 2.0**53:
        return x.sum(-1)
    return np.cumsum(x, axis=-1)[..., -1]


def replicate_rows(
    weight_Bn: np.ndarray, num_phy: int, max_copies: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 2: give ``num_phy - n`` extra slots, one at a time, to the expert with most load per copy.

    Args:
        weight_Bn: ``[B, n]`` float64 expert loads (>= 0).
        num_phy: physical slots per row (>= n); slots ``0..n-1`` hold experts ``0..n-1``, slot
            ``n + i`` the ``i``-th extra copy given out.
        max_copies: optional cap on the copies of one expert (DeepSeek's algorithm has none;
            the ``eplb`` policy caps at the GPUs an expert may use). Slots left once every
            expert is capped stay empty (-1).
    Returns:
        ``expert [B, num_phy]`` (expert of each slot, -1 empty), ``rank [B, num_phy]`` (copy
        number of the slot's expert, 0 for the first copy, -1 empty) and ``count [B, n]``
        (copies of each expert), all int64.
    """
    B, n = weight_Bn.shape
    if num_phy < n:
        raise ValueError(f"replicate_rows: {num_phy} physical slots cannot hold {n} experts")
    if max_copies is not None and max_copies < 1:
        raise ValueError(f"replicate_rows: max_copies must be >= 1, got {max_copies}")
    extra = num_phy - n
    if max_copies is not None:  # every expert capped after this many: the rest stay empty
        extra = min(extra, n * (max_copies - 1))
    weight = np.ascontiguousarray(weight_Bn, dtype=np.float64).reshape(-1)
    score = weight.copy()  # load per copy of every expert; -inf once capped
    count = np.ones(B * n, dtype=np.int64)
    row_first = np.arange(0, B * n, n)
    expert = np.full((B, num_phy), -1, dtype=np.int64)
    rank = np.full((B, num_phy), -1, dtype=np.int64)
    expert[:, :n], rank[:, :n] = np.arange(n), 0
    for i in range(n, n + extra):
        flat = score.reshape(B, n).argmax(axis=1) + row_first  # first maximum: lowest expert among ties
        copies = count[flat]
        expert[:, i], rank[:, i] = flat - row_first, copies
        copies += 1
        count[flat] = copies
        score[flat] = weight[flat] / copies  # int -> float64 exactly: divides like the reference
        if max_copies is not None:
            score[flat[copies >= max_copies]] = -np.inf
    return expert, rank, count.reshape(B, n)


def pack_rows(weight_Bn: np.ndarray, num_packs: int) -> np.ndarray:
    """Step 3: pack ``n`` items into ``num_packs`` packs of ``n / num_packs`` items each, per row.

    Longest first: items in stable descending order of weight, each to the lightest pack that
    still has room (the lowest-numbered among equally light ones). As in the reference, one
    item per pack is the identity.

    Args:
        weight_Bn: ``[B, n]`` float64 item weights (>= 0); ``n`` divisible by ``num_packs``.
        num_packs: packs per row.
    Returns:
        ``place [B, n]`` int64: ``pack * (n / num_packs) + rank in the pack`` (packing order) of
        every item.
    """
    B, n = weight_Bn.shape
    if n % num_packs:
        raise ValueError(f"pack_rows: {n} items do not split evenly into {num_packs} packs")
    if n == num_packs:
        return np.broadcast_to(np.arange(n), (B, n)).copy()
    order, ordered = sorted_desc(weight_Bn)
    place = np.empty(B * n, dtype=np.int64)
    place[order] = _pack_sorted(ordered, num_packs)
    return place.reshape(B, n)


def sorted_desc(weight_Bn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row by descending weight (>= +0.0), ties by index: a stable sort of ``-weight``.

    Returns ``order [B, n]`` as flat indices (``b * n + i``) and the sorted weights. It sorts
    integer keys, several times faster than NumPy's stable float sort: the complemented IEEE
    bits of the weight (for values >= +0.0 they order like the values) with the index in the
    low mantissa bits. Two weights that differ only in those bits could come out misordered,
    so the sorted weights are checked and the rows where that happened are sorted again
    exactly (:func:`_stable_sorted_desc`).
    """
    B, n = weight_Bn.shape
    index_bits = (1 << int(n - 1).bit_length()) - 1
    weight_Bn = weight_Bn + 0.0  # contiguous, and -0.0 -> +0.0: the key reads the sign bit
    key = np.subtract(_INF_BITS, weight_Bn.view(np.int64))  # descending
    key &= ~index_bits
    key |= np.arange(n)
    key.sort(axis=1)
    key &= index_bits
    key += np.arange(0, B * n, n)[:, None]
    ordered = weight_Bn.reshape(-1)[key]
    misordered = np.flatnonzero((ordered[:, :-1] < ordered[:, 1:]).any(axis=1))
    if misordered.size:
        key[misordered] = _stable_sorted_desc(weight_Bn[misordered]) + (misordered * n)[:, None]
        ordered[misordered] = weight_Bn.reshape(-1)[key[misordered]]
    return key, ordered


def _stable_sorted_desc(weight_Bn: np.ndarray) -> np.ndarray:
    """``[B, n]`` indices of every row by descending weight, ties by index (NumPy's stable sort)."""
    return np.argsort(-weight_Bn, axis=1, kind="stable")


def _pack_sorted(ordered_Bn: np.ndarray, num_packs: int) -> np.ndarray:
    """Longest-first packing of rows sorted heaviest first: ``place [B, n]`` of the j-th heaviest.

    The items go in rounds of ``num_packs``. When every pack holds ``r`` items at the start of
    round ``r`` and every pack served before the round's last turn ends strictly heavier than
    the heaviest pack was at the round's start, the greedy gives the round's items, heaviest
    first, to the packs in ascending order of weight (ties by index), one each: at each turn
    the lightest pack not yet served is the lightest of all. (The last round always is such a
    round: each pack has one place left.) So every row takes all rounds that way, one sort of
    ``[B, num_packs]`` a round; the rows where some round was not of that kind (rare on real
    loads: ties and zeros make them) are packed again by the greedy itself
    (:func:`pack_sorted_row`).
    """
    B, n = ordered_Bn.shape
    per_pack = n // num_packs
    items = ordered_Bn.reshape(B, per_pack, num_packs)
    pack = np.empty((B, per_pack, num_packs), dtype=np.int64)
    load = np.zeros((B, num_packs))
    load_flat, row_first = load.reshape(-1), np.arange(0, B * num_packs, num_packs)[:, None]
    in_rounds = np.ones(B, dtype=bool)
    for r in range(per_pack):
        lightest_first = load.argsort(axis=1, kind="stable")
        pack[:, r] = lightest_first
        flat = lightest_first + row_first
        start = load_flat[flat]
        end = start + items[:, r]
        if r < per_pack - 1:
            in_rounds &= (end[:, :-1] > start[:, -1:]).all(axis=1)
        load_flat[flat] = end
    place = pack.reshape(B, n) * per_pack
    place += np.repeat(np.arange(per_pack), num_packs)  # the round is the rank in the pack
    for row in np.flatnonzero(~in_rounds).tolist():
        place[row] = pack_sorted_row(ordered_Bn[row].tolist(), num_packs)
    return place


def pack_sorted_row(items: list[float], num_packs: int) -> list[int]:
    """The longest-first greedy itself, for one row sorted heaviest first: ``place`` of each item.

    A heap of ``(load, pack)`` over the packs with room pops the lightest, ties by index;
    loads add up in item order, as in the reference.
    """
    per_pack = len(items) // num_packs
    heap = [(0.0, p) for p in range(num_packs)]
    count = [0] * num_packs
    place = []
    for weight in items:
        load, p = heapq.heappop(heap)
        place.append(p * per_pack + count[p])
        count[p] += 1
        if count[p] < per_pack:
            heapq.heappush(heap, (load + weight, p))
    return place
