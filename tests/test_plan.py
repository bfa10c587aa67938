import pytest
import torch

from relibra import Placement, Plan, Topology
from relibra.plan import as_loads, even_slot_tokens, slot_ranks

TOPO = Topology(num_nodes=2, gpus_per_node=2, num_experts=8, spare_slots_per_gpu=1)


def _plan_with_replica(loads):
    """Expert 0 (home GPU 0) replicated into GPU 1's spare slot, tokens split 3 / rest."""
    placement = Placement.contiguous(TOPO, loads.shape[1])
    plan = Plan.without_replicas(placement, loads, TOPO)
    spare = plan.spare_experts.clone()
    spare[:, :, 1] = 0  # spare slot of GPU 1
    slot_tokens = plan.slot_tokens.clone()
    moved = torch.minimum(slot_tokens[:, :, 0], torch.tensor(3))
    slot_tokens[:, :, 0] -= moved
    slot_tokens[:, :, 1 * TOPO.slots_per_gpu + 2] = moved
    return Plan(TOPO, placement, spare, slot_tokens, True, "hand")


def test_static_like_plan_views():
    loads = torch.arange(16).reshape(1, 2, 8)
    plan = Plan.without_replicas(Placement.contiguous(TOPO, 2), loads, TOPO)
    plan.validate(TOPO, loads)
    assert plan.gpu_loads(loads).tolist() == [[[1, 5, 9, 13], [17, 21, 25, 29]]]
    assert plan.node_loads().tolist() == [[[6, 22], [38, 54]]]
    assert plan.logcnt().eq(1).all()
    assert plan.phy2log()[0, 0].tolist() == [0, 1, -1, 2, 3, -1, 4, 5, -1, 6, 7, -1]
    assert plan.log2phy()[0, 0, :, 0].tolist() == [0, 1, 3, 4, 6, 7, 9, 10]
    torch.testing.assert_close(plan.imbalance()[0, 0], torch.tensor(13 / 7, dtype=torch.float64))
    assert plan.replicas().eq(0).all()


def test_replica_views_and_split():
    loads = torch.full((2, 1, 8), 5)
    plan = _plan_with_replica(loads)
    plan.validate(TOPO, loads)
    assert plan.logcnt()[0, 0, 0] == 2
    assert plan.log2phy()[0, 0, 0].tolist() == [0, 5]
    assert plan.gpu_loads()[0, 0].tolist() == [7, 13, 10, 10]
    assert plan.replicas().tolist() == [[1], [1]]


def test_micro_batches_slice_a_plan():
    loads = torch.arange(48).reshape(3, 2, 8)
    plan = _plan_with_replica(loads)
    plan.info["note"] = "kept"
    part = plan.micro_batches(1, 3)
    part.validate(TOPO, loads[1:])
    assert part.placement is plan.placement and part.num_micro_batches == 2 and part.policy == "hand"
    assert torch.equal(part.slot_tokens, plan.slot_tokens[1:])
    assert torch.equal(part.spare_experts, plan.spare_experts[1:])
    part.info["note"] = "changed"
    assert plan.info["note"] == "kept"  # its own copy of info


def test_cross_node_tokens_follow_split_rule():
    # Source rank 3 (node 1) sends all 5 tokens of expert 0; home GPU 0 (node 0) takes the first 2.
    loads = torch.zeros(1, 1, 8, dtype=torch.int64)
    loads[0, 0, 0] = 5
    plan = _plan_with_replica(loads)
    src = torch.zeros(1, 1, 4, 8, dtype=torch.int64)
    src[0, 0, 3, 0] = 5
    assert plan.cross_node_tokens(src).tolist() == [[5]]  # both copies (GPU 0, GPU 1) are on node 0
    src = torch.zeros(1, 1, 4, 8, dtype=torch.int64)
    src[0, 0, 0, 0] = 5
    assert plan.cross_node_tokens(src).tolist() == [[0]]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (
            lambda p: Plan(TOPO, Placement(p.placement.home_experts.clone().fill_(0)), p.spare_experts, p.slot_tokens),
            "expert 0 has 8 home slots",
        ),
        (lambda p: Plan(TOPO, p.placement, p.spare_experts.clone().fill_(9), p.slot_tokens), "outside"),
        (lambda p: Plan(TOPO, p.placement, p.spare_experts[..., :2], p.slot_tokens), "over-full"),
        (lambda p: Plan(TOPO, p.placement, _set(p.spare_experts, 0), p.slot_tokens), "two copies of expert 0"),
        (lambda p: Plan(TOPO, p.placement, _set(p.spare_experts, 7, slot=1), p.slot_tokens), "outside its home node"),
        (lambda p: Plan(TOPO, p.placement, p.spare_experts, p.slot_tokens + 1), "empty spare slot"),
        (lambda p: Plan(TOPO, p.placement, p.spare_experts, -p.slot_tokens), "negative"),
    ],
)
def test_validate_names_the_fault(mutate, match):
    loads = torch.full((1, 1, 8), 4)
    plan = _plan_with_replica(loads)
    with pytest.raises(ValueError, match=match):
        mutate(plan).validate(TOPO, loads)


def _set(spare, expert, slot=0):
    spare = spare.clone()
    spare[..., slot] = expert
    return spare


def test_split_must_add_up_to_loads():
    loads = torch.full((1, 1, 8), 4)
    plan = _plan_with_replica(loads)
    other = loads.clone()
    other[0, 0, 0] = 5
    with pytest.raises(ValueError, match="expert 0 adds up to 4, its load is 5"):
        plan.validate(TOPO, other)
    with pytest.raises(ValueError, match="loads must have shape"):
        plan.gpu_loads(loads[..., :4])


def test_placement_from_home_gpu_and_moves():
    home_gpu = torch.tensor([[3, 3, 2, 2, 1, 1, 0, 0]])
    placement = Placement.from_home_gpu(home_gpu, TOPO)
    placement.validate(TOPO)
    assert placement.home_gpu(TOPO).tolist() == home_gpu.tolist()
    contiguous = Placement.contiguous(TOPO, 1)
    assert placement.moved_experts(contiguous, TOPO).sum() == 8
    assert placement.bytes_moved(contiguous, TOPO, bytes_per_expert=10) == 80.0
    with pytest.raises(ValueError, match="GPU 0 is given 3 home experts"):
        Placement.from_home_gpu(torch.tensor([[0, 0, 0, 1, 2, 2, 3, 3]]), TOPO)


def test_even_split_and_ranks():
    phy2log = torch.tensor([[0, 1, 0, -1, 0]])
    rank, cnt = slot_ranks(phy2log, 2)
    assert rank.tolist() == [[0, 0, 1, -1, 2]]
    assert cnt.tolist() == [[3, 1]]
    assert even_slot_tokens(phy2log, torch.tensor([[7, 2]])).tolist() == [[3, 2, 2, 0, 2]]


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([[[1.5]]]), "fractional"),
        (torch.tensor([[[float("nan")]]]), "NaN"),
        (torch.tensor([[[-1]]]), "negative load -1"),
        (torch.zeros(2, 2), "3 dimensions"),
        (torch.zeros(1, 1, 1, dtype=torch.bool), "dtype"),
    ],
)
def test_as_loads_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        as_loads(bad)


def test_plan_repr_is_one_line_without_tensors():
    import relibra

    t = Topology(2, 2, 8, 1)
    loads = torch.tensor([[[90, 5, 5, 5, 5, 5, 5, 5], [5, 5, 5, 5, 5, 5, 5, 90]]])
    plan = relibra.get_policy("replicate").plan(loads, t)
    text = repr(plan)
    assert "\n" not in text and "tensor" not in text and len(text) < 250
    assert text.startswith("Plan(policy='replicate', micro_batches=1, layers=2, topology=[2 nodes x 2 GPUs")
    assert f"replicas={int(plan.replicas().sum())}" in text and "imbalance mean" in text


def test_loads_whose_total_passes_int64_are_refused():
    # two loads of 2**62 on one GPU summed to a negative gpu_loads (imbalance 1.0): refused, with the index
    top = 2**63 - 1
    placement = Placement.contiguous(TOPO, 1)
    near = torch.zeros(1, 1, 8, dtype=torch.int64)
    near[0, 0, :2] = 2**62
    with pytest.raises(ValueError, match=r"passes it at index \(0, 0, 1\) \(load 4611686018427387904\)"):
        Plan.without_replicas(placement, near, TOPO)
    # the bound is the whole tensor: a step's micro-batches are summed too (reorder plans per step)
    across = torch.zeros(2, 1, 8, dtype=torch.int64)
    across[:, 0, 3] = 2**62 - 1  # 2**63 - 2 in all: fits
    across[1, 0, 4] = 2
    with pytest.raises(ValueError, match=r"index \(1, 0, 4\)"):
        as_loads(across)
    # up to the limit everything stays exact and non-negative
    edge = torch.zeros(1, 1, 8, dtype=torch.int64)
    edge[0, 0, 0], edge[0, 0, 1] = top - 5, 5
    plan = Plan.without_replicas(placement, edge, TOPO)
    plan.validate(TOPO, edge)
    assert plan.gpu_loads().tolist() == [[[top, 0, 0, 0]]]
    edge[0, 0, 7] = 1
    with pytest.raises(ValueError, match=r"index \(0, 0, 7\) \(load 1\)"):
        as_loads(edge)
    # many large loads whose total fits take the exact path and pass
    fits = torch.full((3, 2, 8), top // 48, dtype=torch.int64)
    assert torch.equal(as_loads(fits), fits)
