"""Cross-node replicas, the two greedy steps: fill a node only to the target, and export to other nodes.

Legend: :mod:`relibra.policies.replica_cross` (which also says how the steps fit together).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["fill_to_target", "Exports", "plan_exports"]


def fill_to_target(hshare: np.ndarray, gpus_per_node: int, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bring every GPU of a node down to ``target`` with as little of the node's room as it takes.

    One spare slot per GPU. Every round the busiest GPU above ``target`` copies its hottest
    expert onto the GPU of the node whose room (``target`` minus its load) fits the move most
    tightly (the least room that takes ``min(share, excess)``; the most room if none does), and
    moves as much as fits. Unlike the intra-node greedy (the lightest GPU receives), this keeps
    the GPUs with most room free for cross-node replicas. At most ``Gn`` rounds.

    Args:
        hshare: ``[Gn*H, B]`` home-expert loads; on return, what each home copy keeps.
        target: ``[B]``.
    Returns:
        ``rep [Gn, B]`` (local home slot copied into each GPU's spare slot, -1 empty) and ``x [Gn, B]``.
    """
    GH, B = hshare.shape
    Gn = gpus_per_node
    H = GH // Gn
    rep = np.full((Gn, B), -1, np.int64)
    x = np.zeros((Gn, B), np.int64)
    load = hshare.reshape(Gn, H, B).sum(1)
    cols = np.arange(B)
    big = np.iinfo(np.int64).max
    for _ in range(Gn):
        donor = load.argmax(0)
        need = load[donor, cols] - target
        items = hshare.reshape(Gn, H, B)[donor, :, cols]  # [B, H]
        j = items.argmax(1)
        want = np.minimum(items[cols, j], need)
        room = np.where(rep < 0, target - load, -1)  # [Gn, B] free GPUs only (the donor has none: above target)
        fits = np.where(room >= want, room, big).argmin(0)
        recv = np.where(room[fits, cols] >= want, fits, room.argmax(0))
        amount = np.minimum(want, room[recv, cols])
        go = np.flatnonzero((need > 0) & (amount > 0))
        if go.size == 0:
            break
        d, r, a = donor[go], recv[go], amount[go]
        slot = d * H + j[go]
        hshare[slot, go] -= a
        load[d, go] -= a
        load[r, go] += a
        rep[r, go], x[r, go] = slot, a
    return rep, x


class Exports(NamedTuple):
    """Cross-node replicas chosen by :func:`plan_exports`, one entry each (``[X]`` arrays), and its rounds.

    ``problem``: the (micro-batch, layer) problem (row of the ``C`` tried); ``item``: the home
    slot exported, ``node * I + local slot``; ``gpu``: the receiving GPU (``node * Gn + local``);
    ``amount``: tokens it takes.
    """

    problem: np.ndarray
    item: np.ndarray
    gpu: np.ndarray
    amount: np.ndarray
    rounds: int


def plan_exports(share_CNI: np.ndarray, gpu_load_CG: np.ndarray, free_CG: np.ndarray, target_C: np.ndarray,
                 gpus_per_node: int, max_rounds: int) -> Exports:
    """Step 1 of the module docstring, every problem at once.

    Args:
        share_CNI: ``[C, N, I]`` home-expert loads.
        gpu_load_CG: ``[C, G]`` every GPU's load under the intra-node plan.
        free_CG: ``[C, G]`` bool: the GPU has a spare slot the intra-node plan left empty.
        target_C: ``[C]`` the level ``T``.
        max_rounds: at most this many rounds (each gives every exporting problem one receiver).
    Returns:
        the exports in round order (a function of the inputs alone: deterministic).
    """
    C, N, I = share_CNI.shape
    Gn = gpus_per_node
    G = N * Gn
    share = share_CNI.reshape(C, N * I).astype(np.int64, copy=True)
    W = share_CNI.sum(-1)  # [C, N]
    load = gpu_load_CG.astype(np.int64, copy=True)
    free = free_CG.copy()
    cap = Gn * target_C[:, None]
    gpu_bits = max(Gn - 1, 1).bit_length()
    big = np.iinfo(np.int64).max
    lightest = np.where(free, (load << gpu_bits) | (np.arange(G) % Gn), big).reshape(C, N, Gn).min(-1)  # [C, N]
    held = np.zeros(C * N * N * I, bool)  # [C, receiving node, item]: the node holds a copy already
    nodes = np.arange(N)
    out: list[tuple[np.ndarray, ...]] = []
    active = np.ones(C, bool)
    rounds = 0
    while rounds < max_rounds:
        c = np.flatnonzero(active)
        if c.size == 0:
            break
        rounds += 1
        rows = np.arange(c.size)
        excess = W[c] - cap[c]
        donor = excess.argmax(1)
        ex = excess[rows, donor]
        items = share[c[:, None], donor[:, None] * I + np.arange(I)]  # [c, I] the donor's experts
        j = items.argmax(1)
        item, s = donor * I + j, items[rows, j]
        blocked = held[(c[:, None] * N + nodes) * (N * I) + item[:, None]]
        key = np.where(blocked, big, lightest[c])
        recv = key.argmin(1)
        best = key[rows, recv]
        g = recv * Gn + (best & ((1 << gpu_bits) - 1))
        room = target_C[c] - np.where(best < big, best >> gpu_bits, target_C[c])
        amount = np.minimum(np.minimum(s, ex), room)
        go = (ex > 0) & (amount > 0)
        active[c[~go]] = False
        c, recv, item, g, amount = c[go], recv[go], item[go], g[go], amount[go]
        if c.size == 0:
            break
        share[c, item] -= amount
        W[c, item // I] -= amount
        load[c, g] += amount
        free[c, g] = False
        held[(c * N + recv) * (N * I) + item] = True
        gpus = recv[:, None] * Gn + np.arange(Gn)
        lightest[c, recv] = np.where(free[c[:, None], gpus], (load[c[:, None], gpus] << gpu_bits) | np.arange(Gn),
                                     big).min(1)
        out.append((c, item, g, amount))
    if not out:
        empty = np.zeros(0, np.int64)
        return Exports(empty, empty, empty, empty, rounds)
    return Exports(*(np.concatenate([o[k] for o in out]) for k in range(4)), rounds)
