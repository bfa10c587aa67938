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
"""

from __future__ import annotations

import torch

__all__ = ["greedy_pack", "swap_search", "objective"]

_BIG = float("inf")


def objective(w_BIM: torch.Tensor, assign_BI: torch.Tensor, num_bins: int) -> torch.Tensor:
    """``[B]`` sum over micro-batches of the busiest bin (float64)."""
    return bin_loads(w_BIM, assign_BI, num_bins).amax(-1).sum(-1)


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
                max_iters: int = 200, candidates: int = 2) -> torch.Tensor:
    """Local search: swap item pairs between bins while ``F`` drops.

    Each iteration, per problem: ``p`` = the bin that is the busiest with the most load over
    the micro-batches where it is the busiest; ``q`` = the ``candidates`` bins lightest over
    those micro-batches; every pair (item of ``p``, item of ``q``) is scored exactly and the
    best strictly improving swap is applied. Problems stop independently.

    Returns:
        the improved ``assign_BI`` (a new tensor); every bin keeps its item count.
    """
    B, I, M = w_BIM.shape
    K = num_bins
    if K == 1 or I <= 1:
        return assign_BI.clone()
    cap = I // K
    Q = min(candidates, K - 1)
    assign = assign_BI.clone()
    rows = torch.arange(B)
    active = torch.ones(B, dtype=torch.bool)
    for _ in range(max_iters):
        b = rows[active]
        if b.numel() == 0:
            break
        w = w_BIM[b]  # [b, I, M]
        a_b = assign[b]
        load = bin_loads(w, a_b, K)  # [b, M, K]
        mx, arg = load.max(-1)  # [b, M]
        is_max = torch.nn.functional.one_hot(arg, K).to(load.dtype)  # [b, M, K]
        p = (is_max * load).sum(1).argmax(-1)  # [b]
        wm = is_max.gather(2, p[:, None, None].expand(-1, M, 1)).squeeze(2)  # [b, M] micro-batches p leads
        light = (load * wm[:, :, None]).sum(1)  # [b, K]
        light.scatter_(1, p[:, None], _BIG)
        qs = light.argsort(dim=-1, stable=True)[:, :Q]  # [b, Q]
        # items of p and of each q, in index order: [b, cap]
        key = torch.where(a_b == p[:, None], torch.arange(I), I + torch.arange(I))
        items_p = key.argsort(dim=-1, stable=True)[:, :cap]
        key_q = torch.where(a_b[:, None, :] == qs[:, :, None], torch.arange(I), I + torch.arange(I))
        items_q = key_q.argsort(dim=-1, stable=True)[:, :, :cap]  # [b, Q, cap]
        wp = w.gather(1, items_p[:, :, None].expand(-1, -1, M))  # [b, cap, M]
        wq = w.gather(1, items_q.reshape(-1, Q * cap)[:, :, None].expand(-1, -1, M)).view(-1, Q, cap, M)
        # busiest bin other than p and q, per micro-batch: [b, Q, M]
        others = load[:, None, :, :].expand(-1, Q, -1, -1).clone()
        others.scatter_(3, p[:, None, None, None].expand(-1, Q, M, 1), -_BIG)
        others.scatter_(3, qs[:, :, None, None].expand(-1, -1, M, 1), -_BIG)
        other_max = others.amax(-1)
        lp = load.gather(2, p[:, None, None].expand(-1, M, 1)).squeeze(2)  # [b, M]
        lq = load.gather(2, qs[:, None, :].expand(-1, M, -1)).transpose(1, 2)  # [b, Q, M]
        d = wq[:, :, None, :, :] - wp[:, None, :, None, :]  # [b, Q, cap_p, cap_q, M] (q item in, p item out)
        new_p = lp[:, None, None, None, :] + d
        new_q = lq[:, :, None, None, :] - d
        new = torch.maximum(torch.maximum(new_p, new_q), other_max[:, :, None, None, :]).sum(-1)
        gain = mx.sum(-1)[:, None, None, None] - new  # [b, Q, cap, cap]
        if prev_BI is not None:
            prev = prev_BI[b]
            pp = prev.gather(1, items_p)  # [b, cap]
            pq = prev.gather(1, items_q.reshape(-1, Q * cap)).view(-1, Q, cap)
            moved_before = (pp != p[:, None])[:, None, :, None].to(w.dtype) + (pq != qs[:, :, None])[:, :, None, :]
            moved_after = (pp[:, None, :, None] != qs[:, :, None, None]).to(w.dtype) + (pq[:, :, None, :] != p[:, None, None, None])
            gain = gain - move_cost_B[b][:, None, None, None] * (moved_after - moved_before)
        flat = gain.reshape(b.numel(), -1)
        best, idx = flat.max(-1)
        scale = mx.sum(-1).abs().clamp(min=1.0)
        ok = best > 1e-9 * scale
        if not bool(ok.any()):
            break
        qi, rem = idx // (cap * cap), idx % (cap * cap)
        ip, iq = rem // cap, rem % cap
        item_p = items_p.gather(1, ip[:, None]).squeeze(1)
        item_q = items_q[torch.arange(b.numel()), qi].gather(1, iq[:, None]).squeeze(1)
        q = qs.gather(1, qi[:, None]).squeeze(1)
        sel = b[ok]
        assign[sel, item_p[ok]] = q[ok]
        assign[sel, item_q[ok]] = p[ok]
        active[b[~ok]] = False
    return assign
