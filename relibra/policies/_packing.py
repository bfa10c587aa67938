"""Packing items into equal-capacity bins against a per-micro-batch min-max objective.

Used by ``reorder`` twice: experts -> nodes (per layer) and experts -> GPUs (per layer and
node). Pure tensor functions, vectorised over the batch dimension.

Legend:

    B  independent problems (layers, or layers x nodes)     I  items (experts) per problem
    M  micro-batches                                        K  bins, each holding exactly I / K items

Objective of an assignment, per problem::

    F = sum_m max_k bin_load[m, k]  +  move_cost * #(items whose bin differs from ``prev``)

``bin_load[m, k]`` is the load of bin ``k`` in micro-batch ``m``. A bin that is the busiest in
one micro-batch cannot borrow from a bin that is idle in another, so ``F`` (not the load summed
over micro-batches) is what the step time follows.

``F`` is flat where several bins tie for the maximum of a micro-batch: lowering one of them
gains nothing until all are lowered, so a swap search against ``F`` stalls there. The overload
objective (``overload=True``) ``sum_m sum_k max(0, bin_load[m, k] - floor(mean_k bin_load[m, k]))``
rewards lowering any bin above its micro-batch's mean; ``reorder`` descends it first, then
polishes against ``F``.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["greedy_pack", "swap_search", "objective", "overload_objective"]

_BIG = float("inf")


def objective(w_BIM: torch.Tensor, assign_BI: torch.Tensor, num_bins: int) -> torch.Tensor:
    """``[B]`` sum over micro-batches of the busiest bin (float64)."""
    return bin_loads(w_BIM, assign_BI, num_bins).amax(-1).sum(-1)


def overload_objective(w_BIM: torch.Tensor, assign_BI: torch.Tensor, num_bins: int) -> torch.Tensor:
    """``[B]`` sum over micro-batches and bins of the load above the micro-batch's mean bin load
    (rounded down, so integer loads score exactly)."""
    load = bin_loads(w_BIM, assign_BI, num_bins)
    mean = torch.div(load.sum(-1, keepdim=True), num_bins, rounding_mode="floor")
    return (load - mean).clamp(min=0).sum((1, 2))


def bin_loads(w_BIM: torch.Tensor, assign_BI: torch.Tensor, num_bins: int) -> torch.Tensor:
    """``[B, M, K]`` load of every bin in every micro-batch."""
    B, I, M = w_BIM.shape
    out = torch.zeros(B, num_bins, M, dtype=w_BIM.dtype)
    out.scatter_add_(1, assign_BI[:, :, None].expand(B, I, M), w_BIM)
    return out.transpose(1, 2)


def greedy_pack(w_BIM: torch.Tensor, num_bins: int, prev_BI: torch.Tensor | None = None,
                move_cost_B: torch.Tensor | None = None) -> torch.Tensor:
    """Longest-first packing: items by summed load, heaviest first, each into the bin that
    raises ``F`` least (ties: lightest summed bin, then lowest index) among bins with room.

    Args:
        w_BIM: ``[B, I, M]`` float64 item loads per micro-batch.
        prev_BI: ``[B, I]`` previous bin of every item (for the move cost), or None.
        move_cost_B: ``[B]`` cost of one item leaving its previous bin.
    Returns:
        ``assign_BI [B, I]`` int64 bin of every item, exactly ``I / K`` items per bin.
    """
    B, I, M = w_BIM.shape
    K = num_bins
    cap = I // K
    order = w_BIM.sum(-1).argsort(dim=1, descending=True, stable=True)  # [B, I]
    load = torch.zeros(B, M, K, dtype=w_BIM.dtype)
    count = torch.zeros(B, K, dtype=torch.int64)
    assign = torch.zeros(B, I, dtype=torch.int64)
    rows = torch.arange(B)
    bins = torch.arange(K)
    for t in range(I):
        item = order[:, t]
        w = w_BIM[rows, item]  # [B, M]
        cur_max = load.amax(-1, keepdim=True)  # [B, M, 1]
        cost = torch.maximum(cur_max, load + w[:, :, None]).sum(1)  # [B, K]
        if prev_BI is not None:
            cost = cost + move_cost_B[:, None] * (bins != prev_BI[rows, item][:, None])
        cost = torch.where(count < cap, cost, _BIG)
        tie = cost <= cost.amin(-1, keepdim=True)
        total = torch.where(tie, load.sum(1), _BIG)
        k = total.argmin(-1)
        assign[rows, item] = k
        load[rows, :, k] += w
        count[rows, k] += 1
    return assign


def swap_search(w_BIM: torch.Tensor, assign_BI: torch.Tensor, num_bins: int,
                prev_BI: torch.Tensor | None = None, move_cost_B: torch.Tensor | None = None,
                max_iters: int = 200, candidates: int = 2, per_move: bool = False,
                busiest: int = 1, overload: bool = False,
                price_items: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Local search: swap item pairs between bins while ``F`` drops.

    Each iteration, per problem: ``p`` = the bin that is the busiest with the most load over
    the micro-batches where it is the busiest (``busiest > 1``: that many such bins, by that
    load); ``q`` = the ``candidates`` bins lightest over the micro-batches where ``p`` is the
    busiest; every pair (item of ``p``, item of ``q``) is scored exactly and the best strictly
    improving swap is applied. Problems stop independently.

    ``per_move=True`` (the incremental search of ``reorder``, started from ``prev_BI``): a swap
    qualifies when its gain in ``sum_m max_k`` exceeds ``move_cost`` times the moves it adds,
    and among those the best gain per added move (at least one) is applied, so the cheapest
    balance comes first. Either way every applied swap lowers ``F`` plus the move cost.

    ``overload=True`` scores swaps by :func:`overload_objective` instead of ``F`` (same bin
    pairs, same move pricing): every applied swap lowers the overload plus the move cost.

    ``price_items`` (with ``prev_BI``): called with the current assignment at the start of every
    round, returns the ``[B, I]`` price of each item leaving its previous bin (at least
    ``move_cost_B``); prices may thus depend on the moves so far (``reorder`` raises them on
    GPUs that already send many experts). An item returning to its previous bin saves only
    ``move_cost_B``, so every applied swap lowers the objective plus ``move_cost_B`` times the
    moves, and the search cannot cycle as prices change.

    Returns:
        the improved ``assign_BI`` (a new tensor); every bin keeps its item count.
    """
    B, I, M = w_BIM.shape
    K = num_bins
    if K == 1 or I <= 1:
        return assign_BI.clone()
    cap = I // K
    Q = min(candidates, K - 1)
    P = min(busiest, K)
    R = P * Q  # candidate (p, q) bin pairs per problem
    assign = assign_BI.clone()
    rows = torch.arange(B)
    active = torch.ones(B, dtype=torch.bool)
    ids = torch.arange(I)
    # integer loads whose per-problem total stays below 2**24 are summed exactly in float32
    # (every partial sum is an integer no larger than that total): half the memory traffic
    exact32 = w_BIM.dtype == torch.float64 and bool((w_BIM.sum((1, 2)) < 2**24).all()) \
        and bool((w_BIM == w_BIM.round()).all()) and bool((w_BIM >= 0).all())
    work = torch.float32 if exact32 else w_BIM.dtype
    # the [b, R, M, cap, cap] scores reuse two buffers: a fresh multi-MB tensor every round
    # costs more in first-touch page faults than the arithmetic
    buf_new = torch.empty(B, R, M, cap, cap, dtype=work)
    buf_q = torch.empty(B, R, M, cap, cap, dtype=work)
    for _ in range(max_iters):
        if prev_BI is not None:  # [B, I] price of every item leaving its previous bin
            item_cost = move_cost_B[:, None].expand(B, I) if price_items is None else price_items(assign)
        b = rows[active]
        nb = b.numel()
        if nb == 0:
            break
        w = w_BIM if nb == B else w_BIM[b]  # [b, I, M] (no copy while every problem is active)
        a_b = assign[b]
        load = bin_loads(w, a_b, K)  # [b, M, K]
        mx, arg = load.max(-1)  # [b, M]
        is_max = torch.nn.functional.one_hot(arg, K).to(load.dtype)  # [b, M, K]
        lead = (is_max * load).sum(1)  # [b, K]
        ps = lead.argsort(dim=-1, descending=True, stable=True)[:, :P]  # [b, P]
        wm = is_max.gather(2, ps[:, None, :].expand(-1, M, -1))  # [b, M, P] micro-batches each p leads
        light = torch.einsum("bmk,bmp->bpk", load, wm)  # [b, P, K]
        light.scatter_(2, ps[:, :, None], _BIG)
        qs = light.argsort(dim=-1, stable=True)[:, :, :Q]  # [b, P, Q]
        p = ps[:, :, None].expand(-1, -1, Q).reshape(nb, R)  # [b, R]
        q = qs.reshape(nb, R)
        # items of every p and q, in index order: [b, R, cap]
        items_p = torch.where(a_b[:, None, :] == p[:, :, None], ids, I + ids).argsort(dim=-1, stable=True)[:, :, :cap]
        items_q = torch.where(a_b[:, None, :] == q[:, :, None], ids, I + ids).argsort(dim=-1, stable=True)[:, :, :cap]
        wp = w.gather(1, items_p.reshape(nb, R * cap)[:, :, None].expand(-1, -1, M)).view(nb, R, cap, M).to(work)
        wq = w.gather(1, items_q.reshape(nb, R * cap)[:, :, None].expand(-1, -1, M)).view(nb, R, cap, M).to(work)
        lp = load.gather(2, p[:, None, :].expand(-1, M, -1)).transpose(1, 2).to(work)  # [b, R, M]
        lq = load.gather(2, q[:, None, :].expand(-1, M, -1)).transpose(1, 2).to(work)  # [b, R, M]
        wpT, wqT = wp.transpose(2, 3).contiguous(), wq.transpose(2, 3).contiguous()  # [b, R, M, cap]
        rest_p = (lp[:, :, :, None] - wpT).contiguous()  # [b, R, M, cap] (lp is a strided view)
        rest_q = (lq[:, :, :, None] - wqT).contiguous()
        new, new_q = buf_new[:nb], buf_q[:nb]  # [b, R, M, cap_p, cap_q]
        if overload:
            # sum over micro-batches of p's and q's load above t = floor(mean bin load): with
            # x = p_new - t and s = p + q - 2t (a swap keeps p + q), relu(x) + relu(s - x) =
            # max(relu(s), x, s - x). Integer loads stay integers, so float32 sums stay exact.
            t = torch.div(load.sum(-1), K, rounding_mode="floor").to(work)[:, None, :]  # [b, 1, M]
            s_ = lp + lq - 2 * t  # [b, R, M]
            torch.add((rest_p - t[..., None])[:, :, :, :, None], wqT[:, :, :, None, :], out=new)
            torch.sub(s_[:, :, :, None, None], new, out=new_q)
            torch.maximum(new, new_q, out=new)
            torch.maximum(new, s_.clamp(min=0)[:, :, :, None, None], out=new)
            new = new.sum(2).to(torch.float64)
            cur = ((lp - t).clamp(min=0) + (lq - t).clamp(min=0)).sum(-1).to(torch.float64)  # [b, R]
            gain = cur[:, :, None, None] - new
        else:
            # after swapping p's item i for q's item j: p = lp - wp[i] + wq[j], q = lq - wq[j] + wp[i];
            # laid out [b, R, M, cap_p, cap_q] so the sum over micro-batches runs on whole rows
            others = load[:, None, :, :].expand(-1, R, -1, -1).clone()  # busiest bin but p, q: [b, R, M]
            others.scatter_(3, p[:, :, None, None].expand(-1, -1, M, 1), -_BIG)
            others.scatter_(3, q[:, :, None, None].expand(-1, -1, M, 1), -_BIG)
            other_max = others.amax(-1).to(work)
            torch.add(rest_p[:, :, :, :, None], wqT[:, :, :, None, :], out=new)
            torch.add(rest_q[:, :, :, None, :], wpT[:, :, :, :, None], out=new_q)
            torch.maximum(new, new_q, out=new)
            torch.maximum(new, other_max[:, :, :, None, None], out=new)
            new = new.sum(2).to(torch.float64)  # [b, R, cap, cap]
            gain = mx.sum(-1)[:, None, None, None] - new  # [b, R, cap, cap]
        scale = mx.sum(-1).abs().clamp(min=1.0)
        if prev_BI is not None:
            prev = prev_BI[b]
            pp = prev.gather(1, items_p.reshape(nb, -1)).view(nb, R, cap)
            pq = prev.gather(1, items_q.reshape(nb, -1)).view(nb, R, cap)
            # moves each swap adds, per side: item i of p goes to q, item j of q goes to p
            add_p = (pp != q[:, :, None]).to(w.dtype) - (pp != p[:, :, None]).to(w.dtype)  # [b, R, cap]
            add_q = (pq != p[:, :, None]).to(w.dtype) - (pq != q[:, :, None]).to(w.dtype)
            added = add_p[:, :, :, None] + add_q[:, :, None, :]  # [b, R, cap, cap] in {-2..2}
            # an item leaving its previous bin pays its price; one returning saves only the
            # base price (prices may have risen since it left: saving them would undo moves
            # in cycles), so every applied swap lowers objective + base price x moves
            cost, base = item_cost[b], move_cost_B[b][:, None, None].to(w.dtype)  # [b, I], [b, 1, 1]
            cp = torch.where(add_p > 0, cost.gather(1, items_p.reshape(nb, -1)).view(nb, R, cap), base) * add_p
            cq = torch.where(add_q > 0, cost.gather(1, items_q.reshape(nb, -1)).view(nb, R, cap), base) * add_q
            move = cp[:, :, :, None] + cq[:, :, None, :]  # [b, R, cap, cap] price of the added moves
            gain = gain - move
        if per_move and prev_BI is not None:  # rank qualifying swaps by gain per added move
            raw = gain + move
            key = torch.where(gain > 1e-9 * scale[:, None, None, None], raw / added.clamp(min=1.0), -_BIG)
        else:
            key = gain
        key_r, idx_r = key.reshape(nb, R, -1).max(-1)  # [b, R] best swap of every pair
        gain_r = gain.reshape(nb, R, -1).gather(2, idx_r[:, :, None]).squeeze(2)
        ri = key_r.argmax(-1)
        nr = torch.arange(nb)
        ok = gain_r[nr, ri] > 1e-9 * scale
        if not bool(ok.any()):
            break
        bp, bq = p[nr, ri], q[nr, ri]
        sel = b[ok]
        item_p, item_q = _pair_items(items_p, items_q, ri, idx_r[nr, ri], cap)
        assign[sel, item_p[ok]] = bq[ok]
        assign[sel, item_q[ok]] = bp[ok]
        active[b[~ok]] = False
        if overload and R > 1:
            # the overload objective sums over bins against per-micro-batch means that swaps do
            # not change, so swaps on disjoint bin pairs add up exactly: also apply, best key
            # first, every other pair's best qualifying swap whose two bins are untouched so far
            used = torch.zeros(nb, K, dtype=torch.bool)
            used[nr, bp] = True
            used[nr, bq] = True
            order = key_r.argsort(dim=-1, descending=True, stable=True)
            for rank in range(R):
                r2 = order[:, rank]
                p2, q2 = p[nr, r2], q[nr, r2]
                can = ok & (r2 != ri) & (gain_r[nr, r2] > 1e-9 * scale) & ~used[nr, p2] & ~used[nr, q2]
                if not bool(can.any()):
                    continue
                i2p, i2q = _pair_items(items_p, items_q, r2, idx_r[nr, r2], cap)
                assign[b[can], i2p[can]] = q2[can]
                assign[b[can], i2q[can]] = p2[can]
                used[nr[can], p2[can]] = True
                used[nr[can], q2[can]] = True
        elif per_move and prev_BI is not None and R > 1:
            # also the best swap of another pair on four other bins, kept only if it lowers
            # F + move cost further (exact check: the two swaps interact through the max)
            apart = (p != bp[:, None]) & (p != bq[:, None]) & (q != bp[:, None]) & (q != bq[:, None])
            cand = apart & (gain_r > 1e-9 * scale[:, None]) & ok[:, None]
            has = cand.any(-1)
            if bool(has.any()):
                h = has.nonzero().squeeze(1)
                r2 = torch.where(cand, key_r, -_BIG).argmax(-1)[h]
                i2p, i2q = _pair_items(items_p[h], items_q[h], r2, idx_r[h, r2], cap)
                bb = b[h]
                trial = assign[bb].clone()
                hr = torch.arange(h.numel())
                trial[hr, i2p] = q[h, r2]
                trial[hr, i2q] = p[h, r2]
                cost, base, pv = item_cost[bb], move_cost_B[bb].to(w_BIM.dtype), prev_BI[bb]
                score = overload_objective if overload else objective
                was, now = assign[bb] != pv, trial != pv
                before = score(w_BIM[bb], assign[bb], K) + base * (was & ~now).sum(-1)
                after = score(w_BIM[bb], trial, K) + (cost * (now & ~was)).sum(-1)
                keep = after < before - 1e-9 * scale[h]
                assign[bb[keep]] = trial[keep]
    return assign


def _pair_items(items_p: torch.Tensor, items_q: torch.Tensor, r: torch.Tensor, idx: torch.Tensor,
                cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Items ``[b]`` of the swap ``idx`` (flat over ``cap x cap``) of pair ``r`` ``[b]``."""
    nr = torch.arange(r.numel())
    return items_p[nr, r, idx // cap], items_q[nr, r, idx % cap]
