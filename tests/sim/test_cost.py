"""Cost model against hand-computed cases, and its guards."""

import pytest
import torch

from relibra.plan import Placement, Plan
from relibra.sim.cost import CostConfig, ideal_step_cost, make_config, step_cost
from relibra.topology import Topology

# 2 nodes x 2 GPUs, 4 experts (1 home slot each), 1 spare slot per GPU. Round numbers:
# expert_params = 3 * hidden * inter = 3 * 10 * 10 = 300, flops = 1000 flop/s. The machine's fixed
# costs (half rows, latency, optimizer, host) are 0 here and tested one at a time below.
CFG = CostConfig(hidden=10, expert_intermediate=10, num_experts=4, top_k=1, num_moe_layers=1,
                 num_expert_groups=1, non_moe_params=0.0, attn_width=0, attn_context=0.0,
                 extra_params=0.0, peak_flops=1000.0, mfu=1.0, intra_node_bandwidth=100.0,
                 inter_node_bandwidth=10.0, backward_factor=2.0, a2a_bytes=1.0, a2a_overlap=0.0,
                 weight_bytes=1.0, replica_grad_bytes=1.0, replica_overlap=0.0,
                 state_bytes_per_param=16.0, reorder_overlap=0.0, state_move_overlap=0.0,
                 expert_half_rows=0.0, message_latency_s=0.0,
                 migration_s_per_byte=0.0, optimizer_s_per_param=0.0, layer_call_s=0.0, step_overhead_s=0.0)
TOPO = Topology(2, 2, 4, spare_slots_per_gpu=1, intra_node_bandwidth=100.0, inter_node_bandwidth=10.0)


def static_plan(loads):
    return Plan.without_replicas(Placement.contiguous(TOPO, 1), loads, TOPO)


def test_expert_compute_busiest_gpu_sets_pace():
    loads = torch.tensor([[[8, 4, 4, 0]]])
    cost = step_cost(static_plan(loads), loads, CFG)
    # busiest GPU 8 copies * 2 flops * 300 params * (1 + 2 backward) / 1000 flop/s
    assert cost.expert_compute_s == pytest.approx(8 * 2 * 300 * 3 / 1000)
    ideal = ideal_step_cost(loads, TOPO, CFG)
    assert ideal.expert_compute_s == pytest.approx(4 * 2 * 300 * 3 / 1000)


def test_a2a_two_tiers_hot_gpu_receives_more():
    loads = torch.tensor([[[8, 4, 4, 0]]])
    cost = step_cost(static_plan(loads), loads, CFG)
    # uniform sources: GPU0 receives 8/4 from its node-mate (intra) and 2 * 8/4 from the other
    # node (inter). Bytes per copy = hidden * 1 B = 10. inter recv = 4 copies = 40 B / 10 B/s = 4 s,
    # inter send of GPU2 (node 1): (8 + 4) / 4 = 3 copies -> 3 s; intra worst: 2 copies*10/100.
    # Slowest GPU 4 s per transfer, 4 transfers (dispatch + combine, forward + backward).
    assert cost.a2a_s == pytest.approx(16.0)
    ideal = ideal_step_cost(loads, TOPO, CFG)
    # every GPU 4 copies: inter recv = 4 * 2/4 = 2 copies = 2 s; 4 transfers
    assert ideal.a2a_s == pytest.approx(8.0)


def test_source_loads_route_traffic():
    loads = torch.tensor([[[4, 4, 4, 4]]])
    # every source only sends to experts on its own GPU: no link traffic at all
    src = torch.diag_embed(loads)  # [1, 1, G, E] with G == E
    cost = step_cost(static_plan(loads), loads, CFG, source_loads_MLGE=src)
    assert cost.a2a_s == 0.0
    uniform = step_cost(static_plan(loads), loads, CFG, source_loads_MLGE=torch.ones(1, 1, 4, 4, dtype=torch.int64))
    assert uniform.a2a_s == pytest.approx(step_cost(static_plan(loads), loads, CFG).a2a_s)


def test_replica_copies_and_gradient_reduce_intra_node():
    loads = torch.tensor([[[8, 0, 4, 4]], [[8, 0, 4, 4]]])
    spare = torch.tensor([-1, 0, -1, -1]).expand(2, 1, 4)  # expert 0 replicated on GPU 1 (same node)
    plan = Plan.with_spares(Placement.contiguous(TOPO, 1), spare, loads, TOPO)
    cost = step_cost(plan, loads, CFG)
    # arrives once (micro-batch 0), leaves once (end of step): 2 * 300 params * 1 B over 100 B/s
    assert cost.replica_bytes == pytest.approx(600.0)
    assert cost.replica_s == pytest.approx(6.0)
    half = step_cost(plan, loads, CostConfig(**{**CFG.to_dict(), "replica_overlap": 0.5}))
    assert half.replica_s == pytest.approx(3.0)
    # without reuse (what ReLibraMoE does today) the kept replica is fetched and reduced in both
    # micro-batches; half reuse pays half of the second micro-batch's fetch and first reduction
    none = step_cost(plan, loads, CostConfig(**{**CFG.to_dict(), "replica_reuse": 0.0}))
    assert none.replica_bytes == pytest.approx(1200.0) and none.replica_s == pytest.approx(12.0)
    part = step_cost(plan, loads, CostConfig(**{**CFG.to_dict(), "replica_reuse": 0.5}))
    assert part.replica_bytes == pytest.approx(900.0) and part.replica_s == pytest.approx(9.0)


def test_reorder_moves_state_over_inter_node_links():
    loads = torch.tensor([[[1, 1, 1, 1]]])
    prev = Placement.contiguous(TOPO, 1)
    swapped = Placement(torch.tensor([[2, 1, 0, 3]]))  # experts 0 and 2 swap nodes
    plan = Plan.without_replicas(swapped, loads, TOPO)
    cost = step_cost(plan, loads, CFG, previous=prev)
    assert cost.reorder_bytes == pytest.approx(2 * 300 * 16)
    # each of GPU 0 and 2 sends and receives one expert (4800 B) over 10 B/s, full duplex
    assert cost.reorder_s == pytest.approx(480.0)
    assert step_cost(plan, loads, CFG).reorder_s == 0.0


def test_deferred_optimizer_state_travels_behind_the_pass():
    loads = torch.tensor([[[1, 1, 1, 1]]])
    prev = Placement.contiguous(TOPO, 1)
    plan = Plan.without_replicas(Placement(torch.tensor([[2, 1, 0, 3]])), loads, TOPO)
    cost = step_cost(plan, loads, with_(state_move_overlap=1.0), previous=prev)
    hide = cost.expert_compute_s + cost.non_moe_s + cost.extra_s
    assert hide == pytest.approx(1.8)  # 1 copy * 2 flops * 300 params * 3 / 1000 flop/s
    # the weights (1 B/param, 300 B) move before the pass over 10 B/s; the other 15 B/param
    # (4500 B, 450 s) travel during it and only what its 1.8 s of compute cannot hide is paid
    assert cost.reorder_s == pytest.approx(30.0 + 450.0 - hide)
    assert cost.reorder_bytes == pytest.approx(2 * 300 * 16)  # the same bytes move
    # a pass long enough (600 s of non-MoE work) hides all of the state: the weights remain
    long = step_cost(plan, loads, with_(state_move_overlap=1.0, non_moe_params=1e5), previous=prev)
    assert long.non_moe_s == pytest.approx(600.0) and long.reorder_s == pytest.approx(30.0)
    # half of the state deferred: 1 + 7.5 B/param before the pass, 7.5 behind it
    half = step_cost(plan, loads, with_(state_move_overlap=0.5, non_moe_params=1e5), previous=prev)
    assert half.reorder_s == pytest.approx(300 * 8.5 / 10)


def test_non_moe_work_is_balanced_per_token():
    cfg = CostConfig(**{**CFG.to_dict(), "non_moe_params": 100.0, "extra_params": 50.0})
    loads = torch.tensor([[[8, 4, 4, 0]]])  # 16 tokens (top_k 1) over 4 GPUs
    cost = step_cost(static_plan(loads), loads, cfg)
    assert cost.non_moe_s == pytest.approx(16 / 4 * 2 * 100 * 3 / 1000)
    assert cost.extra_s == pytest.approx(16 / 4 * 2 * 50 * 3 / 1000)
    assert cost.tokens == 16


def test_presets_and_overrides():
    cfg = make_config("qwen3-30b-a3b", "h800", {"mfu": "0.4", "num_moe_layers": 10})
    assert cfg.num_experts == 128 and cfg.hidden == 2048 and cfg.mfu == 0.4
    assert cfg.intra_node_bandwidth == 200e9 and cfg.num_moe_layers == 10
    assert make_config().expert_params == 3 * 7168 * 2048
    with pytest.raises(ValueError, match="unknown cost parameter 'nope'"):
        make_config(overrides={"nope": 1})
    with pytest.raises(ValueError, match="unknown model preset"):
        make_config("gpt-5")
    with pytest.raises(ValueError, match="mfu"):
        make_config(overrides={"mfu": 1.5})
    with pytest.raises(ValueError, match="not a number"):
        make_config(overrides={"mfu": "fast"})


def test_bad_source_loads_rejected():
    loads = torch.tensor([[[8, 4, 4, 0]]])
    with pytest.raises(ValueError, match="source_loads"):
        step_cost(static_plan(loads), loads, CFG, source_loads_MLGE=torch.ones(1, 1, 4, 4, dtype=torch.int64))


def with_(**kw):
    return CostConfig(**{**CFG.to_dict(), **kw})


def test_half_rows_charge_every_busy_slot_once():
    loads = torch.tensor([[[8, 0, 4, 4]], [[8, 0, 4, 4]]])
    spare = torch.tensor([-1, 0, -1, -1]).expand(2, 1, 4)  # expert 0 also on GPU 1: 4 + 4 rows
    plan = Plan.with_spares(Placement.contiguous(TOPO, 1), spare, loads, TOPO)
    per_row = 2 * 300 * 3 / 1000
    # every GPU has one busy slot of 4 rows (GPU 1: the replica; its empty home slot is free)
    assert step_cost(plan, loads, CFG).expert_compute_s == pytest.approx(2 * 4 * per_row)
    assert step_cost(plan, loads, with_(expert_half_rows=2.0)).expert_compute_s == pytest.approx(2 * 6 * per_row)
    # static: GPU 0 computes 8 rows in one slot; ideal: 16 rows and 3 busy experts over 4 GPUs
    static = step_cost(static_plan(loads), loads, with_(expert_half_rows=2.0))
    assert static.expert_compute_s == pytest.approx(2 * 10 * per_row)
    ideal = ideal_step_cost(loads, TOPO, with_(expert_half_rows=2.0))
    assert ideal.expert_compute_s == pytest.approx(2 * (16 + 3 * 2) / 4 * per_row)


def test_latency_per_transfer():
    loads = torch.tensor([[[8, 0, 4, 4]], [[8, 0, 4, 4]]])
    base = step_cost(static_plan(loads), loads, CFG)
    lat = step_cost(static_plan(loads), loads, with_(message_latency_s=0.5))
    # 4 token transfers per micro-batch and layer, 2 micro-batches
    assert lat.a2a_s - base.a2a_s == pytest.approx(4 * 2 * 0.5)
    spare = torch.tensor([-1, 0, -1, -1]).expand(2, 1, 4)
    plan = Plan.with_spares(Placement.contiguous(TOPO, 1), spare, loads, TOPO)
    # the replica arrives once (micro-batch 0) and its gradient goes home once (micro-batch 1)
    rep = step_cost(plan, loads, with_(message_latency_s=0.5)).replica_s - step_cost(plan, loads, CFG).replica_s
    assert rep == pytest.approx(2 * 0.5)
    one_gpu = Topology(1, 1, 4)
    solo = Plan.without_replicas(Placement.contiguous(one_gpu, 1), loads, one_gpu)
    assert step_cost(solo, loads, with_(message_latency_s=0.5)).a2a_s == 0.0  # nothing crosses a link


def test_migration_handling_per_byte_in_and_out():
    loads = torch.tensor([[[1, 1, 1, 1]]])
    prev = Placement.contiguous(TOPO, 1)
    plan = Plan.without_replicas(Placement(torch.tensor([[2, 1, 0, 3]])), loads, TOPO)
    base = step_cost(plan, loads, CFG, previous=prev).reorder_s
    cost = step_cost(plan, loads, with_(migration_s_per_byte=0.01), previous=prev).reorder_s
    # GPU 0 sends and receives one expert of 4800 B: 2 * 4800 * 0.01 s on top of the link
    assert cost - base == pytest.approx(2 * 4800 * 0.01)
    assert step_cost(plan, loads, with_(migration_s_per_byte=0.01), previous=plan.placement).reorder_s == 0.0


def test_optimizer_and_host_are_the_same_for_every_plan():
    cfg = with_(optimizer_s_per_param=0.001, layer_call_s=0.25, step_overhead_s=1.0, non_moe_params=40.0)
    loads = torch.tensor([[[8, 0, 4, 4]], [[8, 0, 4, 4]]])
    cost = step_cost(static_plan(loads), loads, cfg)
    # one home expert of 300 params per GPU plus a quarter of the 40 other params
    assert cost.optimizer_s == pytest.approx((300 + 40 / 4) * 0.001)
    assert cost.overhead_s == pytest.approx(2 * 1 * 0.25 + 1.0)
    ideal = ideal_step_cost(loads, TOPO, cfg)
    assert (ideal.optimizer_s, ideal.overhead_s) == (cost.optimizer_s, cost.overhead_s)
    assert cost.total_s - step_cost(static_plan(loads), loads, with_(non_moe_params=40.0)).total_s == \
        pytest.approx(cost.optimizer_s + cost.overhead_s)


def test_zero_machine_costs_reduce_to_the_plain_model():
    cfg = make_config("qwen3-30b-a3b", overrides={"expert_half_rows": 0, "message_latency_s": 0,
                                                  "optimizer_s_per_param": 0, "layer_call_s": 0,
                                                  "step_overhead_s": 0, "num_moe_layers": 2})
    topo = cfg.topology(2, 2, 1)
    loads = torch.randint(0, 50, (2, 2, 128))
    plan = Plan.without_replicas(Placement.contiguous(topo, 2), loads, topo)
    cost = step_cost(plan, loads, cfg)
    busiest = plan.gpu_loads().amax(-1).sum().item()
    assert cost.expert_compute_s == pytest.approx(busiest * 2 * cfg.expert_params * 3 / cfg.flops)
    assert cost.optimizer_s == 0.0 and cost.overhead_s == 0.0
