"""Intra-node replication, token split: the exact integer min-max split for chosen replicas.

The layout, the legend and the phases are in :mod:`relibra.policies.replica_problems`; the
replicas come from :mod:`relibra.policies.replica_greedy` with the exact optimal level ``T*``
they allow (:func:`~relibra.policies.replica_greedy.best_level`).

With one spare slot per GPU, :func:`forest_split` reaches ``T*`` in two sweeps (NumPy,
problem-last). Otherwise the greedy moves are replayed with ``T*`` as target (:func:`resplit`)
as the start for :func:`optimal_split`, which is also the fallback for the rare node that
:func:`forest_split` does not solve (and runs without ``T*`` for wider nodes).

:func:`optimal_split` works on the residual graph of the node's GPUs: an edge ``u -> v`` when
some expert has tokens on ``u`` and a copy on ``v``. A split is optimal iff no busiest GPU
reaches a GPU at least 2 tokens lighter (otherwise the set U reachable from the busiest GPUs
satisfies ``load(U) = fixed(U) + replicated experts wholly inside U``, so ``ceil(load(U)/|U|)``
= current max is a lower bound). Each round pushes ``min(bottleneck, (a - c) // 2)`` tokens
along such a path; the sum of squared GPU loads strictly drops, so it terminates, and the
busiest GPU never rises. Tokens move only from a busiest GPU, so copies keep their home tokens
where moving buys nothing. Its torch tensors are problem-first: ``hshare_BGH [B, Gn, H]``,
``rep_BSn`` and ``x_BSn [B, Sn]``; ``NE = 2 Sn + Sn * Sn`` encoded residual edges per problem.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["resplit", "tree_split", "forest_split", "optimal_split", "slot_sums"]

_INF = torch.iinfo(torch.int64).max // 4  # "no path" in the Bellman-Ford rounds; above any load


def resplit(
    loads_BGH: torch.Tensor,
    rep_BSn: torch.Tensor,
    made_BSn: torch.Tensor,
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

    Returns new ``hshare_BGH`` and ``x_BSn``; the busiest GPU never rises above the loads'.
    """
    B, Gn, H = loads_BGH.shape
    S = spare_per_gpu
    Sn = rep_BSn.shape[1]
    hflat = torch.cat([loads_BGH.reshape(B, Gn * H), torch.zeros(B, 1, dtype=torch.int64)], 1)
    x = torch.zeros(B, Sn + 1, dtype=torch.int64)
    ld = torch.cat([loads_BGH.sum(-1), torch.zeros(B, 1, dtype=torch.int64)], 1)
    rep_x = torch.cat([rep_BSn, torch.full((B, 1), Gn * H, dtype=torch.int64)], 1)
    T = level_B[:, None]
    chain = None if chain_B is None else chain_B[:, None]
    T_live = made_BSn.shape[1] - int((made_BSn < 0).all(0).flip(0).cumprod(0).sum())  # rounds with a move
    for _ in range(passes if chain is not None else 1):
        for t in range(T_live):
            k = made_BSn[:, t : t + 1]
            live = k >= 0
            k = torch.where(live, k, Sn)
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
    return hflat[:, :-1].reshape(B, Gn, H), x[:, :Sn]


def tree_split(w: np.ndarray, rep: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact split at the known optimum ``T [B]`` in two sweeps, for one spare slot per GPU.

    With one spare slot per GPU every GPU receives from at most one donor, so the replicas form
    a forest (donor -> receiver) unless a chain closes into a cycle. Bottom-up, ``absorb(v)`` =
    the most tokens GPU ``v`` can take over its parent edge with its subtree at most ``T*``:
    ``T* - home(v) + sum over v's experts e of min(load_e, sum of absorb(c) over copies of e)``.
    Top-down, every GPU sheds exactly its excess over ``T*`` (nothing where it is not above
    ``T*``), expert by expert, copy by copy, each copy within its receiver's ``absorb``. Both
    sweeps iterate to a fixed point (tree depth + 1 rounds, a few array operations each).

    Args:
        w: ``[Gn*H, B]`` home-expert loads (not modified).
        rep: ``[Gn, B]`` replicas (one spare slot per GPU).
        T: ``[B]`` the exact optimal level (:func:`~relibra.policies.replica_greedy.best_level`).
    Returns:
        ``hshare [Gn*H, B]``, ``x [Gn, B]`` and ``ok [B]``: True where the split is valid (no
        negative share) and reaches ``T``; other problems (cycles) must be solved another way.
    """
    GH, B = w.shape
    Gn = rep.shape[0]
    H = GH // Gn
    exists = rep >= 0
    ridx = (np.where(exists, rep, GH) * B + np.arange(B)).ravel()  # flat (home slot, problem) of each copy

    def to_slots(v_GB: np.ndarray) -> np.ndarray:  # [Gn*H, B]: per-copy values summed by home slot
        out = np.bincount(ridx, weights=v_GB.ravel(), minlength=(GH + 1) * B)[: GH * B]
        return out.astype(np.int64).reshape(GH, B)  # exact below 2**53

    base = T - w.reshape(Gn, H, B).sum(1)  # [Gn, B] room of every GPU before it sheds anything

    def absorb_step(absorb: np.ndarray, cols: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One bottom-up round on problems ``cols`` (None: all): ``(cap, new absorb)``."""
        if cols is None:
            cap = np.minimum(w, to_slots(np.maximum(absorb, 0)))  # [Gn*H, B] most each expert sheds
            return cap, base + cap.reshape(Gn, H, B).sum(1)
        cap = np.minimum(w[:, cols], slot_sums(np.maximum(absorb, 0), rep[:, cols], GH))
        return cap, base[:, cols] + cap.reshape(Gn, H, -1).sum(1)

    absorb, cap = _fixed_point(absorb_step, base, np.empty_like(w), Gn + 1)
    capk = np.where(exists, np.maximum(absorb, 0), 0)  # [Gn, B] most each copy may take
    lower = np.tri(Gn, Gn, -1, dtype=bool)[:, :, None]
    before = (((rep[:, None] == rep[None]) & exists[:, None] & lower) * capk[None]).sum(1)
    capv = cap.reshape(Gn, H, B)
    before_e = (capv.cumsum(1) - capv).reshape(-1)  # capacity of the GPU's earlier experts
    at = np.minimum(ridx, GH * B - 1)  # per copy, from here on: its expert's slot (any, if none)
    before_e, cap_k = before_e.take(at).reshape(Gn, B), cap.reshape(-1).take(at).reshape(Gn, B)
    home = np.minimum(ridx.reshape(Gn, B) // (H * B), Gn - 1)  # [Gn, B] home GPU of each copy

    def shed_step(x: np.ndarray, cols: np.ndarray | None) -> tuple[None, np.ndarray]:
        """One top-down round on problems ``cols`` (None: all): ``(None, new x)``."""
        pick = (slice(None), slice(None)) if cols is None else (slice(None), cols)
        excess = np.take_along_axis(np.maximum(x - base[pick], 0), home[pick], 0)  # the home GPU's excess
        return None, np.minimum(np.maximum(np.minimum(np.maximum(excess - before_e[pick], 0), cap_k[pick])
                                           - before[pick], 0), capk[pick])

    x = _fixed_point(shed_step, np.zeros((Gn, B), np.int64), None, Gn + 1)[0]
    h = w - to_slots(x)
    ok = (h >= 0).all(0) & ((h.reshape(Gn, H, B).sum(1) + x).max(0) <= T)
    return h, x, ok


def slot_sums(v_SB: np.ndarray, rep_SB: np.ndarray, slots: int) -> np.ndarray:
    """``[slots, B]``: per-copy values ``v_SB`` summed by the home slot each copy holds (``rep_SB``,
    local home slot per spare slot, -1 empty; ``[Sn, B]`` both)."""
    B = rep_SB.shape[1]
    flat = (np.where(rep_SB >= 0, rep_SB, slots) * B + np.arange(B)).ravel()
    out = np.bincount(flat, weights=v_SB.ravel(), minlength=(slots + 1) * B)[: slots * B]
    return out.astype(np.int64).reshape(slots, B)  # exact below 2**53


def _fixed_point(step, state: np.ndarray, aux: np.ndarray | None, rounds: int
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Iterate ``state [X, B]`` (and ``aux``, from the round before the last) per problem column
    to its fixed point, at most ``rounds`` rounds: ``step(state, cols) -> (aux, new state)`` on
    the columns ``cols`` (None: all). Every column iterates on its own, so once a quarter or
    fewer still change, the rounds run on those columns alone (the same result, less work)."""
    B = state.shape[1]
    cols = None
    for _ in range(rounds):
        cur = state if cols is None else state[:, cols]
        extra, new = step(cur, cols)
        changed = (new != cur).any(0)
        if aux is not None:
            if cols is None:
                aux = extra
            else:
                aux[:, cols] = extra
        if cols is None:
            state = new if changed.any() else state
            if not changed.any():
                break
            if 4 * changed.sum() <= B:
                cols = np.flatnonzero(changed)
        else:
            state[:, cols] = new
            cols = cols[changed]
            if cols.size == 0:
                break
    return state, aux


def forest_split(w: np.ndarray, rep: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`tree_split`, with replica cycles cut: one call over all problems, same arguments and results.

    A cycle of replicas (GPU a holds a copy of b's expert, b of a's, ...) carries a
    circulation that moves no load; cancelling it empties one cycle edge, so some optimal
    split leaves one copy on the cycle unused. Problems with a cycle that the plain sweeps
    do not solve are solved again once per copy on a cycle (that copy removed) and the first
    variant that reaches the level is kept. Problems with two cycles may still fail (``ok`` False).
    """
    GH, B = w.shape
    Gn = rep.shape[0]
    H = GH // Gn
    arB = np.arange(B)
    anc = np.concatenate([np.where(rep >= 0, rep // H, Gn), np.full((1, B), Gn)])  # parent GPU, Gn = none
    for _ in range(max(1, (Gn - 1).bit_length())):  # ancestor 2**j steps up
        anc = anc[anc, arB]
    h, x, ok = tree_split(w, rep, T)
    on_cycle = np.zeros((Gn + 1, B), bool)  # after Gn steps up every path sits on its cycle
    on_cycle[anc[:Gn], arB] = True
    on_cycle[:, ok] = False  # a cycle often carries no flow anyway: solved already
    cyc_f, cut_g = np.nonzero(on_cycle[:Gn].T)  # (problem, cycle GPU) pairs, by problem then GPU
    if cyc_f.size:  # one variant per cycle edge: the copy on that GPU dropped
        cut = rep[:, cyc_f]
        cut[cut_g, np.arange(cyc_f.size)] = -1
        h_v, x_v, ok_v = tree_split(w[:, cyc_f], cut, T[cyc_f])
        good = np.flatnonzero(ok_v)  # the first variant of each problem that reaches the level
        first = good[np.unique(cyc_f[good], return_index=True)[1]]
        dst = cyc_f[first]
        h[:, dst], x[:, dst], ok[dst] = h_v[:, first], x_v[:, first], True
    return h, x, ok


def optimal_split(
    hshare_BGH: torch.Tensor,
    rep_BSn: torch.Tensor,
    x_BSn: torch.Tensor,
    spare_per_gpu: int,
    max_rounds: int = 10_000,
    level_B: torch.Tensor | None = None,
) -> int:
    """Phase 2: make the split exactly min-max optimal for the replicas in ``rep_BSn``.

    ``level_B`` (from :func:`best_level`), when given, skips problems already at the optimum.
    Mutates ``hshare_BGH`` and ``x_BSn`` in place; returns the number of augmenting rounds.
    """
    B, Gn, H = hshare_BGH.shape
    S = spare_per_gpu
    Sn = Gn * S
    if Sn == 0 or Gn == 1 or B == 0:
        return 0
    NE = 2 * Sn + Sn * Sn
    hflat_all = hshare_BGH.view(B, Gn * H)
    rep_gpu = torch.arange(Sn) // S  # [Sn]
    edge_ids = torch.arange(NE)
    eye = torch.eye(Sn, dtype=torch.bool)
    # only problems with a replica can improve
    todo = (rep_BSn >= 0).any(-1)
    if level_B is not None:
        ld0 = hshare_BGH.sum(-1).scatter_add_(1, (torch.arange(Sn) // S).expand(B, Sn), x_BSn)
        todo &= ld0.amax(-1) > level_B
    rows = torch.nonzero(todo).squeeze(1)
    hflat, x, rep = hflat_all[rows], x_BSn[rows], rep_BSn[rows]
    lev = None if level_B is None else level_B[rows][:, None]
    rounds = 0
    while rows.numel() and rounds < max_rounds:
        b_n = rows.numel()
        exists = rep >= 0
        slot = rep.clamp(min=0)
        home_gpu = slot // H
        rg = rep_gpu.expand(b_n, Sn)
        ld = hflat.view(b_n, Gn, H).sum(-1).scatter_add_(1, rg, x)
        # residual edges: home -> replica k, replica k -> home, replica k -> replica k' (same expert)
        same = (rep[:, :, None] == rep[:, None, :]) & exists[:, :, None] & ~eye
        pair = torch.cat(
            [
                home_gpu * Gn + rg,
                rg * Gn + home_gpu,
                (rep_gpu[:, None] * Gn + rep_gpu[None, :]).reshape(1, Sn * Sn).expand(b_n, -1),
            ],
            1,
        )
        cap = torch.cat([hflat.gather(1, slot), x, x[:, :, None].expand(b_n, Sn, Sn).reshape(b_n, Sn * Sn)], 1)
        valid = torch.cat([exists, exists, same.reshape(b_n, Sn * Sn)], 1) & (cap > 0)
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
            x_BSn[rows[done]] = x[done]
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
        dx = torch.zeros(b_n, Sn + 1, dtype=torch.int64)
        dh = torch.zeros(b_n, Gn * H + 1, dtype=torch.int64)
        for act, eid in hops:
            da = torch.where(act, amt, 0)[:, None]
            is_a, is_b = eid < Sn, (eid >= Sn) & (eid < 2 * Sn)
            rr = (eid - 2 * Sn).clamp(min=0)
            k_from = torch.where(is_a, Sn, torch.where(is_b, eid - Sn, rr // Sn))
            k_to = torch.where(is_a, eid, torch.where(is_b, Sn, rr % Sn))
            dx.scatter_add_(1, k_from[:, None], -da).scatter_add_(1, k_to[:, None], da)
            k_home = torch.where(is_a, eid, eid - Sn).clamp(0, Sn - 1)
            hslot = torch.where(is_a | is_b, slot.gather(1, k_home[:, None]).squeeze(1), Gn * H)
            dh.scatter_add_(1, hslot[:, None], torch.where(is_a[:, None], -da, da))
        x = x + dx[:, :Sn]
        hflat = hflat + dh[:, : Gn * H]
    if rows.numel():
        hflat_all[rows] = hflat
        x_BSn[rows] = x
    return rounds
