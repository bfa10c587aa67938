"""Packing items into equal-capacity bins against a per-micro-batch min-max objective.

Used by ``reorder`` twice: experts -> nodes (per layer) and experts -> GPUs (per layer and
node). Pure tensor functions, vectorised over the problem dimension.

Legend:

    B  independent problems (layers, or layers x nodes)     I  items (experts) per problem
    M  micro-batches                                        C  bins, each holding c = I / C items
    b  problems still searching                             U  bin pairs tried per round

Objective of an assignment, per problem::

    F = sum_m max_k bin_load[m, k]  +  move price of the items whose bin differs from ``previous``

``bin_load[m, k]`` is the load of bin ``k`` in micro-batch ``m``. A bin that is the busiest in
one micro-batch cannot borrow from a bin that is idle in another, so ``F`` (not the load summed
over micro-batches) is what the step time follows.

``F`` is flat where several bins tie for the maximum of a micro-batch: lowering one of them
gains nothing until all are lowered, so a swap search against ``F`` stalls there. The overload
objective ``sum_m sum_k max(0, bin_load[m, k] - floor(mean_k bin_load[m, k]))`` rewards lowering
any bin above its micro-batch's mean; ``reorder`` descends it first, then polishes against ``F``.

:func:`swap_search` runs in rounds of named stages: :func:`choose_bin_pairs` (which bins to swap
between), :func:`swap_candidates` (their items and loads), :func:`max_swap_gain` or
:func:`overload_swap_gain` (what every swap gains), :func:`price_moves` (what it costs against
the previous assignment), :func:`rank_swaps` (the best one per pair), then the best swap of each
problem is applied, plus :func:`apply_disjoint_swaps` (overload) or :func:`try_second_swap` (max
objective with moves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch

from .budget import SearchBudget, round_cost

__all__ = ["greedy_pack", "swap_search", "objective", "overload_objective", "bin_loads", "BinPairs", "MovePrices",
           "choose_bin_pairs", "SwapCandidates", "swap_candidates", "max_swap_gain", "overload_swap_gain",
           "price_moves", "RankedSwaps", "rank_swaps", "SearchRound", "apply_disjoint_swaps", "try_second_swap"]

_BIG = float("inf")
_TOLERANCE = 1e-9  # a swap must gain this much times the objective's size: no moves for float noise


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
    """``[B, M, C]`` load of every bin in every micro-batch."""
    B, I, M = w_BIM.shape
    out = torch.zeros(B, num_bins, M, dtype=w_BIM.dtype)
    out.scatter_add_(1, assign_BI[:, :, None].expand(B, I, M), w_BIM)
    return out.transpose(1, 2)


def greedy_pack(w_BIM: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Longest-first packing: items by summed load, heaviest first, each into the bin that
    raises ``F`` least (ties: lightest summed bin, then lowest index) among bins with room.

    Args:
        w_BIM: ``[B, I, M]`` float64 item loads per micro-batch.
    Returns:
        ``assign_BI [B, I]`` int64 bin of every item, exactly ``I / C`` items per bin.
    """
    B, I, M = w_BIM.shape
    C = num_bins
    per_bin = I // C
    order = w_BIM.sum(-1).argsort(dim=1, descending=True, stable=True)  # [B, I]
    load = torch.zeros(B, M, C, dtype=w_BIM.dtype)
    count = torch.zeros(B, C, dtype=torch.int64)
    assign = torch.zeros(B, I, dtype=torch.int64)
    rows = torch.arange(B)
    for t in range(I):
        item = order[:, t]
        w = w_BIM[rows, item]  # [B, M]
        cur_max = load.amax(-1, keepdim=True)  # [B, M, 1]
        cost = torch.maximum(cur_max, load + w[:, :, None]).sum(1)  # [B, C]
        cost = torch.where(count < per_bin, cost, _BIG)
        tie = cost <= cost.amin(-1, keepdim=True)
        total = torch.where(tie, load.sum(1), _BIG)
        k = total.argmin(-1)
        assign[rows, item] = k
        load[rows, :, k] += w
        count[rows, k] += 1
    return assign


@dataclass(frozen=True)
class BinPairs:
    """Which bin pairs a round tries: each of the ``busiest`` bins leading the most load (summed
    over the micro-batches where it is the busiest) with each of its ``partners`` bins lightest
    over those micro-batches."""

    busiest: int = 1
    partners: int = 2


@dataclass(frozen=True)
class MovePrices:
    """Moves priced against a previous assignment.

    Attributes:
        previous_BI: ``[B, I]`` previous bin of every item.
        base_B: ``[B]`` price of one item leaving its previous bin.
        price_items: optional; called with the current assignment at the start of every round,
            returns the ``[B, I]`` price of each item leaving its previous bin (at least
            ``base_B``), so prices may depend on the moves so far (``reorder`` raises them on
            GPUs that already send many experts). An item returning to its previous bin saves
            only ``base_B``, so every applied swap lowers the objective plus ``base_B`` times
            the moves, and the search cannot cycle as prices change.
    """

    previous_BI: torch.Tensor
    base_B: torch.Tensor
    price_items: Callable[[torch.Tensor], torch.Tensor] | None = None

    def item_prices(self, assign_BI: torch.Tensor) -> torch.Tensor:
        """``[B, I]`` price of every item leaving its previous bin, this round."""
        if self.price_items is None:
            return self.base_B[:, None].expand_as(assign_BI)
        return self.price_items(assign_BI)


def swap_search(w_BIM: torch.Tensor, assign_BI: torch.Tensor, num_bins: int, *,
                score: Literal["max", "overload"] = "max", pairs: BinPairs = BinPairs(),
                moves: MovePrices | None = None, max_rounds: int = 200, budget: SearchBudget | None = None
                ) -> torch.Tensor:
    """Local search: swap item pairs between bins while the objective (plus move prices) drops.

    Each round, per problem still searching: the bin pairs of ``pairs``; every swap (item of
    ``p``, item of ``q``) of every pair scored exactly against ``score`` (``"max"``: ``F``;
    ``"overload"``: :func:`overload_objective`); the best strictly improving swap applied.
    With ``moves`` a swap qualifies when its gain exceeds the price of the moves it adds, and
    among those the best gain per added move (at least one) is applied, so the cheapest
    balance comes first. A problem stops when no swap qualifies, or after ``max_rounds``; all
    stop when ``budget`` refuses a round (:func:`~relibra.policies.budget.round_cost`).

    Returns:
        the improved ``assign_BI`` (a new tensor); every bin keeps its item count, and every
        applied swap lowered the objective plus the move price.
    """
    B, I, M = w_BIM.shape
    C = num_bins
    if C == 1 or I <= 1:
        return assign_BI.clone()
    per_bin = I // C
    pairs = BinPairs(min(pairs.busiest, C), min(pairs.partners, C - 1))
    U = pairs.busiest * pairs.partners
    assign = assign_BI.clone()
    searching = torch.ones(B, dtype=torch.bool)
    work = _work_dtype(w_BIM)
    # the [b, U, M, c, c] scores reuse two buffers: a fresh multi-MB tensor every round
    # costs more in first-touch page faults than the arithmetic
    scratch = (torch.empty(B, U, M, per_bin, per_bin, dtype=work), torch.empty(B, U, M, per_bin, per_bin, dtype=work))
    for _ in range(max_rounds):
        prices_BI = None if moves is None else moves.item_prices(assign)
        b = searching.nonzero().squeeze(1)
        if b.numel() == 0 or (budget is not None and not budget.charge(round_cost(b.numel(), M, I, U * per_bin ** 2))):
            break
        w = w_BIM if b.numel() == B else w_BIM[b]  # [b, I, M] (no copy while every problem searches)
        load = bin_loads(w, assign[b], C)  # [b, M, C]
        busiest_load, busiest_bin = load.max(-1)  # [b, M]
        tolerance = _TOLERANCE * busiest_load.sum(-1).abs().clamp(min=1.0)  # [b] least gain that counts
        p, q = choose_bin_pairs(load, busiest_bin, pairs)
        cand = swap_candidates(w, load, assign[b], p, q, work)
        sliced = tuple(buffer[: b.numel()] for buffer in scratch)
        if score == "overload":
            gain = overload_swap_gain(load, cand, sliced)
        else:
            gain = max_swap_gain(load, busiest_load, cand, sliced)
        move = added = None
        if moves is not None:
            move, added = price_moves(cand, moves.previous_BI[b], prices_BI[b], moves.base_B[b].to(w.dtype))
            gain = gain - move
        ranked = rank_swaps(gain, tolerance, move, added)
        best = ranked.key.argmax(-1)  # [b] the pair whose best swap ranks first
        nb = torch.arange(b.numel())
        applied = ranked.gain[nb, best] > tolerance
        if not bool(applied.any()):
            break
        item_p, item_q = _swap_items(cand.items_p, cand.items_q, best, ranked.swap[nb, best])
        assign[b[applied], item_p[applied]] = q[nb, best][applied]
        assign[b[applied], item_q[applied]] = p[nb, best][applied]
        searching[b[~applied]] = False
        if U == 1:
            continue
        done = SearchRound(b, cand, ranked, best, applied, tolerance)
        if score == "overload":
            apply_disjoint_swaps(assign, done, C)
        elif moves is not None:
            try_second_swap(assign, w_BIM, done, moves, prices_BI, C)
    return assign


def _work_dtype(w_BIM: torch.Tensor) -> torch.dtype:
    """float32 where that sums exactly: integer loads whose per-problem total stays below 2**24
    (every partial sum is then an integer no larger than that total); half the memory traffic."""
    exact32 = w_BIM.dtype == torch.float64 and bool((w_BIM.sum((1, 2)) < 2**24).all()) \
        and bool((w_BIM == w_BIM.round()).all()) and bool((w_BIM >= 0).all())
    return torch.float32 if exact32 else w_BIM.dtype


def choose_bin_pairs(load_bMC: torch.Tensor, busiest_bM: torch.Tensor, pairs: BinPairs
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The bin pairs ``(p, q)`` to swap between, ``[b, U]`` each (``U = busiest * partners``).

    ``p``: the ``pairs.busiest`` bins that lead the most load, summed over the micro-batches where
    each is the busiest bin (``busiest_bM``): lowering them lowers ``F`` most directly. ``q``: for
    each ``p``, the ``pairs.partners`` other bins lightest over those same micro-batches, the ones
    with room exactly where ``p`` is heavy. Ties go to the lower bin index.
    """
    nb, M, C = load_bMC.shape
    leads = torch.nn.functional.one_hot(busiest_bM, C).to(load_bMC.dtype)  # [b, M, C]
    lead_load = (leads * load_bMC).sum(1)  # [b, C]
    first = lead_load.argsort(dim=-1, descending=True, stable=True)[:, : pairs.busiest]  # [b, busiest]
    where_led = leads.gather(2, first[:, None, :].expand(-1, M, -1))  # [b, M, busiest] micro-batches it leads
    there = torch.einsum("bmk,bmp->bpk", load_bMC, where_led)  # [b, busiest, C]
    there.scatter_(2, first[:, :, None], _BIG)
    partner = there.argsort(dim=-1, stable=True)[:, :, : pairs.partners]  # [b, busiest, partners]
    U = pairs.busiest * pairs.partners
    return first[:, :, None].expand(-1, -1, pairs.partners).reshape(nb, U), partner.reshape(nb, U)


class SwapCandidates(NamedTuple):
    """Every swap of one round: item ``i`` of bin ``p`` for item ``j`` of bin ``q``, per pair.

    Loads are in the search's work dtype; ``rest_*`` is the bin's load without each of its items.
    """

    p: torch.Tensor  # [b, U] first bin of every pair
    q: torch.Tensor  # [b, U] its partner
    items_p: torch.Tensor  # [b, U, c] items of p, in index order
    items_q: torch.Tensor  # [b, U, c]
    load_p: torch.Tensor  # [b, U, M]
    load_q: torch.Tensor  # [b, U, M]
    item_load_p: torch.Tensor  # [b, U, M, c]
    item_load_q: torch.Tensor  # [b, U, M, c]
    rest_p: torch.Tensor  # [b, U, M, c]
    rest_q: torch.Tensor  # [b, U, M, c]


def swap_candidates(w_bIM: torch.Tensor, load_bMC: torch.Tensor, assign_bI: torch.Tensor, p_bU: torch.Tensor,
                    q_bU: torch.Tensor, work: torch.dtype) -> SwapCandidates:
    """The items of both bins of every pair and their loads, laid out ``[b, U, M, c]`` so that
    sums over micro-batches run on whole rows."""
    nb, I, M = w_bIM.shape
    per_bin = I // load_bMC.shape[2]

    def side(bins_bU: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.arange(I)
        items = torch.where(assign_bI[:, None, :] == bins_bU[:, :, None], ids, I + ids).argsort(dim=-1, stable=True)
        items = items[:, :, :per_bin]  # [b, U, c] the bin's items, in index order
        U = bins_bU.shape[1]
        item_load = w_bIM.gather(1, items.reshape(nb, U * per_bin)[:, :, None].expand(-1, -1, M))
        item_load = item_load.view(nb, U, per_bin, M).to(work).transpose(2, 3).contiguous()  # [b, U, M, c]
        bin_load = load_bMC.gather(2, bins_bU[:, None, :].expand(-1, M, -1)).transpose(1, 2).to(work)  # [b, U, M]
        rest = (bin_load[:, :, :, None] - item_load).contiguous()  # (bin_load is a strided view)
        return items, bin_load, item_load, rest

    items_p, load_p, item_load_p, rest_p = side(p_bU)
    items_q, load_q, item_load_q, rest_q = side(q_bU)
    return SwapCandidates(p_bU, q_bU, items_p, items_q, load_p, load_q, item_load_p, item_load_q, rest_p, rest_q)


def max_swap_gain(load_bMC: torch.Tensor, busiest_bM: torch.Tensor, cand: SwapCandidates,
                  scratch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[b, U, c, c]`` float64 drop of ``F`` (the busiest bin, summed over micro-batches) for
    every swap: after swapping ``p``'s item ``i`` for ``q``'s item ``j``, ``p`` carries
    ``load_p - w_i + w_j`` and ``q`` carries ``load_q - w_j + w_i``; every other bin is unchanged.
    ``scratch``: two ``[b, U, M, c, c]`` work buffers."""
    nb, M, C = load_bMC.shape
    U = cand.p.shape[1]
    new_p, new_q = scratch
    others = load_bMC[:, None, :, :].expand(-1, U, -1, -1).clone()  # busiest bin but p, q: [b, U, M]
    others.scatter_(3, cand.p[:, :, None, None].expand(-1, -1, M, 1), -_BIG)
    others.scatter_(3, cand.q[:, :, None, None].expand(-1, -1, M, 1), -_BIG)
    other_max = others.amax(-1).to(new_p.dtype)
    torch.add(cand.rest_p[:, :, :, :, None], cand.item_load_q[:, :, :, None, :], out=new_p)
    torch.add(cand.rest_q[:, :, :, None, :], cand.item_load_p[:, :, :, :, None], out=new_q)
    torch.maximum(new_p, new_q, out=new_p)
    torch.maximum(new_p, other_max[:, :, :, None, None], out=new_p)
    return busiest_bM.sum(-1)[:, None, None, None] - new_p.sum(2).to(torch.float64)


def overload_swap_gain(load_bMC: torch.Tensor, cand: SwapCandidates,
                       scratch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[b, U, c, c]`` float64 drop of the overload objective for every swap.

    Only ``p`` and ``q`` change, and the per-micro-batch mean ``t`` (rounded down) does not: with
    ``x = p_new - t`` and ``s = p + q - 2t`` (a swap keeps ``p + q``), their overload is
    ``relu(x) + relu(s - x) = max(relu(s), x, s - x)``. Integer loads stay integers, so float32
    sums stay exact. ``scratch``: two ``[b, U, M, c, c]`` work buffers.
    """
    C = load_bMC.shape[2]
    new_p, new_q = scratch
    work = new_p.dtype
    t = torch.div(load_bMC.sum(-1), C, rounding_mode="floor").to(work)[:, None, :]  # [b, 1, M]
    s = cand.load_p + cand.load_q - 2 * t  # [b, U, M]
    torch.add((cand.rest_p - t[..., None])[:, :, :, :, None], cand.item_load_q[:, :, :, None, :], out=new_p)
    torch.sub(s[:, :, :, None, None], new_p, out=new_q)
    torch.maximum(new_p, new_q, out=new_p)
    torch.maximum(new_p, s.clamp(min=0)[:, :, :, None, None], out=new_p)
    current = ((cand.load_p - t).clamp(min=0) + (cand.load_q - t).clamp(min=0)).sum(-1).to(torch.float64)  # [b, U]
    return current[:, :, None, None] - new_p.sum(2).to(torch.float64)


def price_moves(cand: SwapCandidates, previous_bI: torch.Tensor, prices_bI: torch.Tensor, base_b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """What every swap costs in moves against the previous assignment: ``(price, added)``, ``[b, U, c, c]``.

    ``added`` is the change in the number of items away from their previous bin (-2..2). An item
    leaving its previous bin pays its price (``prices_bI``); one returning saves only the base
    price ``base_b`` (prices may have risen since it left: saving them would undo moves in
    cycles), so every applied swap lowers objective + base price x moves.
    """
    nb, U, per_bin = cand.items_p.shape
    dtype = base_b.dtype

    def side(items: torch.Tensor, here: torch.Tensor, there: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prev = previous_bI.gather(1, items.reshape(nb, -1)).view(nb, U, per_bin)
        add = (prev != there[:, :, None]).to(dtype) - (prev != here[:, :, None]).to(dtype)  # [b, U, c]
        price = prices_bI.gather(1, items.reshape(nb, -1)).view(nb, U, per_bin)
        return torch.where(add > 0, price, base_b[:, None, None]) * add, add

    price_p, add_p = side(cand.items_p, cand.p, cand.q)  # item i of p goes to q
    price_q, add_q = side(cand.items_q, cand.q, cand.p)  # item j of q goes to p
    return price_p[:, :, :, None] + price_q[:, :, None, :], add_p[:, :, :, None] + add_q[:, :, None, :]


class RankedSwaps(NamedTuple):
    """The best swap of every pair, ``[b, U]`` each."""

    key: torch.Tensor  # what ranks the pairs (see :func:`rank_swaps`)
    swap: torch.Tensor  # the swap, flat over ``c x c``: item of ``p`` times ``c`` plus item of ``q``
    gain: torch.Tensor  # its gain (net of the move price with moves)


def rank_swaps(gain: torch.Tensor, tolerance_b: torch.Tensor, move: torch.Tensor | None,
               added: torch.Tensor | None) -> RankedSwaps:
    """The best swap of every pair, from ``gain [b, U, c, c]``.

    ``gain`` is net of the move price when ``move`` is given; the key is then the gross gain per
    added move (at least one) of every swap whose net gain exceeds ``tolerance_b``, so the
    cheapest balance comes first; without moves the key is the gain.
    """
    nb, U = gain.shape[:2]
    if move is None:
        key = gain
    else:  # gross = net + move, as floats (the ranking is pinned to these exact values)
        key = torch.where(gain > tolerance_b[:, None, None, None], (gain + move) / added.clamp(min=1.0), -_BIG)
    key_bU, swap_bU = key.reshape(nb, U, -1).max(-1)
    return RankedSwaps(key_bU, swap_bU, gain.reshape(nb, U, -1).gather(2, swap_bU[:, :, None]).squeeze(2))


class SearchRound(NamedTuple):
    """A round after its best swap was applied, for the extra swaps that may follow."""

    problems: torch.Tensor  # [b] ids of the problems that searched this round
    cand: SwapCandidates
    ranked: RankedSwaps
    best: torch.Tensor  # [b] the pair whose best swap was applied
    applied: torch.Tensor  # [b] bool: it was (its gain exceeded the tolerance)
    tolerance: torch.Tensor  # [b] least gain that counts


def _swap_items(items_p: torch.Tensor, items_q: torch.Tensor, pair_b: torch.Tensor, swap_b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two items ``[b]`` of swap ``swap_b`` (flat over ``c x c``) of pair ``pair_b``."""
    per_bin = items_p.shape[2]
    nb = torch.arange(pair_b.numel())
    return items_p[nb, pair_b, swap_b // per_bin], items_q[nb, pair_b, swap_b % per_bin]


def apply_disjoint_swaps(assign_BI: torch.Tensor, done: SearchRound, num_bins: int) -> None:
    """Overload search, after the best swap: also apply, best key first, every other pair's best
    qualifying swap whose two bins are untouched so far (in place on ``assign_BI``).

    The overload objective sums over bins against per-micro-batch means that swaps do not change,
    so swaps on disjoint bin pairs add up exactly.
    """
    b, ranked = done.problems, done.ranked
    nb = torch.arange(b.numel())
    p, q = done.cand.p, done.cand.q
    used = torch.zeros(b.numel(), num_bins, dtype=torch.bool)
    used[nb, p[nb, done.best]] = True
    used[nb, q[nb, done.best]] = True
    order = ranked.key.argsort(dim=-1, descending=True, stable=True)
    for rank in range(ranked.key.shape[1]):
        pair = order[:, rank]
        p2, q2 = p[nb, pair], q[nb, pair]
        can = done.applied & (pair != done.best) & (ranked.gain[nb, pair] > done.tolerance)
        can &= ~used[nb, p2] & ~used[nb, q2]
        if not bool(can.any()):
            continue
        item_p, item_q = _swap_items(done.cand.items_p, done.cand.items_q, pair, ranked.swap[nb, pair])
        assign_BI[b[can], item_p[can]] = q2[can]
        assign_BI[b[can], item_q[can]] = p2[can]
        used[nb[can], p2[can]] = True
        used[nb[can], q2[can]] = True


def try_second_swap(assign_BI: torch.Tensor, w_BIM: torch.Tensor, done: SearchRound, moves: MovePrices,
                    prices_BI: torch.Tensor, num_bins: int) -> None:
    """Max-objective search with moves, after the best swap: also the best swap of another pair on
    four other bins, kept only if it lowers ``F`` + move price further (in place on ``assign_BI``).

    The check is exact (the two swaps interact through the busiest bin), against the assignment
    with the first swap applied; moves are priced as in :func:`price_moves`.
    """
    ranked, p, q = done.ranked, done.cand.p, done.cand.q
    nb = torch.arange(done.problems.numel())
    bp, bq = p[nb, done.best][:, None], q[nb, done.best][:, None]
    apart = (p != bp) & (p != bq) & (q != bp) & (q != bq)
    second = apart & (ranked.gain > done.tolerance[:, None]) & done.applied[:, None]
    has = second.any(-1)
    if not bool(has.any()):
        return
    h = has.nonzero().squeeze(1)
    pair = torch.where(second, ranked.key, -_BIG).argmax(-1)[h]
    item_p, item_q = _swap_items(done.cand.items_p[h], done.cand.items_q[h], pair, ranked.swap[h, pair])
    rows = done.problems[h]
    trial = assign_BI[rows].clone()
    hr = torch.arange(h.numel())
    trial[hr, item_p] = q[h, pair]
    trial[hr, item_q] = p[h, pair]
    prices, base, prev = prices_BI[rows], moves.base_B[rows].to(w_BIM.dtype), moves.previous_BI[rows]
    was, now = assign_BI[rows] != prev, trial != prev
    before = objective(w_BIM[rows], assign_BI[rows], num_bins) + base * (was & ~now).sum(-1)
    after = objective(w_BIM[rows], trial, num_bins) + (prices * (now & ~was)).sum(-1)
    keep = after < before - done.tolerance[h]
    assign_BI[rows[keep]] = trial[keep]
