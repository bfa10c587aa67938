"""EPLB speed: the fast ``rebalance_experts`` against the per-layer loop reference.

    python benchmarks/eplb.py [--repeats 15] [--data FILE.json] [--micro-batches 16]

Shape: DeepSeek-V3, 58 MoE layers x 256 experts, 8 nodes x 8 GPUs, 320 physical slots
(5 per GPU). ``hierarchical`` uses 8 expert groups (groups packed onto nodes), ``global``
one group (the reference's fallback). Loads: real SGLang counts of DeepSeek-V3, by default
``prefill_in1024`` as shipped with the tests (``tests/policies/data``); ``--data`` reads
another file of that release (``{"logical_count": [[...]]}``, dense rows dropped).

Method: one thread; the loop reference (:mod:`relibra.policies.eplb_reference`) and the
fast function run interleaved, one call each per repeat, and each reports its best repeat,
in process CPU time (what the shared development machines distort least) and in wall time.
``identical`` compares all three outputs bit for bit. Interleaving is the harsh case for the
fast side: each of its calls starts right after tens of ms of Python in the loop reference,
with its arrays and NumPy's code out of the caches. A second table times each function
back-to-back, ``timeit``-style (``--repeats`` calls in a row, best call), as a planner called
in a tight loop would see it. The last rows time the ``eplb`` policy
(``EplbPolicy(source="oracle").plan``) on ``--micro-batches`` micro-batches that split the
same loads, next to the ``rebalance_experts`` call it is built around.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import relibra
from relibra.policies.eplb import EplbPolicy, rebalance_experts
from relibra.policies.eplb_reference import rebalance_experts_loop

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "tests/policies/data/deepseek_v3_expert_load.npz"
NODES, GPUS, SLOTS = 8, 64, 320


def real_weight(path: str | None) -> tuple[torch.Tensor, str]:
    """``[58, 256]`` float64 loads and a line saying where they came from."""
    if path is None:
        with np.load(SHIPPED, allow_pickle=False) as data:
            return torch.from_numpy(data["prefill_in1024"].astype(np.float64)), "real loads prefill_in1024 (shipped)"
    counts = np.asarray(json.loads(Path(path).read_text())["logical_count"], dtype=np.float64)
    return torch.from_numpy(counts[counts.sum(1) > 0].copy()), f"real loads {Path(path).name}"


def timed(fn, *args):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    return out, time.process_time() - c0, time.perf_counter() - w0


def split_loads(weight_LE: torch.Tensor, M: int, seed: int = 0) -> torch.Tensor:
    """``[M, L, E]`` int64 micro-batch loads summing to ``weight`` (each token copy to a random micro-batch)."""
    gen = torch.Generator().manual_seed(seed)
    remaining = weight_LE.round().double()
    out = torch.zeros(M, *weight_LE.shape, dtype=torch.int64)
    for m in range(M - 1):  # binomial split of what is left: exact totals
        share = torch.binomial(remaining, torch.full_like(remaining, 1.0 / (M - m)), generator=gen)
        out[m] = share.to(torch.int64)
        remaining -= share
    out[M - 1] = remaining.to(torch.int64)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--data", default=None, help="SGLang expert-load JSON (default: the shipped prefill_in1024)")
    parser.add_argument("--micro-batches", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    weight, source = real_weight(args.data)
    ref = rebalance_experts_loop
    modes = (("hierarchical", 8), ("global", 1))
    best = {(m, k): [float("inf"), float("inf")] for m, _ in modes for k in ("loop", "fast")}
    identical = {m: True for m, _ in modes}
    for _ in range(args.repeats):
        for mode, groups in modes:
            call = (weight, SLOTS, groups, NODES, GPUS)
            want, cpu, wall = timed(ref, *call)
            best[mode, "loop"] = [min(best[mode, "loop"][0], cpu), min(best[mode, "loop"][1], wall)]
            got, cpu, wall = timed(rebalance_experts, *call)
            best[mode, "fast"] = [min(best[mode, "fast"][0], cpu), min(best[mode, "fast"][1], wall)]
            identical[mode] &= all(torch.equal(a, b) for a, b in zip(got, want))

    back_to_back = {}
    for mode, groups in modes:
        call = (weight, SLOTS, groups, NODES, GPUS)
        for name, fn in (("loop", ref), ("fast", rebalance_experts)):
            runs = [timed(fn, *call)[1:] for _ in range(args.repeats)]
            back_to_back[mode, name] = [min(r[0] for r in runs), min(r[1] for r in runs)]

    loads = split_loads(weight, args.micro_batches)
    plan_best = {}
    for mode, groups in modes:
        topo = relibra.Topology(num_nodes=NODES, gpus_per_node=GPUS // NODES, num_experts=weight.shape[1],
                                spare_slots_per_gpu=1, num_expert_groups=groups)
        policy = EplbPolicy(source="oracle")
        plan_cpu = plan_wall = core_cpu = core_wall = float("inf")
        for _ in range(args.repeats):
            _, cpu, wall = timed(policy.plan, loads, topo)
            plan_cpu, plan_wall = min(plan_cpu, cpu), min(plan_wall, wall)
            _, cpu, wall = timed(rebalance_experts, loads.sum(0).double(), SLOTS, groups, NODES, GPUS)
            core_cpu, core_wall = min(core_cpu, cpu), min(core_wall, wall)
        policy.plan(loads, topo).validate(topo, loads)
        plan_best[mode] = (plan_cpu, plan_wall, core_cpu, core_wall)

    print(f"EPLB, DeepSeek-V3 shape: {weight.shape[0]} layers x {weight.shape[1]} experts, {NODES} nodes x "
          f"{GPUS // NODES} GPUs, {SLOTS} slots; {source}; 1 thread, best of {args.repeats} interleaved runs; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    head = (f"{'mode':13s} {'loop ms cpu':>11s} {'loop ms wall':>12s} {'fast ms cpu':>11s} {'fast ms wall':>12s} "
            f"{'speed-up cpu':>12s} {'speed-up wall':>13s} {'identical':>9s}")
    print(head)
    print("-" * len(head))
    for mode, _ in modes:
        (lc, lw), (vc, vw) = best[mode, "loop"], best[mode, "fast"]
        print(f"{mode:13s} {lc * 1e3:11.1f} {lw * 1e3:12.1f} {vc * 1e3:11.2f} {vw * 1e3:12.2f} "
              f"{lc / vc:11.0f}x {lw / vw:12.0f}x {'yes' if identical[mode] else 'NO':>9s}")
    print()
    print(f"back-to-back (each function {args.repeats} calls in a row, best call):")
    print(head[: head.index(" identical")])
    print("-" * head.index(" identical"))
    for mode, _ in modes:
        (lc, lw), (vc, vw) = back_to_back[mode, "loop"], back_to_back[mode, "fast"]
        print(f"{mode:13s} {lc * 1e3:11.1f} {lw * 1e3:12.1f} {vc * 1e3:11.2f} {vw * 1e3:12.2f} "
              f"{lc / vc:11.0f}x {lw / vw:12.0f}x")
    print()
    print(f"eplb policy, {args.micro_batches} micro-batches (plan = rebalance on the summed loads, home-aware "
          f"placement, per-micro-batch splits):")
    head = (f"{'mode':13s} {'plan ms cpu':>11s} {'plan ms wall':>12s} {'rebalance ms cpu':>16s} "
            f"{'rebalance ms wall':>17s}")
    print(head)
    print("-" * len(head))
    for mode, _ in modes:
        pc, pw, cc, cw = plan_best[mode]
        print(f"{mode:13s} {pc * 1e3:11.2f} {pw * 1e3:12.2f} {cc * 1e3:16.2f} {cw * 1e3:17.2f}")


if __name__ == "__main__":
    main()
