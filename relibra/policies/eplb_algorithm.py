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

The reference loops over layers in Python; here every step handles all layers (and nodes)
at once, on NumPy arrays (torch's per-call dispatch costs several times more at these
sizes; torch only at the public boundary). Step 2 is one ``argmax`` and a few ``[B]``-vector
operations per extra slot. Step 3 sorts every node's copies once (an integer key made of
the loads' bits and the flat slot, checked; :func:`_sort_slots`), then packs a round of
``G / N`` copies at a time, one argsort per round, where the greedy provably gives one copy
to each GPU in load order (see
:func:`_pack_rounds`; other rows, rare on real loads, go to :func:`pack_slots`). Every
physical copy is named by one integer, ``flat expert * X + copy rank``, which is also its
index in ``log2phy``, so the outputs are two scatters.

Speed at DeepSeek-V3's shape is set less by arithmetic than by memory: each pass over a
``[B, R]`` array costs tens of microseconds when the cache is cold (as it is right after
other work), so the code keeps passes and fresh arrays few and caches index constants per
shape (:func:`_frame`); ``benchmarks/eplb.py`` measures it both cold (interleaved with the
loop reference) and back-to-back.

Dtype: ``weight`` may be any real integer or floating tensor (or array / nested list); it
is converted to float64 on the CPU, so integer loads are exact up to 2**53 and every sum is
taken left to right in a fixed order (the reference works in float32, which rounds group
sums above 2**24 tokens: on such loads ties can break differently). Results are int64.
"""

from __future__ import annotations

import functools
import heapq
from typing import Any

import numpy as np
import torch

__all__ = ["rebalance_experts", "balanced_packing", "replicate_experts", "as_weight"]


_FINITE_BITS = np.uint64(0x7FF0000000000000)  # bits of +inf: finite values >= +0.0 lie below
_INF_BITS = np.int64(0x7FF0000000000000)


def weight_array(weight: Any, name: str = "weight") -> np.ndarray:
    """``weight [L, E]`` (tensor, ndarray, nested list) as a float64 ndarray, checked finite and >= 0.

    May share memory with ``weight`` (callers only read it). -0.0 comes back as +0.0.
    """
    if isinstance(weight, torch.Tensor):
        # Fast path (the common call: a float64 CPU tensor): one reduction over the raw bits
        # checks everything, since finite values >= +0.0 are exactly the bit patterns below
        # +inf's (negatives, -0.0, NaN and inf all lie above). Anything else takes the
        # checked conversion below.
        try:
            fast = weight.numpy()
        except Exception:  # not viewable (needs grad, on a device, ...): the checked path says why
            fast = None
        if (
            fast is not None
            and fast.dtype == np.float64
            and fast.ndim == 2
            and fast.size
            and fast.flags.c_contiguous
            and fast.view(np.uint64).max() < _FINITE_BITS
        ):
            return fast
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
    weight = np.ascontiguousarray(weight, dtype=np.float64)  # no copy when already so (never written)
    if weight.size:
        low, high = weight.min(), weight.max()  # NaN propagates to both
        if np.isnan(low) or np.isinf(low) or np.isinf(high):
            raise ValueError(f"{name} contains NaN or inf")
        if low < 0:
            layer, expert = (int(i) for i in np.argwhere(weight < 0)[0])
            raise ValueError(f"{name} has a negative load at layer {layer}, expert {expert}")
        if low == 0 and np.signbit(weight).any():
            weight = weight + 0.0  # -0.0 -> +0.0: the sort keys below read the sign bit
    return weight


def as_weight(weight: Any, name: str = "weight") -> torch.Tensor:
    """``weight [L, E]`` (tensor, ndarray, nested list) as float64 CPU, checked finite and >= 0."""
    return torch.from_numpy(weight_array(weight, name) + 0.0)  # a fresh tensor


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


def _sorted_desc(weight_BN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row by descending weight (>= 0), ties by index: a stable sort of ``-weight``.

    Returns ``order [B, n]`` as flat indices (``b * n + i``) and the sorted weights. Long
    rows sort integer keys instead, several times faster: the weight's IEEE bits (for
    values >= 0 they order like the values) with the index in the low mantissa bits. Two
    weights differing only there could come out misordered, so the sorted weights are
    checked and, in that rare case, NumPy's stable sort is used instead.
    """
    B, n = weight_BN.shape
    offsets = (np.arange(B) * n)[:, None]
    flat_w = weight_BN.reshape(-1)
    if n > 16:
        idx_mask = (1 << int(n - 1).bit_length()) - 1
        key = (weight_BN + 0.0).view(np.int64)  # + 0.0: -0.0 -> 0.0; [0, inf] -> [0, 0x7FF0 << 48]
        np.subtract(np.int64(0x7FF0000000000000), key, out=key)  # descending
        key &= ~idx_mask
        key |= np.arange(n)
        key.sort(axis=1)
        key &= idx_mask
        key += offsets
        ordered = flat_w.take(key)
        if (ordered[:, :-1] >= ordered[:, 1:]).all():
            return key, ordered
    order = np.argsort(-weight_BN, axis=1, kind="stable")
    order += offsets
    return order, flat_w.take(order)


def stable_order_desc(weight_BN: np.ndarray) -> np.ndarray:
    """``order [B, n]``: indices by descending weight (>= 0), ties by index (a stable sort)."""
    order, _ = _sorted_desc(weight_BN)
    return order - (np.arange(weight_BN.shape[0]) * weight_BN.shape[1])[:, None]


def pack_array(weight_BN: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`balanced_packing` on a float64 ndarray (>= 0); returns int64 ndarrays."""
    slot = pack_slots(weight_BN, num_packs)
    return np.divmod(slot, weight_BN.shape[1] // num_packs)


def pack_slots(weight_BN: np.ndarray, num_packs: int) -> np.ndarray:
    """Balanced packing as ``slot [B, n] = pack * (n / num_packs) + rank_in_pack`` (int64).

    The sorted items are taken in rounds of ``num_packs``. When every pack of a row holds
    the same number of items at the start of a round, the greedy usually gives the round's
    items, heaviest first, to the packs in ascending order of weight (ties by index), one
    each. It does exactly when every pack served before the last turn ends up strictly
    heavier than the heaviest pack at the round's start: then at each turn the lightest
    pack not yet served is the lightest of all (before the last round no pack is full; in
    the last round served packs are full). Rows where that holds take the round in a few
    array operations; the others take it item by item (the greedy itself). On
    DeepSeek-V3's real loads nearly every round of every row is of the first kind.
    """
    B, n = weight_BN.shape
    if n % num_packs:
        raise ValueError(f"balanced_packing: {n} items do not split evenly into {num_packs} packs")
    P, per_pack = num_packs, n // num_packs
    if per_pack == 1:  # the reference's shortcut: item i in pack i
        return np.broadcast_to(np.arange(n), (B, n)).copy()
    order_flat, ordered = _sorted_desc(weight_BN)  # heaviest first, ties by index
    slot = np.empty(B * n, dtype=np.int64)
    if P == 1:  # one pack takes every item, in sorted order
        slot[order_flat] = np.arange(n)
        return slot.reshape(B, n)
    # Turn-major layout: arrays [.., P, B] keep B (the long axis) innermost for every op.
    items = np.ascontiguousarray(ordered.reshape(B, per_pack, P).transpose(1, 2, 0))  # [round, turn, B]
    del ordered
    key = np.zeros(P * B)  # key[p * B + b]: weight of pack p of row b; +inf once full
    key_PB = key.reshape(P, B)
    count = np.zeros((P, B), dtype=np.int64)  # items per pack; kept for rows out of sync only
    cols = np.arange(B)
    slot_of = np.empty((per_pack, P, B), dtype=np.int64)  # slot of each sorted item
    fills = np.zeros(per_pack + 1)
    fills[per_pack - 1] = np.inf  # added with the item that fills a pack
    synced = np.ones(B, dtype=bool)  # every pack holds r items at the start of round r
    for r in range(per_pack):
        if r == 0:  # all packs empty (weight 0): in index order
            perm_PB = np.broadcast_to(np.arange(P)[:, None], (P, B))
            lightest = key_PB
        else:
            perm_PB = np.argsort(key_PB, axis=0, kind="stable")  # packs, lightest first
            flat = perm_PB * B + cols
            lightest = key.take(flat)
        ok = synced.copy()
        new = lightest + items[r]
        if r < per_pack - 1:  # served packs (all turns but the last) end heavier than any pack began
            ok &= lightest[P - 1] < new[: P - 1].min(axis=0)
        else:
            new[:] = np.inf  # the last round fills every pack
        rest = None if ok.all() else np.flatnonzero(~ok)
        if rest is not None:  # round-start state of the other rows (C order, so views stay views)
            k, c = key_PB.take(rest, axis=1), count.take(rest, axis=1)
            c[:, synced[rest]] = r
        np.multiply(perm_PB, per_pack, out=slot_of[r])
        slot_of[r] += r
        if r == 0:
            key_PB[:] = new
        else:
            key[flat] = new
        if rest is None:
            continue
        # the other rows take the round item by item: the greedy itself
        R = rest.size
        k_flat, c_flat, cols_R = k.reshape(-1), c.reshape(-1), np.arange(R)
        for j in range(P):
            pack = k.argmin(axis=0)  # first minimum: lowest index among ties
            f = pack * R + cols_R
            c_f = c_flat[f]
            slot_of[r, j, rest] = pack * per_pack + c_f
            c_flat[f] = c_f + 1
            k_flat[f] += items[r, j, rest] + fills[c_f]
        key_PB[:, rest], count[:, rest] = k, c
        synced[rest] = (c == r + 1).all(axis=0)
    slot[order_flat] = slot_of.transpose(2, 0, 1).reshape(B, n)
    return slot.reshape(B, n)


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
    if L == 0:
        empty = torch.zeros(0, num_replicas, dtype=torch.int64)
        return empty, torch.zeros(0, E, 1, dtype=torch.int64), torch.zeros(0, E, dtype=torch.int64)
    phy2log, log2phy, logcnt = _rebalance(weight_LE, num_replicas, num_groups, num_nodes, num_gpus)
    as_t = torch.from_numpy
    return as_t(phy2log), as_t(log2phy), as_t(logcnt)


def _replicate_flat(
    w_flat: np.ndarray, B: int, n: int, extra: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Step 2 for ``B`` rows of ``n`` experts (``w_flat [B*n]``), uncapped.

    Returns ``score [B*n]`` (final load per copy, ``w / cnt``), ``cnt [B*n]`` (int64
    copies), ``picks [extra, B]`` (flat expert given the ``i``-th extra slot) and
    ``after [extra, B]`` (its copies after that pick, i.e. the new copy's rank + 1).
    Each pick is a handful of operations on ``[B]`` vectors plus one ``argmax``.
    """
    base = np.arange(0, B * n, n)
    score = w_flat.copy()
    score_BN = score.reshape(B, n)
    cnt = np.ones(B * n, dtype=np.int64)
    picks = np.empty((extra, B), dtype=np.int64)
    after = np.empty((extra, B), dtype=np.int64)
    for i in range(extra):
        flat = score_BN.argmax(axis=1, out=picks[i])  # first maximum: lowest expert among ties
        flat += base
        c = np.add(cnt[flat], 1, out=after[i])
        cnt[flat] = c
        score[flat] = w_flat[flat] / c  # exact int -> float64: divides like the reference
    return score, cnt, picks, after


def _rows_descending(x_BN: np.ndarray) -> bool:
    """Whether every row of ``x_BN`` (C-contiguous) is non-increasing."""
    n = x_BN.shape[1]
    flat = x_BN.reshape(-1)
    ok = flat[:-1] >= flat[1:]  # contiguous: cheaper than comparing two strided views
    ok[n - 1 :: n] = True  # pairs across row boundaries
    return bool(ok.all())


def _pack_rounds(ordered: np.ndarray, num_packs: int, base: np.ndarray | None = None) -> np.ndarray:
    """Longest-first packing of rows already sorted heaviest first: ``slot [B, n]``.

    ``slot = pack * (n / num_packs) + rank in pack`` of the ``j``-th heaviest item, as
    :func:`pack_slots` gives it; with ``base [B, n]`` (each row's offset plus the item's
    round, i.e. its rank in the pack: see :func:`_frame`) the slot is ``pack * (n /
    num_packs) + base``. Packs a round of ``num_packs`` items at a time for all rows, then
    redoes with :func:`pack_slots` the (few) rows where some round was not provably "clean".
    In a clean round every pack holds the same number of items at its start and the greedy
    gives the round's items, heaviest first, to the packs in ascending order of load (ties
    by index), one each: it does exactly when every pack served before the last turn ends
    up strictly heavier than the heaviest pack at the round's start (see :func:`pack_slots`).
    The last round is always clean (each pack has one place left). The checks are made at
    the end: first the sufficient one that every pack ends a round heavier than the heaviest
    began it (the next round's lightest against this round's heaviest: ``[B]`` vectors), and
    only if some row fails it the exact one.
    """
    B, n = ordered.shape
    P = num_packs
    per_pack = n // P
    items = ordered.reshape(B, per_pack, P)  # [row, round, turn]
    pack = np.empty((B, per_pack, P), dtype=np.int64)  # pack of each item
    pack[:, 0, :] = np.arange(P)  # round 0: item p to (empty) pack p
    load = items[:, 0, :].copy()  # [B, P] by pack
    load_flat = load.reshape(-1)
    offsets = _row_offsets(B, P)
    exact = [(0.0, items[:, 0, : P - 1])]  # (heaviest at the start, served packs at the end)
    heaviest = [0.0]
    lightest_next = []  # lightest pack at the start of the next round
    for r in range(1, per_pack):
        perm = load.argsort(axis=1, kind="stable")  # packs, lightest first
        pack[:, r, :] = perm
        perm += offsets  # flat
        lightest = load_flat.take(perm)
        lightest_next.append(lightest[:, 0])
        if r == per_pack - 1:
            break
        heaviest.append(lightest[:, P - 1])
        new = lightest + items[:, r, :]
        exact.append((lightest[:, P - 1 :], new[:, : P - 1]))
        load_flat[perm] = new
    slot = pack.reshape(B, n)
    slot *= per_pack
    if base is None:
        base = np.repeat(np.arange(per_pack), P)
    slot += base
    if all(np.less(h, l).all() for h, l in zip(heaviest, lightest_next)):
        return slot
    clean = np.ones(B, dtype=bool)
    for start, end in exact:
        clean &= np.less(start, end).all(axis=1)
    rows = np.flatnonzero(~clean)
    offset = base[rows, :1] if base.ndim == 2 else 0  # the rows' offsets (round 0 adds nothing)
    if rows.size * n <= _FEW_ITEMS:  # usually one row or two: cheaper one by one
        redone = np.array([_greedy_sorted(ordered[row].tolist(), P) for row in rows.tolist()], dtype=np.int64)
        slot[rows] = redone.reshape(rows.size, n) + offset
    else:
        slot[rows] = pack_slots(ordered[rows], P) + offset  # sorted rows: its stable sort keeps the order
    return slot


@functools.lru_cache(maxsize=8)
def _row_offsets(B: int, P: int) -> np.ndarray:
    """``[B, P]`` first flat index of each row (``b * P``), cached read-only."""
    offsets = np.repeat(np.arange(0, B * P, P), P).reshape(B, P)
    offsets.flags.writeable = False
    return offsets


_FEW_ITEMS = 4096  # unclean rows up to this many items in all take the per-row greedy


def _greedy_sorted(items: list[float], num_packs: int) -> list[int]:
    """The greedy itself for one row sorted heaviest first: ``slot`` of each item.

    A heap of ``(load, pack)`` over the packs with room pops the lightest, ties by index;
    loads add up in item order, as in the reference.
    """
    per_pack = len(items) // num_packs
    heap = [(0.0, p) for p in range(num_packs)]
    count = [0] * num_packs
    slot = []
    for w in items:
        load, p = heapq.heappop(heap)
        slot.append(p * per_pack + count[p])
        count[p] += 1
        if count[p] < per_pack:
            heapq.heappush(heap, (load + w, p))
    return slot


@functools.lru_cache(maxsize=8)
def _frame(L: int, N: int, n: int, R: int, P: int) -> dict[str, np.ndarray]:
    """Index constants of one problem shape, cached read-only. Rows ``b = layer * N + node``.

    ``slot [B, R]`` flat slot ``b * R + s``; ``layer_R [B, 1]``
    the row's layer's first flat slot (``layer * N * R``); ``home_flat [B, n]`` flat expert
    ``b * n + s``; ``home_local [B, n]`` expert within the layer (``node * n + s``);
    ``layer_E [B]`` the row's layer's first flat expert (``layer * N * n``); ``pack_base
    [B, R]`` what :func:`_pack_rounds` adds to ``GPU * per_gpu`` (``b * R`` + the sorted
    copy's round, i.e. its place on its GPU).
    """
    B = L * N
    frame = {
        "slot": np.arange(B * R).reshape(B, R),
        "layer_R": np.repeat(np.arange(0, L * N * R, N * R), N)[:, None],
        "home_flat": np.arange(B * n).reshape(B, n),
        "home_local": np.tile(np.arange(N * n).reshape(N, n), (L, 1)),
        "layer_E": np.repeat(np.arange(0, L * N * n, N * n), N),
        "pack_base": np.arange(0, B * R, R)[:, None] + np.repeat(np.arange(R // P), P),
    }
    for array in frame.values():
        array.flags.writeable = False
    return frame


def _sort_slots(vals: np.ndarray, flat_slot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row of ``vals [B, R]`` (>= +0.0) heaviest first, ties by slot: ``(src, ordered)``.

    ``src [B, R]`` holds flat slots ``b * R + s`` (``flat_slot``), ``ordered`` their values.
    One integer sort: the values' bits, complemented for descending order, with the flat
    slot in the low bits (which orders ties by slot, the row part being constant). Values
    that differ only in those low bits could come out misordered: the gathered values are
    checked and the (rare) rows where that happened are sorted again exactly with
    :func:`_sorted_desc`.
    """
    B, R = vals.shape
    mask = (1 << int(flat_slot.size - 1).bit_length()) - 1
    key = np.subtract(_INF_BITS, vals.view(np.int64))  # descending
    key &= ~mask
    key |= flat_slot
    key.sort(axis=1)
    key &= mask
    ordered = vals.reshape(-1).take(key)
    if not _rows_descending(ordered):
        rows = np.flatnonzero(~(ordered[:, :-1] >= ordered[:, 1:]).all(axis=1))
        src, ordered[rows] = _sorted_desc(vals[rows])
        key[rows] = src + (rows * R - np.arange(0, rows.size * R, R))[:, None]  # sub-array rows -> rows
    return key, ordered


def _rebalance(
    weight_LE: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three steps for all layers; returns ``phy2log [L, R]``, ``log2phy [L, E, X]``, ``logcnt [L, E]``.

    Rows ``B = L * num_nodes`` are (layer, node) pairs with ``n`` experts (in node-major
    order) and ``R_node`` physical slots each: slot ``s < n`` holds expert ``s``'s first
    copy, slot ``n + i`` the ``i``-th extra copy given out in step 2. Step 3 sorts each
    row's slots by load per copy and packs them, which gives every slot's destination
    (``dest``, flat ``b * R_node + GPU * per_gpu + position``). Every copy is named by a
    code ``flat expert * X + copy rank``, which is also its flat index in ``log2phy``
    (when groups stay in place), so the outputs are two scatters. Gathers and scatters go
    through flat indices, cheaper than 2-D fancy indexing; index constants are cached per
    shape (:func:`_frame`).
    """
    L, E = weight_LE.shape
    N = num_nodes
    n, R_node, B = E // N, num_phy // N, L * N
    extra = R_node - n
    P = num_gpus // N  # GPUs (packs) per node
    per_gpu = R_node // P
    frame = _frame(L, N, n, R_node, P)
    identity = num_groups == N  # step 1 keeps group g on node g: node-major = expert order
    if identity:
        w_flat = weight_LE.reshape(-1)
    else:
        log2mlog = group_node_map(weight_LE, num_groups, N)  # step 1
        mlog2log = inverse_perm(log2mlog)
        w_flat = np.take_along_axis(weight_LE, mlog2log, 1).reshape(-1)
    score, cnt, picks, after = _replicate_flat(w_flat, B, n, extra)  # step 2
    X = int(cnt.max())
    code = np.empty((B, R_node), dtype=np.int64)  # of every slot
    np.multiply(frame["home_flat"], X, out=code[:, :n])
    extra_code = picks * X
    extra_code += after
    extra_code -= 1
    code[:, n:] = extra_code.T
    # step 3: ``src`` the slots by load per copy (flat, heaviest first; None: slot order)
    # and ``dest`` their destinations
    src = None
    if per_gpu == 1:  # one copy per GPU: the reference keeps slot order, no sort
        dest = frame["slot"]
    else:
        vals = np.empty((B, R_node))
        vals[:, :n] = score.reshape(B, n)
        vals[:, n:] = score.take(picks).T
        src, ordered = _sort_slots(vals, frame["slot"])
        del vals
        if P == 1:  # one GPU per node: copies in sorted order
            dest = frame["slot"]
        else:
            dest = _pack_rounds(ordered, P, frame["pack_base"])
        del ordered
    copies = code if src is None else code.reshape(-1).take(src)
    del code
    phy2log = np.empty((L, num_phy), dtype=np.int64)
    if identity:
        local = np.empty((B, R_node), dtype=np.int64)  # expert within the layer, of every slot
        local[:, :n] = frame["home_local"]
        local[:, n:] = (picks - frame["layer_E"]).T
        phy2log.reshape(-1)[dest] = local if src is None else local.reshape(-1).take(src)
        del local
        index = copies
    else:
        es = copies // X  # flat node-major experts
        log_local = mlog2log.reshape(-1).take(es)
        phy2log.reshape(-1)[dest] = log_local
        index = copies - es * X  # copy rank
        index += (log_local + (es // E) * E) * X
        del es
    log2phy = np.full(L * E * X, -1, dtype=np.int64)
    log2phy[index] = dest - frame["layer_R"]  # slot within the layer
    logcnt = cnt.reshape(L, E)
    if not identity:
        logcnt = np.take_along_axis(logcnt, log2mlog, 1)
    return phy2log, log2phy.reshape(L, E, X), logcnt
