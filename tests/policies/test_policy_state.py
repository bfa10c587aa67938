"""Policy state for checkpoints: ``state_dict`` / ``load_state_dict`` of reorder, hybrid and eplb.

The property: a policy that planned some steps, saved through ``torch.save`` and read back with
``torch.load(weights_only=True)`` into a fresh policy, plans the next step exactly as the
policy that never stopped. Random topologies (1-2 nodes, 1-3 GPUs per node, 1-2 home and 0-1
spare slots per GPU) and skewed loads that change every step. Bad state raises ValueError naming
the key and leaves the policy as it was.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import relibra
from relibra.plan import Placement
from relibra.policies import EplbPolicy, HybridPolicy, ReorderPolicy

STATEFUL = {
    "reorder": lambda: ReorderPolicy(),
    "reorder_w0": lambda: ReorderPolicy(migration_weight=0.0),
    "hybrid": lambda: HybridPolicy(),
    "eplb_window": lambda: EplbPolicy(window=2),
    "eplb_ema": lambda: EplbPolicy(history="ema", ema_decay=0.5),
}


@st.composite
def runs(draw):
    nodes, gpus, homes = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    E = nodes * gpus * homes
    topo = relibra.Topology(num_nodes=nodes, gpus_per_node=gpus, num_experts=E,
                            spare_slots_per_gpu=draw(st.integers(0, 1)))
    M, L, steps = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (steps + 1, M, L, E)
    hot = (torch.rand(shape, generator=g) < 0.2) * torch.randint(20, 400, shape, generator=g)
    loads = torch.randint(0, 10, shape, generator=g) + hot
    return topo, loads.to(torch.int64)


def _through_a_file(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _same_plan(a, b) -> bool:
    return (a.placement.equal(b.placement) and torch.equal(a.spare_experts, b.spare_experts)
            and torch.equal(a.slot_tokens, b.slot_tokens))


@pytest.mark.parametrize("name", list(STATEFUL))
@settings(max_examples=15, deadline=None)
@given(run=runs())
def test_a_resumed_policy_plans_like_the_one_that_never_stopped(name, run):
    topo, loads = run
    policy = STATEFUL[name]()
    for step_loads in loads[:-1]:
        policy.plan(step_loads, topo)
    resumed = STATEFUL[name]()
    resumed.load_state_dict(_through_a_file(policy.state_dict()))
    assert _same_plan(resumed.plan(loads[-1], topo), policy.plan(loads[-1], topo))
    assert resumed.state_dict().keys() == policy.state_dict().keys()


def test_fresh_state_round_trips():
    for make in STATEFUL.values():
        policy = make()
        policy.load_state_dict(_through_a_file(policy.state_dict()))
        assert _through_a_file(policy.state_dict()).keys() == make().state_dict().keys()


def _loads(E: int = 4, L: int = 2) -> torch.Tensor:
    return torch.arange(2 * L * E, dtype=torch.int64).reshape(2, L, E) % 7 * 10


def test_bad_state_raises_naming_the_key_and_changes_nothing():
    topo = relibra.Topology(num_nodes=2, gpus_per_node=1, num_experts=4)
    reorder = ReorderPolicy()
    reorder.plan(_loads(), topo)
    good = reorder.state_dict()
    bad_ids = {**good, "placement": good["placement"].clone()}
    bad_ids["placement"][0, 0] = bad_ids["placement"][0, 1]
    bad_topology = {**good, "topology": {**good["topology"], "num_nodes": 3}}
    cases = [
        (reorder, {"placement": good["placement"]}, "reorder state must hold the keys 'placement' and 'topology'"),
        (reorder, bad_ids, "reorder state key 'placement': placement, layer 0: expert"),
        (reorder, bad_topology, "reorder state key 'topology': Topology.num_experts=4 is not divisible"),
        (reorder, {**good, "placement": [[0, 1, 2, 3]]}, "reorder state key 'placement' must be a tensor"),
        (HybridPolicy(), {"reorder": good, "x": 1}, "hybrid state must be a dict with the one key 'reorder'"),
        (EplbPolicy(), {"history": "ema", "steps": [], "ema": None}, "eplb state key 'history'"),
        (EplbPolicy(), {"history": "window", "steps": [torch.zeros(2, 4)], "ema": None},
         "eplb state key 'steps[0]' must be a float64 tensor [L, E]"),
        (EplbPolicy(), {"history": "window", "steps": [torch.zeros(2, 4, dtype=torch.float64),
                                                       torch.zeros(3, 4, dtype=torch.float64)], "ema": None},
         "eplb state key 'steps[1]' has shape (3, 4)"),
    ]
    for policy, state, message in cases:
        before = policy.state_dict()
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            policy.load_state_dict(state)
        after = policy.state_dict()
        assert after.keys() == before.keys()
        for key in before:
            assert str(after[key]) == str(before[key]), f"{type(policy).__name__}: {key} changed"


def test_an_eplb_window_longer_than_the_policy_keeps_its_last_steps():
    steps = [torch.full((1, 4), float(i), dtype=torch.float64) for i in range(3)]
    policy = EplbPolicy(window=2)
    policy.load_state_dict({"history": "window", "steps": steps, "ema": None})
    assert torch.equal(policy.weight(), torch.full((1, 4), 1.5, dtype=torch.float64))
    reorder = ReorderPolicy()
    reorder.load_state_dict({})
    assert reorder.placement is None
    topo = relibra.Topology(num_nodes=1, gpus_per_node=2, num_experts=4)
    reorder.load_state_dict({"placement": Placement.contiguous(topo, 1).home_experts, "topology": vars(topo)})
    assert reorder.placement.equal(Placement.contiguous(topo, 1))
