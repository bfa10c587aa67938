"""The vectorised replicate internals against plain per-problem references.

``greedy_replicas``, ``best_level``, ``forest_split`` and ``replicate_on``'s chunked passes are
written for speed (problem-last numpy arrays, encoded arg-min/max keys, a sum over subsets,
one receiver per round with one spare slot per GPU). These tests pin each fast path to a slow,
obvious definition: a Python loop for the greedy rule, max-flow for the optimal level, and a
single pass for the chunking.
"""

from __future__ import annotations

import networkx as nx
import pytest
import torch

import relibra
from relibra.plan import Placement
from relibra.policies import replica_solve
from relibra.policies.replica_greedy import best_level, greedy_replicas
from relibra.policies.replica_problems import problem_first, problem_last
from relibra.policies.replica_split import forest_split
from relibra.policies.replicate import replicate_on


def random_problems(B: int, Gn: int, H: int, seed: int, scale: int = 1) -> torch.Tensor:
    """``[B, Gn, H]`` skewed home-expert loads with zeros and ties."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 3, (B, 1, 1), generator=g)
    base = torch.randint(0, 6, (B, Gn, H), generator=g)
    hot = (torch.rand(B, Gn, H, generator=g) < 0.3) * torch.randint(20, 400, (B, Gn, H), generator=g)
    loads = torch.where(kind == 0, base, base + hot)
    loads = torch.where(kind == 2, loads // 5 * 5, loads)  # many ties
    return loads.to(torch.int64) * scale


def greedy_reference(h: list[list[int]], S: int, equalise: bool, best_fit: bool, overshoot: bool = False):
    """The documented greedy rule, one problem, plain Python (ties to the lowest GPU / slot).

    Each round the donor copies, among its experts with a free receiver and something to move,
    the hottest one; with ``best_fit`` the coolest one whose share covers the whole move, if any.
    """
    Gn, H = len(h), len(h[0])
    h = [row[:] for row in h]
    ld = [sum(row) for row in h]
    T = (sum(ld) + Gn - 1) // Gn
    used, holds = [0] * Gn, {(g * H + j, g) for g in range(Gn) for j in range(H)}
    rep, x, made = [-1] * (Gn * S), [0] * (Gn * S), [-1] * (Gn * S)
    for t in range(Gn * S):
        donor = max(range(Gn), key=lambda g: (ld[g], -g))
        best = (None, None)
        for j in range(H):
            slot, share = donor * H + j, h[donor][j]
            free = [g for g in range(Gn) if used[g] < S and (slot, g) not in holds]
            if not free:
                continue
            r = min(free, key=lambda g: (ld[g], g))
            room = min(ld[donor] - T, (ld[donor] - ld[r]) // 2 if equalise else T - ld[r])
            if overshoot and used[donor] < S and ld[donor] > T:  # past the excess: donor slot free
                room = T - ld[r]
            amt = min(share, room)
            if amt <= 0:
                continue
            key = (1, -share) if best_fit and share >= room else (0, share)  # covering first, then hottest
            if best[1] is None or key > best[0]:
                best = (key, (j, r, amt))
        if best[1] is None:
            break
        j, r, amt = best[1]
        k = r * S + used[r]
        rep[k], x[k], made[t] = donor * H + j, amt, k
        holds.add((donor * H + j, r))
        used[r] += 1
        h[donor][j] -= amt
        ld[donor] -= amt
        ld[r] += amt
    return h, rep, x, made


@pytest.mark.parametrize("Gn,H,S", [(2, 1, 1), (3, 2, 1), (4, 3, 1), (8, 4, 1), (3, 2, 2), (4, 1, 2), (5, 2, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_matches_per_problem_reference(Gn, H, S, seed):
    B = 40
    loads = random_problems(B, Gn, H, seed)
    g = torch.Generator().manual_seed(seed + 100)
    equalise = torch.rand(B, generator=g) < 0.5
    best_fit = torch.rand(B, generator=g) < (0.0 if seed == 0 else 0.5)  # seed 0: the fast S == 1 path
    overshoot = torch.rand(B, generator=g) < 0.5
    hshare = problem_last(loads.reshape(B, Gn * H))  # updated in place: what each home copy keeps
    rep, x, made = (problem_first(a) for a in greedy_replicas(hshare, Gn, S, equalise.numpy(), best_fit.numpy(),
                                                                  overshoot=overshoot.numpy()))
    hshare = problem_first(hshare).view(B, Gn, H)
    for b in range(B):
        h_ref, rep_ref, x_ref, made_ref = greedy_reference(loads[b].tolist(), S, bool(equalise[b]), bool(best_fit[b]),
                                                           bool(overshoot[b]))
        assert rep[b].tolist() == rep_ref, b
        assert x[b].tolist() == x_ref, b
        assert made[b].tolist() == made_ref, b
        assert hshare[b].tolist() == h_ref, b


def level_of(loads_BGH: torch.Tensor, rep_BSn: torch.Tensor, S: int) -> torch.Tensor:
    """:func:`best_level` on problem-first tensors: ``[B]``."""
    B, Gn, H = loads_BGH.shape
    return torch.from_numpy(best_level(problem_last(loads_BGH.reshape(B, Gn * H)), problem_last(rep_BSn), Gn, S))


def split_of(loads_BGH: torch.Tensor, rep_BSn: torch.Tensor, level_B: torch.Tensor):
    """:func:`forest_split` on problem-first tensors: ``hshare [B, Gn, H]``, ``x [B, Gn]``, ``ok [B]``."""
    B, Gn, H = loads_BGH.shape
    h, x, ok = forest_split(problem_last(loads_BGH.reshape(B, Gn * H)), problem_last(rep_BSn), level_B.numpy())
    return problem_first(h).view(B, Gn, H), problem_first(x), torch.from_numpy(ok)


def greedy_of(loads_BGH: torch.Tensor, S: int, equalise_B: torch.Tensor) -> torch.Tensor:
    """The replicas ``rep [B, Gn*S]`` :func:`greedy_replicas` chooses (direct or chain rule)."""
    B, Gn, H = loads_BGH.shape
    rep, _, _ = greedy_replicas(problem_last(loads_BGH.reshape(B, Gn * H)), Gn, S, equalise_B.numpy())
    return problem_first(rep)


def exact_level(loads_GH: list[list[int]], rep_K: list[int], S: int) -> int:
    """Min over integer splits of the busiest GPU, by max-flow and binary search."""
    Gn, H = len(loads_GH), len(loads_GH[0])
    copies = {g * H + j: {g} for g in range(Gn) for j in range(H)}
    for k, slot in enumerate(rep_K):
        if slot >= 0:
            copies[slot].add(k // S)
    total = sum(map(sum, loads_GH))

    def feasible(T: int) -> bool:
        net = nx.DiGraph()
        for slot, gpus in copies.items():
            n = loads_GH[slot // H][slot % H]
            net.add_edge("s", ("e", slot), capacity=n)
            for gpu in gpus:
                net.add_edge(("e", slot), ("g", gpu), capacity=n)
        for gpu in range(Gn):
            net.add_edge(("g", gpu), "t", capacity=T)
        return nx.maximum_flow_value(net, "s", "t") == total

    lo, hi = 0, total
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if feasible(mid) else (mid + 1, hi)
    return lo


@pytest.mark.parametrize("Gn,H,S,scale", [(2, 2, 1, 1), (4, 2, 1, 1), (5, 1, 1, 1), (3, 2, 2, 1),
                                          (4, 2, 1, 2**27)])  # last: node totals above 2**31 (int64 table)
def test_best_level_matches_max_flow(Gn, H, S, scale):
    B = 12
    loads = random_problems(B, Gn, H, seed=Gn * 10 + S, scale=scale)
    equalise = torch.arange(B) % 2 == 1
    rep = greedy_of(loads, S, equalise)
    level = level_of(loads, rep, S)
    for b in range(B):
        assert int(level[b]) == exact_level(loads[b].tolist(), rep[b].tolist(), S), b


def check_split(loads_BGH, rep_BK, hshare_BGH, x_BK, level_B, ok_B):
    """Rows marked ok: non-negative, every expert's tokens add up, busiest GPU at the level."""
    B, Gn, H = loads_BGH.shape
    shed = torch.zeros(B, Gn * H + 1, dtype=torch.int64).scatter_add_(
        1, torch.where(rep_BK >= 0, rep_BK, Gn * H), x_BK)[:, :-1].view(B, Gn, H)
    rows = ok_B.nonzero().squeeze(1)
    assert (hshare_BGH[rows] >= 0).all() and (x_BK[rows] >= 0).all()
    assert (x_BK[rows][rep_BK[rows] < 0] == 0).all()
    assert torch.equal(hshare_BGH[rows] + shed[rows], loads_BGH[rows])
    assert torch.equal((hshare_BGH[rows].sum(-1) + x_BK[rows]).amax(-1), level_B[rows])


def test_forest_split_solves_cycles():
    """GPU 0 holds a copy of GPU 1's hot expert and GPU 1 one of GPU 0's: a replica cycle."""
    loads = torch.tensor([[[90, 10], [80, 0], [5, 5]]])  # Gn = 3, H = 2
    rep = torch.tensor([[2, 0, 1]])  # GPU 0 <- slot 2 (GPU 1), GPU 1 <- slot 0 (GPU 0), GPU 2 <- slot 1
    level = level_of(loads, rep, 1)
    assert int(level[0]) == exact_level(loads[0].tolist(), rep[0].tolist(), 1)
    hshare, x, ok = split_of(loads, rep, level)
    assert bool(ok[0])
    check_split(loads, rep, hshare, x, level, ok)


@pytest.mark.parametrize("Gn,H", [(3, 2), (4, 3), (8, 4)])
def test_forest_split_exact_on_greedy_replicas(Gn, H):
    B = 60
    loads = random_problems(B, Gn, H, seed=Gn)
    rep = greedy_of(loads, 1, torch.arange(B) % 2 == 0)
    level = level_of(loads, rep, 1)
    hshare, x, ok = split_of(loads, rep, level)
    assert float(ok.float().mean()) > 0.9  # the rest go to the augmenting rounds
    check_split(loads, rep, hshare, x, level, ok)


@pytest.mark.parametrize("spare", [1, 2])
def test_chunked_passes_equal_one_pass(monkeypatch, spare):
    topo = relibra.Topology(num_nodes=2, gpus_per_node=4, num_experts=16, spare_slots_per_gpu=spare)
    g = torch.Generator().manual_seed(3)
    probs = torch.distributions.Dirichlet(torch.full((16,), 0.3)).sample((3, 5))
    loads = torch.poisson(probs * 3000, generator=g).to(torch.int64)
    placement = Placement.contiguous(topo, 5)
    whole = replicate_on(loads, placement, topo)
    monkeypatch.setattr(replica_solve, "PROBLEMS_PER_PASS", 7)  # 30 problems in 5 uneven passes
    chunked = replicate_on(loads, placement, topo)
    chunked.validate(topo, loads)
    assert torch.equal(whole.spare_experts, chunked.spare_experts)
    assert torch.equal(whole.slot_tokens, chunked.slot_tokens)


def test_huge_node_load_is_refused():
    topo = relibra.Topology(num_nodes=1, gpus_per_node=2, num_experts=2, spare_slots_per_gpu=1)
    loads = torch.tensor([[[2**60, 0]]])
    with pytest.raises(ValueError, match="node's load"):
        relibra.get_policy("replicate").plan(loads, topo)
