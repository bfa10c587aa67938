"""Replica reuse on a gloo world (2 nodes x 2 GPUs): a replica kept in its spare slot is fetched
once and its gradient goes home once; activation checkpointing, a backward after the block and a
second pass over one plan stay exact; a misuse raises the same error on every rank.

Traffic is counted on the real collectives: ``dist.all_to_all_single`` is wrapped, and its 1-D
transfers are the replica ones (the token dispatch moves ``[rows, D]`` blocks). A rank receives
replica weights only as a micro-batch block starts (the fetch) and replica gradients only in the
backward (the return home).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist
from _moe_world import D, I, Net, allreduce_dense_grads, logical_grads, max_err, outcome, same_error, step_data
from torch.utils.checkpoint import checkpoint

from relibra.runtime.balancer import Balancer
from relibra.testing import run_world

M = 4
W = 2 * I * D + D * I  # elements of one expert's weights: gate_up [2I, D] and down [D, I]
POLICIES = ("replicate", "eplb", "hybrid")


def _runs_and_filled(plan, slots: slice) -> tuple[int, int]:
    """Runs (a replica arriving in a slot) and filled (micro-batch, layer, slot)s among ``slots``."""
    sp = plan.spare_experts[:, :, slots]
    prev = torch.cat([torch.full_like(sp[:1], -1), sp[:-1]])
    filled = sp >= 0
    return int((filled & (sp != prev)).sum()), int(filled.sum())


def _traffic_worker(rank, mesh):
    real = dist.all_to_all_single
    phase = [None]
    received = {"fetch": 0, "return": 0}

    def counting(output, input, *args, **kwargs):
        if phase[0] is not None and output.dim() == 1:
            received[phase[0]] += output.numel()
        return real(output, input, *args, **kwargs)

    out = {}
    dist.all_to_all_single = counting
    try:
        for policy in POLICIES:
            torch.manual_seed(0)
            model = Net(mesh)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            bal = Balancer(model, mesh=mesh, policy=policy, optimizer=opt, spare_slots_per_gpu=1)
            S = bal.topology.spare_slots_per_gpu
            received.update({"fetch": 0, "return": 0})
            runs = filled = 0
            for s in range(3):
                data = step_data(s, M, hold=2)  # hot experts stay for two micro-batches
                plan = bal.plan_step([data[m][rank][1] for m in range(M)])
                r, f = _runs_and_filled(plan, slice(rank * S, (rank + 1) * S))
                runs, filled = runs + r, filled + f
                for m in range(M):
                    phase[0] = "fetch"
                    with bal.micro_batch(m):
                        phase[0] = None
                        y = model(data[m][rank][0])
                        phase[0] = "return"
                        y.square().sum().backward()
                        phase[0] = None
                opt.step()
                opt.zero_grad()
            out[policy] = dict(fetched=received["fetch"], returned=received["return"], runs=runs, filled=filled)
    finally:
        dist.all_to_all_single = real
    return out


@pytest.fixture(scope="module")
def traffic():
    return run_world(_traffic_worker, timeout=180)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_kept_replica_is_fetched_once_and_its_gradient_goes_home_once(traffic, policy):
    per_rank = [r[policy] for r in traffic]
    for rank, r in enumerate(per_rank):
        # every run (a replica arriving in this rank's slot) is fetched exactly once, whole
        assert r["fetched"] == r["runs"] * W, f"rank {rank}: fetched {r['fetched'] / W} experts, {r['runs']} runs"
    runs, filled = sum(r["runs"] for r in per_rank), sum(r["filled"] for r in per_rank)
    # every run's gradient arrives home exactly once (summed over the home ranks that receive it)
    assert sum(r["returned"] for r in per_rank) == runs * W
    # reuse: fewer fetches than the filled slot-micro-batches that a fetch per micro-batch would pay
    assert 0 < runs < filled, (policy, runs, filled)


class _Checkpointed(Net):
    """Net with each MoE layer under activation checkpointing (recomputed during backward)."""

    def __init__(self, mesh, reentrant: bool):
        super().__init__(mesh)
        self.ck = partial(checkpoint, use_reentrant=reentrant)

    def forward(self, x):
        h = self.ck(self.moe1, torch.tanh(self.inp(x)))
        return self.ck(self.moe2, self.mid(h)) + h


def _variant_run(rank, mesh, init, variant: str, policy: str):
    """Two steps (two passes over one plan for ``two_passes``); outputs, grads, final weights."""
    model = {"ckpt": partial(_Checkpointed, reentrant=False),
             "ckpt_reentrant": partial(_Checkpointed, reentrant=True)}.get(variant, Net)(mesh)
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    bal = Balancer(model, mesh=mesh, policy=policy, optimizer=opt, spare_slots_per_gpu=1)
    outs, grads, kept = [], [], 0
    data = None
    for s in range(2):
        if variant != "two_passes" or s == 0:  # two_passes: the second pass reuses the plan
            data = step_data(s, M, hold=2)
            plan = bal.plan_step([data[m][rank][1] for m in range(M)])
            runs, filled = _runs_and_filled(plan, slice(None))
            kept += filled - runs
        for m in range(M):
            with bal.micro_batch(m):
                y = model(data[m][rank][0])
                if variant != "after_block":
                    y.square().sum().backward()
            if variant == "after_block":
                y.square().sum().backward()
            outs.append(y.detach().clone())
        allreduce_dense_grads(model)
        grads.append(logical_grads(model))
        opt.step()
        opt.zero_grad()
    return outs, grads, {k: v.clone() for k, v in model.state_dict().items()}, kept


def _update_between_micro_batches(rank, mesh, init, policy: str) -> torch.Tensor:
    """Micro-batch 1's output after an optimizer step that follows micro-batch 0 (no gradient
    waits: 0 ran without grad), so replicas kept from 0 to 1 must be fetched again."""
    model = Net(mesh)
    model.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    bal = Balancer(model, mesh=mesh, policy=policy, optimizer=opt, spare_slots_per_gpu=1)
    data = step_data(0, M, hold=M)
    plan = bal.plan_step([data[m][rank][1] for m in range(M)])
    runs, filled = _runs_and_filled(plan, slice(None))
    with torch.no_grad(), bal.micro_batch(0):
        model(data[0][rank][0])
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.1)
    opt.step()
    with torch.no_grad(), bal.micro_batch(1):
        return model(data[1][rank][0]), filled - runs


def _variants_worker(rank, mesh):
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in Net(None).state_dict().items()}
    ref, _ = _update_between_micro_batches(rank, mesh, init, "static")
    got, kept = _update_between_micro_batches(rank, mesh, init, "replicate")
    out = {"update_between": dict(out=float((got - ref).abs().max()) if ref.numel() else 0.0, grad=0.0, weights=0.0,
                                  kept=kept)}
    for variant in ("plain", "ckpt", "ckpt_reentrant", "after_block", "two_passes"):
        ref = _variant_run(rank, mesh, init, "two_passes" if variant == "two_passes" else "plain", "static")
        got = _variant_run(rank, mesh, init, variant, "replicate")
        out[variant] = dict(out=max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(ref[0], got[0])),
                            grad=max(max_err(a, b) for a, b in zip(ref[1], got[1])),
                            weights=max_err(ref[2], got[2]), kept=got[3])
    return out


@pytest.fixture(scope="module")
def variants():
    return run_world(_variants_worker, timeout=240)


@pytest.mark.parametrize("variant", ["plain", "ckpt", "ckpt_reentrant", "after_block", "two_passes",
                                     "update_between"])
def test_checkpointing_backward_after_the_block_and_a_second_pass_stay_exact(variants, variant):
    """replicate, with replicas kept across micro-batches (fetched once, gradient home once),
    equals static: with each MoE layer recomputed in the backward (non-reentrant and reentrant
    checkpointing), with the backward run after the block, over two passes of one plan with an
    optimizer step between them, and with an optimizer step between two micro-batches (both
    fetch the changed weights again)."""
    for rank, r in enumerate(variants):
        for key in ("out", "grad", "weights"):
            assert r[variant][key] < 2e-5, f"rank {rank} {variant}: {key} differs by {r[variant][key]}"
        assert r[variant]["kept"] > 0, f"rank {rank} {variant}: no replica stayed in its slot: reuse untested"



def _misuse_worker(rank, mesh):
    torch.manual_seed(0)
    model = Net(mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    bal = Balancer(model, mesh=mesh, policy="replicate", optimizer=opt, spare_slots_per_gpu=1)
    data = step_data(0, M, hold=M)  # the hot experts' replicas stay for the whole step
    xs, routes = [d[rank][0] for d in data], [d[rank][1] for d in data]

    def run(m):
        with bal.micro_batch(m):
            model(xs[m]).square().sum().backward()

    def forward(m):
        with bal.micro_batch(m):
            return model(xs[m]).square().sum()

    def good_step():
        opt.zero_grad()
        bal.plan_step(routes)
        for m in range(M):
            run(m)
        opt.step()
        return True

    out = {}
    bal.plan_step(routes)
    run(0)
    out["step_early"] = outcome(opt.step)
    out["step_early/then"] = good_step()
    bal.plan_step(routes)
    run(0)
    out["skip"] = outcome(lambda: run(2))
    out["skip/then"] = good_step()
    bal.plan_step(routes[:2])  # micro-batch 1 is the step's last: every run's gradient goes home in its backward
    losses = [forward(0), forward(1)]
    out["backward_order"] = outcome(lambda: sum(losses).backward())  # 1's backward runs first
    out["backward_order/then"] = good_step()
    bal.plan_step(routes)
    loss = forward(0)
    bal.plan_step(routes)
    out["backward_late"] = outcome(loss.backward)
    out["backward_late/then"] = good_step()
    return out


@pytest.fixture(scope="module")
def misuse():
    return run_world(_misuse_worker, timeout=180)


@pytest.mark.parametrize("case,kind,needles", [
    ("step_early", "RuntimeError", ("optimizer.step() before every replica gradient of the step went home",
                                    "it goes in the backward of micro-batch")),
    ("skip", "ValueError", ("Balancer.micro_batch: rank 0: micro-batch 2 entered after micro-batch 0",
                            "has not gone home")),
    ("backward_order", "RuntimeError", ("ReLibraMoE replica backward of micro-batch 0 ran after the backward",
                                        "in order")),
    ("backward_late", "RuntimeError", ("ran after plan_step started the next step",)),
])
def test_a_misuse_of_the_replica_lifecycle_raises_the_same_error_on_every_rank(misuse, case, kind, needles):
    same_error([r[case] for r in misuse], kind, needles, case)
    assert all(r[case + "/then"] for r in misuse), "the world did not run a good step after"
