"""A step of several passes on a gloo world (2 nodes x 2 GPUs): a forward-only log-prob pass whose
first micro-batch (or all of it, ``overlap_micro_batches=None``) runs on the placement of the step
before while the step's placement is planned in the background, the experts moved once, two
training passes with an optimizer step between them; every pass's outputs and every gradient
equal ``static``'s. Bad schedules raise the same error on every rank."""

from __future__ import annotations

import pytest
import torch
from _moe_world import Net, allreduce_dense_grads, logical_grads, max_err, outcome, same_error, step_data

from relibra.runtime.balancer import Balancer
from relibra.testing import run_world

Z = 6  # sequences per rank and step (step_data's micro-batches of one rank; rank 2's second is empty)
SCHEDULE = [("logprob", [[0, 1], [2, 3], [4, 5]]),      # rollout order
            ("train", [[0, 3], [1, 4], [2, 5]]),        # packed otherwise: first mini-batch ...
            ("train", [[5, 0], [4], [3, 1, 2]])]        # ... and a second epoch, reshuffled
POLICIES = ("hybrid", "replicate", "eplb", "reorder")


#: how the log-prob pass overlaps planning: its first micro-batch (the default), all of it, none
MODES = (1, None, False)


def _run(rank, mesh, init, policy: str, mode: int | None | bool, steps: int = 2) -> dict:
    """Two steps of the schedule: logprob outputs, training outputs, gradients, final weights, and
    per step whether each log-prob micro-batch ran on the placement the step started on."""
    model = Net(mesh)
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    spare = 0 if policy == "static" else 1
    # placement_min_gain=0: every planned placement is adopted, so the migration is exercised
    bal = Balancer(model, mesh=mesh, policy=policy, optimizer=opt, spare_slots_per_gpu=spare, placement_min_gain=0,
                   overlap_micro_batches=1 if mode is False else mode)
    out = {"logprob": [], "train": [], "grads": [], "moved": 0, "on_previous": [], "logprob_replicas": 0}
    for s in range(steps):
        seqs = [d[rank] for d in step_data(s, Z, hold=2)]
        before = bal.placement
        bal.plan_step([routes for _, routes in seqs], phases=SCHEDULE, overlap=mode is not False)
        on_previous = []
        for k, (name, groups) in enumerate(SCHEDULE):
            for m, group in enumerate(groups):
                x = torch.cat([seqs[z][0] for z in group])
                if name == "logprob":
                    with torch.no_grad(), bal.micro_batch(m, "logprob"):
                        out["logprob"].append(model(x))
                        out["logprob_replicas"] += int(bal.plan.replicas()[m].sum())
                    on_previous.append(bal.placement.equal(before))
                else:
                    with bal.micro_batch(m, k):
                        y = model(x)
                        y.square().sum().backward()
                    out["train"].append(y.detach().clone())
            if name == "train":
                allreduce_dense_grads(model)
                out["grads"].append(logical_grads(model))
                opt.step()
                opt.zero_grad()
        moved = bal.metrics()["experts_moved"]
        out["moved"] += moved
        out["on_previous"].append((on_previous, moved))
        metrics = bal.metrics(gather_realised=True)
        out["rows"] = (metrics["pass_phases"], metrics["pass_micro_batches"], len(metrics["realised_gpu_loads"]),
                       len(metrics["planned_max_vio"]))
    out["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def _diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))


def _exact_worker(rank, mesh):
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in Net(None).state_dict().items()}
    ref = _run(rank, mesh, init, "static", 1)
    out = {}
    for policy in POLICIES:
        for mode in MODES:
            got = _run(rank, mesh, init, policy, mode)
            out[policy, mode] = dict(logprob=_diff(ref["logprob"], got["logprob"]),
                                        train=_diff(ref["train"], got["train"]),
                                        grads=max(max_err(a, b) for a, b in zip(ref["grads"], got["grads"])),
                                        weights=max_err(ref["weights"], got["weights"]), moved=got["moved"],
                                        on_previous=got["on_previous"], rows=got["rows"],
                                        logprob_replicas=got["logprob_replicas"])
    return out


@pytest.fixture(scope="module")
def exact():
    return run_world(_exact_worker, timeout=400)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", MODES)
def test_every_pass_equals_static(exact, policy, mode):
    early = {1: 1, None: 3, False: 0}[mode]  # log-prob micro-batches on the step before's placement
    for rank, res in enumerate(exact):
        r = res[policy, mode]
        for key in ("logprob", "train", "grads", "weights"):
            assert r[key] < 2e-5, f"rank {rank} {policy} mode={mode}: {key} differs by {r[key]}"
        # the early micro-batches run on the placement the step started on, the rest on the step's
        for on_previous, moved in r["on_previous"]:
            assert on_previous == [True] * early + [not moved] * (3 - early), (rank, policy, mode, on_previous)
        assert r["rows"] == (["logprob", "train", "train"], [3, 3, 3], 9, 9)
    if policy in ("hybrid", "reorder", "eplb"):
        assert any(res[policy, mode]["moved"] > 0 for res in exact), "no expert moved: the migration is untested"
    if policy != "reorder":  # replicas in the log-prob pass too (planned by the policy's replan)
        assert exact[0][policy, mode]["logprob_replicas"] > 0, "no replica in the log-prob pass: untested"



class _Failing:
    """A policy whose planning fails (in the background, while the log-prob pass runs)."""

    def plan(self, loads, topology):
        raise RuntimeError("no placement today")


def _misuse_worker(rank, mesh):
    torch.manual_seed(0)
    model = Net(mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    bal = Balancer(model, mesh=mesh, policy="hybrid", optimizer=opt, spare_slots_per_gpu=1)
    seqs = [d[rank] for d in step_data(0, Z, hold=2)]
    routes = [r for _, r in seqs]

    def batch(group):
        return torch.cat([seqs[z][0] for z in group])

    def fwd(m, phase, group):
        with torch.no_grad(), bal.micro_batch(m, phase):
            model(batch(group))

    def train(m, phase, group):
        with bal.micro_batch(m, phase):
            model(batch(group)).square().sum().backward()

    out = {}
    ghost = [("train", [[0, 1], [2, 9 if rank == 3 else 3]])]
    out["ghost"] = outcome(lambda: bal.plan_step(routes, phases=ghost))
    twice = [("train", [[0, 1], [1, 2]])]
    out["twice"] = outcome(lambda: bal.plan_step(routes, phases=twice))
    apart = [("logprob", [[0, 1, 2], [3, 4, 5]])] + ([("train", [[0, 1, 2], [3, 4, 5]])] if rank else
                                                     [("train", [[0, 1], [2, 3], [4, 5]])])
    out["apart"] = outcome(lambda: bal.plan_step(routes, phases=apart))
    out["no_train"] = outcome(lambda: bal.plan_step(routes, phases=[("logprob", [[0, 1]])]))
    bal.plan_step(routes, phases=SCHEDULE)
    out["ambiguous"] = outcome(lambda: train(0, "train", [0, 3]))
    fwd(0, "logprob", [0, 1])
    out["skip_back"] = outcome(lambda: fwd(0, "logprob", [0, 1]) or train(0, 1, [0, 3]) or fwd(1, 0, [2, 3]))
    bal.plan_step(routes, phases=SCHEDULE)
    fwd(0, "logprob", [0, 1])
    bal.prepare_training()  # explicit: the experts move now
    out["logprob_after_move"] = outcome(lambda: fwd(0, "logprob", [0, 1]))  # planned on the placement they left
    bal.plan_step(routes, phases=SCHEDULE)
    out["fine_after"] = outcome(lambda: [train(m, 1, g) for m, g in enumerate(SCHEDULE[1][1])])
    other = Net(mesh)
    failing = Balancer(other, mesh=mesh, policy=_Failing(), spare_slots_per_gpu=1)
    failing.plan_step(routes, phases=SCHEDULE)  # the log-prob pass's replicas plan fine: the policy has no replan

    def logprob_then_train():
        for m, g in enumerate(SCHEDULE[0][1]):
            with torch.no_grad(), failing.micro_batch(m, "logprob"):
                other(batch(g))
        with failing.micro_batch(0, 1):
            pass
    out["policy_fails"] = outcome(logprob_then_train)
    out["policy_fails/then"] = outcome(lambda: failing.micro_batch(0, 1).__enter__())
    return out


@pytest.fixture(scope="module")
def misuse():
    return run_world(_misuse_worker, timeout=240)


@pytest.mark.parametrize("case,kind,needles", [
    ("ghost", "ValueError", ("Balancer.plan_step: bad input: rank 3: phases[0] (train) micro-batch 1 names sequence 9",
                             "this rank has 6 sequences", "nothing was changed on any rank")),
    ("twice", "ValueError", ("puts sequence 1 in two micro-batches",)),
    ("apart", "ValueError", ("ranks disagree on the schedule", "rank 0: logprob x2, train (pass 1) x3",
                             "rank 1: logprob x2, train (pass 1) x2")),
    ("no_train", "ValueError", ("has no training pass",)),
    ("ambiguous", "ValueError", ("phase='train' names passes [1, 2]; give the pass index",)),
    ("skip_back", "ValueError", ("pass 0 (logprob) after pass 1 (train): the passes of a step run in schedule order",)),
    ("logprob_after_move", "ValueError", ("micro-batch 0 of pass 0 (logprob) was planned on the placement of the "
                                          "step before, and the experts have moved since",)),
    ("fine_after", "no error", ()),
    ("policy_fails", "ValueError", ("Balancer.plan_step: policy '_Failing' failed: RuntimeError: no placement today",
                                    "nothing was changed on any rank")),
    ("policy_fails/then", "RuntimeError", ("no plan is installed",)),
])
def test_bad_schedules_and_misuse_raise_the_same_error_on_every_rank(misuse, case, kind, needles):
    same_error([r[case] for r in misuse], kind, needles, case)
