"""check_policy catches deliberately broken policies, each with a small counterexample naming the invariant.

Every broken policy here is a plausible bug: an off-by-one split, a policy that assumes a spare
slot the GPU does not have, a replica placed across nodes, a placement from the unseeded global
RNG or from state shared between objects, a policy that goes wrong only on its second step.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import pytest
import torch

import relibra
from relibra import Placement, Plan
from relibra.policies import StaticPolicy
from relibra.testing import INVARIANTS, PolicyCheckError, check_plan, check_policy, strategies

MAX_EXAMPLES = 30


def caught(policy, invariant: str, **kwargs) -> PolicyCheckError:
    """The error check_policy raises for ``policy``, checked to name ``invariant``."""
    with pytest.raises(PolicyCheckError) as info:
        check_policy(policy, max_examples=MAX_EXAMPLES, **kwargs)
    error = info.value
    assert error.invariant == invariant, str(error)
    assert invariant in INVARIANTS
    assert str(error).startswith(f"[{invariant}] policy ") and "\n  counterexample: Topology(num_nodes=" in str(error)
    return error


def shape_of(error: PolicyCheckError) -> tuple:
    """(nodes, GPUs per node, experts, spare slots per GPU, [M, L] of every step) of the counterexample."""
    t = error.topology
    return (t.num_nodes, t.gpus_per_node, t.num_experts, t.spare_slots_per_gpu,
            [tuple(loads.shape[:2]) for loads in error.loads])


def contiguous_plan(loads, topology) -> Plan:
    return Plan.without_replicas(Placement.contiguous(topology, loads.shape[1]), loads, topology, policy="test")


# ------------------------------------------------------------------ the four bugs of the issue
class LosesAToken:
    """An off-by-one split: the busiest slot computes one token copy fewer than it is sent."""

    def plan(self, loads, topology):
        plan = contiguous_plan(loads, topology)
        tokens = plan.slot_tokens.clone()
        flat = tokens.view(-1)
        busiest = int(flat.argmax())
        flat[busiest] -= int(flat[busiest] > 0)
        return dataclasses.replace(plan, slot_tokens=tokens)


def test_a_lost_token_is_caught_on_one_gpu_one_token():
    error = caught(LosesAToken, "loads-conserved")
    assert shape_of(error) == (1, 1, 1, 0, [(1, 1)])
    assert error.loads[0].tolist() == [[[1]]]
    assert "expert 0 has load 1, its copies compute 0" in str(error)
    assert "loads [1, 1, 1] = torch.tensor([[[1]]])" in str(error)


class OverfillsAGpu:
    """Assumes every GPU has one spare slot more than the topology gives it."""

    def plan(self, loads, topology):
        roomier = dataclasses.replace(topology, spare_slots_per_gpu=topology.spare_slots_per_gpu + 1)
        M, L, _ = loads.shape
        spare = torch.full((M, L, roomier.num_spare_slots), -1, dtype=torch.int64)
        return Plan.with_spares(Placement.contiguous(topology, L), spare, loads, roomier, policy="overfills")


def test_an_overfilled_gpu_is_caught_on_one_gpu():
    error = caught(OverfillsAGpu, "gpu-capacity")
    assert shape_of(error) == (1, 1, 1, 0, [(1, 1)])
    assert "1 home + 1 spare slots per GPU; each of the 1 GPUs has 1 + 0" in str(error)


def test_a_plan_wider_than_the_gpus_is_caught_by_check_plan():
    topology = relibra.Topology(num_nodes=1, gpus_per_node=2, num_experts=2, spare_slots_per_gpu=1)
    loads = torch.tensor([[[3, 1]]])
    good = relibra.get_policy("replicate").plan(loads, topology)
    check_plan(good, topology, loads, replicas="intra_node")  # a valid plan passes
    wide = Plan(topology, good.placement, torch.full((1, 1, 4), -1), torch.tensor([[[3, 0, 0, 1, 0, 0, 0, 0]]]))
    with pytest.raises(PolicyCheckError, match=r"\[gpu-capacity\] plan.spare_experts fills 4 slots .* there are 2"):
        check_plan(wide, topology, loads)


class ReplicatesAcrossNodes:
    """Copies node 0's hottest expert into the last GPU's spare slot, on another node."""

    def __init__(self, promise_intra_node: bool = False):
        self.promise_intra_node = promise_intra_node

    def plan(self, loads, topology):
        M, L, _ = loads.shape
        spare = torch.full((M, L, topology.num_spare_slots), -1, dtype=torch.int64)
        if topology.num_nodes > 1 and topology.spare_slots_per_gpu > 0:
            spare[..., -1] = loads[..., : topology.experts_per_node].argmax(-1)
        return Plan.with_spares(Placement.contiguous(topology, L), spare, loads, topology,
                                intra_node_replicas=self.promise_intra_node, policy="across")


def test_a_replica_outside_its_node_is_caught_on_two_nodes():
    error = caught(ReplicatesAcrossNodes, "replica-contract", replicas="intra_node")
    assert shape_of(error) == (2, 1, 2, 1, [(1, 1)])
    assert ("the replica of expert 0 in spare slot 1 sits on GPU 1 of node 1, outside its home node 0; "
            "the contract is replicas='intra_node'") in str(error)
    check_policy(ReplicatesAcrossNodes, replicas="any", max_examples=10)  # allowed where the contract allows it


def test_a_broken_intra_node_promise_is_caught_whatever_the_contract():
    error = caught(functools.partial(ReplicatesAcrossNodes, promise_intra_node=True), "replica-contract")
    assert shape_of(error) == (2, 1, 2, 1, [(1, 1)])
    assert "the plan (policy across) promises intra_node_replicas=True" in str(error)


def test_replicas_where_the_contract_says_none_are_caught():
    error = caught("replicate", "replica-contract", replicas="none")
    assert shape_of(error)[:4] == (1, 2, 2, 1) and error.loads[0].shape[:2] == (1, 1)
    assert "but the contract is replicas='none'" in str(error)


class RandomPlacement:
    """Homes experts by a permutation from torch's unseeded global generator."""

    def plan(self, loads, topology):
        home_gpu = (torch.randperm(topology.num_experts) % topology.num_gpus).expand(loads.shape[1], -1)
        return Plan.without_replicas(Placement.from_home_gpu(home_gpu, topology), loads, topology)


def test_a_nondeterministic_policy_is_caught_on_two_gpus_and_the_rng_is_restored():
    state = torch.get_rng_state()
    error = caught(RandomPlacement, "deterministic")
    assert shape_of(error) == (1, 2, 2, 0, [(1, 1)])
    assert "two fresh policy objects planned the same loads differently: plan.placement.home_experts" in str(error)
    assert torch.equal(torch.get_rng_state(), state)


class NumbersItsObjects:
    """Rotates its placement by a counter shared by every object of the class."""

    made = 0

    def __init__(self):
        NumbersItsObjects.made += 1
        self.shift = NumbersItsObjects.made

    def plan(self, loads, topology):
        home_gpu = (torch.arange(topology.num_experts) // topology.home_slots_per_gpu + self.shift) % topology.num_gpus
        placement = Placement.from_home_gpu(home_gpu.expand(loads.shape[1], -1), topology)
        return Plan.without_replicas(placement, loads, topology)


def test_state_shared_between_objects_is_caught():
    error = caught(NumbersItsObjects, "deterministic")
    assert shape_of(error) == (1, 2, 2, 0, [(1, 1)])


# ------------------------------------------------------------------ the other invariants
class LosesATokenFromItsSecondStep:
    def __init__(self):
        self.steps = 0

    def plan(self, loads, topology):
        self.steps += 1
        return contiguous_plan(loads, topology) if self.steps == 1 else LosesAToken().plan(loads, topology)


def test_a_policy_that_breaks_on_its_second_step_is_caught_with_both_steps():
    error = caught(LosesATokenFromItsSecondStep, "steps-stay-valid")
    assert shape_of(error) == (1, 1, 1, 0, [(1, 1), (1, 1)])
    assert "step 2 of 2 on one policy object: [loads-conserved]" in str(error)
    assert "step 1 loads [1, 1, 1] = torch.tensor(" in str(error) and "step 2 loads [1, 1, 1]" in str(error)


class ZeroesTheLoads:
    def plan(self, loads, topology):
        plan = contiguous_plan(loads, topology)
        loads.zero_()
        return plan


class FailsOnAnIdleStep:
    def plan(self, loads, topology):
        share = loads / loads.sum()
        if torch.isnan(share).any():
            raise ZeroDivisionError("no tokens to share")
        return contiguous_plan(loads, topology)


def test_modified_loads_and_exceptions_are_caught():
    caught(ZeroesTheLoads, "loads-untouched")
    error = caught(FailsOnAnIdleStep, "accepts-valid-loads")
    assert "plan() raised ZeroDivisionError: no tokens to share" in str(error)
    assert int(error.loads[0].sum()) == 0 and shape_of(error) == (1, 1, 1, 0, [(1, 1)])
    assert isinstance(error.__cause__, ZeroDivisionError)


class PacksTheHottestTogether:
    """Homes the H hottest experts on GPU 0, the next H on GPU 1, ..."""

    def plan(self, loads, topology):
        order = loads.sum(0).argsort(dim=1, descending=True, stable=True)  # [L, E]
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(topology.num_experts).expand_as(order))
        placement = Placement.from_home_gpu(rank // topology.home_slots_per_gpu, topology)
        return Plan.without_replicas(placement, loads, topology)


def test_the_opt_in_claims_are_checked_only_when_claimed():
    check_policy(PacksTheHottestTogether, replicas="none", max_examples=10)
    error = caught(PacksTheHottestTogether, "never-worse-than-static", never_worse_than_static=True)
    assert shape_of(error)[:4] == (1, 2, 4, 0)
    assert "the busiest GPU computes" in str(error)


class Alternates:
    """Swaps its placement between two every call: deterministic, but every step migrates."""

    def __init__(self):
        self.flip = False

    def plan(self, loads, topology):
        self.flip = not self.flip
        home_gpu = torch.arange(topology.num_experts) // topology.home_slots_per_gpu
        if self.flip:
            home_gpu = topology.num_gpus - 1 - home_gpu
        return Plan.without_replicas(Placement.from_home_gpu(home_gpu.expand(loads.shape[1], -1), topology),
                                     loads, topology)


def test_moving_on_the_same_loads_is_caught_when_claimed_and_an_object_is_copied_not_used():
    policy = Alternates()
    check_policy(policy, replicas="none", max_examples=10)
    error = caught(policy, "same-loads-move-nothing", same_loads_move_nothing=True)
    assert shape_of(error)[:4] == (1, 2, 2, 0)
    assert policy.flip is False  # every fresh object was a deep copy: the caller's object never planned


# ------------------------------------------------------------------ the ways to name a policy
def test_a_registered_name_with_options_is_checked(monkeypatch):
    from relibra import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    relibra.register_policy("test-across")(ReplicatesAcrossNodes)
    caught("test-across", "replica-contract", options=dict(promise_intra_node=True))


def test_bad_arguments_are_refused_before_any_example():
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        check_policy("nope")
    with pytest.raises(ValueError, match="replicas must be one of"):
        check_policy(StaticPolicy, replicas="local")
    with pytest.raises(ValueError, match="max_examples must be an int >= 1"):
        check_policy(StaticPolicy, max_examples=0)
    with pytest.raises(ValueError, match="need a policy name or factory"):
        check_policy(StaticPolicy(), options=dict(knob=1))

    class HoldsALock(StaticPolicy):
        def __init__(self):
            self.lock = threading.Lock()

    with pytest.raises(TypeError, match="cannot be copied .* pass its factory instead"):
        check_policy(HoldsALock())
    with pytest.raises(TypeError, match="which has no plan"):
        check_policy(lambda: object(), max_examples=1)


class FailsOnManyMicroBatches:
    def plan(self, loads, topology):
        if loads.shape[0] > 1:
            raise NotImplementedError("one micro-batch only")
        return contiguous_plan(loads, topology)


def test_the_callers_strategies_and_step_count_are_the_ones_used():
    one_micro_batch = functools.partial(strategies.loads, micro_batches=1)
    check_policy(FailsOnManyMicroBatches, loads=one_micro_batch, max_examples=10)
    assert shape_of(caught(FailsOnManyMicroBatches, "accepts-valid-loads"))[4] == [(2, 1)]
    check_policy(LosesATokenFromItsSecondStep, steps=1, max_examples=10)  # one step per object: never a second
    single_gpus = strategies.topologies(nodes=1, gpus_per_node=1)
    check_policy(RandomPlacement, topologies=single_gpus, max_examples=10)  # one GPU: every placement is the same


def test_something_other_than_a_plan_is_caught():
    class ReturnsPlacement:
        def plan(self, loads, topology):
            return Placement.contiguous(topology, loads.shape[1])

    error = caught(ReturnsPlacement, "returns-plan")
    assert "plan() returned Placement, not a relibra.Plan" in str(error)
