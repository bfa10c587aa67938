"""Exactness at 8 ranks: every built-in policy on gloo worlds of 2 nodes x 4 GPUs and 4 nodes x 2 GPUs.

One world per mesh runs every policy (and ``replicate`` / ``hybrid`` with cross-node replicas
forced: ``cross_node_price=0``) for a few steps of two micro-batches each, with replicas and
migrations, and compares outputs, loss, gradients, final weights and AdamW state with the
single-process run of all ranks' tokens under ``static``. Tiny shapes (E = 8 experts, one home
and one spare slot per rank) so each world finishes in well under a minute on two cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _moe_world import D, E, K, Net, allreduce_dense_grads, logical_grads, logical_state, max_err

import relibra
from relibra.runtime.balancer import Balancer
from relibra.testing import run_world

WORLD, STEPS, M = 8, 2, 2
#: every built-in with its defaults, then the replicating ones with cross-node replicas forced
RUNS = [(name, {}) for name in relibra.policies.BUILTINS] + [
    ("replicate", {"cross_node_price": 0.0}), ("hybrid", {"cross_node_price": 0.0})]


def run_name(policy: str, options: dict) -> str:
    return policy + ("(cross-node)" if options else "")


def step_data(step: int):
    """Per micro-batch, per rank: (x [T, D], routes [T, 2, K]). Three first choices in four go to
    one hot expert (another every micro-batch and layer): its node carries more than its share
    whatever the placement, so only cross-node replicas balance it. Rank 5 has no token in
    micro-batch 1."""
    g = torch.Generator().manual_seed(2000 + step)
    data = []
    for m in range(M):
        hot = [(3 * step + m) % E, (3 * step + m + 5) % E]
        per_rank = []
        for r in range(WORLD):
            T = 0 if (m == 1 and r == 5) else 4 + (r + m + step) % 3
            x = torch.randn(T, D, generator=g)
            routes = torch.empty(T, 2, K, dtype=torch.int64)
            for t in range(T):
                for layer in range(2):
                    first = hot[layer] if torch.rand((), generator=g) < 0.75 else int(torch.randint(E, (), generator=g))
                    second = (first + 1 + int(torch.randint(E - 1, (), generator=g))) % E
                    routes[t, layer] = torch.tensor([first, second])
            per_rank.append((x, routes))
        data.append(per_rank)
    return data


def _reference():
    """Single process, every rank's tokens, ``static``: outputs, loss, grads per step; final weights, state."""
    torch.manual_seed(0)
    ref = Net(None)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.AdamW(ref.parameters(), lr=2e-2)
    bal = Balancer(ref, None, "static")
    rec = []
    for s in range(STEPS):
        data = step_data(s)
        bal.plan_step([torch.cat([r for _, r in data[m]]) for m in range(M)])
        outs, loss = [], 0.0
        for m in range(M):
            with bal.micro_batch(m):
                out = ref(torch.cat([x for x, _ in data[m]]))
                lm = (out * out).sum() * 0.5
                lm.backward()
            outs.append(out.detach())
            loss += float(lm.detach())
        rec.append((outs, loss, logical_grads(ref)))
        opt.step()
        opt.zero_grad()
    return init, rec, {k: v.clone() for k, v in ref.state_dict().items()}, logical_state(ref, opt)


def _worker(rank, mesh, runs, reference):
    init, rec, ref_weights, ref_state = reference
    results = {}
    for policy, options in runs:
        torch.manual_seed(0)
        model = Net(mesh)
        model.load_state_dict(init)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        bal = Balancer(model, mesh=mesh, policy=policy, optimizer=opt, spare_slots_per_gpu=1,
                       policy_options=options, replica_min_gain=0.0, placement_min_gain=0.0)
        err = dict(out=0.0, loss=0.0, grad=0.0)
        moved = replicas = cross = 0
        for s in range(STEPS):
            data = step_data(s)
            plan = bal.plan_step([data[m][rank][1] for m in range(M)])
            moved += bal.metrics()["experts_moved"]
            replicas += int(plan.replicas().sum())
            cross += int(not plan.intra_node_replicas)
            loss = torch.zeros(())
            for m in range(M):
                x = data[m][rank][0]
                with bal.micro_batch(m):
                    out = model(x)
                    lm = (out * out).sum() * 0.5
                    lm.backward()
                loss += lm.detach()
                start = sum(data[m][r][0].shape[0] for r in range(rank))
                ref_out = rec[s][0][m][start:start + x.shape[0]]
                err["out"] = max(err["out"], float((out.detach() - ref_out).abs().max()) if x.numel() else 0.0)
            dist.all_reduce(loss)
            err["loss"] = max(err["loss"], abs(float(loss) - rec[s][1]) / max(abs(rec[s][1]), 1.0))
            allreduce_dense_grads(model)
            err["grad"] = max(err["grad"], max_err(logical_grads(model), rec[s][2]))
            opt.step()
            opt.zero_grad()
        realised = bal.metrics(gather_realised=True, as_tensors=True)
        err["weights"] = max_err(dict(model.state_dict()), ref_weights)
        err["state"] = max_err(logical_state(model, opt), ref_state)
        results[run_name(policy, options)] = dict(
            err, moved=moved, replicas=replicas, cross_node_steps=cross,
            realised_equals_planned=bool(torch.equal(realised["realised_gpu_loads"], bal.plan.gpu_loads())))
    return results


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize("nodes", [2, 4], ids=["2x4", "4x2"])
def test_every_policy_exact_on_8_ranks(nodes, reference):
    results = run_world(_worker, world_size=WORLD, nodes=nodes, args=(RUNS, reference), timeout=300)
    for policy, options in RUNS:
        name = run_name(policy, options)
        per_rank = [r[name] for r in results]
        for rank, res in enumerate(per_rank):
            for key in ("out", "loss", "grad", "weights", "state"):
                assert res[key] < 2e-5, f"{nodes} nodes, rank {rank}, {name}: {key} differs by {res[key]}"
            assert res["realised_equals_planned"], f"{name}, rank {rank}: dispatch did not follow the plan's split"
        first = per_rank[0]
        if policy in ("replicate", "hybrid", "eplb"):
            assert first["replicas"] > 0, f"{name} filled no spare slot: replicas untested"
        if policy in ("reorder", "hybrid"):
            assert first["moved"] > 0, f"{name} never moved an expert: migration untested"
        if options:
            assert first["cross_node_steps"] > 0, f"{name} placed no cross-node replica: untested"
