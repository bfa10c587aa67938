"""How much searching one ``plan`` call may do: counted work (deterministic) and an opt-in wall clock.

Every rank of a training job may plan the same step for itself (``policy.plan`` on every rank),
so a bound that stops a search must stop it at the same place on every rank: :class:`SearchBudget`
counts work (:func:`round_cost`, proportional to a round's CPU time), never time, unless
``seconds`` is set. A wall-clock bound is only safe where one rank plans and the others receive
its plan (:class:`relibra.Balancer` plans on rank 0 and broadcasts).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

__all__ = ["SearchBudget", "check_budget_options", "round_cost", "ROUND_COST"]

#: what one search round costs before it scores anything (its fixed operations), in scored
#: entries: about 3 ms of one core on the development machines, as much as 1.5e6 entries
ROUND_COST = 1.5e6


def round_cost(problems: int, micro_batches: int, items: int, swaps: int) -> float:
    """Work units of one swap-search round: :data:`ROUND_COST` plus its scored entries, ``problems x
    micro-batches x (items + swaps)`` (item loads gathered, swaps scored: ``pairs x c ** 2``).

    Fitted on the development machines (least squares over reorder's plans at 8, 16 and 32
    nodes x 8 GPUs): 1.9 ns of one core per entry, so CPU time is about ``work x 1.9 ns``.
    """
    return ROUND_COST + problems * micro_batches * (items + swaps)


@dataclass
class SearchBudget:
    """The searching one plan call may do, shared by its stages in order.

    Attributes:
        work: work units the swap searches may spend in all (:func:`round_cost` per round, about
            1.9 ns of one core each on the development machines). inf: no bound. Deterministic.
        seconds: opt-in bound on wall-clock seconds since the budget was made (None: none). Not
            deterministic: ranks planning for themselves may stop at different rounds.
        stage: the stage now searching (set by the planner; named in ``cut``).
        spent: work spent so far.
        cut: "" while no bound has stopped a search; then which bound, and in which stage. A
            stopped search keeps its best assignment so far, and later stages get no rounds.
    """

    work: float = math.inf
    seconds: float | None = None
    stage: str = ""
    spent: float = 0.0
    cut: str = ""
    started: float = field(default_factory=time.perf_counter)

    def charge(self, cost: float) -> bool:
        """Spend ``cost`` on one more round: True if allowed, else False with ``cut`` set."""
        if self.cut:
            return False
        if self.spent + cost > self.work:
            self.cut = f"work budget ({self.work:.3g} units) spent in {self.stage or 'the search'}"
            return False
        if self.seconds is not None and time.perf_counter() - self.started > self.seconds:
            self.cut = f"time budget ({self.seconds:g} s) spent in {self.stage or 'the search'}"
            return False
        self.spent += cost
        return True


def check_budget_options(policy: str, work_budget: float, time_budget_s: float | None) -> None:
    """ValueError naming the option unless ``work_budget`` is a number > 0 (inf: no bound) and
    ``time_budget_s`` is None or a finite number > 0."""
    for name, value, finite in (("work_budget", work_budget, False), ("time_budget_s", time_budget_s, True)):
        if value is None and finite:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and value > 0 and (math.isfinite(value) or not finite)):
            what = "None or a finite number > 0 (seconds)" if finite else "a number > 0 (inf: no bound)"
            raise ValueError(f"{policy} option {name} must be {what}, got {value!r}")
