"""The passes of a step in the Balancer: the schedule checked, each pass's micro-batches, plans joined and split.

Legend: Z sequences of the step on this rank, M micro-batches (of a pass, or of every pass in
schedule order), L MoE layers, E experts, K top-k, G ranks of the expert-parallel group.

An RL step runs several passes over its sequences (:mod:`relibra.phases`): forward-only
``logprob`` / ``ref`` / ``forward`` passes, then one or more ``train`` passes (forward and
backward; each one optimizer step's micro-batches). ``Balancer.plan_step(routes, phases=...)``
takes this rank's routes per sequence and the schedule ``[(phase name, micro-batches), ...]``,
every micro-batch a list of sequence indices; each pass has its own micro-batching (a pass may
cover a subset of the sequences, e.g. one PPO mini-batch). The step's micro-batches of every
pass, in schedule order, make one loads tensor ``[M, L, E]``.

Placement: the policy plans once a step, on the micro-batches of every training pass; the
forward-only passes get replica plans of their own on a fixed placement (the policy's
``replan``, or none). The first forward-only micro-batches before the first training pass (the
Balancer's ``overlap_micro_batches``, 1 by default) run on the placement of the step before, so
the step's placement can be planned in the background while they run (:class:`BackgroundPlan`);
the experts move once, as the next micro-batch starts, and every later micro-batch runs on the
step's placement. A pass may so run its first micro-batches on one placement (``early_plan``)
and the rest on the other (``plan``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..phases import MAX_PASSES, PHASES, TRAIN, pass_id, pass_label
from ..plan import Placement, Plan

__all__ = ["Pass", "schedule_fault", "build_passes", "schedule_signature", "describe_signature", "resolve_pass",
           "pass_fault", "join_plans", "plan_on", "BackgroundPlan"]


@dataclass
class Pass:
    """One pass of a step on this rank.

    Attributes:
        index: its position in the schedule; ``name``: its phase.
        routes: this rank's routes of every micro-batch, ``[T_m, L, K]`` int64.
        first: the row of its first micro-batch in the step's ``[M, L, E]`` loads.
        early: how many of its first micro-batches run on the placement of the step before.
        early_plan: their plan (``early`` micro-batches), None when ``early`` is 0.
        plan: the plan of all its micro-batches on the step's placement (None until that is
            planned and the experts moved; never set for a pass that runs only early); only
            the micro-batches from ``early`` on run it.
        cache: its replica cache (made as the pass starts, and again where it moves from
            ``early_plan`` to ``plan``).
    """

    index: int
    name: str
    routes: list[torch.Tensor]
    first: int
    plan: Plan | None = None
    cache: Any = None
    early: int = 0
    early_plan: Plan | None = None
    offsets_MLE: torch.Tensor | None = field(default=None, repr=False)
    source_MLGE: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_micro_batches(self) -> int:
        return len(self.routes)

    @property
    def rows(self) -> slice:
        return slice(self.first, self.first + len(self.routes))

    @property
    def id(self) -> int:
        """What the collective-order check carries (:func:`relibra.phases.pass_id`)."""
        return pass_id(self.index, self.name)


def schedule_fault(phases: Any, num_sequences: int) -> str:
    """Why ``phases`` is not a schedule over ``num_sequences`` sequences, or "" (no communication).

    A schedule is a non-empty list of ``(phase name, micro-batches)``, at most 64 passes, at least
    one ``train``; every micro-batch a list of sequence indices in ``[0, num_sequences)``, none
    twice in one pass; every pass at least one micro-batch.
    """
    if not isinstance(phases, (list, tuple)) or not phases:
        return f"phases must be a non-empty list of (phase name, micro-batches), got {phases!r:.80}"
    if len(phases) > MAX_PASSES:
        return f"phases lists {len(phases)} passes, more than {MAX_PASSES}"
    for k, item in enumerate(phases):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            return f"phases[{k}] must be a (phase name, micro-batches) pair, got {item!r:.80}"
        name, groups = item
        if name not in PHASES:
            return f"phases[{k}] names unknown phase {name!r}; phases are {', '.join(PHASES)}"
        if not isinstance(groups, (list, tuple)) or not groups:
            return f"phases[{k}] ({name}) must list at least one micro-batch (a list of sequence indices)"
        seen: set[int] = set()
        for m, group in enumerate(groups):
            if not isinstance(group, (list, tuple)):
                return f"phases[{k}] ({name}) micro-batch {m} must be a list of sequence indices, got {group!r:.80}"
            for z in group:
                if isinstance(z, bool) or not isinstance(z, int):
                    return f"phases[{k}] ({name}) micro-batch {m} holds {z!r}, not a sequence index"
                if not 0 <= z < num_sequences:
                    return (f"phases[{k}] ({name}) micro-batch {m} names sequence {z}, but this rank has "
                            f"{num_sequences} sequences (0..{num_sequences - 1})")
                if z in seen:
                    return f"phases[{k}] ({name}) puts sequence {z} in two micro-batches (or twice in one)"
                seen.add(z)
    if not any(item[0] == TRAIN for item in phases):
        return "phases has no training pass ('train'): a step trains at least once (its placement moves before)"
    return ""


def build_passes(routes: Sequence[torch.Tensor], phases: Sequence[tuple[str, Sequence[Sequence[int]]]] | None
                 ) -> list[Pass]:
    """The passes of a checked step: ``phases`` None is one training pass over ``routes`` (one
    tensor per micro-batch); else each micro-batch joins its sequences' routes (in its order)."""
    if phases is None:
        return [Pass(0, TRAIN, [r.to(torch.int64) for r in routes], 0)]
    seqs = [r.to(torch.int64) for r in routes]
    empty = seqs[0].new_zeros((0, *seqs[0].shape[1:])) if seqs else torch.zeros(0, 0, 0, dtype=torch.int64)
    passes, first = [], 0
    for k, (name, groups) in enumerate(phases):
        mbs = [torch.cat([seqs[z] for z in group]) if group else empty for group in groups]
        passes.append(Pass(k, name, mbs, first))
        first += len(mbs)
    return passes


def schedule_signature(passes: list[Pass] | None) -> torch.Tensor:
    """``[1 + 2 * MAX_PASSES]`` int64: pass count, then (pass id + 1, micro-batches) per pass;
    what every rank of the group must agree on (zeros for a rank whose input is bad)."""
    out = torch.zeros(1 + 2 * MAX_PASSES, dtype=torch.int64)
    if passes:
        out[0] = len(passes)
        for p in passes:
            out[1 + 2 * p.index], out[2 + 2 * p.index] = p.id + 1, p.num_micro_batches
    return out


def describe_signature(signature: torch.Tensor) -> str:
    """A :func:`schedule_signature` in words: ``"logprob (pass 0) x4, train (pass 1) x4"``."""
    n = int(signature[0])
    if n == 0:
        return "bad input"
    return ", ".join(f"{pass_label(int(signature[1 + 2 * k]) - 1)} x{int(signature[2 + 2 * k])}" for k in range(n))


def resolve_pass(passes: list[Pass], phase: Any) -> tuple[int, str]:
    """``(index of the pass, fault text or "")`` that ``micro_batch(m, phase=...)`` names: a pass
    index, a phase name that one pass runs, or None for the one training pass (index 0 with a fault)."""
    if phase is None:
        train = [p.index for p in passes if p.name == TRAIN]
        if len(train) == 1:
            return train[0], ""
        return 0, (f"phase=None names the training pass, but the step has {len(train)} (passes {train}); "
                   "give the pass index")
    if isinstance(phase, int) and not isinstance(phase, bool):
        if 0 <= phase < len(passes):
            return phase, ""
        return 0, f"phase={phase} is not a pass of the step (passes 0..{len(passes) - 1})"
    if isinstance(phase, str):
        named = [p.index for p in passes if p.name == phase]
        if len(named) == 1:
            return named[0], ""
        if not named:
            return 0, (f"phase={phase!r} names no pass of the step; its passes: "
                       + ", ".join(f"{p.index} ({p.name})" for p in passes))
        return 0, f"phase={phase!r} names passes {named}; give the pass index"
    return 0, f"phase must be a pass index, a phase name or None, got {phase!r}"


def pass_fault(passes: list[Pass], current: Pass | None, target: Pass, m: int) -> str:
    """Why micro-batch ``m`` of ``target`` cannot start after the pass ``current`` ran, or "".

    Passes run in schedule order (one may be skipped); a micro-batch planned on the placement of
    the step before cannot run once the experts moved; a pass may not end while replica
    gradient of its micro-batches waits to go home.
    """
    if current is not None and target.index < current.index:
        return (f"pass {target.index} ({target.name}) after pass {current.index} ({current.name}): the passes of a "
                "step run in schedule order")
    if 0 <= m < target.early and passes[-1].plan is not None:
        return (f"micro-batch {m} of pass {target.index} ({target.name}) was planned on the placement of the step "
                f"before, and the experts have moved since (micro-batch {target.early} of that pass, a later "
                "pass, or prepare_training moved them): run the step's micro-batches in schedule order")
    if current is None or target is current:
        return ""
    pending = "" if current.cache is None else current.cache.pending_fault()
    return f"pass {target.index} ({target.name}) started too early: {pending}" if pending else ""


def join_plans(plans: list[Plan]) -> Plan:
    """Plans of one placement as one plan of all their micro-batches (in order)."""
    first = plans[0]
    if len(plans) == 1:
        return first
    return Plan(first.topology, first.placement, torch.cat([p.spare_experts for p in plans]),
                torch.cat([p.slot_tokens for p in plans]), all(p.intra_node_replicas for p in plans), first.policy)


def plan_on(policy: Any, loads_MLE: torch.Tensor, placement: Placement, topology, policy_name: str) -> Plan:
    """Replica plans of ``loads_MLE`` on a fixed ``placement``: the policy's ``replan`` when it has
    one, else no replicas (the plans of forward-only passes)."""
    replan = getattr(policy, "replan", None)
    if callable(replan) and topology.spare_slots_per_gpu:
        return replan(loads_MLE.clone(), placement, topology)
    return Plan.without_replicas(placement, loads_MLE, topology, policy_name)


class BackgroundPlan:
    """``fn()`` in a thread of its own, started at once (``in_thread=False``: run now, in this
    thread); :meth:`result` waits for it.

    Runs on the planning rank only and issues no collective: the ranks meet again where the
    result is shared. An exception (any BaseException) is kept and handed back, not raised in
    the thread.
    """

    def __init__(self, fn: Callable[[], Plan], in_thread: bool = True) -> None:
        self._fn = fn
        self._value: Plan | None = None
        self._failure: BaseException | None = None
        self._seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="relibra-planner", daemon=True) if in_thread else None
        if self._thread is None:
            self._run()
        else:
            self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self._value = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who shares it with every rank
            self._failure = exc
        self._seconds = time.perf_counter() - t0

    def result(self) -> tuple[Plan | None, BaseException | None, float, float]:
        """``(plan, failure, seconds it planned, seconds the caller waited for it)``."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
        return self._value, self._failure, self._seconds, time.perf_counter() - t0
