"""Intra-node replication, choice of replicas: greedy rules, and the exact optimal level they allow.

Problem-last NumPy functions over every (micro-batch, layer, node) problem at once; the layout,
the legend and the phases are in :mod:`relibra.policies.replica_problems`.

Phase 1 (:func:`greedy_replicas`), at most ``Sn`` rounds: every problem takes its busiest GPU
(the donor), its hottest home expert that has a free receiver, and copies it onto the least
loaded GPU of the node with a free spare slot that does not already hold it. How much moves is
the rule: the direct rule moves ``min(share, donor - T, T - receiver)``, ``T = ceil(node mean)``;
the chain rule ``min(share, donor - T, (donor - receiver) // 2)`` routes load through medium
GPUs; the overshoot rule fills the receiver up to ``T`` while the donor's own spare slot is free,
so the donor may end below ``T`` and take a replica from another busy GPU later.
:func:`best_of_greedy` keeps, per problem, the rule whose replicas allow the lowest exact optimal
level (:func:`best_level`).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["greedy_replicas", "best_of_greedy", "GREEDY_VARIANTS", "best_level"]

_COVERS = np.iinfo(np.int64).max // 4  # best-fit keys: above every share


def greedy_replicas(
    hshare: np.ndarray,
    gpus_per_node: int,
    spare_per_gpu: int,
    equalise: np.ndarray | None = None,
    best_fit: np.ndarray | None = None,
    target: np.ndarray | None = None,
    overshoot: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phase 1: fill spare slots greedily (see the module docstring). Updates ``hshare`` in place.

    Per-problem rule switches (``[B]`` bool, default False):

    - ``equalise``: move ``min(share, donor - T, (donor - receiver) // 2)`` instead of
      ``min(share, donor - T, T - receiver)``: the receiver may end above ``T`` (it sheds its
      own experts in a later round), so full nodes can route load through a chain of GPUs;
    - ``best_fit``: copy the donor's coolest home expert that can carry the whole move
      (instead of its hottest), keeping hot experts for later rounds;
    - ``overshoot``: while the donor still has a free spare slot, fill the receiver up to
      ``T`` even past the donor's own excess (``min(share, T - receiver)``): the donor ends
      below ``T`` and can take a replica from another busy GPU later. This balances a node
      whose one very hot GPU needs every light GPU and a second busy GPU needs one more
      receiver (the donor's own free slot).

    ``target`` (``[B]``) replaces ``T = ceil(node mean)``. Ties go to the lowest GPU / slot.

    Args:
        hshare: ``[Gn*H, B]`` int64 home-expert loads; on return, what each home copy keeps.
    Returns:
        ``rep [Sn, B]`` (local home slot copied into each spare slot, -1 empty), ``x [Sn, B]``
        (tokens given to each replica) and ``made [Sn, B]`` (spare slot filled in greedy round
        ``t``, -1 when none).
    """
    GH, B = hshare.shape
    Gn, S = gpus_per_node, spare_per_gpu
    Sn = Gn * S
    rep = np.full((Sn, B), -1, np.int64)
    x = np.zeros((Sn, B), np.int64)
    made = np.full((Sn, B), -1, np.int64)
    if S == 0 or Gn == 1 or B == 0:
        return rep, x, made
    H = GH // Gn
    equalise = equalise if equalise is not None and equalise.any() else None
    best_fit = best_fit if best_fit is not None and best_fit.any() else None
    overshoot = overshoot if overshoot is not None and overshoot.any() else None
    gpu_load = hshare.reshape(Gn, H, B).sum(1)  # [Gn, B]
    if target is None:
        target = (gpu_load.sum(0) + Gn - 1) // Gn
    # argmax / argmin over GPUs as one max / min of (load << gpu_bits | GPU code), ties to the
    # lowest GPU, kept up to date in place: ``donor_key`` for the donor, ``receiver_key`` for the
    # receiver (a full GPU reads ``full`` there, or far above any real key after later moves).
    # The donor need not be excluded as receiver: were it the lightest free GPU, every free GPU
    # would be as heavy as the busiest and no move would have room.
    gpu_bits = (Gn - 1).bit_length()
    gpu_mask = (1 << gpu_bits) - 1
    limit = 60 - max(gpu_bits, (H - 1).bit_length())  # keys (load << bits | code) stay below 2**61
    if int(gpu_load.sum(0).max()) >= 1 << limit:
        raise ValueError(f"replicate: a node's load reaches 2**{limit} tokens; loads that large are not supported")
    gpu_ids = np.arange(Gn)[:, None]
    donor_key = (gpu_load << gpu_bits) | (gpu_mask - gpu_ids)  # [Gn, B]
    receiver_key = (gpu_load << gpu_bits) | gpu_ids
    full = 1 << 62
    donor_key_flat, receiver_key_flat = donor_key.reshape(-1), receiver_key.reshape(-1)
    problems = np.arange(B)
    home_offsets = np.arange(H)[:, None] * B + problems  # [H, B] flat (slot on the GPU, problem)
    slot_bits = (H - 1).bit_length()  # the same (share << slot_bits | code) trick over the donor's experts
    slot_mask = (1 << slot_bits) - 1
    slot_code = slot_mask - np.arange(H)[:, None]
    share_flat = hshare.reshape(-1)
    if S > 1:  # (home slot, GPU) that may not take a replica: the home GPU, then every copy made
        holds = np.zeros((GH, Gn, B), bool)
        holds[np.arange(GH), np.arange(GH) // H] = True
        holds_flat = holds.reshape(-1)
    spare_used = np.zeros(Gn * B, np.int64)  # [Gn, B] flat
    one_receiver = S == 1 and best_fit is None  # every expert of the donor goes to the same receiver
    for t in range(Sn):
        top = donor_key.max(0)
        donor, donor_load = gpu_mask - (top & gpu_mask), top >> gpu_bits
        shares = share_flat.take(donor * (H * B) + home_offsets)  # [H, B] the donor's experts
        if S == 1:
            lightest = receiver_key.min(0)
        else:  # per expert: the lightest GPU that does not hold it yet
            blocked = holds_flat.take(((donor * H + np.arange(H)[:, None])[:, None, :] * Gn + gpu_ids) * B + problems)
            lightest = np.where(blocked, full, receiver_key).min(1)  # [H, B]
        receiver, receiver_load = lightest & gpu_mask, lightest >> gpu_bits
        excess = donor_load - target
        room = np.minimum(excess, target - receiver_load)
        if equalise is not None:
            room = np.where(equalise, np.minimum(excess, (donor_load - receiver_load) >> 1), room)  # >> 1: floor
        if overshoot is not None:  # past the donor's excess while its own spare slot is free
            donor_flat = donor * B + problems
            donor_free = (receiver_key_flat.take(donor_flat) < full) if S == 1 else (spare_used.take(donor_flat) < S)
            room = np.where(overshoot & donor_free & (excess > 0), target - receiver_load, room)
        if one_receiver:  # the hottest expert (the lowest slot among equals), as far as the room allows
            hottest = ((shares << slot_bits) | slot_code).max(0)
            slot_on_gpu = slot_mask - (hottest & slot_mask)
            amount = np.minimum(hottest >> slot_bits, room)
            moving = np.flatnonzero(amount > 0)
            if moving.size == 0:
                break
            to_gpu, amount = receiver[moving], amount[moving]
        else:
            if S == 1:
                receiver, room = np.broadcast_to(receiver, (H, B)), np.broadcast_to(room, (H, B))
            amount_each = np.minimum(shares, room)  # [H, B]
            key = np.where(amount_each > 0, shares, -1)
            if best_fit is not None:  # smallest share covering the whole move, else the hottest
                key = np.where(best_fit & (shares >= room) & (key > 0), _COVERS - shares, key)
            slot_on_gpu = key.argmax(0)
            moving = np.flatnonzero(key[slot_on_gpu, problems] > 0)
            if moving.size == 0:
                break
            to_gpu, amount = receiver[slot_on_gpu[moving], moving], amount_each[slot_on_gpu[moving], moving]
        from_gpu = donor[moving]
        to_flat = to_gpu * B + moving
        slot = from_gpu * H + slot_on_gpu[moving]
        k = to_gpu if S == 1 else to_gpu * S + spare_used[to_flat]  # the receiver's next free spare slot
        made[t, moving] = k
        rep[k, moving] = slot
        x[k, moving] = amount
        i = slot * B + moving
        share_flat[i] = share_flat[i] - amount
        i = from_gpu * B + moving
        shift = amount << gpu_bits
        donor_key_flat[i] = donor_key_flat[i] - shift
        receiver_key_flat[i] = receiver_key_flat[i] - shift
        donor_key_flat[to_flat] = donor_key_flat[to_flat] + shift
        if S == 1:  # the receiver is full now
            receiver_key_flat[to_flat] = full
        else:
            holds[slot, to_gpu, moving] = True
            spare_used[to_flat] += 1
            receiver_key_flat[to_flat] = np.where(spare_used[to_flat] >= S, full, receiver_key_flat[to_flat] + shift)
    return rep, x, made


#: greedy rules, tried in this order: (equalise, best_fit[, overshoot]), see :func:`greedy_replicas`.
#: The overshoot rule alone reaches the node mean almost everywhere; the direct and chain rules
#: run only where it does not (see :func:`best_of_greedy`).
GREEDY_VARIANTS: tuple[tuple[bool, ...], ...] = ((False, False, True), (False, False, False), (True, False, False))


def best_of_greedy(
    hshare: np.ndarray, gpus_per_node: int, spare_per_gpu: int,
    variants: tuple[tuple[bool, ...], ...] = GREEDY_VARIANTS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """The best greedy rule of ``variants`` per problem.

    "Best" is the exact optimal level (:func:`best_level`) of each rule's replicas; ties keep
    the earlier rule, so the result is deterministic and never worse than any rule alone. The
    later rules run (together, in one greedy pass) only on the problems where the first rule's
    level is above the lower bound ``ceil(node load / Gn)`` (no rule can beat a problem that
    reached it), which gives the same result as running every rule everywhere.

    Args:
        hshare: ``[Gn*H, B]`` home-expert loads (not modified).
        variants: rule flags ``(equalise, best_fit[, overshoot])``, see :func:`greedy_replicas`.
    Returns:
        ``rep``, ``x`` (its own split), ``made`` (``[Sn, B]``) of the winning rule, its
        ``level [B]`` (None where :func:`best_level` does not enumerate: more than 10 GPUs per
        node) and ``chain [B]`` (the winner lets receivers end above target; for
        :func:`~relibra.policies.replica_split.resplit`).
    """
    GH, B = hshare.shape
    Gn, S = gpus_per_node, spare_per_gpu
    flags = np.array([tuple(v) + (False,) * (3 - len(v)) for v in variants], dtype=bool).reshape(-1, 3)
    bound = -(-hshare.sum(0) // Gn)  # ceil(node load / Gn): no split goes below it
    rep, x, made, kept = _run_rules(hshare, Gn, S, flags[:1])
    chain = np.full(B, flags[0, 0])
    level = _level(hshare, kept, rep, x, Gn, S, bound)
    if level is None or len(flags) == 1:  # no exact score (wide nodes): keep the first rule
        return rep, x, made, level, chain
    todo = np.flatnonzero(level > bound)
    if todo.size == 0:
        return rep, x, made, level, chain
    V, T = len(flags) - 1, todo.size
    hshare_todo = hshare[:, todo]
    rep_t, x_t, made_t, kept_t = _run_rules(hshare_todo, Gn, S, flags[1:])
    level_t = _level(np.tile(hshare_todo, V), kept_t, rep_t, x_t, Gn, S, np.tile(bound[todo], V)).reshape(V, T)
    win = level_t.argmin(0)  # first minimum among the later rules
    pick = win * T + np.arange(T)
    better = level_t[win, np.arange(T)] < level[todo]  # ties keep the first rule
    cols, pick = todo[better], pick[better]
    rep[:, cols], x[:, cols], made[:, cols] = rep_t[:, pick], x_t[:, pick], made_t[:, pick]
    level[cols], chain[cols] = level_t.reshape(-1)[pick], flags[1 + win[better], 0]
    return rep, x, made, level, chain


def _run_rules(hshare: np.ndarray, Gn: int, S: int, flags: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Greedy rules on ``hshare [Gn*H, B]`` (not modified), one pass: ``flags [V, 3]`` (equalise,
    best_fit, overshoot) per rule; returns ``rep, x, made [Sn, V*B]`` and what each home copy
    keeps ``[Gn*H, V*B]``, rule-major columns."""
    B = hshare.shape[1]
    kept = np.tile(hshare, len(flags))
    rep, x, made = greedy_replicas(kept, Gn, S, flags[:, 0].repeat(B), flags[:, 1].repeat(B), None,
                                   flags[:, 2].repeat(B))
    return rep, x, made, kept


def _level(hshare: np.ndarray, kept: np.ndarray, rep: np.ndarray, x: np.ndarray, Gn: int, S: int,
           bound: np.ndarray) -> np.ndarray | None:
    """:func:`best_level` of ``rep``, skipped where the rule's own split (``kept``, ``x``) already
    reaches ``bound = ceil(node load / Gn)``: no split goes below it, so the level is the bound."""
    GH, B = hshare.shape
    if Gn > 10 or S == 0 or B == 0:
        return None
    split_max = (kept.reshape(Gn, GH // Gn, B).sum(1) + x.reshape(Gn, S, B).sum(1)).max(0)
    rest = np.flatnonzero(split_max > bound)
    level = bound.copy()
    if rest.size:
        level[rest] = best_level(hshare[:, rest], rep[:, rest], Gn, S)
    return level


def best_level(hshare: np.ndarray, rep: np.ndarray, gpus_per_node: int, spare_per_gpu: int) -> np.ndarray | None:
    """``[B]`` the exact optimal busiest-GPU load for the replicas in ``rep [Sn, B]``.

    ``max over GPU subsets U of ceil((fixed(U) + replicated experts wholly in U) / |U|)``;
    enumerates the ``2**Gn`` subsets, so returns None for more than 10 GPUs per node (and with
    no spare slots, or no problems). Every home expert adds its load (``hshare [Gn*H, B]``) at
    the GPU set of its copies (home GPU and replicas); a sum over subsets (``Gn`` in-place
    passes over ``[2**Gn, B]``) gives every ``U``'s load.
    """
    GH, B = hshare.shape
    Gn, S = gpus_per_node, spare_per_gpu
    H = GH // Gn
    if Gn > 10 or S == 0 or B == 0:
        return None
    problems = np.arange(B)
    k, b = np.nonzero(rep >= 0)
    # GPUs holding a copy of each home slot (at most one copy per GPU, so the sum is an OR)
    copies = np.bincount(rep[k, b] * B + b, weights=1 << (k // S), minlength=GH * B)
    mask = copies.astype(np.int64).reshape(GH, B) | (1 << (np.arange(GH) // H))[:, None]
    dtype = np.int32 if int(hshare.sum(0).max()) < 2**31 else np.int64  # int32: half the memory traffic
    f = np.zeros((1 << Gn) * B, dtype)  # [2**Gn, B]: load whose copies span exactly U
    np.add.at(f, (mask * B + problems).ravel(), hshare.ravel().astype(dtype))
    for i in range(Gn):  # f[U] = sum over m inside U of f[m]
        v = f.reshape(-1, 2, B << i)
        v[:, 1] += v[:, 0]
    f = f.reshape(1 << Gn, B)
    # ceil(x / s) is monotone in x: the best U of each size s is the heaviest one
    heaviest = np.stack([f[rows].max(0) for rows in _subsets_by_size(Gn)])  # [Gn, B]
    return (-(-heaviest // np.arange(1, Gn + 1)[:, None])).max(0).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _subsets_by_size(Gn: int) -> tuple[np.ndarray, ...]:
    """Bit masks over ``Gn`` GPUs grouped by size: entry ``s - 1`` holds the subsets of size ``s``."""
    size = np.array([bin(u).count("1") for u in range(1 << Gn)])
    return tuple(np.flatnonzero(size == s) for s in range(1, Gn + 1))
