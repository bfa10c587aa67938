"""Route-aware micro-batch packing: step time of every policy under each packing (cost model).

    python benchmarks/packing.py [--concentrations 16,64,512] [--micro-batches 8]
        [--tokens-per-micro-batch 131072] [--group-size 16] [--steps 3] [--seed 0]
        [--spare-slots 1] [--timing-micro-batches 16] [--timing-tokens 73728] [--repeats 7]
        [--set key=value ...] [--placement-min-gain G]

Traces: relibra.sim.traces.generate_sequences (DeepSeek-V3 ``prefill_in4096`` popularity, GRPO
groups of ``--group-size`` responses sharing a ``Dirichlet(concentration * popularity)`` expert
mix, log-normal lengths), per sequence; the default micro-batching is the default trace's (8 x
131,072 tokens, 2,048 per GPU). Concentration 512 is the default trace's, 64 and 16 are harder
(fewer, stronger prompt-specific hot spots). 8 nodes x 8 GPUs, 1 spare slot per GPU, DeepSeek-V3
on H100 (relibra.sim.cost presets); ``--steps`` steps, the first a warm-up.

Packings of every step:

- ``rollout``: the generator's rollout order (a prompt's responses side by side);
- ``tokens``: relibra.packing.pack_tokens (LPT on lengths, the sequence-length balancing of verl);
- ``routes``: relibra.packing.pack under the policy's placement of the step before (contiguous
  at first), started from the rollout order;
- ``joint``: relibra.packing.pack_with_reorder (pack, reorder on the packed loads, re-pack),
  for the policies that reorder (``reorder`` from that placement, ``hybrid`` adds its replicas);
- ``mean``: not a packing, the bound of one: every micro-batch carries exactly 1/M of the step's
  load of every expert (rounded to integers), which whole sequences cannot reach.

Each cell: mean step time over the steady steps (relibra.sim.cost.step_cost of the policy's plan
for the packed loads, migration from the step before included) and its gap to
``ideal_step_cost`` (which no packing changes). ``x`` columns: speedup over the rollout order.
Then hybrid's gap split by part (as ``relibra bench`` splits it), the packers' CPU time per
step, and a timing of ``pack`` at the DeepSeek-V3 size (the
budget: 50 ms of one core for 512 sequences in 16 micro-batches). One torch thread; CPU times
are process times (the development machines are shared: medians move with their load).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from relibra.packing import pack, pack_tokens, pack_with_reorder, sum_by_micro_batch
from relibra.plan import Placement, Plan
from relibra.policies.hybrid import HybridPolicy
from relibra.runtime.plan_share import move_pays
from relibra.sim.cost import ideal_step_cost, make_config, step_cost
from relibra.sim.rl_step import plan_on
from relibra.sim.simulate import policy_factory
from relibra.sim.traces import TraceConfig, generate_sequences

POLICIES = ["static", "reorder", "replicate", "hybrid", "eplb-oracle"]
PACKINGS = ["rollout", "tokens", "routes", "joint", "mean"]
PARTS = ("expert_compute_s", "a2a_s", "replica_s", "reorder_s")
JOINT_POLICIES = ("reorder", "hybrid")


def packed_step(step, mode: str, placement: Placement, previous: Placement | None, topo, first: bool,
                migration_weight: float = 0.02):
    """``(loads [M, L, E], joint placement or None, packer CPU seconds)`` of one step; ``joint``
    reorders at ``migration_weight`` (the policy's)."""
    M, budget = step.num_micro_batches, step.tokens_per_micro_batch
    t0 = time.process_time()
    if mode == "rollout":
        return torch.from_numpy(step.loads()), None, 0.0
    if mode == "mean":
        total = torch.from_numpy(step.loads()).sum(0)
        share = total // M
        return share + (torch.arange(M)[:, None, None] < total - share * M), None, 0.0
    if mode == "tokens":
        assign = pack_tokens(step.sequence_tokens, M, budget)
        seconds = time.process_time() - t0
        return sum_by_micro_batch(torch.from_numpy(step.sequence_loads), assign, M), None, seconds
    if mode == "routes":
        result = pack(step.sequence_loads, step.sequence_tokens, M, budget, placement, topo, start=step.micro_batch_of)
        return result.loads, None, time.process_time() - t0
    joint = pack_with_reorder(step.sequence_loads, step.sequence_tokens, M, budget, topo,
                              None if first else previous, migration_weight=migration_weight,
                              start=step.micro_batch_of)
    return joint.loads, joint.placement, time.process_time() - t0


def run_cell(steps, mode: str, name: str, topo, cfg, warmup: int, min_gain: float = 0.0
             ) -> tuple[dict[str, float], float]:
    """``({"total_s", *PARTS}: mean over steady steps, mean packer CPU s)`` of policy ``name``
    under packing ``mode``; ``min_gain`` > 0 applies the Balancer's placement guard
    (``placement_min_gain``: a new placement that does not lower the busiest GPUs by that
    fraction against replicas on the current one is not adopted)."""
    policy = policy_factory(name)()
    previous = Placement.contiguous(topo, steps[0].sequence_loads.shape[1])
    times, pack_seconds = [], []
    for s, step in enumerate(steps):
        current = getattr(policy, "placement", None)
        current = current if isinstance(current, Placement) else previous
        weight = getattr(getattr(policy, "reorder", policy), "migration_weight", 0.02)
        loads, placement, seconds = packed_step(step, mode, current, previous, topo, first=s == 0,
                                                migration_weight=weight)
        if placement is None:
            plan = policy.plan(loads, topo)
        elif name == "hybrid":
            plan = HybridPolicy().replan(loads, placement, topo)
        else:
            plan = Plan.without_replicas(placement, loads, topo, policy=name)
        if min_gain > 0 and s > 0 and not plan.placement.equal(previous):
            stay = plan_on(policy, loads, previous, topo)
            if not move_pays(plan, stay, loads, min_gain):
                plan = stay
                kept = getattr(policy, "placement_kept", None)
                if callable(kept):
                    kept(previous)
        cost = step_cost(plan, loads, cfg, previous=previous)
        previous = plan.placement
        if s >= warmup:
            times.append({"total_s": cost.total_s, **{part: getattr(cost, part) for part in PARTS}})
            pack_seconds.append(seconds)
    return {key: float(np.mean([t[key] for t in times])) for key in times[0]}, float(np.mean(pack_seconds))


def table(concentration: float, args, topo, cfg) -> None:
    tcfg = TraceConfig(steps=args.steps, micro_batches=args.micro_batches,
                       tokens_per_micro_batch=args.tokens_per_micro_batch, group_size=args.group_size,
                       concentration=concentration, seed=args.seed)
    steps = list(generate_sequences(tcfg))
    ideal_costs = [ideal_step_cost(torch.from_numpy(st.loads()), topo, cfg) for st in steps[1:]]
    ideal = float(np.mean([c.total_s for c in ideal_costs]))
    ideal_parts = {part: float(np.mean([getattr(c, part) for c in ideal_costs])) for part in PARTS}
    sequences = int(np.mean([len(st.sequence_tokens) for st in steps]))
    print(f"\nconcentration {concentration:g}: {sequences} sequences per step, {args.micro_batches} x "
          f"{args.tokens_per_micro_batch} tokens; ideal {ideal:.2f} s per step")
    cells: dict[tuple[str, str], float] = {}
    parts: dict[str, dict[str, float]] = {}
    packer: dict[str, list[float]] = {mode: [] for mode in PACKINGS}
    for mode in PACKINGS:
        for name in POLICIES:
            if mode == "joint" and name not in JOINT_POLICIES:
                continue
            t0 = time.process_time()
            cost, seconds = run_cell(steps, mode, name, topo, cfg, warmup=1, min_gain=args.placement_min_gain)
            cells[mode, name] = cost["total_s"]
            if name == "hybrid":
                parts[mode] = cost
            packer[mode].append(seconds)
            print(f"  [{mode} {name}] {time.process_time() - t0:.0f}s", file=sys.stderr)
    head = f"{'policy':12s}" + "".join(f"{mode:>17s}" for mode in PACKINGS) + f"{'x routes':>10s}{'x joint':>9s}"
    print(head)
    print("-" * len(head))
    for name in POLICIES:
        row = f"{name:12s}"
        for mode in PACKINGS:
            t = cells.get((mode, name))
            row += f"{'-':>17s}" if t is None else f"{t:8.2f}s {t / ideal - 1:+7.1%}"
        rollout = cells["rollout", name]
        row += f"{rollout / cells['routes', name]:10.2f}"
        row += f"{rollout / cells['joint', name]:9.2f}" if ("joint", name) in cells else f"{'-':>9s}"
        print(row)
    print(f"{'ideal':12s}{ideal:8.2f}s")
    names = {"expert_compute_s": "compute", "a2a_s": "all-to-all", "replica_s": "replicas", "reorder_s": "migration"}
    print("hybrid's gap by part, % of ideal's step time (" + " / ".join(names.values()) + "): " + "; ".join(
        f"{mode} " + " / ".join(f"{(parts[mode][p] - ideal_parts[p]) / ideal:+.2%}" for p in PARTS)
        for mode in PACKINGS))
    print("packer CPU ms per step: " + ", ".join(
        f"{mode} {np.mean(packer[mode]) * 1e3:.0f}" for mode in ("tokens", "routes", "joint"))
        + " (joint includes reorder)")


def timing(args, topo) -> None:
    """CPU time of ``pack`` (and the baselines) on one step at the DeepSeek-V3 size."""
    tcfg = TraceConfig(steps=1, micro_batches=args.timing_micro_batches, tokens_per_micro_batch=args.timing_tokens,
                       group_size=args.group_size, concentration=64.0, seed=args.seed)
    step = next(generate_sequences(tcfg))
    Z, L, E = step.sequence_loads.shape
    M, budget = step.num_micro_batches, step.tokens_per_micro_batch
    placement = Placement.contiguous(topo, L)
    runs = {
        "pack (routes)": lambda: pack(step.sequence_loads, step.sequence_tokens, M, budget, placement, topo),
        "pack (routes), start=rollout": lambda: pack(step.sequence_loads, step.sequence_tokens, M, budget,
                                                     placement, topo, start=step.micro_batch_of),
        "pack_tokens (LPT)": lambda: pack_tokens(step.sequence_tokens, M, budget),
        "pack_with_reorder (1 round)": lambda: pack_with_reorder(step.sequence_loads, step.sequence_tokens, M,
                                                                 budget, topo, placement),
    }
    print(f"\npacking CPU time, one thread: {Z} sequences x {L} layers x {E} experts, {M} micro-batches of "
          f"{budget} tokens, {topo.num_nodes} x {topo.gpus_per_node} GPUs, {args.repeats} runs")
    for k in (256, 128, 0):
        runs[f"pack, scored_sequences={k}"] = (lambda k=k: pack(step.sequence_loads, step.sequence_tokens, M, budget,
                                                                placement, topo, scored_sequences=k))
    rollout = pack(step.sequence_loads, step.sequence_tokens, M, budget, placement, topo, scored_sequences=0,
                   start=step.micro_batch_of).info["start_objective"]
    print(f"{'':32s}{'min ms':>8s}{'median ms':>11s}  objective F / rollout's (contiguous placement)")
    for label, run in runs.items():
        seconds = []
        for _ in range(args.repeats):
            t0 = time.process_time()
            result = run()
            seconds.append(time.process_time() - t0)
        quality = f"{result.objective / rollout:.3f}" if hasattr(result, "objective") else ""
        print(f"{label:32s}{min(seconds) * 1e3:8.1f}{np.median(seconds) * 1e3:11.1f}  {quality}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concentrations", default="16,64,512")
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--tokens-per-micro-batch", type=int, default=131072)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spare-slots", type=int, default=1)
    ap.add_argument("--timing-micro-batches", type=int, default=16)
    ap.add_argument("--timing-tokens", type=int, default=73728, help="budget of the timing step (~512 sequences)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--placement-min-gain", type=float, default=0.0,
                    help="apply the Balancer's placement guard at this fraction (default 0: every placement "
                         "is adopted, as relibra bench prices it)")
    ap.add_argument("--set", action="append", default=[], metavar="key=value",
                    help="override a cost parameter (relibra.sim.cost_config.CostConfig), repeatable")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first is a warm-up)")
    torch.set_num_threads(1)
    if not 0.0 <= args.placement_min_gain < 1.0:
        ap.error(f"--placement-min-gain must be in [0, 1), got {args.placement_min_gain}")
    overrides = dict(item.partition("=")[::2] for item in args.set)
    if any(not key or not value for key, value in overrides.items()):
        ap.error(f"--set expects key=value, got {args.set}")
    try:
        cfg = make_config("deepseek-v3", "h100", overrides)
    except ValueError as exc:  # an unknown key or a value that is not a number, named
        ap.error(f"--set: {exc}")
    topo = cfg.topology(8, 8, args.spare_slots)
    guard = f"; Balancer placement guard {args.placement_min_gain:g}" if args.placement_min_gain > 0 else ""
    print(f"DeepSeek-V3 on H100 (cost model), {topo}; groups of {args.group_size}, {args.steps} steps "
          f"(1 warm-up), seed {args.seed}{guard}; cells: step time and gap to ideal")
    t0 = time.process_time()
    for c in (float(v) for v in args.concentrations.split(",") if v.strip()):
        table(c, args, topo, cfg)
    if not args.no_timing:
        timing(args, topo)
    print(f"\nCPU {time.process_time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
