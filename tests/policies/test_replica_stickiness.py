"""Sticky replicas: a node keeps its previous replicas only where that slows no layer down."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relibra.placement import Placement
from relibra.policies.hybrid import HybridPolicy
from relibra.policies.replica_stickiness import stick_replicas
from relibra.policies.replicate import ReplicatePolicy, replicate_on
from relibra.testing import check_policy, strategies


def kept_slots(plan) -> int:
    spare = plan.spare_experts
    return int(((spare[1:] == spare[:-1]) & (spare[1:] >= 0)).sum())


def matches(spare_LR, before_LR) -> int:
    """Spare slots whose contents (a replica or nothing) stay from ``before``: no copy, no return."""
    return int((spare_LR == before_LR).sum())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_sticky_plans_are_valid_never_slower_and_keep_more(data):
    topology = data.draw(strategies.topologies(spare_slots=(1, 2), nodes=(1, 2)))
    loads = data.draw(strategies.loads(topology, micro_batches=(2, 5), layers=(1, 2)))
    placement = Placement.contiguous(topology, loads.shape[1])
    price = data.draw(st.sampled_from([None, 0.0]))  # intra-node only, or cross-node replicas wherever they help
    fresh = replicate_on(loads, placement, topology, cross_node_price=price)
    sticky = stick_replicas(fresh, loads, 0.0)
    sticky.validate(topology, loads)  # loads conserved, slots valid, intra-node replicas where promised
    assert sticky.placement.equal(fresh.placement)
    assert torch.equal(sticky.spare_experts[0], fresh.spare_experts[0])  # the first micro-batch is the fresh one
    # tolerance 0: no layer of any micro-batch waits longer than in the fresh plan
    assert (sticky.gpu_loads().amax(-1) <= fresh.gpu_loads().amax(-1)).all()
    for m in range(1, loads.shape[0]):  # every micro-batch keeps at least what the fresh one would of the one before
        assert matches(sticky.spare_experts[m], sticky.spare_experts[m - 1]) >= \
            matches(fresh.spare_experts[m], sticky.spare_experts[m - 1])
    again = stick_replicas(replicate_on(loads, placement, topology, cross_node_price=price), loads, 0.0)
    assert torch.equal(again.spare_experts, sticky.spare_experts) and torch.equal(again.slot_tokens,
                                                                                   sticky.slot_tokens)


def test_keeps_a_replica_the_fresh_plan_moves():
    """Two micro-batches of one node (2 GPUs, 1 spare slot each) whose hot expert is the same: the
    fresh planner may pick either light slot; the sticky plan keeps the first micro-batch's."""
    from relibra.topology import Topology

    topology = Topology(1, 4, 8, 1)
    loads = torch.tensor([[[90, 10, 10, 10, 10, 10, 10, 10]], [[88, 10, 12, 10, 10, 10, 10, 10]]])
    placement = Placement.contiguous(topology, 1)
    fresh = replicate_on(loads, placement, topology)
    sticky = stick_replicas(fresh, loads, 0.0)
    sticky.validate(topology, loads)
    assert kept_slots(sticky) >= 1
    assert (sticky.gpu_loads().amax(-1) <= fresh.gpu_loads().amax(-1)).all()


def test_nodes_tied_by_cross_node_replicas_keep_the_fresh_plan():
    """A spare slot holding another node's expert names that expert by its slot in *its* node, which
    means nothing in this node's problem: such nodes are neither scored nor changed (this case
    once crashed ``best_level`` on those meaningless slots)."""
    from relibra.topology import Topology

    topology = Topology(2, 2, 4, 2)
    loads = torch.tensor([[[8, 15, 0, 0]], [[8, 15, 0, 0]]])
    fresh = HybridPolicy(cross_node_price=0.0, replica_stickiness=None).plan(loads, topology)
    spare = fresh.spare_experts[0, 0]  # [V]: node n's spare slots are n*Gn*S .. (n+1)*Gn*S - 1
    home_node = fresh.placement.home_gpu(topology)[0] // 2
    held = spare >= 0
    assert (home_node[spare[held]] != torch.arange(8)[held] // 4).any()  # a replica in the other node's slots
    sticky = HybridPolicy(cross_node_price=0.0, replica_stickiness=0.0).plan(loads, topology)
    sticky.validate(topology, loads)
    assert torch.equal(sticky.spare_experts, fresh.spare_experts) and torch.equal(sticky.slot_tokens,
                                                                                   fresh.slot_tokens)


@pytest.mark.parametrize("factory,replicas", [
    (lambda: HybridPolicy(replica_stickiness=0.0), "any"),  # cross-node replicas where they pay
    (lambda: ReplicatePolicy(replica_stickiness=0.0), "any"),
    (lambda: HybridPolicy(replica_stickiness=0.0, cross_node=False), "intra_node"),
])
def test_policies_with_sticky_replicas_pass_check_policy(factory, replicas):
    check_policy(factory, replicas=replicas, max_examples=12)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_stickiness_is_named(bad):
    for policy in (HybridPolicy, ReplicatePolicy):
        with pytest.raises(ValueError, match=r"replica_stickiness must be None, 'auto' or a finite number >= 0"):
            policy(replica_stickiness=bad)


def test_auto_is_sticky_with_one_spare_slot_per_gpu_only():
    """hybrid's default: tolerance 0 with one spare slot per GPU (a forest split), afresh with more."""
    from relibra.topology import Topology

    assert HybridPolicy().replica_stickiness == "auto" and ReplicatePolicy().replica_stickiness is None
    loads = torch.tensor([[[90, 10, 10, 10, 10, 10, 10, 10]], [[88, 10, 12, 10, 10, 10, 10, 10]]])
    for spare, like in ((1, 0.0), (2, None)):
        topology = Topology(1, 4, 8, spare)
        auto = HybridPolicy().plan(loads, topology)
        same = HybridPolicy(replica_stickiness=like).plan(loads, topology)
        assert torch.equal(auto.spare_experts, same.spare_experts) and torch.equal(auto.slot_tokens, same.slot_tokens)
    one = Topology(1, 4, 8, 1)
    assert kept_slots(HybridPolicy().plan(loads, one)) >= 1  # the case above: sticky keeps a replica
