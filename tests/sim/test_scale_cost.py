"""Cost model at scale: NVLink-domain presets and their errors, the cross-node price, live planning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relibra.plan import Placement, Plan
from relibra.sim import DEFAULT_POLICIES, simulate
from relibra.sim.cost import (
    CLUSTER_PRESETS,
    CostConfig,
    a2a_seconds,
    cross_node_price,
    make_config,
    replica_seconds,
    step_cost,
)
from relibra.sim.simulate import LIVE_ROWS, ROW_SYSTEMS
from relibra.topology import Topology

CFG = CostConfig(hidden=64, expert_intermediate=32, num_experts=8, top_k=2, num_moe_layers=2,
                 num_expert_groups=1, non_moe_params=1e4, attn_width=64, extra_params=0.0,
                 peak_flops=1e12, mfu=0.5, intra_node_bandwidth=1e9, inter_node_bandwidth=1e8)


def test_nvlink_domain_presets_hold_their_published_numbers():
    b200, nvl72 = make_config(cluster="b200"), make_config(cluster="gb200-nvl72")
    assert (b200.peak_flops, b200.intra_node_bandwidth, b200.gpus_per_domain) == (2.25e15, 900e9, 8)
    assert (nvl72.peak_flops, nvl72.intra_node_bandwidth, nvl72.gpus_per_domain) == (2.5e15, 900e9, 72)
    assert nvl72.inter_node_bandwidth == 400e9 / 8  # ConnectX-7, 400 Gb/s per GPU
    assert make_config(cluster="gb200-nvl72-cx8").inter_node_bandwidth == 800e9 / 8
    assert all(p["gpus_per_domain"] == 8 for name, p in CLUSTER_PRESETS.items() if name.startswith("h"))
    topo = nvl72.topology(1, 64, 1)  # one NVLink domain: 64 of the 72 GPUs for 256 experts
    assert (topo.num_nodes, topo.gpus_per_node, topo.home_slots_per_gpu) == (1, 64, 4)


def test_a_topology_the_cluster_cannot_hold_is_named():
    with pytest.raises(ValueError, match=r"1 nodes x 16 GPUs: a node of the topology is one NVLink domain, and this "
                                         r"cluster's domain holds 8 GPUs \(gpus_per_domain\)"):
        make_config(cluster="h100").topology(1, 16, 1)
    with pytest.raises(ValueError, match=r"not divisible by the 72 GPUs \(1 nodes x 72\).*run expert parallelism "
                                         r"on 64 of each node's GPUs \(gpus_per_node=64\)"):
        make_config(cluster="gb200-nvl72").topology(1, 72, 1)
    with pytest.raises(ValueError, match=r"spare_slots_per_gpu=8: the replicas' weights and gradients alone take "
                                         r"81\.7 GB per GPU \(58 MoE layers x 8 slots x 0\.176 GB\), more than the "
                                         r"GPU's 80 GB \(gpu_memory_bytes\)"):
        make_config(cluster="h100").topology(8, 8, 8)
    make_config(cluster="h200").topology(8, 8, 8)  # 141 GB holds them
    with pytest.raises(ValueError, match="CostConfig.gpus_per_domain must be > 0"):
        make_config(overrides={"gpus_per_domain": 0})


def test_cross_node_price_is_the_cost_models_exchange_rate():
    """One cross-node replica costs as much as ``price`` token copies less on the busiest GPU."""
    # the price is the marginal exchange rate: bytes and compute; per-transfer latency is paid
    # once per (micro-batch, layer) whatever the number of replicas, so it is left out here
    cfg = CostConfig(**{**CFG.to_dict(), "replica_overlap": 0.5, "a2a_overlap": 0.25, "message_latency_s": 0.0})
    topo = cfg.topology(2, 2, 1)
    loads = torch.tensor([[[10, 0, 0, 0, 0, 0, 0, 0]]])
    spare = torch.tensor([[[-1, -1, 0, -1]]])  # expert 0 (node 0) in GPU 2's spare slot (node 1)
    plan = Plan.with_spares(Placement.contiguous(topo, 1), spare, loads, topo, intra_node_replicas=False)
    replica_s, _ = replica_seconds(plan, cfg)
    one_copy = torch.zeros(1, 1, 4, dtype=torch.float64)
    one_copy[..., 0] = 1.0  # the busiest GPU's traffic per token copy (inter-node tier, uniform sources)
    copy_s = 2 * cfg.expert_params * (1 + cfg.backward_factor) / cfg.flops + float(a2a_seconds(one_copy, topo, cfg))
    assert cross_node_price(cfg, topo) == pytest.approx(float(replica_s.sum()) / copy_s)
    assert cross_node_price(cfg, cfg.topology(1, 4, 1)) == float("inf")


def test_live_planning_is_priced_per_micro_batch_and_layer():
    topo = CFG.topology(2, 2, 1)
    loads = torch.randint(0, 50, (3, 2, 8), generator=torch.Generator().manual_seed(0))
    plan = Plan.without_replicas(Placement.contiguous(topo, 2), loads, topo)
    ahead, live = step_cost(plan, loads, CFG), step_cost(plan, loads, CFG, live_planning=True)
    assert ahead.planning_s == 0.0
    assert live.planning_s == pytest.approx(3 * 2 * CFG.live_planning_s)
    assert live.total_s - ahead.total_s == pytest.approx(live.planning_s)
    slow = CostConfig(**{**CFG.to_dict(), "live_planning_s": 1e-3})
    assert step_cost(plan, loads, slow, live_planning=True).planning_s == pytest.approx(6e-3)


def test_bench_rows_live_planning_price_and_names():
    topo = CFG.topology(2, 2, 1)
    rng = np.random.default_rng(3)
    loads = rng.integers(0, 200, size=(2, 2, 2, 8))
    loads[..., 0] += 3000  # one expert hotter than its node
    res = simulate(loads, topo, CFG, ["replicate", "replicate-live", "hybrid-intra", "hybrid", "ideal"])
    live = res["replicate-live"]
    assert live.options == {"policy": "replicate", "cross_node": False, "cross_node_price": cross_node_price(CFG, topo)}
    assert live.breakdown_s["planning_s"] == pytest.approx(2 * 2 * CFG.live_planning_s)
    assert res["replicate"].breakdown_s["planning_s"] == 0.0
    assert res["hybrid"].options["cross_node_price"] == pytest.approx(cross_node_price(CFG, topo))
    assert res["hybrid"].plan_info["cross_node_layers"] > 0  # the price pays here: cross-node replicas
    assert res["hybrid-intra"].plan_info.get("cross_node_layers", 0) == 0
    assert res["hybrid"].step_time_s < res["hybrid-intra"].step_time_s
    assert set(DEFAULT_POLICIES) <= set(ROW_SYSTEMS) and set(LIVE_ROWS) <= set(ROW_SYSTEMS)
    assert "MoonEP" in ROW_SYSTEMS["replicate"] and "live" in ROW_SYSTEMS["replicate-live"]
    with pytest.raises(ValueError, match="hybrid option cross_node_price must be None or a number >= 0"):
        simulate(loads, topo, CFG, ["hybrid"], options={"hybrid": {"cross_node_price": -1}})


def test_topology_error_names_a_domain_size_that_divides():
    with pytest.raises(ValueError, match=r"gpus_per_node=64"):
        Topology(num_nodes=2, gpus_per_node=72, num_experts=256)
