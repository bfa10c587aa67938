"""Cross-node replicas (``replicate`` / ``hybrid``): valid, priced, never worse, unchanged where not chosen.

Random topologies of 2-4 nodes and loads with hot experts; ``cross_node_price=0`` forces the
cross-node path wherever it lowers the busiest GPU at all.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relibra
from relibra.plan import Placement, Plan
from relibra.policies.replica_cross import DEEPSEEK_V3_H100, cross_node_price
from relibra.policies.replica_exports import fill_to_target, plan_exports
from relibra.policies.replicate import replicate_on
from relibra.testing import check_policy, strategies

SETTINGS = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MULTI_NODE = strategies.topologies(nodes=(2, 4), gpus_per_node=(1, 4), home_slots=(1, 2), spare_slots=(1, 2))


def cross_node_slots(plan: Plan) -> torch.Tensor:
    """``[M, L, R]`` bool: spare slots holding an expert that homes on another node."""
    t = plan.topology
    spare = plan.spare_experts
    home_node = plan.placement.home_gpu(t) // t.gpus_per_node
    slot_node = torch.arange(t.num_spare_slots) // t.spare_slots_per_gpu // t.gpus_per_node
    e_node = home_node.expand(spare.shape[0], -1, -1).gather(2, spare.clamp(min=0))
    return (spare >= 0) & (e_node != slot_node)


@settings(**SETTINGS)
@given(case=strategies.topology_and_loads(MULTI_NODE, max_load=5000), price=st.sampled_from([0.0, 50.0, 400.0]))
def test_cross_node_plan_valid_priced_and_unchanged_elsewhere(case, price):
    topo, loads = case
    placement = Placement.contiguous(topo, loads.shape[1])
    intra = replicate_on(loads, placement, topo)
    plan = replicate_on(loads, placement, topo, cross_node_price=price)
    plan.validate(topo, loads)
    assert torch.equal(plan.expert_loads(), loads)
    cross = cross_node_slots(plan)
    assert plan.intra_node_replicas == (not bool(cross.any()))
    assert plan.info["cross_node_replicas"] == int(cross.sum())
    # a GPU takes at most one cross-node replica
    per_gpu = cross.view(*cross.shape[:2], topo.num_gpus, topo.spare_slots_per_gpu).sum(-1)
    assert int(per_gpu.max()) <= 1
    # where a (micro-batch, layer) has one, its busiest GPU dropped by more than the price
    layer_cross = cross.any(-1)
    busiest, busiest_intra = plan.gpu_loads().amax(-1), intra.gpu_loads().amax(-1)
    assert (busiest_intra[layer_cross] - busiest[layer_cross] > price).all()
    # and elsewhere the plan is the intra-node one, bit for bit
    same = ~layer_cross
    assert torch.equal(plan.spare_experts[same], intra.spare_experts[same])
    assert torch.equal(plan.slot_tokens[same], intra.slot_tokens[same])


def test_infinite_price_is_the_intra_node_plan():
    topo = relibra.Topology(num_nodes=4, gpus_per_node=2, num_experts=16, spare_slots_per_gpu=1)
    loads = torch.zeros(2, 3, 16, dtype=torch.int64)
    loads[..., 0] = 10_000  # one expert hotter than its whole node can absorb
    loads += 10
    placement = Placement.contiguous(topo, 3)
    intra = replicate_on(loads, placement, topo)
    priced_out = replicate_on(loads, placement, topo, cross_node_price=math.inf)
    assert torch.equal(intra.spare_experts, priced_out.spare_experts)
    assert torch.equal(intra.slot_tokens, priced_out.slot_tokens)
    assert priced_out.intra_node_replicas
    cheap = replicate_on(loads, placement, topo, cross_node_price=0.0)
    assert not cheap.intra_node_replicas
    assert (cheap.gpu_loads().amax(-1) < intra.gpu_loads().amax(-1)).all()


def test_hot_expert_spreads_over_other_nodes():
    """2 nodes x 2 GPUs, 1 spare slot: expert 0 carries 900 of 1000 tokens. Inside its node it can
    reach 450 at best; with the other node's two spare slots it reaches the group's mean, 250."""
    topo = relibra.Topology(num_nodes=2, gpus_per_node=2, num_experts=4, spare_slots_per_gpu=1)
    loads = torch.tensor([[[900, 40, 30, 30]]])
    placement = Placement.contiguous(topo, 1)
    assert int(replicate_on(loads, placement, topo).gpu_loads().max()) == 470
    plan = replicate_on(loads, placement, topo, cross_node_price=0.0)
    plan.validate(topo, loads)
    assert int(plan.gpu_loads().max()) == 255  # ceil(1000 / 4) + the 2 % slack the exports aim at
    assert sorted(plan.spare_experts[0, 0].tolist())[-2:] == [0, 0]  # both of node 1's slots copy expert 0


@pytest.mark.parametrize("name", ["replicate", "hybrid"])
def test_cross_node_policies_pass_check_policy(name):
    check_policy(name, options={"cross_node_price": 0.0}, replicas="any", max_examples=12,
                 topologies=MULTI_NODE, never_worse_than_static=name == "replicate", same_loads_move_nothing=True)


def test_default_price_is_the_cost_models():
    from relibra.sim.cost import cross_node_price as model_price
    from relibra.sim.cost import make_config

    cfg = make_config("deepseek-v3", "h100")
    topo = cfg.topology(16, 8, 1)
    assert cross_node_price(16, 8, topo.inter_node_bandwidth, **DEEPSEEK_V3_H100) == pytest.approx(
        model_price(cfg, topo))
    assert math.isinf(cross_node_price(1, 8, 50e9, **DEEPSEEK_V3_H100))  # one node: nothing to export


def test_cross_node_options_are_checked():
    for name in ("replicate", "hybrid"):
        with pytest.raises(ValueError, match=f"{name} option cross_node must be True or False"):
            relibra.get_policy(name, cross_node="yes")
        with pytest.raises(ValueError, match=f"{name} option cross_node_price must be None or a number >= 0"):
            relibra.get_policy(name, cross_node_price=-1)


def test_cross_node_off_and_one_node_plan_intra_node():
    topo = relibra.Topology(num_nodes=2, gpus_per_node=2, num_experts=4, spare_slots_per_gpu=1)
    loads = torch.tensor([[[900, 40, 30, 30]]])
    assert relibra.get_policy("replicate", cross_node=False, cross_node_price=0.0).plan(loads, topo).intra_node_replicas
    one = relibra.Topology(num_nodes=1, gpus_per_node=4, num_experts=4, spare_slots_per_gpu=1)
    assert relibra.get_policy("hybrid", cross_node_price=0.0).plan(loads, one).intra_node_replicas


# ------------------------------------------------------------------ the greedy steps
@settings(**SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), gpus=st.integers(2, 8), homes=st.integers(1, 3))
def test_fill_to_target_conserves_and_never_raises_a_gpu_above_target(seed, gpus, homes):
    rng = np.random.default_rng(seed)
    B = 12
    w = rng.integers(0, 100, size=(B, gpus * homes)) * (rng.random((B, gpus * homes)) < 0.6)
    target = -(-w.sum(1) // gpus) + rng.integers(0, 20, size=B)
    h = w.copy()
    rep, x = fill_to_target(h, gpus, target)
    assert (h >= 0).all() and (x >= 0).all()
    given_away = np.zeros_like(w)
    for b in range(B):
        for g in range(gpus):
            if rep[b, g] >= 0:
                assert rep[b, g] // homes != g  # never a copy on its home GPU
                given_away[b, rep[b, g]] += x[b, g]
    assert (h + given_away == w).all()  # every token kept or moved once
    load = h.reshape(B, gpus, homes).sum(-1) + x
    before = w.reshape(B, gpus, homes).sum(-1)
    received = rep >= 0
    assert (load[received] <= np.broadcast_to(target[:, None], load.shape)[received]).all()  # receivers at most T
    assert (load.max(1) <= np.maximum(before.max(1), target)).all()


def test_plan_exports_fill_free_gpus_once_and_within_room():
    rng = np.random.default_rng(0)
    C, N, Gn, H = 6, 4, 2, 2
    share = rng.integers(0, 50, size=(C, N, Gn * H))
    share[:, 0, 0] += 400  # node 0 is far above the mean
    target = -(-share.sum((1, 2)) // (N * Gn))
    load = share.reshape(C, N * Gn, H).sum(-1)
    free = np.ones((C, N * Gn), bool)
    free[:, :Gn] = False  # the exporting node does not receive
    ex = plan_exports(share, load, free, target, Gn, max_rounds=64)
    assert ex.problem.size > 0
    pairs = ex.problem * (N * Gn) + ex.gpu
    assert np.unique(pairs).size == pairs.size  # one cross-node replica per receiving GPU
    assert free[ex.problem, ex.gpu].all()
    assert (load[ex.problem, ex.gpu] + ex.amount <= target[ex.problem]).all()
    assert (ex.item // (Gn * H) != ex.gpu // Gn).all()  # never into its own node
    taken = np.zeros_like(share.reshape(C, -1))
    np.add.at(taken, (ex.problem, ex.item), ex.amount)
    assert (taken <= share.reshape(C, -1)).all()


# ------------------------------------------------------------------ bad input, named
def test_cross_node_split_that_does_not_add_up_is_named():
    topo = relibra.Topology(num_nodes=2, gpus_per_node=2, num_experts=4, spare_slots_per_gpu=1)
    loads = torch.tensor([[[900, 40, 30, 30]]])
    plan = replicate_on(loads, Placement.contiguous(topo, 1), topo, cross_node_price=0.0)
    tokens = plan.slot_tokens.clone()
    p = int((plan.phy2log()[0, 0] == 0).nonzero()[-1])  # the last copy of expert 0: a cross-node one
    tokens[0, 0, p] += 1
    bad = Plan(topo, plan.placement, plan.spare_experts, tokens, False, "replicate")
    with pytest.raises(ValueError, match="token split of expert 0 adds up to 901, its load is 900"):
        bad.validate(topo, loads)


def test_replicas_beyond_a_gpus_slots_are_named():
    topo = relibra.Topology(num_nodes=2, gpus_per_node=2, num_experts=4, spare_slots_per_gpu=1)
    loads = torch.tensor([[[900, 40, 30, 30]]])
    plan = replicate_on(loads, Placement.contiguous(topo, 1), topo, cross_node_price=0.0)
    two_each = torch.cat([plan.spare_experts, torch.full_like(plan.spare_experts, -1)], -1)
    bad = Plan(topo, plan.placement, two_each, plan.slot_tokens, False, "replicate")
    with pytest.raises(ValueError, match="a GPU would be over-full"):
        bad.validate(topo, loads)
