import pytest
import torch

import relibra
from relibra import Topology


def test_sizes_and_maps():
    t = Topology(num_nodes=8, gpus_per_node=8, num_experts=256, spare_slots_per_gpu=1, num_expert_groups=8)
    assert t.num_gpus == 64
    assert t.home_slots_per_gpu == 4
    assert t.slots_per_gpu == 5
    assert t.num_physical_slots == 320
    assert t.num_spare_slots == 64
    assert t.experts_per_node == 32
    assert t.node_of_gpu(15) == 1
    assert list(t.gpus_of_node(2)) == list(range(16, 24))
    assert t.gpu_of_slot(319) == 63 and t.gpu_of_slot(5) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_nodes=0, gpus_per_node=2, num_experts=8), "num_nodes"),
        (dict(num_nodes=2, gpus_per_node=2, num_experts=6), "not divisible"),
        (dict(num_nodes=1, gpus_per_node=2, num_experts=8, spare_slots_per_gpu=-1), "spare_slots_per_gpu"),
        (dict(num_nodes=1, gpus_per_node=2, num_experts=8, num_expert_groups=3), "num_expert_groups"),
        (dict(num_nodes=1, gpus_per_node=2, num_experts=8, inter_node_bandwidth=0), "inter_node_bandwidth"),
        (dict(num_nodes=1, gpus_per_node=2, num_experts=8, inter_node_bandwidth=float("inf")),
         r"inter_node_bandwidth must be a finite positive number \(bytes/s\), got inf"),
        (dict(num_nodes=1, gpus_per_node=2, num_experts=8, intra_node_bandwidth=float("nan")), "intra_node_bandwidth"),
        (dict(num_nodes=1, gpus_per_node=2, num_experts=8, intra_node_bandwidth=True), "intra_node_bandwidth"),
        (dict(num_nodes=1, gpus_per_node=2, num_experts=8, intra_node_bandwidth="450e9"), "intra_node_bandwidth"),
        (dict(num_nodes=1.5, gpus_per_node=2, num_experts=8), "num_nodes"),
    ],
)
def test_invalid_combinations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Topology(**kwargs)


def test_bandwidths_any_finite_positive_number():
    t = Topology(num_nodes=1, gpus_per_node=2, num_experts=8, intra_node_bandwidth=10**30, inter_node_bandwidth=1e-3)
    assert t.intra_node_bandwidth == 10**30 and t.inter_node_bandwidth == 1e-3


def test_out_of_range_lookups_raise():
    t = Topology(num_nodes=2, gpus_per_node=2, num_experts=8)
    with pytest.raises(ValueError, match="GPU 4"):
        t.node_of_gpu(4)
    with pytest.raises(ValueError, match="node 2"):
        t.gpus_of_node(2)


class _FakeMesh:
    def __init__(self, shape):
        self.shape = shape


def test_from_mesh_reads_node_and_gpu_dims():
    t = Topology.from_mesh(_FakeMesh((2, 4)), num_experts=16, spare_slots_per_gpu=2)
    assert (t.num_nodes, t.gpus_per_node, t.spare_slots_per_gpu) == (2, 4, 2)
    assert Topology.from_mesh(_FakeMesh((4,)), num_experts=8).num_nodes == 1
    with pytest.raises(ValueError, match="2-D"):
        Topology.from_mesh(_FakeMesh((2, 2, 2)), num_experts=8)


def test_from_real_device_mesh_single_process():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    import os
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("node", "gpu"))
        t = Topology.from_mesh(mesh, num_experts=4)
        assert (t.num_nodes, t.gpus_per_node, t.home_slots_per_gpu) == (1, 1, 4)
    finally:
        dist.destroy_process_group()


def test_public_api_names():
    for name in ("Topology", "Plan", "Placement", "get_policy", "register_policy"):
        assert hasattr(relibra, name)
    assert isinstance(torch.__version__, str)
