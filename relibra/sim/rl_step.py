"""The RL step in the simulator: which sequences share a micro-batch, and which passes run over them.

Legend: see CONTRIBUTING.md (Y steps, Z sequences, M micro-batches, L MoE layers, E experts).

Packing (``relibra bench --packing``), per step, for every policy:

- ``rollout``: the trace's ``loads`` as recorded (the rollout order; any trace);
- ``tokens``: :func:`relibra.packing.pack_tokens` (LPT on sequence lengths, what sequence-length
  balancing does) of the step's sequences (a per-sequence trace);
- ``routes``: :func:`relibra.packing.pack` of the step's sequences under the placement the step
  starts on (the policy's placement of the step before), started from the rollout order, so it
  is never worse than it on the packing objective (a per-sequence trace).

Phases (``relibra bench --phases``, :func:`relibra.phases.parse_phases`): the passes of the
step over its micro-batches, priced one by one with :mod:`relibra.sim.cost` and added up.
A forward-only pass (``logprob``, ``ref``, ``forward``) costs forward compute, the forward
all-to-all (dispatch and combine) and replica weight copies, no backward and no gradient return
(:func:`forward_config`). The step's placement moves once. As the Balancer runs it
(``overlap_micro_batches``, default 1), the first forward-only micro-batch runs on the placement
of the step before with fresh replica plans (``policy.replan``, or no replicas for a policy
without one) while the step's placement is planned, and the experts move before the second
micro-batch (before the first training micro-batch at the latest); every micro-batch after that
runs the policy's placement. ``overlap_micro_batches=None`` keeps every forward-only pass before
the first training pass on the step before's placement. With ``overlap=False``
(``--no-overlap``) the placement moves before the first pass and every pass runs the policy's
plan (the Balancer's ``plan_step(..., overlap=False)``). The planning time is not priced, as
nowhere in the simulator (``relibra bench`` reports it apart). Every pass uses the step's
packing; replicas are priced per pass (a replica kept from one pass into the next pays its copy
again, and so does one kept across the move).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import torch

from ..packing import pack, pack_tokens, sum_by_micro_batch
from ..phases import TRAIN, early_micro_batches, has_backward
from ..plan import Placement, Plan
from ..topology import Topology
from .cost import CostConfig, StepCost, ideal_step_cost, step_cost

if TYPE_CHECKING:  # pragma: no cover - ``python -m relibra.sim.traces`` must find traces not yet imported
    from .traces import SequenceStep

__all__ = ["PACKINGS", "StepPacker", "forward_config", "early_rows", "phase_step_cost", "ideal_phase_cost",
           "plan_on"]

PACKINGS = ("rollout", "tokens", "routes")


class StepPacker:
    """The loads ``[M, L, E]`` of step ``s`` packed by ``mode``, given the placement it starts on.

    Args:
        steps: the trace's per-sequence steps (:func:`relibra.sim.traces.sequence_steps`).
        mode: ``"tokens"`` or ``"routes"`` (``"rollout"`` needs no packer: the trace's loads).
        topology: the simulated topology (``routes`` scores its objective there).

    ``seconds`` collects the process CPU time of every packing call (on one torch thread).
    """

    def __init__(self, steps: list[SequenceStep], mode: str, topology: Topology) -> None:
        if mode not in PACKINGS[1:]:
            raise ValueError(f"packing {mode!r}: a packer packs 'tokens' or 'routes'; 'rollout' is the trace's loads")
        self.steps, self.mode, self.topology = steps, mode, topology
        self.seconds: list[float] = []
        self._tokens_cache: dict[int, torch.Tensor] = {}  # token packing does not depend on the placement

    def __call__(self, s: int, placement: Placement) -> torch.Tensor:
        step = self.steps[s]
        M, budget = step.num_micro_batches, step.tokens_per_micro_batch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as timed_plan: one thread's own work (spinning OpenMP workers inflate it)
        try:
            t0 = time.process_time()
            if self.mode == "tokens":
                if s not in self._tokens_cache:
                    assign = pack_tokens(step.sequence_tokens, M, budget)
                    self._tokens_cache[s] = sum_by_micro_batch(torch.from_numpy(step.sequence_loads), assign, M)
                loads = self._tokens_cache[s]
            else:
                loads = pack(step.sequence_loads, step.sequence_tokens, M, budget, placement, self.topology,
                             start=step.micro_batch_of).loads
            self.seconds.append(time.process_time() - t0)
        finally:
            torch.set_num_threads(threads)
        return loads

    def describe(self) -> dict[str, Any]:
        """What the bench JSON's ``"packing"`` reports about this packer."""
        sizes = [len(st.sequence_tokens) for st in self.steps]
        return {"mode": self.mode, "sequences_per_step": sizes,
                "tokens_per_micro_batch": int(self.steps[0].tokens_per_micro_batch),
                "pack_cpu_seconds_mean": sum(self.seconds) / len(self.seconds) if self.seconds else 0.0,
                "packer": ("relibra.packing.pack_tokens (LPT on sequence lengths)" if self.mode == "tokens" else
                           "relibra.packing.pack (spread greedy under the placement of the step before, "
                           "started from the rollout order)")}


def forward_config(cfg: CostConfig) -> CostConfig:
    """``cfg`` for a forward-only pass: no backward compute, half the token transfers (dispatch
    and combine, not their backward: half the bytes and half the per-transfer latency), replica
    weight copies without gradient returns (one transfer of the two), no
    optimizer update, half the host work per layer call and none per step (the training pass
    pays the step's)."""
    return dataclasses.replace(cfg, backward_factor=0.0, a2a_bytes=cfg.a2a_bytes / 2, replica_grad_bytes=0.0,
                               message_latency_s=cfg.message_latency_s / 2, optimizer_s_per_param=0.0,
                               layer_call_s=cfg.layer_call_s / 2, step_overhead_s=0.0)


def plan_on(policy: Any, loads_MLE: torch.Tensor, placement: Placement, topology: Topology) -> Plan:
    """Fresh replica plans of ``loads_MLE`` on ``placement``: ``policy.replan`` if it has one,
    else the placement without replicas (what the Balancer runs before the step's placement moves)."""
    replan = getattr(policy, "replan", None)
    if callable(replan):
        return replan(loads_MLE, placement, topology)
    return Plan.without_replicas(placement, loads_MLE, topology)


def _add(costs: list[StepCost]) -> StepCost:
    """The costs of a step's passes added up; ``tokens`` stays the step's (one pass's)."""
    total = {f.name: sum(getattr(c, f.name) for c in costs) for f in dataclasses.fields(StepCost)}
    total["tokens"] = costs[0].tokens
    return StepCost(**total)


def early_rows(phases: tuple[str, ...], num_micro_batches: int, overlap: bool = True,
               overlap_micro_batches: int | None = 1) -> int:
    """How many of the step's micro-batches (every pass's, in schedule order) run on the placement
    of the step before: at most ``overlap_micro_batches`` (None: no bound) of those before the
    first training pass; 0 without ``overlap``."""
    return early_micro_batches(phases.index(TRAIN) * num_micro_batches, overlap, overlap_micro_batches)


def phase_step_cost(plan: Plan, loads_MLE: torch.Tensor, cfg: CostConfig, previous: Placement,
                    phases: tuple[str, ...], policy: Any, overlap: bool = True, live_planning: bool = False,
                    overlap_micro_batches: int | None = 1) -> tuple[StepCost, list[float]]:
    """The step's cost over its ``phases`` and each phase's seconds (module docstring).

    Args:
        plan: the policy's plan of the step (its placement moves after the early micro-batches).
        previous: the placement the step starts on.
        policy: plans the early micro-batches on ``previous`` (:func:`plan_on`), when there are any.
        overlap: False: the placement moves before the first pass, every pass runs ``plan``.
        live_planning: every pass's plans are made at run time (:func:`relibra.sim.cost.step_cost`).
        overlap_micro_batches: forward-only micro-batches on ``previous`` while the step's
            placement is planned (:func:`early_rows`).
    """
    forward = forward_config(cfg)
    M = loads_MLE.shape[0]
    early = early_rows(phases, M, overlap, overlap_micro_batches)
    before = plan_on(policy, loads_MLE, previous, plan.topology) if early else None
    parts = []  # (phase index, plan, loads, config, whether the experts move as it starts)
    for i, name in enumerate(phases):
        phase_cfg = cfg if has_backward(name) else forward
        head = min(max(early - i * M, 0), M)  # this pass's micro-batches on ``previous``
        if head:
            parts.append((i, before.micro_batches(0, head) if head < M else before, loads_MLE[:head], phase_cfg, False))
        if head < M:
            parts.append((i, plan.micro_batches(head, M) if head else plan, loads_MLE[head:], phase_cfg,
                          i * M + head == early))
    costs = [step_cost(p, loads, c, live_planning=live_planning) for _, p, loads, c, _ in parts]
    move = next(k for k, part in enumerate(parts) if part[4])
    # the moved experts' optimizer state travels behind every pass up to the first optimizer step
    last = next(k for k, part in enumerate(parts) if part[0] >= phases.index(TRAIN) and has_backward(phases[part[0]]))
    hide = sum(c.expert_compute_s + c.non_moe_s + c.extra_s for c in costs[move:last + 1])
    _, p, loads, c, _ = parts[move]
    costs[move] = step_cost(p, loads, c, previous=previous, live_planning=live_planning, state_hide_s=hide)
    seconds = [sum(c.total_s for (i, *_), c in zip(parts, costs) if i == k) for k in range(len(phases))]
    pass_tokens = sum(c.tokens for (i, *_), c in zip(parts, costs) if i == 0)
    return dataclasses.replace(_add(costs), tokens=pass_tokens), seconds


def ideal_phase_cost(loads_MLE: torch.Tensor, topology: Topology, cfg: CostConfig,
                     phases: tuple[str, ...]) -> tuple[StepCost, list[float]]:
    """The idealised step over ``phases`` (every pass at the mean load, nothing moved)."""
    forward = forward_config(cfg)
    costs = [ideal_step_cost(loads_MLE, topology, cfg if has_backward(name) else forward) for name in phases]
    return _add(costs), [c.total_s for c in costs]
