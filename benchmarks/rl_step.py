"""An RL step on real ranks: the step's placement planned while the log-prob pass runs, against planned first.

    python benchmarks/rl_step.py [--world 2] [--layers 8] [--experts 32] [--dim 64] [--hidden 128]
        [--top-k 4] [--sequences 16] [--tokens 96] [--micro-batches 4] [--steps 4] [--plan-cost deepseek]

CPU gloo world (``--world`` ranks on one node). Every rank holds ``--layers`` ReLibraMoE layers,
and every step ``--sequences`` sequences of about ``--tokens`` tokens with GRPO-like routes (groups
of 4 sequences share two hot experts per layer). The step is ``logprob`` (forward only, no grad,
rollout order: a group's sequences side by side) then ``train`` (forward + backward, the
sequences packed by their routes with :func:`relibra.packing.pack` on each rank), one AdamW step.
Policy ``hybrid``.

Three Balancers with the same weights take turns step by step (machine noise hits all alike):

- ``blocking``: ``plan_step(..., overlap=False)`` plans the placement and moves the experts before
  the log-prob pass (as relibra did before phases);
- ``overlap-1`` (the Balancer's default, ``overlap_micro_batches=1``): ``plan_step`` plans only
  the first log-prob micro-batch's replicas on the current placement; rank 0 plans the placement
  in a thread while it runs; the second log-prob micro-batch waits for it
  (``planning_wait_seconds``), shares it and moves the experts;
- ``overlap-all`` (``overlap_micro_batches=None``): the whole log-prob pass on the current
  placement; the first training micro-batch waits, shares and moves.

``--plan-cost deepseek`` (default) makes the planning as costly as at full size: the policy's
``plan`` first runs ``hybrid``'s planner for real on a DeepSeek-V3-sized step (8 x 8 GPUs, 8
micro-batches x 58 layers x 256 experts of skewed loads) and drops that result, then plans the
benchmark's own small step. ``none``: the small step's planning only (milliseconds). Printed per
mode: median seconds on rank 0 over the steps after the first of ``plan_step``, the log-prob
pass, the wait for the background plan (and the share + move with it: inside the log-prob pass
for ``overlap-1``, inside the training pass for ``overlap-all``), the training pass and the whole
step, and rank 0's planning time; then one step as a timeline. Wall-clock on
a shared CPU: the planning thread competes with rank 0's own forward for cores and the GIL.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from relibra import Balancer, ReLibraMoE, get_policy
from relibra.packing import pack
from relibra.routing import count_loads
from relibra.testing import run_world
from relibra.topology import Topology

MODES = ("blocking", "overlap-1", "overlap-all")


class CostlyPlan:
    """``policy`` whose ``plan`` first plans a DeepSeek-V3-sized step with ``hybrid`` (result dropped)."""

    def __init__(self, policy) -> None:
        self.policy, self.replan = policy, policy.replan
        g = torch.Generator().manual_seed(0)
        hot = torch.rand(58, 256, generator=g).pow(8) * 40 + 1
        self.big_loads = (torch.rand(8, 58, 256, generator=g) * hot * 64).to(torch.int64)
        self.big_topology = Topology(8, 8, 256, 1, 8)
        self.big = get_policy("hybrid")

    def plan(self, loads, topology):
        self.big.plan(self.big_loads, self.big_topology)
        return self.policy.plan(loads, topology)


def sequences(step: int, rank: int, a) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(x [T, D], routes [T, L, K])`` of every sequence: groups of 4 share two hot experts per layer."""
    g = torch.Generator().manual_seed(7919 * step + 31 * rank)
    xs, routes = [], []
    for z in range(a.sequences):
        group = z // 4
        T = a.tokens // 2 + int(torch.randint(0, a.tokens, (), generator=g))
        scores = torch.rand(T, a.layers, a.experts, generator=g)
        hot = (torch.arange(a.layers)[:, None] * 7 + torch.tensor([0, a.experts // 2 + 1]) + 5 * group + 3 * step) \
            % a.experts  # [L, 2]
        boost = torch.rand(T, a.layers, 2, generator=g) < 0.5
        scores.scatter_add_(2, hot.expand(T, -1, -1), boost.float() * 2)
        routes.append(scores.topk(a.top_k, dim=-1).indices)
        xs.append(torch.randn(T, a.dim, generator=g))
    return xs, routes


def worker(rank, mesh, a):
    runs = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = nn.Sequential(*[ReLibraMoE(a.dim, a.hidden, a.experts, a.top_k, mesh) for _ in range(a.layers)])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        policy = get_policy("hybrid")
        policy = CostlyPlan(policy) if a.plan_cost == "deepseek" else policy
        runs[mode] = (model, opt, Balancer(model, mesh=mesh, policy=policy, optimizer=opt, spare_slots_per_gpu=1,
                                           overlap_micro_batches=None if mode == "overlap-all" else 1))
    times = {mode: [] for mode in MODES}
    M = a.micro_batches
    rollout = [list(range(m * a.sequences // M, (m + 1) * a.sequences // M)) for m in range(M)]
    for step in range(a.steps):
        xs, routes = sequences(step, rank, a)
        tokens = torch.tensor([len(x) for x in xs])
        for mode in MODES:
            model, opt, bal = runs[mode]
            budget = int(tokens.sum()) // M + int(tokens.max()) + 1
            packed = pack(count_loads(routes, a.experts), tokens, M, budget, bal.placement, bal.topology,
                          start=torch.tensor([m for m, g in enumerate(rollout) for _ in g])).groups()
            t = {"start": time.perf_counter()}
            bal.plan_step(routes, phases=[("logprob", rollout), ("train", packed)], overlap=mode != "blocking")
            t["plan_step"] = time.perf_counter()
            with torch.no_grad():
                for m, group in enumerate(rollout):
                    with bal.micro_batch(m, "logprob"):
                        model(torch.cat([xs[z] for z in group]))
            t["logprob"] = time.perf_counter()
            for m, group in enumerate(packed):
                with bal.micro_batch(m, "train"):
                    if m == 0:
                        t["first_train_entered"] = time.perf_counter()
                    model(torch.cat([xs[z] for z in group])).square().mean().backward()
            opt.step()
            opt.zero_grad()
            t["train"] = time.perf_counter()
            metrics = bal.metrics()
            times[mode].append(dict(
                plan_step=t["plan_step"] - t["start"], logprob=t["logprob"] - t["plan_step"],
                prepare=metrics.get("prepare_training_seconds", 0.0), wait=metrics["planning_wait_seconds"],
                train=t["train"] - t["logprob"], total=t["train"] - t["start"],
                planning=metrics["planning_seconds"]))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--plan-cost", choices=("deepseek", "none"), default="deepseek")
    a = ap.parse_args()
    times = run_world(worker, world_size=a.world, nodes=1, args=(a,), timeout=3600)[0]
    print(f"RL step on {a.world} CPU gloo ranks: {a.layers} MoE layers x {a.experts} experts (top-{a.top_k}, dim "
          f"{a.dim}, hidden {a.hidden}), {a.sequences} sequences of ~{a.tokens} tokens per rank, {a.micro_batches} "
          f"micro-batches per pass, hybrid, plan cost {a.plan_cost}; rank 0 wall seconds, median of steps 2..{a.steps}")
    keys = ("plan_step", "logprob", "wait", "prepare", "train", "total", "planning")
    print(f"{'mode':12s}" + "".join(f"{k:>11s}" for k in keys))
    for mode in MODES:
        steady = times[mode][1:]
        print(f"{mode:12s}" + "".join(f"{statistics.median(s[k] for s in steady):11.3f}" for k in keys))
    for mode in MODES:
        s = times[mode][-1]
        moved = s["prepare"] - s["wait"] if mode != "blocking" else 0.0
        where = "second log-prob" if mode == "overlap-1" else "first training"
        print(f"\n{mode} (last step): plan_step {s['plan_step']:.3f}s"
              + (f" [planning {s['planning']:.3f}s and the move inside]" if mode == "blocking" else
                 f" [early replicas only; planning {s['planning']:.3f}s runs in a thread from here]")
              + f" | logprob {s['logprob']:.3f}s"
              + (f" | the {where} micro-batch waits {s['wait']:.3f}s, share + move {moved:.3f}s"
                 if mode != "blocking" else "")
              + f" | train {s['train']:.3f}s | step {s['total']:.3f}s")
    print("\nplan_step: the call; logprob: the log-prob pass; wait: the micro-batch after the early ones waiting "
          "for the background plan; prepare: that wait plus sharing the plan and moving the experts (inside "
          "logprob for overlap-1, inside train for overlap-all); train: the training pass with the optimizer step; "
          "planning: rank 0's policy.plan")


if __name__ == "__main__":
    main()
