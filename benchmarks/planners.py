"""Planning speed and balance of every policy at the DeepSeek-V3 shape, one CPU thread.

    python benchmarks/planners.py [--nodes 8,16,32] [--spare-slots 1] [--loads trace|uniform]
        [--steps 3] [--micro-batches 16] [--seed 0] [--concentration 64] [--tokens-per-gpu 1024]

Shape: 58 MoE layers, 256 experts, top-8, N nodes x 8 GPUs (one table per N), 1 spare slot per
GPU (``--spare-slots``). Loads (``--loads trace``): relibra.sim.traces' GRPO generator around
DeepSeek-V3's real popularity (SGLang ``prefill_in4096`` counts shipped in relibra/sim/data):
groups of 16 responses share a per-layer expert mix ``Dirichlet(concentration * popularity)``,
``--tokens-per-gpu`` tokens per GPU per micro-batch (65,536 per micro-batch at 8 x 8). Seeded,
so runs repeat. ``--loads uniform``: the README's example instead, ``torch.randint(0, 4000,
[M, 58, 256])`` every step (seeded). ``replicate`` and ``hybrid`` run with their defaults
(cross-node replicas priced for DeepSeek-V3 on H100, reorder's default work budget).

Prints, per policy: ms per step (all micro-batches, reorder included; mean, and the slowest
step's CPU time: a fresh policy's first step searches from scratch), ms per micro-batch,
mean and worst imbalance (busiest GPU / mean GPU, over micro-batches and layers), and mean
node imbalance (busiest node / mean node). Timings are process CPU time (the development
machines are shared) and wall time. Budgets (issue 17, at 32 x 8): ``hybrid`` at most 1 s per
step, ``replicate`` at most 5 ms per micro-batch.
"""

from __future__ import annotations

import argparse
import time

import torch

import relibra
from relibra.plan import Placement
from relibra.policies.eplb_reference import rebalance_experts_loop
from relibra.sim.traces import TraceConfig, generate


def imbalance_of_phy2log(phy2log_LR: torch.Tensor, logcnt_LE: torch.Tensor, loads_MLE: torch.Tensor,
                         num_gpus: int) -> torch.Tensor:
    """``[M, L]`` busiest / mean GPU when every expert's load is split evenly over its copies."""
    share = loads_MLE.double() / logcnt_LE.double()  # [M, L, E]
    M, L, _ = loads_MLE.shape
    per_slot = share.gather(2, phy2log_LR.expand(M, -1, -1))
    gpu = per_slot.view(M, L, num_gpus, -1).sum(-1)
    mean = gpu.mean(-1)
    return torch.where(mean > 0, gpu.amax(-1) / mean.clamp(min=1e-30), torch.ones_like(mean))


def run(args, nodes: int) -> list[tuple]:
    torch.set_num_threads(1)
    topo = relibra.Topology(num_nodes=nodes, gpus_per_node=8, num_experts=256, spare_slots_per_gpu=args.spare_slots,
                            num_expert_groups=8)
    if args.loads == "uniform":
        g = torch.Generator().manual_seed(args.seed)
        steps = torch.randint(0, 4000, (args.steps, args.micro_batches, 58, 256), generator=g)
    else:
        trace = TraceConfig(steps=args.steps, micro_batches=args.micro_batches,
                            tokens_per_micro_batch=args.tokens_per_gpu * topo.num_gpus,
                            concentration=args.concentration, seed=args.seed)
        steps = torch.from_numpy(generate(trace))
    candidates = [("static", {}), ("reorder", {}), ("replicate", {}), ("hybrid", {}),
                  ("eplb", {"source": "oracle"}), ("eplb", {"source": "history"})]
    rows = []
    for name, options in candidates:
        policy = relibra.get_policy(name, **options)
        cpu = wall = slowest = 0.0
        imb, node_imb = [], []
        for loads in steps:
            c0, w0 = time.process_time(), time.perf_counter()
            plan = policy.plan(loads, topo)
            cpu += time.process_time() - c0
            slowest = max(slowest, time.process_time() - c0)
            wall += time.perf_counter() - w0
            plan.validate(topo, loads)
            imb.append(plan.imbalance(loads))
            nl = plan.node_loads().double()
            node_imb.append(nl.amax(-1) / nl.mean(-1).clamp(min=1e-30))
        imb, node_imb = torch.stack(imb), torch.stack(node_imb)
        label = name + (f"({','.join(f'{k}={v}' for k, v in options.items())})" if options else "")
        rows.append((label, cpu, wall, slowest, float(imb.mean()), float(imb.max()), float(node_imb.mean())))
    # replicate one micro-batch at a time, on a fixed placement
    policy = relibra.get_policy("replicate")
    placement = Placement.contiguous(topo, steps.shape[2])
    cpu = wall = 0.0
    for loads in steps:
        for mb in loads:
            c0, w0 = time.process_time(), time.perf_counter()
            policy.replan(mb[None], placement, topo)
            cpu += time.process_time() - c0
            wall += time.perf_counter() - w0
    rows.append(("replicate, 1 micro-batch/call", cpu, wall, float("nan"), float("nan"), float("nan"), float("nan")))
    cpu = wall = 0.0
    imb = []
    for loads in steps:
        c0, w0 = time.process_time(), time.perf_counter()
        phy2log, _, logcnt = rebalance_experts_loop(loads.sum(0).double(), topo.num_physical_slots,
                                                    topo.num_expert_groups, topo.num_nodes, topo.num_gpus)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        imb.append(imbalance_of_phy2log(phy2log, logcnt, loads, topo.num_gpus))
    imb = torch.stack(imb)
    rows.append(("eplb loop reference(oracle)", cpu, wall, float("nan"), float(imb.mean()), float(imb.max()),
                 float("nan")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="8,16,32", help="node counts, one table each")
    parser.add_argument("--tokens-per-gpu", type=int, default=1024)
    parser.add_argument("--spare-slots", type=int, default=1)
    parser.add_argument("--loads", choices=["trace", "uniform"], default="trace")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concentration", type=float, default=64.0)
    args = parser.parse_args()
    S, M = args.steps, args.micro_batches
    for nodes in (int(n) for n in args.nodes.split(",") if n.strip()):
        rows = run(args, nodes)
        loads = "uniform random loads in [0, 4000)" if args.loads == "uniform" else \
            f"{args.tokens_per_gpu} tokens per GPU, concentration {args.concentration:g}"
        print(f"DeepSeek-V3 shape: 58 layers x 256 experts, {nodes}x8 GPUs, {args.spare_slots} spare/GPU, {M} "
              f"micro-batches, {loads}, {S} steps, 1 thread")
        head = f"{'policy':30s} {'ms/step cpu':>11s} {'ms/step wall':>12s} {'max ms/step':>11s} {'ms/mb cpu':>9s} " \
               f"{'imb mean':>8s} {'imb worst':>9s} {'node imb':>8s}"
        print(head)
        print("-" * len(head))
        for label, cpu, wall, slowest, mean, worst, node in rows:
            print(f"{label:30s} {cpu / S * 1e3:11.1f} {wall / S * 1e3:12.1f} {slowest * 1e3:11.1f} "
                  f"{cpu / S / M * 1e3:9.2f} {mean:8.3f} {worst:9.3f} {node:8.3f}")
        print()


if __name__ == "__main__":
    main()
