"""Intra-node replication, choice of replicas: greedy rules and the exact optimal level.

Pure functions over every (micro-batch, layer, node) problem at once; the public functions take
and return torch tensors ``[B, ...]``, the hot paths run in numpy on problem-last arrays
``[..., B]``. :mod:`relibra.policies._replica_split` holds the module overview (phases 1, 2a,
2b), the legend and the token-split half.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["greedy_replicas", "best_of_greedy", "GREEDY_VARIANTS", "best_level", "node_problems"]

_INF = torch.iinfo(torch.int64).max // 4


def node_problems(loads_MLE: torch.Tensor, home_experts_LK: torch.Tensor, num_nodes: int,
                  gpus_per_node: int) -> torch.Tensor:
    """Home-slot loads as per-node problems.

    Args:
        loads_MLE: ``[M, L, E]`` int64 loads.
        home_experts_LK: ``[L, G*H]`` placement (home slot -> logical expert).
    Returns:
        ``hshare_BGH [M*L*N, Gn, H]`` int64: the load of every home expert, by node problem.
    """
    M, L, E = loads_MLE.shape
    H = E // (num_nodes * gpus_per_node)
    idx = home_experts_LK.expand(M, L, -1)
    return loads_MLE.gather(2, idx).reshape(M * L * num_nodes, gpus_per_node, H).clone()


def greedy_replicas(hshare_BGH: torch.Tensor, spare_per_gpu: int, equalise_B: torch.Tensor | None = None,
                    best_fit_B: torch.Tensor | None = None, target_B: torch.Tensor | None = None,
                    overshoot_B: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 1: fill spare slots greedily (see module docstring). Mutates ``hshare_BGH``.

    Per-problem rule switches (``[B]`` bool, default False):

    - ``equalise_B``: move ``min(share, donor - T, (donor - receiver) // 2)`` instead of
      ``min(share, donor - T, T - receiver)``: the receiver may end above ``T`` (it sheds its
      own experts in a later round), so full nodes can route load through a chain of GPUs;
    - ``best_fit_B``: copy the donor's coolest home expert that can carry the whole move
      (instead of its hottest), keeping hot experts for later rounds;
    - ``overshoot_B``: while the donor still has a free spare slot, fill the receiver up to
      ``T`` even past the donor's own excess (``min(share, T - receiver)``): the donor ends
      below ``T`` and can take a replica from another busy GPU later. This balances a node
      whose one very hot GPU needs every light GPU and a second busy GPU needs one more
      receiver (the donor's own free slot).

    ``target_B`` (``[B]``) replaces ``T = ceil(node mean)``. Ties go to the lowest GPU / slot.
    Runs in numpy on problem-last arrays (``[Gn, B]``): reductions over a node's few GPUs are
    then elementwise passes over ``B``, several times cheaper than torch's small-row kernels.

    Returns:
        ``rep_BK`` (local home slot copied into each spare slot, -1 empty), ``x_BK``
        (tokens given to each replica) and ``made_BT`` (spare slot filled in greedy round
        ``t``, -1 when none).
    """
    B, Gn, H = hshare_BGH.shape
    S = spare_per_gpu
    K = Gn * S
    rep = np.full((K, B), -1, np.int64)
    x = np.zeros((K, B), np.int64)
    made = np.full((K, B), -1, np.int64)
    if S > 0 and Gn > 1 and B > 0:
        h = np.ascontiguousarray(hshare_BGH.numpy().reshape(B, Gn * H).T)  # [Gn*H, B]
        _greedy_np(h, S, rep, x, made, None if equalise_B is None else equalise_B.numpy(),
                   None if best_fit_B is None else best_fit_B.numpy(), None if target_B is None else target_B.numpy(),
                   None if overshoot_B is None else overshoot_B.numpy())
        hshare_BGH.copy_(torch.from_numpy(np.ascontiguousarray(h.T)).view(B, Gn, H))
    return tuple(torch.from_numpy(np.ascontiguousarray(a.T)) for a in (rep, x, made))


def _greedy_np(h: np.ndarray, S: int, rep: np.ndarray, x: np.ndarray, made: np.ndarray,
               equalise: np.ndarray | None, best_fit: np.ndarray | None, target: np.ndarray | None,
               overshoot: np.ndarray | None = None) -> None:
    """:func:`greedy_replicas` on ``h [Gn*H, B]``; fills ``rep``/``x``/``made`` (``[K, B]``) in place."""
    GH, B = h.shape
    K = rep.shape[0]
    Gn = K // S
    H = GH // Gn
    ld = h.reshape(Gn, H, B).sum(1)  # [Gn, B]
    if target is None:
        target = (ld.sum(0) + Gn - 1) // Gn
    equalise = equalise if equalise is not None and equalise.any() else None
    best_fit = best_fit if best_fit is not None and best_fit.any() else None
    overshoot = overshoot if overshoot is not None and overshoot.any() else None
    # argmax / argmin over GPUs as one max / min of (load << sh | GPU code), ties to the lowest
    # GPU, kept up to date in place: ``hi`` for the donor, ``lo`` for the receiver (a full GPU
    # reads ``big`` there). The donor need not be excluded as receiver: were it the lightest
    # free GPU, every free GPU would be as heavy as the busiest and no move would have room.
    sh = (Gn - 1).bit_length()
    P = 1 << sh
    limit = 60 - max(sh, (H - 1).bit_length())  # keys (load << bits | code) stay below 2**61
    if int(ld.sum(0).max()) >= 1 << limit:
        raise ValueError(f"replicate: a node's load reaches 2**{limit} tokens; loads that large are not supported")
    g_col = np.arange(Gn)[:, None]
    hi = (ld << sh) | ((P - 1) - g_col)  # [Gn, B]
    lo = (ld << sh) | g_col
    big = 1 << 62
    hif, lof = hi.reshape(-1), lo.reshape(-1)
    arB = np.arange(B)
    hB = np.arange(H)[:, None] * B + arB  # [H, B]
    hs = (H - 1).bit_length()  # the same (value << hs | code) trick over the donor's experts
    HP = 1 << hs
    h_up = (HP - 1) - np.arange(H)[:, None]
    hf = h.reshape(-1)
    if S > 1:  # (home slot, GPU) that may not take a replica: the home GPU, then every copy made
        holds = np.zeros((GH, Gn, B), bool)
        holds[np.arange(GH), np.arange(GH) // H] = True
        holdf = holds.reshape(-1)
    usedf = np.zeros(Gn * B, np.int64)
    one = S == 1 and best_fit is None  # one receiver for all the donor's experts
    for t in range(K):
        m = hi.max(0)
        donor, dl = (P - 1) - (m & (P - 1)), m >> sh
        share = hf.take(donor * (H * B) + hB)  # [H, B]
        if S == 1:
            rmin = lo.min(0)
        else:
            blocked = holdf.take(((donor * H + np.arange(H)[:, None])[:, None, :] * Gn + g_col) * B + arB)
            rmin = np.where(blocked, big, lo).min(1)  # [H, B]
        recv, rload = rmin & (P - 1), rmin >> sh
        over = dl - target
        room = np.minimum(over, target - rload)
        if equalise is not None:
            room = np.where(equalise, np.minimum(over, (dl - rload) >> 1), room)  # >> 1: floor halving
        if overshoot is not None:  # past the donor's excess while its own spare slot is free
            dfree = (lof.take(donor * B + arB) < big) if S == 1 else (usedf.take(donor * B + arB) < S)
            room = np.where(overshoot & dfree & (over > 0), target - rload, room)
        if one:  # the hottest expert (the lowest slot among equals), as far as the room allows
            top = ((share << hs) | h_up).max(0)
            j = (HP - 1) - (top & (HP - 1))
            amt = np.minimum(top >> hs, room)
            a = np.flatnonzero(amt > 0)
            if a.size == 0:
                break
            ra, amt = recv[a], amt[a]
        else:
            if S == 1:
                recv, room = np.broadcast_to(recv, (H, B)), np.broadcast_to(room, (H, B))
            amt_j = np.minimum(share, room)  # [H, B]
            key = np.where(amt_j > 0, share, -1)
            if best_fit is not None:  # smallest share covering the whole move, else the hottest
                key = np.where(best_fit & (share >= room) & (key > 0), _INF - share, key)
            j = key.argmax(0)
            a = np.flatnonzero(key[j, arB] > 0)
            if a.size == 0:
                break
            ra, amt = recv[j[a], a], amt_j[j[a], a]
        ja, da = j[a], donor[a]
        ria = ra * B + a
        slot = da * H + ja
        k = ra if S == 1 else ra * S + usedf[ria]  # the receiver's next free spare slot
        made[t, a] = k
        rep[k, a] = slot
        x[k, a] = amt
        i = slot * B + a
        hf[i] = hf[i] - amt
        i = da * B + a
        d = amt << sh
        hif[i] = hif[i] - d
        lof[i] = lof[i] - d
        hif[ria] = hif[ria] + d
        if S == 1:  # the receiver is full now
            lof[ria] = big
        else:
            holds[slot, ra, a] = True
            usedf[ria] += 1
            lof[ria] = np.where(usedf[ria] >= S, big, lof[ria] + d)


#: greedy rules, tried in this order: (equalise, best_fit[, overshoot]), see :func:`greedy_replicas`.
#: The overshoot rule alone reaches the node mean in all but ~0.05 % of the default trace's
#: problems; the direct and chain rules run only on those (see :func:`best_of_greedy`).
GREEDY_VARIANTS: tuple[tuple[bool, ...], ...] = ((False, False, True), (False, False, False), (True, False, False))


def best_of_greedy(loads_BGH: torch.Tensor, spare_per_gpu: int,
                   variants: tuple[tuple[bool, ...], ...] = GREEDY_VARIANTS
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The best greedy rule of ``variants`` per problem.

    "Best" is the exact optimal level (:func:`best_level`) of each rule's replicas; ties keep
    the earlier rule, so the result is deterministic and never worse than any rule alone. The
    later rules run (together, in one greedy pass) only on the problems where the first rule's
    level is above the lower bound ``ceil(node load / Gn)`` (no rule can beat a problem that
    reached it), which gives the same result as running every rule everywhere.

    Args:
        loads_BGH: ``[B, Gn, H]`` home-expert loads (not modified).
        variants: rule flags ``(equalise, best_fit[, overshoot])``, see :func:`greedy_replicas`.
    Returns:
        ``rep_BK``, ``x_BK`` (its own split), ``made_BT`` of the winning rule, its ``level_B`` (None where
        :func:`best_level` does not enumerate: more than 10 GPUs per node) and ``chain_B``
        (the winner lets receivers end above target; for :func:`resplit`).
    """
    B, Gn, H = loads_BGH.shape
    rep, x, made, level, chain = _best_of_greedy_np(_cols(loads_BGH.reshape(B, Gn * H)), Gn, spare_per_gpu, variants)
    level_t = None if level is None else torch.from_numpy(level)
    return _rows(rep), _rows(x), _rows(made), level_t, torch.from_numpy(chain)


def _run_rules(w: np.ndarray, Gn: int, S: int, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy rules on ``w [Gn*H, B]``, one pass: ``flags [V, 3]`` (equalise, best_fit, overshoot)
    per rule; returns ``rep, x, made [K, V*B]``, rule-major columns."""
    GH, B = w.shape
    V, K = len(flags), Gn * S
    rep = np.full((K, V * B), -1, np.int64)
    x = np.zeros((K, V * B), np.int64)
    made = np.full((K, V * B), -1, np.int64)
    if S > 0 and Gn > 1 and B > 0:
        _greedy_np(
            np.tile(w, V), S, rep, x, made, flags[:, 0].repeat(B), flags[:, 1].repeat(B), None, flags[:, 2].repeat(B)
        )
    return rep, x, made


def _best_of_greedy_np(w: np.ndarray, Gn: int, S: int, variants: tuple[tuple[bool, ...], ...]):
    """:func:`best_of_greedy` on ``w [Gn*H, B]``: ``rep``, ``x``, ``made`` (``[K, B]``), ``level``, ``chain``.

    The first rule runs on every problem; the others together (one greedy pass over their
    columns) on the problems whose level misses the lower bound.
    """
    GH, B = w.shape
    flags = np.array([tuple(v) + (False,) * (3 - len(v)) for v in variants], dtype=bool).reshape(-1, 3)
    rep, x, made = _run_rules(w, Gn, S, flags[:1])
    chain = np.full(B, flags[0, 0])
    level = _best_level_np(w, rep, Gn, S)
    if level is None or len(flags) == 1:  # no exact score (wide nodes): keep the first rule
        return rep, x, made, level, chain
    bound = -(-w.sum(0) // Gn)  # ceil(node load / Gn): no split goes below it
    todo = np.flatnonzero(level > bound)
    if todo.size == 0:
        return rep, x, made, level, chain
    V, T = len(flags) - 1, todo.size
    wt = w[:, todo]
    rep_t, x_t, made_t = _run_rules(wt, Gn, S, flags[1:])
    level_t = _best_level_np(np.tile(wt, V), rep_t, Gn, S).reshape(V, T)
    win = level_t.argmin(0)  # first minimum among the later rules
    pick = win * T + np.arange(T)
    better = level_t[win, np.arange(T)] < level[todo]  # ties keep the first rule
    cols, pick = todo[better], pick[better]
    rep[:, cols], x[:, cols], made[:, cols] = rep_t[:, pick], x_t[:, pick], made_t[:, pick]
    level[cols], chain[cols] = level_t.reshape(-1)[pick], flags[1 + win[better], 0]
    return rep, x, made, level, chain


def best_level(loads_BGH: torch.Tensor, rep_BK: torch.Tensor, spare_per_gpu: int) -> torch.Tensor | None:
    """``[B]`` the exact optimal busiest-GPU load for the replicas in ``rep_BK``.

    ``max over GPU subsets U of ceil((fixed(U) + replicated experts wholly in U) / |U|)``;
    enumerates the ``2**Gn`` subsets, so returns None for more than 10 GPUs per node.
    Every home expert adds its load at the GPU set of its copies (home GPU and replicas); a
    sum over subsets (``Gn`` in-place passes over ``[B, 2**Gn]``) gives every ``U``'s load.
    """
    B, Gn, H = loads_BGH.shape
    level = _best_level_np(_cols(loads_BGH.reshape(B, Gn * H)), _cols(rep_BK), Gn, spare_per_gpu)
    return None if level is None else torch.from_numpy(level)


def _best_level_np(w: np.ndarray, rep: np.ndarray, Gn: int, S: int) -> np.ndarray | None:
    """:func:`best_level` on ``w [Gn*H, B]``, ``rep [K, B]``."""
    GH, B = w.shape
    H = GH // Gn
    if Gn > 10 or S == 0 or B == 0:
        return None
    arB = np.arange(B)
    k, b = np.nonzero(rep >= 0)
    # GPUs holding a copy of each home slot (at most one copy per GPU, so the sum is an OR)
    copies = np.bincount(rep[k, b] * B + b, weights=1 << (k // S), minlength=GH * B)
    mask = copies.astype(np.int64).reshape(GH, B) | (1 << (np.arange(GH) // H))[:, None]
    dtype = np.int32 if int(w.sum(0).max()) < 2**31 else np.int64  # int32: half the memory traffic
    f = np.zeros((1 << Gn) * B, dtype)  # [2**Gn, B]: load whose copies span exactly U
    np.add.at(f, (mask * B + arB).ravel(), w.ravel().astype(dtype))
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


def _cols(t_BX: torch.Tensor) -> np.ndarray:
    """``[B, X]`` tensor -> ``[X, B]`` contiguous numpy array (problem-last)."""
    return np.ascontiguousarray(t_BX.numpy().T)


def _rows(a_XB: np.ndarray) -> torch.Tensor:
    """``[X, B]`` numpy array -> ``[B, X]`` contiguous tensor."""
    return torch.from_numpy(np.ascontiguousarray(a_XB.T))
