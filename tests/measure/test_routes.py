"""Replayed routes of relibra measure: skew lands on GPU 0's experts, hot experts move."""

import torch

from relibra.measure.routes import hot_experts, static_imbalance, step_routes

E, G, K, T, L, M = 16, 2, 2, 2000, 2, 4


def loads(skew, step=0, gpus=G):
    per_rank = [step_routes(0, step, r, M, T, L, E, K, gpus, skew) for r in range(gpus)]
    out = torch.zeros(M, L, E, dtype=torch.int64)
    for routes in per_rank:
        for m, r in enumerate(routes):
            ids = r.permute(1, 0, 2).reshape(L, -1)
            out[m].scatter_add_(1, ids, torch.ones_like(ids))
    return out


def test_shapes_distinct_ids_and_determinism():
    routes = step_routes(3, 1, 0, M, 50, L, E, K, G, 0.7)
    assert len(routes) == M and all(r.shape == (50, L, K) and r.dtype == torch.int64 for r in routes)
    for r in routes:
        s = r.sort(-1).values
        assert bool((s[..., 1:] != s[..., :-1]).all())  # K distinct experts per token and layer
    again = step_routes(3, 1, 0, M, 50, L, E, K, G, 0.7)
    assert all(torch.equal(a, b) for a, b in zip(routes, again))
    other_rank = step_routes(3, 1, 1, M, 50, L, E, K, G, 0.7)
    assert not all(torch.equal(a, b) for a, b in zip(routes, other_rank))


def test_skew_sets_the_static_imbalance():
    for skew in (0.0, 0.4, 0.7):
        lo = loads(skew)
        gpu0 = lo[..., : E // G].sum(-1).double()
        imb = (gpu0 / (lo.sum(-1).double() / G)).mean().item()
        assert abs(imb - static_imbalance(skew, G)) < 0.05
    assert static_imbalance(0.7, 2) >= 1.6 and static_imbalance(0.7, 4) > static_imbalance(0.7, 2)


def test_hot_experts_live_on_gpu0_and_move_every_micro_batch():
    H = E // G
    for layer in range(L):
        sets = [set(hot_experts(0, 5, m, layer, E, G, K).tolist()) for m in range(H // K)]
        assert all(len(s) == K and max(s) < H for s in sets)
        assert len(set().union(*sets)) == H  # disjoint: a new pair each micro-batch
    a = [hot_experts(0, s, 0, 0, E, G, K).tolist() for s in range(6)]
    assert len({tuple(x) for x in a}) > 1  # and new ones from step to step


def test_hot_steps_sets_how_long_hot_experts_last():
    def hot(step, hot_steps):
        return hot_experts(0, step, 1, 0, E, G, K, hot_steps).tolist()

    assert all(hot(s, 0) == hot(0, 0) for s in range(6))  # the same in every step
    assert hot(0, 2) == hot(1, 2) and hot(2, 2) == hot(3, 2)
    assert len({tuple(hot(s, 1)) for s in range(6)}) > 1
