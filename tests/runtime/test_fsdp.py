"""FSDP2 + expert parallelism + Balancer equals one process (gloo, 4 ranks as edp=2 x ep=2).

Mesh ``(edp=2, ep=2)``: the MoE layers are built on ``world["ep"]`` (1 node x 2 GPUs, H = 4
home + 1 spare slot per rank); :func:`relibra.runtime.fsdp.apply_fsdp` shards the experts over
``world["edp"]`` (dim 1) and everything else over all 4 ranks. Every rank has its own tokens
(the two EP groups see different data). After three AdamW steps with moving hot experts, the
loss per step and every logical weight and AdamW moment equal a single process trained on all
ranks' tokens. ``_Rotate`` moves every expert to the other GPU each step, so migration of
FSDP-sharded weights and optimizer state is exercised whatever the built-in policies decide.
Steps have four micro-batches, so some replicas stay in their spare slot (fetched in the first
forward of their run, gradient sent home through FSDP's reduction once, in its last backward).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _moe_world import Net, step_data, uniform_routes

from relibra.plan import Placement, Plan
from relibra.runtime.balancer import Balancer
from relibra.testing import run_world

STEPS, M = 3, 4
#: "rotate-deferred": rotate with the optimizer state moved in the background (defer_optimizer_state=True)
POLICIES = ("static", "replicate", "hybrid", "rotate", "rotate-deferred")


class _Rotate:
    """Every step moves each expert's home to the other GPU (and nothing else)."""

    def __init__(self):
        self.shift = 0

    def plan(self, loads, topology):
        self.shift += topology.home_slots_per_gpu
        row = torch.roll(torch.arange(topology.num_experts), self.shift)
        return Plan.without_replicas(Placement(row.expand(loads.shape[1], -1).clone()), loads, topology)


def _policy(name):
    return _Rotate() if name == "rotate" else name


def _reference(scale: float):
    """One process, all ranks' tokens: loss per step, final logical weights and AdamW moments."""
    torch.manual_seed(0)
    ref = Net(None)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.AdamW(ref.parameters(), lr=2e-2)
    losses = []
    for s in range(STEPS):
        data = step_data(s, M)
        loss = 0.0
        for m in range(M):
            routes = torch.cat([r for _, r in data[m]])
            # replay the recorded routes (the Balancer installs the same per layer)
            out = _forward_with_routes(ref, torch.cat([x for x, _ in data[m]]), routes)
            lm = (out * out).sum() * 0.5 * scale
            lm.backward()
            loss += float(lm.detach())
        losses.append(loss)
        opt.step()
        opt.zero_grad()
    state = {f"{n}.{k}": opt.state[p][k].clone() for n, p in ref.named_parameters() for k in ("exp_avg", "exp_avg_sq")}
    return init, losses, {k: v.clone() for k, v in ref.state_dict().items()}, state


def _forward_with_routes(net, x, routes_TLK):
    h = net.moe1(torch.tanh(net.inp(x)), routes_TLK[:, 0])
    return net.moe2(net.mid(h), routes_TLK[:, 1]) + h


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _logical_state(model, opt) -> dict:
    """AdamW moments in logical expert order, full tensors (collective)."""
    out = {}
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            v = _full(opt.state[p][key]).detach()
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                layer = model.get_submodule(name.split(".")[0])
                lv = torch.empty_like(v)
                lv[layer.home_experts_K] = v
                v = lv
            out[f"{name}.{key}"] = v.clone()
    return out


def _worker(rank, _mesh, runs, references):
    from relibra.runtime.fsdp import apply_fsdp, expert_data_parallel_mesh

    world, dp_mesh, edp_mesh, ep_mesh = expert_data_parallel_mesh(2, 2)
    results = {}
    for name, reduce in runs:
        init, ref_losses, ref_weights, ref_state = references[reduce]
        model = Net(ep_mesh)
        model.load_state_dict(init)
        apply_fsdp(model, dp_mesh, edp_mesh, reduce=reduce)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        bal = Balancer(model, mesh=ep_mesh, policy=_policy(name.removesuffix("-deferred")), optimizer=opt,
                       spare_slots_per_gpu=1, placement_min_gain=0,  # every placement: migration under FSDP exercised
                       defer_optimizer_state=True if name.endswith("-deferred") else "auto")
        loss_err, moved, replicas, kept, deferred = 0.0, 0, 0, 0, 0
        for s in range(STEPS):
            data = step_data(s, M)
            plan = bal.plan_step([data[m][rank][1] for m in range(M)])
            moved += bal.metrics()["experts_moved"]
            deferred += bal._state_move is not None  # the optimizer state still travelling
            replicas += int(plan.replicas().sum())
            sp = plan.spare_experts
            kept += int(((sp[1:] >= 0) & (sp[1:] == sp[:-1])).sum())
            loss = torch.zeros(())
            for m in range(M):
                with bal.micro_batch(m):
                    out = model(data[m][rank][0])
                    lm = (out * out).sum() * 0.5
                    lm.backward()
                loss += lm.detach()
            dist.all_reduce(loss)
            scale = 1.0 if reduce == "sum" else 1.0 / dist.get_world_size()
            loss_err = max(loss_err, abs(float(loss) * scale - ref_losses[s]) / max(abs(ref_losses[s]), 1.0))
            opt.step()
            opt.zero_grad()
        weights = {k: _full(v) for k, v in model.state_dict().items()}
        w_err = max(float((weights[k] - ref_weights[k]).abs().max()) for k in ref_weights)
        st = _logical_state(model, opt)
        s_err = max(float((st[k] - ref_state[k]).abs().max()) for k in ref_state)
        results[name, reduce] = dict(loss=loss_err, weights=w_err, state=s_err, moved=moved, replicas=replicas,
                                     kept=kept, deferred=deferred,
                             keys=sorted(weights) == sorted(ref_weights),
                             placement=bal.placement.home_experts.tolist())
    results["guarded"] = _guarded(dp_mesh, edp_mesh, ep_mesh, references["sum"][0])
    results["errors"] = _misuse_errors(dp_mesh, edp_mesh, ep_mesh)
    results["skipped_forward"] = _skipped_forward(rank, dp_mesh, edp_mesh, ep_mesh, references["sum"][0])
    return results


def _guarded(dp_mesh, edp_mesh, ep_mesh, init) -> dict:
    """The placement guard under expert-data parallelism: ``_Rotate`` proposes moving every expert,
    the routes make every placement equal, so with the default ``placement_min_gain`` nothing moves
    on any rank of either replica (with ``placement_min_gain=0`` all 16 expert rows move)."""
    from relibra.runtime.fsdp import apply_fsdp

    model = Net(ep_mesh)
    model.load_state_dict(init)
    apply_fsdp(model, dp_mesh, edp_mesh, reduce="sum")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    bal = Balancer(model, mesh=ep_mesh, policy=_Rotate(), optimizer=opt, spare_slots_per_gpu=1)
    before = bal.placement.home_experts.clone()
    plan = bal.plan_step(uniform_routes(16, M))
    return dict(moved=bal.metrics()["experts_moved"], same=torch.equal(bal.placement.home_experts, before),
                plan_same=torch.equal(plan.placement.home_experts, before))


def _skipped_forward(rank, dp_mesh, edp_mesh, ep_mesh, init) -> float:
    """Micro-batch 0's block entered without a forward (so no layer fetched its replicas there),
    then micro-batches 1..M-1 as usual: replicate's weights after an SGD step minus static's (SGD:
    AdamW's first step turns gradient noise around zero into whole steps)."""
    from relibra.runtime.fsdp import apply_fsdp

    weights = []
    for policy in ("static", "replicate"):
        model = Net(ep_mesh)
        model.load_state_dict(init)
        apply_fsdp(model, dp_mesh, edp_mesh, reduce="sum")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        bal = Balancer(model, mesh=ep_mesh, policy=policy, optimizer=opt, spare_slots_per_gpu=1)
        data = step_data(0, M, hold=M)  # hot experts (and their replicas) stay for the whole step
        plan = bal.plan_step([data[m][rank][1] for m in range(M)])
        assert policy == "static" or bool((plan.spare_experts[1] >= 0).any()), "no replica in micro-batch 1"
        for m in range(M):
            with bal.micro_batch(m):
                if m:
                    model(data[m][rank][0]).square().sum().backward()
        opt.step()
        weights.append({k: _full(v) for k, v in model.state_dict().items()})
    return max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])


def _misuse_errors(dp_mesh, edp_mesh, ep_mesh) -> list[str]:
    """Wrappings that cannot work raise ValueError before any collective."""
    from torch.distributed.fsdp import fully_shard

    from relibra.runtime.fsdp import apply_fsdp

    out = []
    for call in (lambda: apply_fsdp(Net(ep_mesh), edp_mesh, edp_mesh),           # dp != edp * G
                 lambda: apply_fsdp(Net(ep_mesh), dp_mesh, edp_mesh, expert_shard_dim=0),
                 lambda: apply_fsdp(Net(None), dp_mesh, edp_mesh)):
        try:
            call()
            out.append("no error")
        except ValueError as exc:
            out.append(str(exc))
    net = Net(ep_mesh)
    fully_shard(net.moe1.experts, mesh=edp_mesh)
    try:
        Balancer(net, mesh=ep_mesh, policy="static")
        out.append("no error")
    except ValueError as exc:
        out.append(str(exc))
    return out


@pytest.fixture(scope="module")
def results():
    """One world for every case: ``reduce="sum"`` per policy, and hybrid with ``"mean"``
    (dense and expert grads both divided by the 4 data-parallel ranks = loss scaled by 1/4)."""
    runs = [(p, "sum") for p in POLICIES] + [("hybrid", "mean")]
    refs = {"sum": _reference(1.0), "mean": _reference(0.25)}
    return run_world(_worker, nodes=1, args=(runs, refs), timeout=240)


@pytest.mark.parametrize("policy,reduce", [(p, "sum") for p in POLICIES] + [("hybrid", "mean")])
def test_fsdp_expert_data_parallel_equals_single_process(policy, reduce, results):
    per_rank = [r[policy, reduce] for r in results]
    for rank, res in enumerate(per_rank):
        assert res["keys"], f"rank {rank}: state_dict keys differ from the single-process model"
        for key in ("loss", "weights", "state"):
            assert res[key] < 2e-5, f"rank {rank} policy {policy}: {key} differs by {res[key]}"
    # the two expert-data-parallel replicas (ranks 0/2 and 1/3) hold the same homes
    assert per_rank[0]["placement"] == per_rank[2]["placement"]
    if policy in ("replicate", "hybrid"):
        assert per_rank[0]["replicas"] + per_rank[2]["replicas"] > 0, f"{policy} made no replica: untested"
        assert per_rank[0]["kept"] + per_rank[2]["kept"] > 0, f"{policy} kept no replica in its slot: untested"
    if policy.startswith("rotate"):
        assert per_rank[0]["moved"] > 0, "no expert moved: migration under FSDP untested"
    # the optimizer state moved in the background on every rank after the first step (AdamW has none before)
    assert all(r["deferred"] == (STEPS - 1 if policy == "rotate-deferred" else 0) for r in per_rank)


def test_fsdp_placement_guard_keeps_the_experts_on_every_replica(results):
    for rank, r in enumerate(results):
        assert r["guarded"] == dict(moved=0, same=True, plan_same=True), (rank, r["guarded"])


def test_fsdp_replicas_not_fetched_in_a_skipped_forward_are_fetched_in_the_next(results):
    for rank, r in enumerate(results):
        assert r["skipped_forward"] < 2e-5, f"rank {rank}: weights differ from static by {r['skipped_forward']}"


def test_fsdp_misuse_raises_clear_errors(results):
    for rank, r in enumerate(results):
        dp, dim0, no_mesh, experts_only = r["errors"]
        assert "dp_mesh has 2 ranks" in dp, (rank, dp)
        assert "expert_shard_dim" in dim0, (rank, dim0)
        assert "no expert-parallel mesh" in no_mesh, (rank, no_mesh)
        assert "not layer.experts" in experts_only, (rank, experts_only)
