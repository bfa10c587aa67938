"""The replay path reads no device value on the host (gloo, 2 nodes x 2 GPUs, every policy).

On a GPU, reading a device tensor on the host (``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``,
ops whose output shape depends on the data such as ``nonzero``, ``bincount``, boolean indexing or
``repeat_interleave`` without ``output_size``) stalls the host until the GPU catches up. Here every
tensor is on the CPU, so the test watches for the reads themselves:
:class:`relibra.testing.host_reads.HostReads` around the forward and backward of every
micro-batch. With replayed routes and a plan, the Balancer computes every split size, buffer
size and row order on the host before the micro-batch, so nothing may be recorded. The layers run
with ``agree_input_errors=False``: their input agreement is a control-plane collective whose verdict
is read on the host (on the CPU for a ``cpu:gloo,cuda:nccl`` group, on the GPU for NCCL alone).

The live router path (routes chosen by the router, or passed to ``forward``) still exchanges and
reads the split sizes: the same watch records reads there, which shows it can see them.

A single-process layer (no process group) runs the replay path on every device of
tests/conftest.py: on CUDA under ``torch.cuda.set_sync_debug_mode("error")`` as well.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _moe_world import Net, step_data

import relibra
from relibra import ReLibraMoE
from relibra.runtime.balancer import Balancer
from relibra.testing import run_world
from relibra.testing.host_reads import HostReads

M = 4


def _watch_worker(rank, mesh, policies):
    out = {}
    for policy in policies:
        torch.manual_seed(0)
        model = Net(mesh)
        for layer in (model.moe1, model.moe2):
            layer.agree_input_errors = False
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        bal = Balancer(model, mesh=mesh, policy=policy, optimizer=opt, spare_slots_per_gpu=1)
        reads, replicas = [], 0
        for s in range(2):
            data = step_data(s, M, hold=2)
            plan = bal.plan_step([data[m][rank][1] for m in range(M)])
            replicas += int(plan.replicas().sum())
            for m in range(M):
                with bal.micro_batch(m):
                    watch = HostReads()
                    with watch:
                        y = model(data[m][rank][0])
                        y.square().sum().backward()
                    reads += watch.reads
            opt.step()
            opt.zero_grad()
        out[policy] = dict(reads=sorted(set(reads)), replicas=replicas)
    # the live router path reads split sizes on the host: the watch sees it
    x = step_data(0, 1)[0][rank][0]
    watch = HostReads()
    with watch:
        model(x).square().sum().backward()
    out["live router"] = dict(reads=sorted(set(watch.reads)), replicas=0)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def watched():
    return run_world(_watch_worker, args=(list(relibra.policies.BUILTINS),), timeout=240)


@pytest.mark.parametrize("policy", list(relibra.policies.BUILTINS))
def test_replayed_forward_and_backward_read_no_device_value_on_the_host(watched, policy):
    for rank, r in enumerate(watched):
        assert r[policy]["reads"] == [], f"rank {rank} policy {policy} read on the host: {r[policy]['reads']}"
    if policy in ("replicate", "hybrid", "eplb"):
        assert watched[0][policy]["replicas"] > 0, f"{policy} made no replica: the replica path is unwatched"


def test_the_watch_sees_the_live_router_path_read_split_sizes(watched):
    for rank, r in enumerate(watched):
        names = {what for what, _ in r["live router"]["reads"]}
        assert "Tensor.tolist" in names, f"rank {rank}: the watch missed the live path's split sizes: {names}"


def test_single_process_replay_reads_nothing_and_does_not_sync(device):
    """Balancer without a mesh on ``device``: the replayed forward + backward reads no value on the
    host (and, on CUDA, makes no synchronising call); the plan and routes are installed before."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(ReLibraMoE(16, 12, 8, 2, device=device), ReLibraMoE(16, 12, 8, 2, device=device))
    for layer in model:
        layer.agree_input_errors = False
    bal = Balancer(model, None, "static")
    gen = torch.Generator().manual_seed(1)
    routes = [torch.randint(0, 8, (10, 2, 2), generator=gen) for _ in range(2)]
    bal.plan_step(routes)
    for m in range(2):
        x = torch.randn(10, 16, generator=gen).to(device)
        with bal.micro_batch(m):
            watch = HostReads()
            with watch:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    model(x).square().sum().backward()
                finally:
                    if device == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
        assert watch.reads == [], f"micro-batch {m} read on the host: {watch.reads}"
    assert model[0].experts.gate_up_proj.grad.abs().sum() > 0
