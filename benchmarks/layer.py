"""Step time of ReLibraMoE (forward + backward) under each policy, CPU gloo, world 4 = 2 nodes x 2.

    python benchmarks/layer.py [--dim 256 --hidden 512 --experts 16 --top-k 2 --tokens 512 \
                                --micro-batches 4 --steps 3]

Per policy and route kind (uniform: every expert equally likely; skewed: two hot experts that
change every micro-batch take 60 % of the first choice), prints the min and median over steps
of the slowest rank's fwd+bwd time for the step's micro-batches (policies interleave step by
step so machine noise hits all alike; min is the robust figure on shared CPUs), the ratio of
mins to ``static``, the median CPU seconds of fwd+bwd summed over ranks (less sensitive to
other processes on the box than wall time) and its ratio to ``static``, the plan_step time
(incl. migration) and the planned GPU-load imbalance
(busiest / mean GPU). CPU ranks share cores, so balance itself cannot speed anything up here:
the table measures what the machinery costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from relibra import Balancer, ReLibraMoE, available_policies
from relibra.testing import run_world

POLICIES = ("static", "eplb", "reorder", "replicate", "hybrid")


def make_routes(kind, step, m, rank, T, L, E, K):
    g = torch.Generator().manual_seed(hash((kind, step, m, rank)) % (2**31))
    scores = torch.rand(T, L, E, generator=g)
    if kind == "skewed":
        hot = torch.tensor([(5 * step + 3 * m) % E, (5 * step + 3 * m + E // 2 + 1) % E])
        pick = torch.rand(T, L, generator=g) < 0.6
        which = hot[torch.randint(0, 2, (T, L), generator=g)]
        scores[pick] = scores[pick].scatter(1, which[pick][:, None], 2.0)
    return scores.topk(K, dim=-1).indices


def worker(rank, mesh, a):
    names = [n for n in POLICIES if n in available_policies()]
    rows = []
    for kind in ("uniform", "skewed"):
        runs = {}
        for name in names:  # one model per policy, same initial weights
            torch.manual_seed(0)
            model = nn.ModuleList([ReLibraMoE(a.dim, a.hidden, a.experts, a.top_k, mesh) for _ in range(a.layers)])
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            runs[name] = (
                model,
                opt,
                Balancer(model, mesh=mesh, policy=name, optimizer=opt, spare_slots_per_gpu=1),
                [],
                [],
                [],
                [],
            )
        for step in range(a.steps + 1):  # step 0 warms up; policies interleave to share the noise
            routes = [
                make_routes(kind, step, m, rank, a.tokens, a.layers, a.experts, a.top_k) for m in range(a.micro_batches)
            ]
            xs = [torch.randn(a.tokens, a.dim) for _ in range(a.micro_batches)]
            for name in names:
                model, opt, bal, step_times, plan_times, imb, cpu_times = runs[name]
                dist.barrier()
                t0 = time.perf_counter()
                bal.plan_step(routes)
                t1 = time.perf_counter()
                c1 = time.process_time()
                for m, x in enumerate(xs):
                    with bal.micro_batch(m):
                        h = x
                        for layer in model:
                            h = layer(h)
                        h.square().mean().backward()
                t2 = time.perf_counter()
                cpu = torch.tensor([time.process_time() - c1], dtype=torch.float64)
                opt.zero_grad()
                worst = torch.tensor([t2 - t1, t1 - t0], dtype=torch.float64)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                dist.all_reduce(cpu)
                if step:
                    step_times.append(float(worst[0]))
                    cpu_times.append(float(cpu))
                    plan_times.append(float(worst[1]))
                    imb.append(bal.metrics()["planned_imbalance"])
        for name in names:
            _, _, _, step_times, plan_times, imb, cpu_times = runs[name]
            rows.append(
                (
                    kind,
                    name,
                    min(step_times),
                    statistics.median(step_times),
                    statistics.median(cpu_times),
                    statistics.median(plan_times),
                    statistics.mean(imb),
                )
            )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank per micro-batch")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    rows = run_world(worker, args=(a,), timeout=1800)[0]
    print(
        f"ReLibraMoE fwd+bwd per step, gloo CPU, 2 nodes x 2 ranks, dim {a.dim}, hidden {a.hidden}, "
        f"E {a.experts}, top-{a.top_k}, {a.layers} layers, {a.tokens} tokens/rank x {a.micro_batches} micro-batches"
    )
    print(
        f"{'routes':8} {'policy':10} {'min s':>8} {'median s':>9} {'min/static':>11} "
        f"{'cpu s':>7} {'cpu/static':>11} {'plan s':>8} {'planned imb':>12}"
    )
    base = {kind: (t, c) for kind, name, t, _, c, *_ in rows if name == "static"}
    for kind, name, t, tmed, c, tp, imb in rows:
        print(
            f"{kind:8} {name:10} {t:8.3f} {tmed:9.3f} {t / base[kind][0]:10.2f}x "
            f"{c:7.3f} {c / base[kind][1]:10.2f}x {tp:8.3f} {imb:12.2f}"
        )


if __name__ == "__main__":
    main()
