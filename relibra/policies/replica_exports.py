"""Cross-node replicas, the two greedy steps: fill a node only to the target, and export to other nodes.

Legend: :mod:`relibra.policies.replica_cross` (which also says how the steps fit together).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["fill_to_target", "Exports", "plan_exports"]


def fill_to_target(share_BI: np.ndarray, gpus_per_node: int, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bring every GPU of a node down to ``target``, using as little of the node's room as it takes.

    One spare slot per GPU. Every round the busiest GPU above ``target`` copies its hottest
    expert onto the GPU whose room (``target`` minus its load) fits the move most tightly (the
    least room that takes ``min(share, excess)``; the most room if none does) and moves as much
    as fits. Unlike the intra-node greedy (the lightest GPU receives), this keeps the GPUs with
    most room free for cross-node replicas. At most ``Gn`` rounds, each over the problems still
    above ``target``.

    Args:
        share_BI: ``[B, Gn*H]`` home-expert loads, problem-first; on return, what each home copy keeps.
        target: ``[B]``.
    Returns:
        ``rep [B, Gn]`` (local home slot copied into each GPU's spare slot, -1 empty) and ``x [B, Gn]``.
    """
    B, GH = share_BI.shape
    Gn = gpus_per_node
    H = GH // Gn
    # rows are the problems still moving (gathers of whole rows), flat indices for the updates,
    # and arg-min/max over GPUs as one min/max of (value << bits | GPU code)
    share_flat = share_BI.reshape(-1)
    load = share_BI.reshape(B, Gn, H).sum(-1)  # [B, Gn]
    load_flat = load.reshape(-1)
    rep = np.full((B, Gn), -1, np.int64)
    x = np.zeros((B, Gn), np.int64)
    bits = max(Gn - 1, 1).bit_length()
    mask, big = (1 << bits) - 1, np.iinfo(np.int64).max
    gpu = np.arange(Gn)
    act = np.arange(B)
    for _ in range(Gn):
        ld = load[act]
        top = ((ld << bits) | (mask - gpu)).max(1)  # ties to the lowest GPU
        need = (top >> bits) - target[act]
        go = need > 0
        act, ld, donor, need = act[go], ld[go], mask - (top[go] & mask), need[go]
        if act.size == 0:
            break
        items = share_flat.take((act * GH + donor * H)[:, None] + np.arange(H))  # [b, H] the donor's experts
        j = items.argmax(1)
        want = np.minimum(items[np.arange(act.size), j], need)
        room = np.where(rep[act] < 0, target[act, None] - ld, -1)  # free GPUs only (the donor: above target)
        fits = np.where(room >= want[:, None], (room << bits) | gpu, big).min(1)  # tightest fit, lowest GPU
        most = ((room << bits) | (mask - gpu)).max(1)
        recv = np.where(fits < big, fits & mask, mask - (most & mask))
        amount = np.minimum(want, np.where(fits < big, fits >> bits, most >> bits))
        go = amount > 0
        act, donor, recv, amount, slot = act[go], donor[go], recv[go], amount[go], donor[go] * H + j[go]
        share_flat[act * GH + slot] -= amount
        load_flat[act * Gn + donor] -= amount
        load_flat[act * Gn + recv] += amount
        rep.reshape(-1)[act * Gn + recv], x.reshape(-1)[act * Gn + recv] = slot, amount
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
    """Step 2 of :mod:`relibra.policies.replica_cross`, every problem at once.

    Every round, per problem, the node furthest above ``Gn * T`` moves ``min(share, excess,
    room)`` of its hottest expert into the empty spare slot of the free GPU with most room below
    ``T`` (on any other node). A receiving GPU takes one cross-node replica, so no GPU gets two
    copies of an expert, even when a node takes it twice. A problem stops when its exporter
    moves nothing.

    Args:
        share_CNI: ``[C, N, I]`` home-expert loads.
        gpu_load_CG: ``[C, G]`` every GPU's load (nodes with room: as planned so far).
        free_CG: ``[C, G]`` bool: the GPU may receive (an empty spare slot, on a node with room).
        target_C: ``[C]`` the level ``T``.
        max_rounds: at most this many rounds.
    Returns:
        the exports in round order (a function of the inputs alone: deterministic).
    """
    C, N, I = share_CNI.shape
    Gn = gpus_per_node
    G = N * Gn
    share = share_CNI.reshape(C, N * I).astype(np.int64, copy=True)
    excess = share_CNI.sum(-1) - Gn * target_C[:, None]  # [C, N]
    load = gpu_load_CG.astype(np.int64, copy=True)
    free = free_CG.copy()
    bits = max(Gn - 1, 1).bit_length()
    mask, big = (1 << bits) - 1, np.iinfo(np.int64).max
    lightest = np.where(free, (load << bits) | (np.arange(G) % Gn), big).reshape(C, N, Gn).min(-1)  # [C, N]
    share_flat, excess_flat, load_flat, free_flat = share.reshape(-1), excess.reshape(-1), load.reshape(-1), \
        free.reshape(-1)
    node_gpus, node_items = np.arange(Gn), np.arange(I)
    out: list[tuple[np.ndarray, ...]] = []
    c = np.arange(C)
    rounds = 0
    while rounds < max_rounds and c.size:  # flat indices and take: far faster than 2-D fancy indexing
        rounds += 1
        rows = np.arange(c.size)
        ex = excess[c]
        donor = ex.argmax(1)
        items = share_flat.take((c * (N * I) + donor * I)[:, None] + node_items)  # [c, I] the donor's experts
        j = items.argmax(1)
        recv = lightest[c].argmin(1)
        best = lightest.reshape(-1).take(c * N + recv)
        room = target_C[c] - np.where(best < big, best >> bits, target_C[c])
        amount = np.minimum(np.minimum(items[rows, j], ex[rows, donor]), room)
        go = amount > 0
        c, donor, item, recv, amount = c[go], donor[go], donor[go] * I + j[go], recv[go], amount[go]
        if c.size == 0:
            break
        g = recv * Gn + (best[go] & mask)
        share_flat[c * (N * I) + item] -= amount
        excess_flat[c * N + donor] -= amount
        load_flat[c * G + g] += amount
        free_flat[c * G + g] = False
        at = (c * G + recv * Gn)[:, None] + node_gpus
        lightest.reshape(-1)[c * N + recv] = np.where(free_flat.take(at), (load_flat.take(at) << bits) | node_gpus,
                                                      big).min(1)
        out.append((c, item, g, amount))
    if not out:
        empty = np.zeros(0, np.int64)
        return Exports(empty, empty, empty, empty, rounds)
    return Exports(*(np.concatenate([o[k] for o in out]) for k in range(4)), rounds)
