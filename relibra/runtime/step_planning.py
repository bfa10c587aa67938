"""Planning a step in the Balancer: routes and schedule checked, the placement planned (now or in
the background), shared with every rank, the experts moved.

Legend: M micro-batches of the step (every pass's, in schedule order), L MoE layers, E experts,
K top-k, G ranks of the expert-parallel group.

:class:`StepPlanning` is the planning half of :class:`relibra.Balancer` (a base class: it works on
the Balancer's layers, policy, topology, groups and optimizer). The order of collectives, the
same on every rank:

1. ``plan_step``: one agreement on the input (routes, schedule, optimizer); the schedule's
   signature (passes, phases, micro-batches) all-gathered and compared; the loads of every
   micro-batch of every pass all-gathered. Then, when forward-only passes come before the first
   training pass (and ``overlap``): rank 0 plans the replicas of their first
   ``overlap_micro_batches`` micro-batches (the early ones) on the current placement and
   broadcasts them, and starts the policy's plan of the training passes in a thread
   (:class:`~relibra.runtime.schedule.BackgroundPlan`, no collective); else step 2 at once.
2. ``prepare_training`` (the first micro-batch after the early ones calls it): rank 0 takes the
   policy's plan, adds the replicas of the forward-only micro-batches that run on its placement,
   and broadcasts it (or the policy's failure, raised on every rank with nothing moved); the
   experts move (:func:`relibra.runtime.migration.migrate_experts`): weights and gradients now,
   their optimizer state in the background (``defer_optimizer_state``).
3. ``complete_migration`` (an ``optimizer.step()`` pre-hook calls it): the optimizer state's
   transfers are awaited, verified and committed (:mod:`relibra.runtime.state_move`).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..phases import TRAIN, early_micro_batches
from ..plan import Placement, Plan
from ..routing.loads import count_loads
from ..routing.routes import step_routes_fault
from .comm import all_gather_flat, all_reduce_, first_error
from .fsdp import edp_plan
from .migration_stages import MigrationError
from .plan_share import drop_idle_replicas, failure_text, move_pays, share_plan
from .schedule import (
    BackgroundPlan,
    Pass,
    build_passes,
    describe_signature,
    join_plans,
    plan_on,
    schedule_fault,
    schedule_signature,
)
from .state_move import hold_optimizer

__all__ = ["StepPlanning"]


class StepPlanning:
    """``plan_step`` and ``prepare_training`` of :class:`relibra.Balancer` (see the module doc)."""

    def _agree(self, error: str, what: str) -> None:
        """Raise the same ValueError on every rank if any rank has ``error`` (2 small collectives)."""
        if self.group is None:
            if error:
                raise ValueError(f"{what}: {error}")
            return
        found = first_error(error, self.group)
        if found is not None:
            src, text = found
            raise ValueError(f"{what}: rank {src}: {text} (nothing was changed on any rank)")

    def _check_optimizer(self) -> str:
        """Error text if the optimizer misses an expert parameter ("" if fine or no optimizer).

        A reorder moves the rows of the parameters and of their optimizer state; a parameter
        the optimizer does not hold would move without its state (silently wrong AdamW moments).
        """
        if self.optimizer is None:
            return ""
        groups = getattr(self.optimizer, "param_groups", None)
        if not isinstance(groups, (list, tuple)):
            return f"optimizer {type(self.optimizer).__name__} has no param_groups list"
        held = {id(p) for g in groups for p in g.get("params", ())}
        for l, layer in enumerate(self.layers):
            for name in ("gate_up_proj", "down_proj"):
                if id(getattr(layer.experts, name)) not in held:
                    return (f"the optimizer does not hold MoE layer {l} ({self.layer_names[l]}) "
                            f"experts.{name}; a reorder would move its weights but not its optimizer "
                            f"state (build the optimizer from the model's parameters after wrapping)")
        return ""

    # ------------------------------------------------------------------ step
    def plan_step(self, routes: Sequence[torch.Tensor], phases: Sequence[tuple[str, Sequence[Sequence[int]]]] | None
                  = None, overlap: bool = True) -> Plan:
        """Gather the step's loads, plan, validate, migrate (collective; see the module doc).

        Args:
            routes: this rank's routes, ``[T, L, K]`` int tensors: one per micro-batch without
                ``phases``; one per sequence with them.
            phases: the step's passes (:mod:`relibra.runtime.schedule`), ``[(phase name,
                micro-batches), ...]`` in the order they run, each micro-batch a list of sequence
                indices; None is one training pass over the micro-batches of ``routes``.
            overlap: plan the step's placement in the background while the first
                ``overlap_micro_batches`` forward-only micro-batches before the first training pass
                (the Balancer's; all of them with None) run on the placement of the step before;
                the experts move as the next micro-batch starts (:meth:`prepare_training`). False
                plans and moves now, and every pass runs on the new placement.

        Returns the plan of the first micro-batches to run (without ``phases``, the step's plan).
        """
        t0 = time.perf_counter()
        self._end_step()
        error = step_routes_fault(routes, self.L, self.K, self.E) or self._check_optimizer()
        if not error and phases is not None:
            error = schedule_fault(phases, len(routes))
        passes = None if error else build_passes(routes, phases)
        M = sum(p.num_micro_batches for p in passes) if passes else -1
        if self.group is not None:  # every rank joins, also one with bad input (its signature is zero)
            mine = schedule_signature(passes)
            signatures = all_gather_flat(mine, self.group)
            good = signatures[:, 0] > 0
            if not error and bool(good.all()) and bool((signatures != mine).any()):
                counts = [int(sig[2:2 + 2 * int(sig[0]):2].sum()) for sig in signatures]
                error = (f"ranks disagree on the number of micro-batches: {counts}" if phases is None else
                         "ranks disagree on the schedule (phases and micro-batches per pass): " + "; ".join(
                             f"rank {r}: {describe_signature(sig)}" for r, sig in enumerate(signatures)))
        if self.edp_group is not None:  # every rank joins, also one with bad routes
            mm = torch.tensor([M, -M], dtype=torch.int64)
            all_reduce_(mm, self.edp_group, op=dist.ReduceOp.MAX)
            if not error and (int(mm[0]) != M or -int(mm[1]) != M):
                error = "expert-data-parallel replicas disagree on the number of micro-batches (or one has bad routes)"
        self._agree(error, "Balancer.plan_step: bad input")

        local = count_loads([r.cpu() for p in passes for r in p.routes], self.E)  # [M, L, E], ids checked above
        source_GMLE = local[None] if self.group is None else all_gather_flat(local, self.group)
        loads = source_GMLE.sum(0)
        offsets_MLE = (source_GMLE.cumsum(0) - source_GMLE)[self.rank]
        for p in passes:
            p.offsets_MLE, p.source_MLGE = offsets_MLE[p.rows], source_GMLE[:, p.rows].permute(1, 2, 0, 3)
        first_train = next(p.index for p in passes if p.name == TRAIN)
        early_rows = early_micro_batches(sum(p.num_micro_batches for p in passes[:first_train]), overlap,
                                         self.overlap_micro_batches)
        for p in passes:
            p.early = max(0, min(p.num_micro_batches, early_rows - p.first))
        early = [p for p in passes if p.early]
        self._passes, self._loads, self._early_rows = passes, loads, early_rows
        for layer in self.layers:
            layer.realised_rows = {}
        self._realised = {}
        plan_loads = loads[sum([list(range(p.first, p.first + p.num_micro_batches)) for p in passes
                                if p.name == TRAIN], [])]
        if self.rank == 0 and self.edp_group is not None:  # placement from the loads of every EDP replica
            all_reduce_(plan_loads, self.edp_group)
        self._plan_loads = plan_loads  # what the policy plans on (rank 0: summed over EDP replicas)
        plan_policy = self._policy_plan(plan_loads)
        try:
            if early:
                t_plan, plan, error, failure = self._on_rank0(lambda: plan_on(
                    self.policy, loads[:self._early_rows], self.placement, self.topology, self.policy_name),
                    loads[:self._early_rows])
                plan = self._share(plan, error, failure, self._early_rows, t_plan)
                row = 0
                for p in early:
                    p.early_plan = plan.micro_batches(row, row + p.early)
                    row += p.early
                self._pending = BackgroundPlan(plan_policy) if self.rank == 0 else None
                self.plan = early[0].early_plan
                self._record_metrics([(plan, loads[:self._early_rows])], [(p.name, p.early) for p in early], None,
                                     t_plan, time.perf_counter() - t0)
            else:
                self._pending = BackgroundPlan(plan_policy, in_thread=False) if self.rank == 0 else None
                self.plan = self.prepare_training(t0)
        except BaseException:
            self._passes = self.plan = None  # nothing installable after a failed plan_step
            raise
        self.steps_planned += 1
        return passes[0].early_plan if passes[0].early else passes[0].plan

    def _policy_plan(self, plan_loads: torch.Tensor):
        """The policy's plan of the training passes' loads, checked (rank 0; runs in the background)."""
        def plan() -> Plan:
            out = self.policy.plan(plan_loads.clone(), self.topology)
            if not isinstance(out, Plan):
                raise ValueError(f"policy returned {type(out).__name__}, not a relibra.Plan")
            out.validate(self.topology, plan_loads)
            return out
        return plan

    def _on_rank0(self, make: Any, loads_MLE: torch.Tensor) -> tuple[float, Plan | None, str, BaseException | None]:
        """Rank 0 runs ``make()`` and drops idle replicas: ``(seconds, plan, error text, failure)``."""
        if self.rank != 0:
            return 0.0, None, "", None
        t0, plan, error, failure = time.perf_counter(), None, "", None
        try:
            plan = drop_idle_replicas(make(), loads_MLE, self.topology, self.replica_min_gain)
        except Exception as exc:  # noqa: BLE001 - shared with every rank, then raised
            error, failure, plan = failure_text(f"policy {self.policy_name!r}", exc), exc, None
        return time.perf_counter() - t0, plan, error, failure

    def prepare_training(self, started: float | None = None) -> Plan:
        """Finish the step's placement and move the experts (collective; the first training
        micro-batch calls it when :meth:`plan_step` planned in the background).

        Rank 0 waits for the background plan, plans the replicas of the other passes that run on
        it, and shares the result; the experts (weights, gradients, optimizer state) move; every
        pass with micro-batches after the early ones gets its plan. Returns the plan of those
        passes on the new placement (all their micro-batches, the early ones of a pass that
        started early included). A policy's failure raises the same error on every rank, nothing
        moved, and the step is over (call ``plan_step`` again).
        """
        if self._passes is None:
            raise RuntimeError("Balancer.prepare_training: no step is planned (call plan_step first)")
        main = self._passes_after_early()
        if main[0].plan is not None:  # planned and moved already
            return join_plans([p.plan for p in main])
        t0 = time.perf_counter() if started is None else started
        rows = torch.cat([torch.arange(p.first, p.first + p.num_micro_batches) for p in main])
        loads, waited, t_plan = self._loads[rows], 0.0, 0.0
        plan, error, failure = None, "", None
        if self.rank == 0:
            try:
                train, failure, t_plan, waited = self._pending.result()
            except BaseException as exc:  # interrupted while waiting: told to every rank, then re-raised
                train, failure = None, exc
            self._pending = None
            if failure is not None:
                error = (failure_text(f"policy {self.policy_name!r}", failure) if isinstance(failure, Exception)
                         else f"planning was interrupted on rank 0 by {failure!r}")
            else:
                plan, error, failure = self._main_plan(train, main)
            if self.edp_group is not None:
                plan, error = edp_plan(plan, error, loads, self.topology, self.policy_name, self.edp_group,
                                       getattr(self.policy, "replan", None))
            if not error:
                _, plan, error, failure = self._on_rank0(lambda: plan, loads)
        try:
            plan = self._share(plan, error, failure, len(rows), t_plan)
            migration = self._adopt_placement(plan.placement)
        except BaseException:
            self._passes = self.plan = None  # the step cannot train (nothing moved): plan_step again
            raise
        self._split(plan, main)
        parts = [(p.early_plan, self._loads[p.first:p.first + p.early]) for p in self._passes if p.early]
        parts += [(p.plan.micro_batches(p.early, p.num_micro_batches), self._loads[p.first + p.early:p.rows.stop])
                  for p in main if p.early < p.num_micro_batches]
        plan_step_seconds = self._metrics.get("plan_step_seconds")
        self._record_metrics(parts, [(p.name, p.num_micro_batches) for p in self._passes], migration, t_plan,
                             time.perf_counter() - t0, waited_seconds=waited)
        if started is None:  # planned in the background: plan_step's own time, and this call's
            self._metrics.update(plan_step_seconds=plan_step_seconds,
                                 prepare_training_seconds=time.perf_counter() - t0)
        return plan

    def _passes_after_early(self) -> list[Pass]:
        """The passes with micro-batches on the step's placement (all but those that run only early)."""
        return [p for p in self._passes if p.early < p.num_micro_batches]

    def _main_plan(self, train: Plan, main: list[Pass]) -> tuple[Plan | None, str, BaseException | None]:
        """Rank 0: the policy's training plan with the replicas of the forward-only passes on its
        placement, in schedule order: ``(plan, error text, failure)``. Where the policy's new
        placement does not pay its move (:func:`move_pays` with ``placement_min_gain`` and
        ``cost_model``), the experts stay: the training passes get replica plans on the current
        placement instead, and a policy that offers ``placement_kept(placement)`` is told."""
        try:
            train = self._move_or_stay(train, main)
            parts, row = [], 0
            for p in main:
                if p.name == TRAIN:
                    M = p.num_micro_batches
                    parts.append(Plan(train.topology, train.placement, train.spare_experts[row:row + M],
                                      train.slot_tokens[row:row + M], train.intra_node_replicas, train.policy))
                    row += M
                else:
                    parts.append(plan_on(self.policy, self._loads[p.rows], train.placement, self.topology,
                                         self.policy_name))
            joined = join_plans(parts)
            if train.info.get("placement_kept"):
                joined.info["placement_kept"] = True
            return joined, "", None
        except Exception as exc:  # noqa: BLE001 - shared with every rank, then raised
            return None, failure_text(f"policy {self.policy_name!r}", exc), exc

    def _move_or_stay(self, train: Plan, main: list[Pass]) -> Plan:
        """``train`` if its placement pays its move, else the training loads' plan on the current one."""
        if train.placement.equal(self.placement) or (self.placement_min_gain <= 0 and self.cost_model is None):
            return train
        loads = self._plan_loads
        stay = plan_on(self.policy, loads, self.placement, self.topology, self.policy_name)
        if move_pays(train, stay, loads, self.placement_min_gain, self.cost_model):
            return train
        kept = getattr(self.policy, "placement_kept", None)
        if callable(kept):
            kept(self.placement)
        stay.info.update(placement_kept=True)
        return stay

    def _split(self, plan: Plan, passes: list[Pass]) -> None:
        """Each pass's share of ``plan`` (its micro-batches, in order)."""
        row = 0
        for p in passes:
            M = p.num_micro_batches
            p.plan = plan.micro_batches(row, row + M)
            row += M

    def _end_step(self) -> None:
        """The step before is over: its replica caches close, its background planning is awaited."""
        for p in self._passes or ():
            if p.cache is not None:  # its replica gradients not yet home are dropped
                p.cache.close()
        if self._pending is not None:
            self._pending.result()
        self.plan, self._passes, self._pending, self._replicas, self._current, self._metrics = (
            None, None, None, None, None, {})

    def _share(self, plan: Plan | None, error: str, failure: BaseException | None, M: int, t_plan: float) -> Plan:
        return share_plan(plan, error, failure, M, t_plan, group=self.group, rank=self.rank, topology=self.topology,
                          num_layers=self.L, policy_name=self.policy_name)

    def _adopt_placement(self, new: Placement):
        """Move the experts (weights, grads, optimizer state) to ``new``, then switch every layer
        to it. Returns the migration's report (None in one process or when nothing moves); a
        failed migration raises on every rank with nothing changed."""
        from .migration import migrate_experts, permute_experts

        self.complete_migration()
        old, migration = self.placement, None
        if new.equal(old):
            return None
        tensors = [[layer.experts.gate_up_proj, layer.experts.down_proj] for layer in self.layers]
        if self.group is None:
            permute_experts(tensors, self.optimizer, old, new)
        else:
            migration = migrate_experts(tensors, self.optimizer, old, new, self.topology, group=self.group,
                                        agree_group=self.edp_group, defer_state=self._can_defer_state())
            self._state_move = migration.state_move
        for l, layer in enumerate(self.layers):
            layer._set_home_experts(new.home_experts[l])
        return migration

    def _can_defer_state(self) -> bool:
        """Whether this move may leave the optimizer state in flight (hooks the optimizer once):
        ``defer_optimizer_state`` True, or ``"auto"`` with the experts on a GPU."""
        defer = self.defer_optimizer_state
        if defer == "auto":
            defer = self.layers[0].experts.local_weights()[0].device.type == "cuda"
        if not defer or self.optimizer is None:
            return False
        if self._held is not self.optimizer:
            if not hold_optimizer(self.optimizer, lambda: self._state_move is not None, self.complete_migration):
                return False
            self._held = self.optimizer
        return True

    def complete_migration(self) -> None:
        """Finish the optimizer-state half of the last expert move, if one is in flight
        (collective over the EP group; nothing to do otherwise).

        ``optimizer.step()`` calls it first (a hook), and so do :meth:`state_dict`, the next move
        and the checkpoint helpers; call it yourself, on every rank, before reading the
        optimizer's state any other way. If the state's transfer failed, the weights moved back
        (:mod:`relibra.runtime.state_move`): every layer is on the old placement again, the step's
        plans are dropped (``plan_step`` again) and MigrationError is raised on every rank.
        """
        move, self._state_move = self._state_move, None
        if move is None:
            return
        try:
            waited = move.finish()
        except MigrationError:
            for l, layer in enumerate(self.layers):
                layer._set_home_experts(move.weights_on.home_experts[l])
            self._passes = self.plan = None
            raise
        self._metrics["state_move_wait_seconds"] = waited
