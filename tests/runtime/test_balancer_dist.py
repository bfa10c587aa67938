"""Distributed exactness and failure handling of Balancer + ReLibraMoE (gloo, 2 nodes x 2 GPUs).

One spawn runs every built-in policy against the single-process reference, over steps of four
micro-batches in which some replicas stay in their spare slot (fetched once, their gradient
accumulated there and sent home once) and others move; a second spawn feeds bad input. Each
parametrised test reads its policy's numbers from the shared run.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _moe_world import Net, allreduce_dense_grads, logical_grads, logical_state, max_err, outcome, same_error, step_data

import relibra
from relibra.plan import Plan
from relibra.runtime.balancer import Balancer
from relibra.testing import run_world

BUILTIN = list(relibra.policies.BUILTINS)
STEPS, M = 3, 2
M_EXACT = 4  # micro-batches per step of the exactness run: long enough for replicas to stay


def _kept_and_arrived(plan) -> tuple[int, int]:
    """Filled spare slots (after micro-batch 0) that keep their replica / get a new one."""
    sp = plan.spare_experts
    filled = sp[1:] >= 0
    return int((filled & (sp[1:] == sp[:-1])).sum()), int((filled & (sp[1:] != sp[:-1])).sum())


def _reference(steps=STEPS, M=M_EXACT):
    """Single-process run on all ranks' tokens: outputs, loss, grads per step; final weights/state."""
    torch.manual_seed(0)
    ref = Net(None)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.AdamW(ref.parameters(), lr=2e-2)
    bal = Balancer(ref, None, "static")
    rec = []
    for s in range(steps):
        data = step_data(s, M)
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


def _exact_worker(rank, mesh, policies, reference):
    init, rec, ref_weights, ref_state = reference
    M = M_EXACT
    results = {}
    for name in policies:
        torch.manual_seed(0)
        model = Net(mesh)
        model.load_state_dict(init)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        bal = Balancer(model, mesh=mesh, policy=name, optimizer=opt, spare_slots_per_gpu=1)
        err = dict(out=0.0, loss=0.0, grad=0.0)
        moved = replicas = kept = arrived = 0
        for s in range(STEPS):
            data = step_data(s, M)
            plan = bal.plan_step([data[m][rank][1] for m in range(M)])
            moved += bal.metrics()["experts_moved"]
            replicas += int(plan.replicas().sum())
            kept, arrived = (a + b for a, b in zip((kept, arrived), _kept_and_arrived(plan)))
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
        planned = bal.plan.gpu_loads().permute(0, 1, 2)
        err["weights"] = max_err({k: v for k, v in model.state_dict().items()}, ref_weights)
        err["state"] = max_err(logical_state(model, opt), ref_state)
        results[name] = dict(err, moved=moved, replicas=replicas, kept=kept, arrived=arrived,
                             realised_equals_planned=bool(torch.equal(realised["realised_gpu_loads"], planned)))
    return results


@pytest.fixture(scope="module")
def exact_results():
    return run_world(_exact_worker, args=(BUILTIN, _reference()), timeout=240)


@pytest.mark.parametrize("policy", BUILTIN)
def test_distributed_run_equals_single_process(policy, exact_results):
    per_rank = [r[policy] for r in exact_results]
    for rank, res in enumerate(per_rank):
        for key in ("out", "loss", "grad", "weights", "state"):
            assert res[key] < 2e-5, f"rank {rank} policy {policy}: {key} differs by {res[key]}"
        assert res["realised_equals_planned"], f"rank {rank}: dispatch did not follow the plan's split"
    if policy in ("replicate", "hybrid", "eplb"):
        assert per_rank[0]["replicas"] > 0, f"{policy} filled no spare slot: replicas untested"
        assert per_rank[0]["kept"] > 0, f"{policy} kept no replica in its slot: reuse untested"
    if policy in ("replicate", "hybrid"):
        assert per_rank[0]["arrived"] > 0, f"{policy} never moved a replica after micro-batch 0: untested"
    if policy == "reorder":
        assert per_rank[0]["moved"] > 0, "reorder never moved an expert: migration untested"


class _Raises:
    def plan(self, loads, topology):
        raise RuntimeError("boom from a custom policy")


class _Invalid:
    """Puts a replica on its own home GPU: fails Plan.validate."""

    def plan(self, loads, topology):
        from relibra.plan import Placement

        placement = Placement.contiguous(topology, loads.shape[1])
        spare = torch.full((loads.shape[0], loads.shape[1], topology.num_spare_slots), -1, dtype=torch.int64)
        spare[:, :, 0] = 0  # GPU 0 already homes expert 0
        return Plan.with_spares(placement, spare, loads, topology)


class _NotAPlan:
    def plan(self, loads, topology):
        return {"not": "a plan"}



def _bad_input_worker(rank, mesh):
    torch.manual_seed(0)
    model = Net(mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    data = step_data(0, M)
    good = [data[m][rank][1] for m in range(M)]

    def bad_id():
        r = [t.clone() for t in good]
        if rank == 1:
            r[0][0, 1, 0] = 8
        return r

    def bad_shape():
        return [t[..., :1] for t in good] if rank == 3 else good

    def bad_dtype():
        return [t.float() for t in good] if rank == 0 else good

    def bad_count():
        return good[:1] if rank == 2 else good

    cases = [("id", "replicate", bad_id), ("shape", "static", bad_shape), ("dtype", "static", bad_dtype),
             ("count", "static", bad_count), ("raises", _Raises(), lambda: good),
             ("invalid", _Invalid(), lambda: good), ("notaplan", _NotAPlan(), lambda: good)]
    # rank 2's optimizer misses the second layer's experts: a reorder would strand its state
    partial = torch.optim.AdamW([p for n, p in model.named_parameters()
                                 if rank != 2 or not n.startswith("moe2.experts")], lr=1e-2)
    cases.append(("optimizer", "reorder", lambda: good))
    out = {}
    for case, policy, make in cases:
        bal = Balancer(model, mesh=mesh, policy=policy, optimizer=partial if case == "optimizer" else opt,
                       spare_slots_per_gpu=1)
        try:
            bal.plan_step(make())
            out[case] = ("no error", "")
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out[case] = (type(exc).__name__, str(exc))
        now = model.state_dict()
        out[case + "_unchanged"] = all(torch.equal(now[k], snapshot[k]) for k in snapshot)
    # the world is still usable: a good step runs
    bal = Balancer(model, mesh=mesh, policy="static", optimizer=opt, spare_slots_per_gpu=1)
    bal.plan_step(good)
    with bal.micro_batch(0):
        model(data[0][rank][0]).sum().backward()
    out["good_step"] = True
    # bad input to forward on one rank: every rank raises the same error before the dispatch
    bal = Balancer(model, mesh=mesh, policy="replicate", optimizer=opt, spare_slots_per_gpu=1)
    bal.plan_step(good)
    x0 = data[0][rank][0]
    ids = good[0][:, 0].clone()
    if rank == 3:
        ids[0, 1] = 99
    forward_cases = {
        "fwd_tokens": lambda: model(x0[:-1] if rank == 1 else x0),  # fewer tokens than its routes
        "fwd_width": lambda: model.moe1(torch.zeros(len(x0), 9) if rank == 0 else x0),
    }
    for case, run in forward_cases.items():
        with bal.micro_batch(0):
            out[case] = outcome(run)
    out["fwd_routes"] = outcome(lambda: model.moe1(x0, routes=ids))  # no plan installed
    with bal.micro_batch(0):  # and the world still runs
        model(x0).sum().backward()
    out["fwd_good"] = True
    # a failed plan_step drops the previous plan: micro_batch must not run on stale routes
    try:
        bal.plan_step(bad_id())  # bad on rank 1 only: every rank raises
    except ValueError:
        pass
    else:
        out["stale"] = "plan_step did not raise"
        return out
    try:
        with bal.micro_batch(0):
            pass
        out["stale"] = "micro_batch ran"
    except RuntimeError as exc:
        out["stale"] = str(exc)
    return out


def test_bad_input_fails_on_every_rank_without_hang_or_change():
    results = run_world(_bad_input_worker, timeout=120)
    expect = {"id": ("rank 1", "not an expert id"), "shape": ("rank 3", "must have shape"),
              "dtype": ("rank 0", "integer expert ids"), "count": ("micro-batches: [2, 2, 1, 2]",),
              "raises": ("boom from a custom policy",), "invalid": ("holds two copies of expert 0",),
              "notaplan": ("not a relibra.Plan",),
              "optimizer": ("rank 2", "MoE layer 1 (moe2) experts.gate_up_proj", "optimizer state")}
    for case, needles in expect.items():
        same_error([r[case] for r in results], "ValueError", needles, case)
        assert all(r[case + "_unchanged"] for r in results), f"{case}: a weight changed"
    assert all(r["good_step"] for r in results)
    forward = {"fwd_tokens": ("MoE layer 0", "rank 1", "installed routes have shape (7, 2), but x holds 6 tokens"),
               "fwd_width": ("rank 0", "x must end in dim=8, got shape (6, 9)"),
               "fwd_routes": ("rank 3", "routes[0, 1] = 99 is not an expert id")}
    for case, needles in forward.items():
        same_error([r[case] for r in results], "ValueError", needles, case)
    assert all(r["fwd_good"] for r in results)
    for rank, r in enumerate(results):
        assert "no plan is installed" in r["stale"], f"rank {rank}: {r['stale']}"


def test_verl_uint8_routes_plan_and_run_like_int64():
    """verl ships routed experts as uint8: the Balancer takes them as they are (ids compared
    without wrapping -1 to 255), with the same plan and outputs as int64 routes."""
    torch.manual_seed(0)
    net = Net(None)
    data = step_data(0, M)
    results = []
    for dtype in (torch.int64, torch.uint8):
        bal = Balancer(net, None, "hybrid", spare_slots_per_gpu=1)
        plan = bal.plan_step([data[m][0][1].to(dtype) for m in range(M)])
        outs = []
        for m in range(M):
            with bal.micro_batch(m), torch.no_grad():
                outs.append(net(data[m][0][0]))
        results.append((plan, outs))
    (p64, o64), (p8, o8) = results
    assert p64.placement.equal(p8.placement) and torch.equal(p64.slot_tokens, p8.slot_tokens)
    assert all(torch.equal(a, b) for a, b in zip(o64, o8))


@pytest.mark.parametrize("kwargs,match", [
    (dict(spare_slots_per_gpu=-1), r"spare_slots_per_gpu must be an int >= 0, got -1"),
    (dict(spare_slots_per_gpu=1.5), r"spare_slots_per_gpu must be an int, got 1.5"),
    (dict(policy_options=["x"]), r"policy_options must be a dict of keyword options, got list"),
    (dict(replica_min_gain="0.1"), r"replica_min_gain must be a number in \[0, 1\), got '0.1'"),
    (dict(replica_min_gain=float("nan")), r"replica_min_gain must be a number in \[0, 1\), got nan"),
    (dict(defer_optimizer_state="yes"), r"defer_optimizer_state must be True, False or 'auto', got 'yes'"),
    (dict(overlap_micro_batches=0), r"overlap_micro_batches must be an int >= 1 or None, got 0"),
    (dict(overlap_micro_batches=True), r"overlap_micro_batches must be an int >= 1 or None, got True"),
])
def test_balancer_arguments_are_checked_by_name(kwargs, match):
    """Also without a mesh, where spare slots do not apply: a bad value is a mistake, not ignored."""
    with pytest.raises(ValueError, match=match):
        Balancer(Net(None), None, "static", **kwargs)


def _helper_deep_in_the_policy():
    raise RuntimeError("boom from a custom policy")


class _RaisesDeep:
    def plan(self, loads, topology):
        _helper_deep_in_the_policy()


class _Interrupts:
    def __init__(self, exc):
        self.exc = exc

    def plan(self, loads, topology):
        raise self.exc


def test_a_policy_error_keeps_its_traceback_and_an_interruption_propagates_single_process():
    data = step_data(0, M)
    routes = [torch.cat([r for _, r in data[m]]) for m in range(M)]
    with pytest.raises(ValueError, match=r"policy '_RaisesDeep' failed: RuntimeError: boom") as info:
        Balancer(Net(None), None, _RaisesDeep()).plan_step(routes)
    assert isinstance(info.value.__cause__, RuntimeError), "the policy's exception is not chained"
    assert "in _helper_deep_in_the_policy" in str(info.value), str(info.value)
    with pytest.raises(KeyboardInterrupt):
        Balancer(Net(None), None, _Interrupts(KeyboardInterrupt())).plan_step(routes)


def _interrupt_worker(rank, mesh):
    """Rank 0's policy raises (the others never run it): what does every rank raise?"""
    torch.manual_seed(0)
    model = Net(mesh)
    data = step_data(0, M)
    good = [data[m][rank][1] for m in range(M)]
    out = {}
    for case, policy in (("traceback", _RaisesDeep()), ("keyboard", _Interrupts(KeyboardInterrupt())),
                         ("exit", _Interrupts(SystemExit(3)))):
        bal = Balancer(model, mesh=mesh, policy=policy, spare_slots_per_gpu=1)
        try:
            bal.plan_step(good)
            out[case] = ("no error", "", "")
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else ""
            out[case] = (type(exc).__name__, str(exc), cause)
            out[case + "_code"] = exc.code if isinstance(exc, SystemExit) else None
        bal = Balancer(model, mesh=mesh, policy="static", spare_slots_per_gpu=1)  # the world still runs
        bal.plan_step(good)
        with bal.micro_batch(0):
            model(data[0][rank][0]).sum().backward()
        out[case + "_then"] = True
    return out


def test_policy_tracebacks_and_interruptions_on_rank_0_reach_every_rank():
    results = run_world(_interrupt_worker, timeout=120)  # a peer left waiting would time out here
    kinds = {r["traceback"][:2] for r in results}
    assert len(kinds) == 1, f"ranks raised different errors: {kinds}"
    kind, msg = kinds.pop()
    assert kind == "ValueError" and "policy '_RaisesDeep' failed: RuntimeError: boom from a custom policy" in msg
    assert "traceback on rank 0:" in msg and "in _helper_deep_in_the_policy" in msg, msg
    assert [r["traceback"][2] for r in results] == ["RuntimeError", "", "", ""], "rank 0 does not chain the cause"
    for case, interruption, shown in (("keyboard", "KeyboardInterrupt", "KeyboardInterrupt()"),
                                      ("exit", "SystemExit", "SystemExit(3)")):
        assert results[0][case][0] == interruption, results[0][case]
        for rank, r in enumerate(results[1:], start=1):
            kind, msg, _ = r[case]
            assert kind == "RuntimeError", f"rank {rank}: {kind}: {msg}"
            assert f"planning was interrupted on rank 0 by {shown}" in msg, msg
    assert results[0]["exit_code"] == 3
    assert all(r[case + "_then"] for r in results for case in ("traceback", "keyboard", "exit"))
