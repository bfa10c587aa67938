"""Intra-node replication: choose spare-slot replicas and an optimal integer token split.

Pure functions, vectorised over every (micro-batch, layer, node) problem at once. The public
functions take and return torch tensors ``[B, ...]``; the hot paths (greedy, exact level, forest
split) run in numpy on problem-last arrays ``[..., B]`` (``_*_np``): a node has only a few GPUs,
so reductions over them become elementwise passes over ``B``, and numpy's per-call cost on
these small arrays is a fraction of torch's.

Legend (see :mod:`relibra.topology`):

    B  independent problems = M * L * N       Gn GPUs per node
    H  home slots per GPU                     S  spare slots per GPU
    K  spare slots per node = Gn * S          NE encoded residual edges per problem = 2K + K*K

One problem is one node of one layer of one micro-batch. Its state:

    hshare_BGH  tokens the home copy of each home expert keeps ([B, Gn, H])
    rep_BK      home expert (local home slot ``g*H + j``) copied into spare slot ``k``, -1 empty
                (spare slot ``k`` sits on local GPU ``k // S``)
    x_BK        tokens the replica in spare slot ``k`` computes

Phase 1 (greedy, :func:`greedy_replicas`), at most K rounds: every problem takes its busiest
GPU, its hottest home expert that has a free receiver, and copies it onto the least loaded GPU
of the node with a free spare slot that does not already hold it. The overshoot rule (tried
first) moves ``min(share, T - receiver)``, ``T = ceil(node mean)``, while the donor's own spare
slot is free, so the donor may end below ``T`` and take a replica from another busy GPU later;
the direct rule moves ``min(share, donor - T, T - receiver)``; the chain rule
``min(share, donor - T, (donor - receiver) // 2)`` routes load through medium GPUs.
:func:`best_of_greedy` keeps, per problem, the rule whose replicas have the lowest exact
optimal level, running the later rules only where the first misses ``T``.

Phase 2a (:func:`best_level`, :func:`resplit`): the exact optimal busiest-GPU load ``T*`` for
the chosen replicas, ``max over GPU subsets U of ceil((fixed(U) + experts with every copy in
U) / |U|)`` (a sum over all ``2**Gn`` subsets, up to 10 GPUs per node). With one spare slot
per GPU, :func:`forest_split` then reaches ``T*`` in two sweeps; otherwise the greedy moves are
replayed with ``T*`` as target (:func:`resplit`) as the start for 2b.

Phase 2b (:func:`optimal_split`): the exact integer min-max split for the chosen replicas,
run only where 2a did not reach ``T*`` (or with no ``T*`` for wider nodes).
Residual graph on the node's GPUs: an edge ``u -> v`` when some expert has tokens on ``u`` and
a copy on ``v``. A split is optimal iff no busiest GPU reaches a GPU at least 2 tokens lighter
(otherwise the set U reachable from the busiest GPUs satisfies ``load(U) = fixed(U) +
replicated experts wholly inside U``, so ``ceil(load(U)/|U|)`` = current max is a lower
bound). Each round pushes ``min(bottleneck, (a - c) // 2)`` tokens along such a path; the sum of
squared GPU loads strictly drops, so it terminates, and the busiest GPU never rises. Tokens
move only from a busiest GPU, so copies keep their home tokens where moving buys nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from ._replica_greedy import (  # noqa: F401
    _INF,
    GREEDY_VARIANTS,
    _cols,
    _rows,
    best_level,
    best_of_greedy,
    greedy_replicas,
    node_problems,
)

__all__ = [
    "greedy_replicas",
    "best_of_greedy",
    "GREEDY_VARIANTS",
    "best_level",
    "resplit",
    "tree_split",
    "forest_split",
    "optimal_split",
    "node_problems",
    "assemble",
]


def resplit(
    loads_BGH: torch.Tensor,
    rep_BK: torch.Tensor,
    made_BT: torch.Tensor,
    level_B: torch.Tensor,
    spare_per_gpu: int,
    chain_B: torch.Tensor | None = None,
    passes: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay the greedy moves with the optimal level as target: a near-optimal start.

    A move sheds ``min(share, donor - T*, T* - receiver)``; where ``chain_B`` (``[B]`` bool,
    the rules that let a receiver end above target) it sheds ``min(share, donor - T*)``, the
    receiver passing its surplus on in its own later moves; those rows replay ``passes``
    times (a later pass pushes what an earlier receiver could not pass on yet).

    Returns new ``hshare_BGH`` and ``x_BK``; the busiest GPU never rises above the loads'.
    """
    B, Gn, H = loads_BGH.shape
    S = spare_per_gpu
    K = rep_BK.shape[1]
    hflat = torch.cat([loads_BGH.reshape(B, Gn * H), torch.zeros(B, 1, dtype=torch.int64)], 1)
    x = torch.zeros(B, K + 1, dtype=torch.int64)
    ld = torch.cat([loads_BGH.sum(-1), torch.zeros(B, 1, dtype=torch.int64)], 1)
    rep_x = torch.cat([rep_BK, torch.full((B, 1), Gn * H, dtype=torch.int64)], 1)
    T = level_B[:, None]
    chain = None if chain_B is None else chain_B[:, None]
    T_live = made_BT.shape[1] - int((made_BT < 0).all(0).flip(0).cumprod(0).sum())  # rounds with a move
    for _ in range(passes if chain is not None else 1):
        for t in range(T_live):
            k = made_BT[:, t : t + 1]
            live = k >= 0
            k = torch.where(live, k, K)
            slot = rep_x.gather(1, k)  # dummy column Gn*H for finished problems
            donor = torch.where(live, slot // H, Gn)
            recv = torch.where(live, k // S, Gn)
            dl = ld.gather(1, donor)
            room = torch.minimum(dl - T, T - ld.gather(1, recv))
            if chain is not None:
                room = torch.where(chain, dl - T, room)
            amt = torch.where(live, torch.minimum(hflat.gather(1, slot), room).clamp(min=0), 0)
            x.scatter_add_(1, k, amt)
            hflat.scatter_add_(1, slot, -amt)
            ld.scatter_add_(1, donor, -amt).scatter_add_(1, recv, amt)
    return hflat[:, :-1].reshape(B, Gn, H), x[:, :K]


def tree_split(
    loads_BGH: torch.Tensor,
    rep_BK: torch.Tensor,
    level_B: torch.Tensor,
    spare_per_gpu: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact split at the known optimum ``level_B`` in two sweeps, for one spare slot per GPU.

    With one spare slot per GPU every GPU receives from at most one donor, so the replicas form
    a forest (donor -> receiver) unless a chain closes into a cycle. Bottom-up, ``absorb(v)`` =
    the most tokens GPU ``v`` can take over its parent edge with its subtree at most ``T*``:
    ``T* - home(v) + sum over v's experts e of min(load_e, sum of absorb(c) over copies of e)``.
    Top-down, every GPU sheds exactly its excess over ``T*`` (nothing where it is not above
    ``T*``), expert by expert, copy by copy, each copy within its receiver's ``absorb``. Both
    sweeps iterate to a fixed point (tree depth + 1 rounds, a few tensor operations each).

    Args:
        loads_BGH: ``[B, Gn, H]`` home-expert loads (not modified).
        rep_BK: ``[B, Gn]`` replicas (``spare_per_gpu`` must be 1).
        level_B: ``[B]`` the exact optimal level (:func:`best_level`).
    Returns:
        ``hshare_BGH``, ``x_BK`` and ``ok_B``: True where the split is valid (no negative
        share) and reaches ``level_B``; other rows (cycles) must be solved another way.
    """
    return _on_problem_last(_tree_np, "tree_split", loads_BGH, rep_BK, level_B, spare_per_gpu)


def _on_problem_last(
    split_np, name: str, loads_BGH: torch.Tensor, rep_BK: torch.Tensor, level_B: torch.Tensor, spare_per_gpu: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a one-spare-slot sweep ``split_np(w [Gn*H, B], rep [Gn, B], T [B])`` on problem-first
    tensors: ``(hshare [B, Gn, H], x [B, Gn], ok [B])``."""
    B, Gn, H = loads_BGH.shape
    if spare_per_gpu != 1:
        raise ValueError(f"{name} needs spare_per_gpu == 1, got {spare_per_gpu}")
    h, x, ok = split_np(_cols(loads_BGH.reshape(B, Gn * H)), _cols(rep_BK), level_B.numpy())
    return _rows(h).view(B, Gn, H), _rows(x), torch.from_numpy(ok)


def _tree_np(w: np.ndarray, rep: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`tree_split` on problem-last arrays: ``w [Gn*H, B]``, ``rep [Gn, B]``, ``T [B]``."""
    GH, B = w.shape
    Gn = rep.shape[0]
    H = GH // Gn
    exists = rep >= 0
    ridx = (np.where(exists, rep, GH) * B + np.arange(B)).ravel()  # flat (home slot, problem) of each copy

    def to_slots(v_GB: np.ndarray) -> np.ndarray:  # [Gn*H, B]: per-copy values summed by home slot
        out = np.bincount(ridx, weights=v_GB.ravel(), minlength=(GH + 1) * B)[: GH * B]
        return out.astype(np.int64).reshape(GH, B)  # exact below 2**53

    base = T - w.reshape(Gn, H, B).sum(1)  # [Gn, B] room of every GPU before it sheds anything
    absorb = base
    for _ in range(Gn + 1):
        cap = np.minimum(w, to_slots(np.maximum(absorb, 0)))  # [Gn*H, B] most each expert sheds
        new = base + cap.reshape(Gn, H, B).sum(1)
        if not (new != absorb).any():
            break
        absorb = new
    capk = np.where(exists, np.maximum(absorb, 0), 0)  # [Gn, B] most each copy may take
    lower = np.tri(Gn, Gn, -1, dtype=bool)[:, :, None]
    before = (((rep[:, None] == rep[None]) & exists[:, None] & lower) * capk[None]).sum(1)
    capv = cap.reshape(Gn, H, B)
    before_e = (capv.cumsum(1) - capv).reshape(-1)  # capacity of the GPU's earlier experts
    at = np.minimum(ridx, GH * B - 1)  # per copy, from here on: its expert's slot (any, if none)
    before_e, cap_k = before_e.take(at).reshape(Gn, B), cap.reshape(-1).take(at).reshape(Gn, B)
    home_flat = (np.minimum(ridx.reshape(Gn, B) // (H * B), Gn - 1) * B + np.arange(B)).ravel()  # (home GPU, problem)
    x = np.zeros((Gn, B), np.int64)
    for _ in range(Gn + 1):
        excess = np.maximum(x - base, 0).reshape(-1).take(home_flat).reshape(Gn, B)  # the home GPU's excess
        new = np.minimum(np.maximum(np.minimum(np.maximum(excess - before_e, 0), cap_k) - before, 0), capk)
        if not (new != x).any():
            break
        x = new
    h = w - to_slots(x)
    ok = (h >= 0).all(0) & ((h.reshape(Gn, H, B).sum(1) + x).max(0) <= T)
    return h, x, ok


def forest_split(
    loads_BGH: torch.Tensor,
    rep_BK: torch.Tensor,
    level_B: torch.Tensor,
    spare_per_gpu: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`tree_split`, with replica cycles cut: one call over all problems.

    A cycle of replicas (GPU a holds a copy of b's expert, b of a's, ...) carries a
    circulation that moves no load; cancelling it empties one cycle edge, so some optimal
    split leaves one copy on the cycle unused. Problems with a cycle that the plain sweeps
    do not solve are solved again once per copy on a cycle (that copy removed) and the first
    variant that reaches the level is kept. Problems with two cycles may still fail (``ok_B`` False).
    """
    return _on_problem_last(_forest_np, "forest_split", loads_BGH, rep_BK, level_B, spare_per_gpu)


def _forest_np(w: np.ndarray, rep: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`forest_split` on ``w [Gn*H, B]``, ``rep [Gn, B]``, ``T [B]``: ``h``, ``x``, ``ok``."""
    GH, B = w.shape
    Gn = rep.shape[0]
    H = GH // Gn
    arB = np.arange(B)
    anc = np.concatenate([np.where(rep >= 0, rep // H, Gn), np.full((1, B), Gn)])  # parent GPU, Gn = none
    for _ in range(max(1, (Gn - 1).bit_length())):  # ancestor 2**j steps up
        anc = anc[anc, arB]
    h, x, ok = _tree_np(w, rep, T)
    on_cycle = np.zeros((Gn + 1, B), bool)  # after Gn steps up every path sits on its cycle
    on_cycle[anc[:Gn], arB] = True
    on_cycle[:, ok] = False  # a cycle often carries no flow anyway: solved already
    cyc_f, cut_g = np.nonzero(on_cycle[:Gn].T)  # (problem, cycle GPU) pairs, by problem then GPU
    if cyc_f.size:  # one variant per cycle edge: the copy on that GPU dropped
        cut = rep[:, cyc_f]
        cut[cut_g, np.arange(cyc_f.size)] = -1
        h_v, x_v, ok_v = _tree_np(w[:, cyc_f], cut, T[cyc_f])
        good = np.flatnonzero(ok_v)  # the first variant of each problem that reaches the level
        first = good[np.unique(cyc_f[good], return_index=True)[1]]
        dst = cyc_f[first]
        h[:, dst], x[:, dst], ok[dst] = h_v[:, first], x_v[:, first], True
    return h, x, ok


def optimal_split(
    hshare_BGH: torch.Tensor,
    rep_BK: torch.Tensor,
    x_BK: torch.Tensor,
    spare_per_gpu: int,
    max_rounds: int = 10_000,
    level_B: torch.Tensor | None = None,
) -> int:
    """Phase 2: make the split exactly min-max optimal for the replicas in ``rep_BK``.

    ``level_B`` (from :func:`best_level`), when given, skips problems already at the optimum.
    Mutates ``hshare_BGH`` and ``x_BK`` in place; returns the number of augmenting rounds.
    """
    B, Gn, H = hshare_BGH.shape
    S = spare_per_gpu
    K = Gn * S
    if K == 0 or Gn == 1 or B == 0:
        return 0
    NE = 2 * K + K * K
    hflat_all = hshare_BGH.view(B, Gn * H)
    rep_gpu = torch.arange(K) // S  # [K]
    edge_ids = torch.arange(NE)
    eye = torch.eye(K, dtype=torch.bool)
    # only problems with a replica can improve
    todo = (rep_BK >= 0).any(-1)
    if level_B is not None:
        ld0 = hshare_BGH.sum(-1).scatter_add_(1, (torch.arange(K) // S).expand(B, K), x_BK)
        todo &= ld0.amax(-1) > level_B
    rows = torch.nonzero(todo).squeeze(1)
    hflat, x, rep = hflat_all[rows], x_BK[rows], rep_BK[rows]
    lev = None if level_B is None else level_B[rows][:, None]
    rounds = 0
    while rows.numel() and rounds < max_rounds:
        b_n = rows.numel()
        exists = rep >= 0
        slot = rep.clamp(min=0)
        home_gpu = slot // H
        rg = rep_gpu.expand(b_n, K)
        ld = hflat.view(b_n, Gn, H).sum(-1).scatter_add_(1, rg, x)
        # residual edges: home -> replica k, replica k -> home, replica k -> replica k' (same expert)
        same = (rep[:, :, None] == rep[:, None, :]) & exists[:, :, None] & ~eye
        pair = torch.cat(
            [
                home_gpu * Gn + rg,
                rg * Gn + home_gpu,
                (rep_gpu[:, None] * Gn + rep_gpu[None, :]).reshape(1, K * K).expand(b_n, -1),
            ],
            1,
        )
        cap = torch.cat([hflat.gather(1, slot), x, x[:, :, None].expand(b_n, K, K).reshape(b_n, K * K)], 1)
        valid = torch.cat([exists, exists, same.reshape(b_n, K * K)], 1) & (cap > 0)
        enc = torch.where(valid, cap * NE + edge_ids, -1)
        C = torch.full((b_n, Gn * Gn), -1, dtype=torch.int64).scatter_reduce_(1, pair, enc, "amax")
        has = (C >= 0).view(b_n, Gn, Gn)
        # min load reachable from every GPU (Bellman-Ford with min), next hop towards it
        best = ld
        nxt = torch.full((b_n, Gn), -1, dtype=torch.int64)
        for _ in range(Gn - 1):
            m, arg = torch.where(has, best[:, None, :], _INF).min(-1)
            upd = m < best
            if not bool(upd.any()):
                break
            best = torch.where(upd, m, best)
            nxt = torch.where(upd, arg, nxt)
        if lev is None:  # halve the gap between a busiest GPU and the lightest it reaches
            cand = (ld == ld.amax(-1, keepdim=True)) & (ld - best >= 2)
        else:  # push from a GPU above the known optimum to one below it, exactly to the optimum
            cand = (ld > lev) & (best < lev)
            cand &= ld == torch.where(cand, ld, -1).amax(-1, keepdim=True)
        active = cand.any(-1)
        if not bool(active.all()):
            done = ~active
            hflat_all[rows[done]] = hflat[done]
            x_BK[rows[done]] = x[done]
            rows, hflat, x, rep, slot = rows[active], hflat[active], x[active], rep[active], slot[active]
            cand, nxt, C, ld = cand[active], nxt[active], C[active], ld[active]
            lev = None if lev is None else lev[active]
            b_n = rows.numel()
            if b_n == 0:
                break
        rounds += 1
        u = cand.to(torch.int64).argmax(-1)
        cur = u
        bott = torch.full_like(u, _INF)
        hops = []
        for _ in range(Gn - 1):
            nx = nxt.gather(1, cur[:, None]).squeeze(1)
            act = nx >= 0
            if not bool(act.any()):
                break
            e = C.gather(1, (cur * Gn + nx.clamp(min=0))[:, None]).squeeze(1)
            bott = torch.where(act, torch.minimum(bott, e // NE), bott)
            hops.append((act, e % NE))
            cur = torch.where(act, nx, cur)
        a = ld.gather(1, u[:, None]).squeeze(1)
        c = ld.gather(1, cur[:, None]).squeeze(1)
        if lev is None:
            amt = torch.minimum(bott, (a - c) // 2)
        else:
            amt = torch.minimum(bott, torch.minimum(a - lev[:, 0], lev[:, 0] - c))
        dx = torch.zeros(b_n, K + 1, dtype=torch.int64)
        dh = torch.zeros(b_n, Gn * H + 1, dtype=torch.int64)
        for act, eid in hops:
            da = torch.where(act, amt, 0)[:, None]
            is_a, is_b = eid < K, (eid >= K) & (eid < 2 * K)
            rr = (eid - 2 * K).clamp(min=0)
            k_from = torch.where(is_a, K, torch.where(is_b, eid - K, rr // K))
            k_to = torch.where(is_a, eid, torch.where(is_b, K, rr % K))
            dx.scatter_add_(1, k_from[:, None], -da).scatter_add_(1, k_to[:, None], da)
            k_home = torch.where(is_a, eid, eid - K).clamp(0, K - 1)
            hslot = torch.where(is_a | is_b, slot.gather(1, k_home[:, None]).squeeze(1), Gn * H)
            dh.scatter_add_(1, hslot[:, None], torch.where(is_a[:, None], -da, da))
        x = x + dx[:, :K]
        hflat = hflat + dh[:, : Gn * H]
    if rows.numel():
        hflat_all[rows] = hflat
        x_BK[rows] = x
    return rounds


def assemble(
    hshare_BGH: torch.Tensor,
    rep_BK: torch.Tensor,
    x_BK: torch.Tensor,
    home_experts_LK: torch.Tensor,
    M: int,
    L: int,
    N: int,
    S: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-node results -> plan tensors.

    Replicas left with no tokens are dropped (their spare slots stay empty).

    Returns:
        ``spare_experts [M, L, G*S]`` (logical expert, -1 empty) and ``slot_tokens [M, L, P]``.
    """
    B, Gn, H = hshare_BGH.shape
    return _assemble_np(
        _cols(hshare_BGH.reshape(B, Gn * H)), _cols(rep_BK), _cols(x_BK), home_experts_LK, M, L, N, Gn, S
    )


def _assemble_np(
    h: np.ndarray,
    rep: np.ndarray,
    x: np.ndarray,
    home_experts_LK: torch.Tensor,
    M: int,
    L: int,
    N: int,
    Gn: int,
    S: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`assemble` from problem-last arrays ``h [Gn*H, B]``, ``rep [K, B]``, ``x [K, B]``."""
    GH, B = h.shape
    K, H = rep.shape[0], GH // Gn
    rep = np.where(x > 0, rep, -1)
    b = np.arange(B)
    first = ((b // N) % L) * (N * GH) + (b % N) * GH  # flat placement index of the node's slot 0
    logical = home_experts_LK.numpy().reshape(-1).take(first + np.maximum(rep, 0))
    spare = np.ascontiguousarray(np.where(rep >= 0, logical, -1).T).reshape(M, L, N * K)
    tokens = np.concatenate([h.reshape(Gn, H, B), x.reshape(Gn, S, B)], 1)  # [Gn, H + S, B]
    tokens = np.ascontiguousarray(tokens.transpose(2, 0, 1)).reshape(M, L, N * Gn * (H + S))
    return torch.from_numpy(spare), torch.from_numpy(tokens)
