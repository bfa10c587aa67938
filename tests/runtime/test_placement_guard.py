"""The Balancer keeps the experts where they are when a new placement does not pay its move
(``placement_min_gain``), on a real gloo world (2 nodes x 2 ranks, :mod:`_moe_world`'s net).

Rank 0 plans: it alone calls the policy (and its ``placement_kept``) and holds ``plan.info``."""

from __future__ import annotations

import pytest
import torch
from _moe_world import D, E, I, K, Net, step_data, uniform_routes

from relibra.placement import Placement
from relibra.plan import Plan
from relibra.runtime.balancer import Balancer
from relibra.sim.cost_config import CostConfig
from relibra.testing import run_world

T = 16  # tokens per rank and micro-batch


class Rotate:
    """Moves every home expert one GPU further each step, whatever the loads; remembers what the
    Balancer tells it it kept."""

    def __init__(self):
        self.steps, self.kept = 0, []

    def plan(self, loads, topology):
        self.steps += 1
        L, G, H = loads.shape[1], topology.num_gpus, topology.num_experts // topology.num_gpus
        home_gpu = ((torch.arange(topology.num_experts) // H + self.steps) % G).expand(L, -1)
        return Plan.without_replicas(Placement.from_home_gpu(home_gpu, topology), loads, topology, "rotate")

    def placement_kept(self, placement):
        self.kept.append(placement.home_experts.clone())


def _worker(rank, mesh):
    out = {}
    for min_gain in (0.05, 0.0):
        policy = Rotate()
        bal = Balancer(Net(mesh), mesh=mesh, policy=policy, spare_slots_per_gpu=1, placement_min_gain=min_gain)
        before = bal.placement.home_experts.clone()
        plan = bal.plan_step(uniform_routes(T))
        out[min_gain] = dict(moved=bal.metrics()["experts_moved"], kept=bool(plan.info.get("placement_kept")),
                             same=torch.equal(bal.placement.home_experts, before),
                             told=[torch.equal(k, before) for k in policy.kept])
    skewed_routes = [torch.cat([r for _, r in step_data(0, 2)[m][rank:rank + 1]]) for m in range(2)]
    skewed = Balancer(Net(mesh), mesh=mesh, policy="hybrid", spare_slots_per_gpu=1)  # default guard
    skewed.plan_step(skewed_routes)
    out["skewed_moved"] = skewed.metrics()["experts_moved"]
    for name, bandwidth in (("dear", 1e3), ("cheap", 1e15)):  # bytes/s of both tiers: moves priced by the links
        bal = Balancer(Net(mesh), mesh=mesh, policy="reorder", spare_slots_per_gpu=1, cost_model=_cost(bandwidth))
        plan = bal.plan_step(skewed_routes)
        out[name] = dict(moved=bal.metrics()["experts_moved"], kept=bool(plan.info.get("placement_kept")))
    return out


def _cost(bandwidth: float) -> CostConfig:
    """The cost model of _moe_world's net with both link tiers at ``bandwidth`` and no host work
    (which would dwarf this tiny net's expert GEMMs)."""
    return CostConfig(hidden=D, expert_intermediate=I, num_experts=E, top_k=K, num_moe_layers=2, num_expert_groups=1,
                      non_moe_params=0.0, attn_width=0, attn_context=0.0, extra_params=0.0, peak_flops=1e9,
                      layer_call_s=0.0, step_overhead_s=0.0,
                      intra_node_bandwidth=bandwidth, inter_node_bandwidth=bandwidth)


@pytest.fixture(scope="module")
def results():
    return run_world(_worker)


def test_a_move_that_buys_nothing_is_not_made_and_the_policy_is_told(results):
    for rank, r in enumerate(results):
        guarded, unguarded = r[0.05], r[0.0]
        assert guarded == dict(moved=0, kept=rank == 0, same=True, told=[True] if rank == 0 else [])
        # without the guard the same plan moves every expert: the guard is what kept them
        assert unguarded["moved"] > 0 and not unguarded["kept"] and not unguarded["same"] and unguarded["told"] == []


def test_a_move_that_pays_is_made(results):
    assert all(r["skewed_moved"] > 0 for r in results)


def test_a_cost_model_prices_the_move_by_the_links(results):
    """The same skewed step under ``reorder`` (no replicas to fall back on): over links of 1 kB/s
    moving the experts costs more than the balance gains, so they stay (rank 0 records it); over
    fast links they move."""
    for rank, r in enumerate(results):
        assert r["dear"] == dict(moved=0, kept=rank == 0), (rank, r["dear"])
        assert r["cheap"]["moved"] > 0 and not r["cheap"]["kept"], (rank, r["cheap"])


@pytest.mark.parametrize("cost_model,needle", [
    ("h100", "cost_model must be a relibra.sim.cost_config.CostConfig or None, got str"),
    (CostConfig(num_experts=16, num_moe_layers=2), "cost_model prices 16 experts x 2 MoE layers; the model has 8"),
])
def test_a_cost_model_of_another_model_is_refused_by_name(cost_model, needle):
    with pytest.raises(ValueError, match=needle):
        Balancer(Net(None), None, "static", cost_model=cost_model)


@pytest.mark.parametrize("value", [1.0, -0.1, "0.1", True])
def test_placement_min_gain_is_checked_by_name(value):
    with pytest.raises(ValueError, match=r"placement_min_gain must be a number in \[0, 1\)"):
        Balancer(Net(None), None, "static", placement_min_gain=value)
