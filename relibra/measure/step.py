"""One rank of ``relibra measure``: real training steps of a ReLibraMoE stack under each policy.

Legend: M micro-batches, L MoE layers, E experts, G ranks, K top-k, T tokens per rank and
micro-batch, D dim, V = G x S spare slots, P physical slots.

Every policy gets its own stack of L ``ReLibraMoE`` layers (same seed, so the same initial
weights), its own AdamW and its own :class:`relibra.Balancer`. A step is what a training step
is: ``plan_step`` (gather loads, plan, migrate), then forward + backward of every micro-batch
with its replayed routes installed, then ``AdamW.step`` and ``zero_grad``. The policies run the
same routes and inputs, interleaved step by step (step s of every policy before step s + 1, the
order rotating by one policy every round), so machine noise hits them alike. The first
``warmup_steps`` steps are not timed (first-touch allocation of AdamW state, the first move away
from the contiguous placement). The time of a step is the slowest rank's (each rank times itself
between barriers; the maximum is taken).

A rank owns its core only while no other process wants it. Each rank reads how long its main
thread sat runnable but not running during the step (its run-queue delay, ``/proc/self/schedstat``),
less what its own other threads ran (gloo's transfers, e.g. the optimizer state a migration moves
in the background): a step in which some rank lost more than :data:`STOLEN_LIMIT` of the step so
to other processes is *disturbed*.
Rounds go on, interleaved as before, until every policy has ``steps`` undisturbed steps or
``MAX_ROUNDS x steps`` rounds were timed. Other processes matter more than noise here: while a
rank idles, waiting for the busiest one, another process can use its core for free, so on a
busy machine balanced policies lose what an unbalanced one does not.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from ..runtime import Balancer, ReLibraMoE
from ..runtime.comm import all_gather_flat, all_reduce_
from ..sim.cost_config import CostConfig
from .options import MeasureOptions
from .probes import REFERENCE_ROWS, GemmProbe, timed_samples
from .routes import step_routes

__all__ = ["measure_rank", "build_stack", "STOLEN_LIMIT", "MAX_ROUNDS", "GEMM_PROBE_REPEATS"]

#: a step in which a rank waited longer than this share of the step for its core is disturbed
STOLEN_LIMIT = 0.02
#: at most this many times ``steps`` timed rounds, however many were disturbed
MAX_ROUNDS = 3
_SCHEDSTAT = "/proc/self/schedstat"
_TASKS = "/proc/self/task"
#: samples of the GEMM probe before and after the steps
GEMM_PROBE_REPEATS = 5


def build_stack(o: MeasureOptions, mesh, device: torch.device, policy: str, dtype: torch.dtype | None = None,
                cost_model: CostConfig | None = None):
    """``(layers, optimizer, balancer)`` of one policy: L ReLibraMoE layers seeded by ``o.seed``
    (parameters in ``dtype``, default float32); ``cost_model`` prices the Balancer's moves."""
    torch.manual_seed(o.seed)
    layers = nn.ModuleList([ReLibraMoE(o.dim, o.hidden, o.experts, o.top_k, mesh, spare_slots_per_gpu=o.spare_slots,
                                       dtype=dtype, device=device) for _ in range(o.layers)])
    opt = torch.optim.AdamW(layers.parameters(), lr=1e-4)
    bal = Balancer(layers, mesh=mesh, policy=policy, optimizer=opt, spare_slots_per_gpu=o.spare_slots,
                   policy_options=o.policy_options.get(policy), cost_model=cost_model,
                   defer_optimizer_state=o.defer_state)
    return layers, opt, bal


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_delay() -> float:
    """Seconds this process's main thread has spent runnable but not running, less the CPU time
    of its own other threads (0 where unknown).

    A rank is pinned to one core, so its own threads (gloo's, carrying the optimizer state a
    migration moves in the background) take the core from the main thread too; that is the
    rank's own work, not another process's disturbance. The difference under-counts another
    process only while the main thread waits anyway (blocked, not runnable).
    """
    if not os.path.exists(_SCHEDSTAT):
        return 0.0
    with open(_SCHEDSTAT) as f:
        delay = int(f.read().split()[1])
    main = str(os.getpid())
    for tid in os.listdir(_TASKS):
        if tid == main:
            continue
        try:
            with open(os.path.join(_TASKS, tid, "schedstat")) as f:
                delay -= int(f.read().split()[0])
        except FileNotFoundError:  # the thread ended between the listing and the read
            continue
    return delay * 1e-9


def _train_step(layers, opt, bal: Balancer, routes, xs, device) -> list[float]:
    """One timed step on this rank: seconds of ``[total, plan_step, micro-batches, optimizer, cpu,
    stolen]``.

    ``cpu`` is this process's CPU time over the step (all its threads). A rank waiting in gloo
    uses none, so the busiest rank's CPU time is its own work: unlike wall time, it hardly grows
    when other processes share the core. ``stolen`` is the main thread's run-queue delay.
    """
    _sync(device)
    d0 = _run_delay()
    c0 = time.process_time()
    t0 = time.perf_counter()
    bal.plan_step(routes)
    _sync(device)
    t1 = time.perf_counter()
    for m, x in enumerate(xs):
        with bal.micro_batch(m):
            h = x
            for layer in layers:
                h = layer(h)
            h.square().mean().backward()
    _sync(device)
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    t3 = time.perf_counter()
    return [t3 - t0, t1 - t0, t2 - t1, t3 - t2, time.process_time() - c0, _run_delay() - d0]


def _source_loads(routes: list[torch.Tensor], o: MeasureOptions) -> torch.Tensor:
    """``[M, L, G, E]`` token copies every rank sends to every expert (all-gathered counts)."""
    E = o.experts
    local = torch.zeros(len(routes), o.layers, E, dtype=torch.int64)
    for m, r in enumerate(routes):
        ids_LX = r.permute(1, 0, 2).reshape(o.layers, -1)
        local[m].scatter_add_(1, ids_LX, torch.ones_like(ids_LX))
    return all_gather_flat(local, None).permute(1, 2, 0, 3).contiguous()  # through the GPU for NCCL


def _gemm_probe(o: MeasureOptions, device: torch.device) -> list[float]:
    """Seconds of the GEMM probe (forward + backward over ``min(H, 4)`` slots of
    :data:`~relibra.measure.probes.REFERENCE_ROWS` rows), :data:`GEMM_PROBE_REPEATS` samples."""
    probe = GemmProbe(o.dim, o.hidden, min(o.home_slots, 4), device)
    return timed_samples(lambda: probe.forward_backward(REFERENCE_ROWS), GEMM_PROBE_REPEATS, device)


def measure_rank(rank: int, mesh, device: torch.device, o: MeasureOptions,
                 cost_model: CostConfig | None = None) -> dict | None:
    """Run the measurement on this rank; rank 0 returns ``{"policies": {NAME: [record, ...]},
    "gemm_probe": {"rows", "slots", "before_s", "after_s"}}``: one record per timed step, and the
    GEMM probe's samples before and after the steps (how fast the machine was, against the profile).

    A record: ``seconds`` ``[total, plan_step, micro_batches, optimizer, cpu, stolen]`` (the slowest
    rank's each), ``disturbed`` (see the module doc), ``planning_s`` (rank 0's ``policy.plan``),
    ``planned_imbalance``, ``realised_imbalance``, and the plan the Balancer ran:
    ``home_experts [L, E]``, ``previous [L, E]``, ``spare_experts [M, L, V]``,
    ``slot_tokens [M, L, P]``, with ``source_loads [M, L, G, E]``,
    as nested lists (plain data outlives the rank's process; shared-memory tensors do not).
    """
    G = dist.get_world_size()
    stacks = {name: build_stack(o, mesh, device, name, cost_model=cost_model) for name in o.policies}
    records: dict[str, list[dict]] = {name: [] for name in o.policies}
    gen = torch.Generator().manual_seed(o.seed * 7919 + rank)
    clean = dict.fromkeys(o.policies, 0)  # the same on every rank: it comes from all-reduced times
    before = _gemm_probe(o, device)
    for step in range(o.warmup_steps + MAX_ROUNDS * o.steps):
        if step >= o.warmup_steps and min(clean.values()) >= o.steps:
            break
        routes = step_routes(o.seed, step, rank, o.micro_batches, o.tokens, o.layers, o.experts, o.top_k, G,
                             o.skew, o.hot_steps)
        xs = [torch.randn(o.tokens, o.dim, generator=gen).to(device) for _ in range(o.micro_batches)]
        timed = step >= o.warmup_steps
        source = _source_loads(routes, o) if timed else None
        k = step % len(o.policies)  # each round starts with the next policy: no policy always runs first
        for name in o.policies[k:] + o.policies[:k]:
            layers, opt, bal = stacks[name]
            previous = bal.placement.home_experts.clone()
            dist.barrier()
            seconds = torch.tensor(_train_step(layers, opt, bal, routes, xs, device), dtype=torch.float64)
            all_reduce_(seconds, None, op=dist.ReduceOp.MAX)
            metrics = bal.metrics(gather_realised=True)
            disturbed = bool(seconds[5] > STOLEN_LIMIT * seconds[0])
            if timed:
                clean[name] += not disturbed
            if not timed or rank != 0:
                continue
            plan = bal.plan
            records[name].append(dict(
                seconds=seconds.tolist(), disturbed=disturbed, planning_s=float(metrics["planning_seconds"]),
                planned_imbalance=float(metrics["planned_imbalance"]),
                realised_imbalance=float(metrics["realised_imbalance"]),
                home_experts=plan.placement.home_experts.tolist(), previous=previous.tolist(),
                spare_experts=plan.spare_experts.tolist(), slot_tokens=plan.slot_tokens.tolist(),
                source_loads=source.tolist()))
    after = _gemm_probe(o, device)
    gemm = {"rows": REFERENCE_ROWS, "slots": min(o.home_slots, 4), "before_s": before, "after_s": after}
    return {"policies": records, "gemm_probe": gemm} if rank == 0 else None
