"""Balancer: the training-loop face of relibra (plan per step, migrate, replicas per micro-batch).

Legend: M micro-batches of the step, L MoE layers (model order), E experts, K top-k,
G ranks of the expert-parallel group, T_m tokens of micro-batch m on this rank.

    balancer = Balancer(model, mesh=mesh, policy="hybrid", optimizer=opt, spare_slots_per_gpu=1)
    balancer.plan_step(routes)          # routes: list of M int tensors [T_m, L, K] (this rank's)
    for m, x in enumerate(micro_batches):
        with balancer.micro_batch(m):   # installs replica plans + routes of m in every layer
            model(x).sum().backward()
    opt.step()

``plan_step`` is collective over the EP group. It validates the routes locally and agrees on
the verdict before anything else, so bad input raises the same ValueError on every rank and no
collective is left hanging. Loads are all-gathered ([G, M, L, E]); rank 0 plans with the policy,
validates the plan and broadcasts it (or the policy's error, with its traceback, or the news
that planning was interrupted by KeyboardInterrupt / SystemExit, which rank 0 then re-raises).
If the placement changed, the experts (weights, grads, AdamW state) move with
:func:`relibra.runtime.migration.migrate_experts`; the layers adopt the new placement only after
it succeeded.

Every rank runs every micro-batch of the step, in the same order (0, 1, ..., M-1), empty or not:
a rank with no token in micro-batch m still enters ``micro_batch(m)`` and runs the model's
forward and backward on its empty input, because the layers' collectives pair up across ranks
by order. ``micro_batch(m)`` agrees (phase, m) with the EP group as its block starts and ends,
and every MoE layer's forward agrees (phase, m, layer); a rank out of step (micro-batches in
another order, an empty one skipped) makes every rank raise the same ValueError naming where
each side is, instead of aborting or hanging the world. relibra can catch this only at its own
collectives: a rank that skips the whole block of a step's last micro-batch reaches the
caller's next collective (a loss all-reduce, the optimizer's) first.

Replicas live a run, not a micro-batch: one kept in its spare slot over micro-batches ``a..b`` is
fetched once as ``micro_batch(a)`` starts and its gradient, accumulated on the rank, goes home once
in ``b``'s backward, added into the home expert's gradient inside autograd. So run micro-batches
0..M-1 in order, each with its backward (in its block or after it, before the next one's), before
``optimizer.step()``; expert weights must not change within a step. What breaks this raises on
every rank (:mod:`relibra.runtime.replica_cache` has the lifecycle, checkpointing and exceptions).
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from numbers import Integral, Real
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..plan import Placement, Plan
from ..registry import get_policy
from ..routing.loads import count_loads
from ..routing.routes import step_routes_fault
from ..topology import Topology
from .comm import all_gather_flat, all_gather_text, all_reduce_, broadcast_, first_error
from .fsdp import edp_plan, fsdp_layers
from .layer import BLOCK_END, BLOCK_START, PHASES, ReLibraMoE, agree_in_step, micro_batch_contexts
from .optimizer_stamp import placement_stamp, stamp_optimizer
from .replica_cache import ReplicaCache, guard_optimizer
from .router import check_int_argument

__all__ = ["Balancer"]

_PLANNED, _FAILED, _INTERRUPTED = 0, 1, 2  # what rank 0 tells the EP group after planning


def _with_note(text: str, note: str) -> str:
    """``text`` with ``note`` at the end of its first line (a traceback may follow)."""
    first, newline, rest = text.partition("\n")
    return f"{first} {note}{newline}{rest}"


def _failure_text(what: str, exc: BaseException) -> str:
    """``what failed: Type: message`` and, below it, the exception's traceback (shared with every rank)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    return f"{what} failed: {type(exc).__name__}: {exc}\ntraceback on rank 0:\n{tb}"


class Balancer:
    """Plans every step with a policy and makes the plan true in every ReLibraMoE of ``model``.

    Args:
        model: module holding ReLibraMoE layers (found in ``model.modules()`` order; that order
            is the layer axis of routes and loads).
        mesh: the layers' expert-parallel DeviceMesh; None for a single process.
        policy: a registered name or an object with ``plan(loads [M, L, E], topology) -> Plan``.
        optimizer: its state of expert parameters moves with reorders (None: no state).
        spare_slots_per_gpu: spare slots for replicas (the layers adopt this topology).
        policy_options: keyword options for ``get_policy(name, **policy_options)``.
        replica_min_gain: replicas of a (micro-batch, layer) whose busiest GPU is less than this
            fraction below the same placement without replicas are dropped (their tokens go
            home): no replica traffic when there is nothing worth balancing. 0 keeps every one.
        edp_mesh: 1-D mesh of the expert-data-parallel replicas (ranks holding the same home
            slots, e.g. FSDP2 over it, see :mod:`relibra.runtime.fsdp`; default: the layers' ``edp_mesh``
            set by :func:`relibra.runtime.fsdp.apply_fsdp`). With more than one replica, EDP rank 0
            plans the placement on the loads summed over the replicas and broadcasts it; each
            EP group then splits its own tokens on it (``replicate_on`` if the policy's plan
            had replicas, no replicas otherwise), so every replica keeps the same homes.
    """

    def __init__(self, model: nn.Module, mesh=None, policy: Any = "hybrid", optimizer=None,
                 spare_slots_per_gpu: int = 1, policy_options: dict | None = None,
                 replica_min_gain: float = 0.05, edp_mesh=None) -> None:
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, ReLibraMoE)]
        self.layers: list[ReLibraMoE] = [m for _, m in named]
        self.layer_names = [n or "<model>" for n, _ in named]  # module names, "<model>" for the root
        if not self.layers:
            raise ValueError("model holds no ReLibraMoE layer")
        first = self.layers[0]
        for i, layer in enumerate(self.layers):
            if (layer.num_experts, layer.top_k) != (first.num_experts, first.top_k):
                raise ValueError(f"MoE layer {i} has {layer.num_experts} experts / top_k {layer.top_k}, "
                                 f"layer 0 has {first.num_experts} / {first.top_k}; one Balancer needs one shape")
            if layer.mesh is not mesh and not (mesh is not None and layer.mesh == mesh):
                raise ValueError(f"MoE layer {i} was built with a different mesh than the Balancer's")
        check_int_argument("spare_slots_per_gpu", spare_slots_per_gpu, 0)
        if policy_options is not None and not isinstance(policy_options, dict):
            raise ValueError(f"policy_options must be a dict of keyword options, got {type(policy_options).__name__}")
        if isinstance(replica_min_gain, bool) or not isinstance(replica_min_gain, Real) \
                or not 0.0 <= replica_min_gain < 1.0:
            raise ValueError(f"replica_min_gain must be a number in [0, 1), got {replica_min_gain!r}")
        self.replica_min_gain = float(replica_min_gain)
        self.mesh, self.optimizer = mesh, optimizer
        self.E, self.K, self.L = first.num_experts, first.top_k, len(self.layers)
        if mesh is None:
            self.topology = Topology(1, 1, self.E, 0, first.topology.num_expert_groups)
        else:
            self.topology = Topology.from_mesh(mesh, self.E, spare_slots_per_gpu,
                                               num_expert_groups=first.topology.num_expert_groups)
        if isinstance(policy, str):
            self.policy_name = policy
            self.policy = get_policy(policy, **(policy_options or {}))
        else:
            if not callable(getattr(policy, "plan", None)):
                raise ValueError(f"policy must be a registered name or have plan(loads, topology), "
                                 f"got {type(policy).__name__}")
            self.policy_name, self.policy = type(policy).__name__, policy
        self.group, self.rank = first.ep_group, first.ep_rank
        self._fsdp, self.edp_group = fsdp_layers(self.layers, edp_mesh)
        for i, layer in enumerate(self.layers):
            layer.set_topology(self.topology)
            layer.moe_layer_index = i
        self.plan: Plan | None = None
        self.steps_planned = 0  # successful plan_step calls (restored by load_state_dict)
        self._routes: list[torch.Tensor] | None = None
        self._offsets_MLE: torch.Tensor | None = None
        self._metrics: dict = {}
        self._replicas: ReplicaCache | None = None  # this step's replica weights and gradients
        self._guarded = None  # the optimizer hooked by replica_cache.guard_optimizer
        if optimizer is not None:  # a plain optimizer.state_dict() names the placement its rows follow
            stamp_optimizer(optimizer, lambda: placement_stamp(self.placement, self.topology, self.rank))

    # ------------------------------------------------------------------ placement
    @property
    def placement(self) -> Placement:
        """Current placement ``[L, E]`` (rows of every layer)."""
        return Placement(torch.stack([layer.home_experts_K for layer in self.layers]))

    # ------------------------------------------------------------------ collectives
    @property
    def world(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

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
    def plan_step(self, routes: Sequence[torch.Tensor]) -> Plan:
        """Gather the step's loads, plan, validate, migrate (collective; see the module doc)."""
        t0 = time.perf_counter()
        # a failed step must not leave the previous step's routes installable by micro_batch
        self.plan, self._routes, self._offsets_MLE, self._metrics = None, None, None, {}
        if self._replicas is not None:  # the last step is over: its replica gradients not yet home are dropped
            self._replicas.close()
            self._replicas = None
        error = step_routes_fault(routes, self.L, self.K, self.E) or self._check_optimizer()
        M = len(routes) if not error else -1
        if self.group is not None:
            Ms = torch.zeros(self.world, dtype=torch.int64)
            Ms[self.rank] = M + 1  # 0 marks a rank whose routes are bad (it reports why)
            all_reduce_(Ms, self.group)
            if not error and bool((Ms > 0).all()) and bool((Ms != M + 1).any()):
                error = f"ranks disagree on the number of micro-batches: {(Ms - 1).tolist()}"
        if self.edp_group is not None:  # every rank joins, also one with bad routes
            mm = torch.tensor([M, -M], dtype=torch.int64)
            all_reduce_(mm, self.edp_group, op=dist.ReduceOp.MAX)
            if not error and (int(mm[0]) != M or -int(mm[1]) != M):
                error = "expert-data-parallel replicas disagree on the number of micro-batches (or one has bad routes)"
        self._agree(error, "Balancer.plan_step: bad input")

        local = count_loads([r.cpu() for r in routes], self.E)  # [M, L, E], ids checked above
        routes = [r.to(torch.int64) for r in routes]
        if self.group is None:
            source_GMLE = local[None]
        else:
            source_GMLE = all_gather_flat(local, self.group)
        loads = source_GMLE.sum(0)

        plan, error, failure, t_plan = None, "", None, 0.0
        if self.rank == 0:
            tp = time.perf_counter()
            edp_root = self.edp_group is None or dist.get_rank(self.edp_group) == 0
            plan_loads = loads
            if self.edp_group is not None:  # placement from the loads of every EDP replica
                plan_loads = loads.clone()
                all_reduce_(plan_loads, self.edp_group)
            try:
                if edp_root:
                    plan = self.policy.plan(plan_loads.clone(), self.topology)
                    if not isinstance(plan, Plan):
                        raise ValueError(f"policy returned {type(plan).__name__}, not a relibra.Plan")
                    plan.validate(self.topology, plan_loads)
            except Exception as exc:  # noqa: BLE001 - shared with every rank below, then raised
                error, failure, plan = _failure_text(f"policy {self.policy_name!r}", exc), exc, None
            except BaseException as exc:  # KeyboardInterrupt, SystemExit: told to every rank, then re-raised
                error, failure, plan = f"planning was interrupted on rank 0 by {exc!r}", exc, None
            if self.edp_group is not None:
                plan, error = edp_plan(plan, error, loads, self.topology, self.policy_name, self.edp_group,
                                       getattr(self.policy, "replan", None))
            if not error:
                try:
                    plan = self._drop_idle_replicas(plan, loads)
                except Exception as exc:  # noqa: BLE001 - shared with every rank below, then raised
                    error, failure, plan = _failure_text(f"policy {self.policy_name!r}", exc), exc, None
            t_plan = time.perf_counter() - tp
        plan = self._share_plan(plan, error, failure, M, t_plan)
        migration = self._adopt_placement(plan.placement)
        self.plan, self._routes = plan, routes
        self.steps_planned += 1
        for layer in self.layers:
            layer.realised_rows = {}
        self._offsets_MLE = (source_GMLE.cumsum(0) - source_GMLE)[self.rank]
        self._source_MLGE = source_GMLE.permute(1, 2, 0, 3)
        if self.group is not None and self.topology.spare_slots_per_gpu:
            self._replicas = ReplicaCache(self.layers, plan.spare_experts, plan.placement.home_experts,
                                          plan.intra_node_replicas, self.topology, self.rank, prefetch=not self._fsdp)
            if self.optimizer is not None and self.optimizer is not self._guarded:
                guard_optimizer(self.optimizer, lambda opt: self._replicas if opt is self.optimizer else None)
                self._guarded = self.optimizer
        self._record_metrics(plan, loads, migration, t_plan, time.perf_counter() - t0)
        return plan

    def _drop_idle_replicas(self, plan: Plan, loads: torch.Tensor) -> Plan:
        """Empty the spare slots of (micro-batch, layer)s where replicas gain < replica_min_gain."""
        t = self.topology
        if self.replica_min_gain <= 0 or t.spare_slots_per_gpu == 0:
            return plan
        base = Plan.without_replicas(plan.placement, loads, t)
        busiest, base_busiest = plan.gpu_loads().amax(-1), base.gpu_loads().amax(-1)
        idle = (plan.replicas() > 0) & (busiest.double() >= base_busiest.double() * (1 - self.replica_min_gain))
        if not bool(idle.any()):
            return plan
        spare, tokens = plan.spare_experts.clone(), plan.slot_tokens.clone()
        spare[idle] = -1
        tokens[idle] = base.slot_tokens[idle]
        out = Plan(t, plan.placement, spare, tokens, plan.intra_node_replicas, plan.policy, dict(plan.info))
        out.info["replicas_dropped"] = int(plan.replicas()[idle].sum())
        out.validate(t, loads)
        return out

    def _share_plan(self, plan: Plan | None, error: str, failure: BaseException | None, M: int,
                    t_plan: float) -> Plan:
        """Rank 0's plan on every rank; or its ``error`` raised on every rank.

        A policy's exception (``failure``, rank 0 only) travels as its text and traceback and is
        chained on rank 0; an interruption (KeyboardInterrupt, SystemExit) is announced to the
        other ranks, which raise RuntimeError, and re-raised as it was on rank 0.
        """
        t = self.topology
        interrupted = failure is not None and not isinstance(failure, Exception)
        if self.group is None:
            if interrupted:
                raise failure
            if error:
                raise ValueError(f"Balancer.plan_step: {_with_note(error, '(nothing was changed)')}") from failure
            return plan
        sizes = (self.L * t.num_experts, M * self.L * t.num_spare_slots, M * self.L * t.num_physical_slots)
        head = torch.zeros(4, dtype=torch.int64)
        if self.rank == 0:
            head[0] = _INTERRUPTED if interrupted else _FAILED if error else _PLANNED
            head[1] = int(plan.intra_node_replicas) if plan is not None else 0
            head[2] = int(t_plan * 1e9)
        broadcast_(head, 0, self.group)
        if int(head[0]) != _PLANNED:
            text = all_gather_text(error if self.rank == 0 else "", self.group)[0]
            if int(head[0]) == _INTERRUPTED:
                if self.rank == 0:
                    raise failure
                raise RuntimeError(f"Balancer.plan_step: {text}; stopping this rank too "
                                   f"(nothing was changed on any rank)")
            raise ValueError(f"Balancer.plan_step: {_with_note(text, '(nothing was changed on any rank)')}") \
                from failure
        body = torch.zeros(sum(sizes), dtype=torch.int64)
        if self.rank == 0:
            body = torch.cat([plan.placement.home_experts.reshape(-1), plan.spare_experts.reshape(-1),
                              plan.slot_tokens.reshape(-1)])
        broadcast_(body, 0, self.group)
        if self.rank == 0:
            return plan
        he, sp, st = torch.split(body, sizes)
        return Plan(t, Placement(he.view(self.L, t.num_experts).clone()),
                    sp.view(M, self.L, t.num_spare_slots).clone(), st.view(M, self.L, t.num_physical_slots).clone(),
                    bool(head[1]), self.policy_name)

    def _adopt_placement(self, new: Placement):
        """Move the experts (weights, grads, optimizer state) to ``new``, then switch every layer
        to it. Returns the migration's report (None in one process or when nothing moves); a
        failed migration raises on every rank with nothing changed."""
        from .migration import migrate_experts, permute_experts

        old, migration = self.placement, None
        if new.equal(old):
            return None
        tensors = [[layer.experts.gate_up_proj, layer.experts.down_proj] for layer in self.layers]
        if self.group is None:
            permute_experts(tensors, self.optimizer, old, new)
        else:
            migration = migrate_experts(tensors, self.optimizer, old, new, self.topology,
                                        group=self.group, agree_group=self.edp_group)
        for l, layer in enumerate(self.layers):
            layer._set_home_experts(new.home_experts[l])
        return migration

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The Balancer's part of a checkpoint, the same on every rank (collective): ``version``,
        ``policy``, ``policy_state`` (the planning rank's), ``placement [L, E]``, ``topology``,
        ``layers``, ``top_k``, ``steps_planned``; plain data (docs/checkpoints.md)."""
        from .checkpoint import planner_policy_state

        return {"version": 1, "policy": self.policy_name, "policy_state": planner_policy_state(self),
                "placement": self.placement.home_experts.clone(), "topology": dict(vars(self.topology)),
                "layers": list(self.layer_names), "top_k": self.K, "steps_planned": self.steps_planned}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore :meth:`state_dict`'s output (collective). Checked first: a fault raises the same
        ValueError naming the key on every rank, nothing changed. Then the experts move to the
        saved placement if the topology is this one's, the policy's state is restored if it is
        the same policy (another: an error with ``strict``, else it starts fresh), and the step
        count. No plan is installed afterwards (docs/checkpoints.md)."""
        from .checkpoint import agree_fault, restored_placement
        from .checkpoint_checks import balancer_state_fault

        agree_fault(self, balancer_state_fault(self, state, strict), "Balancer.load_state_dict")
        placement = restored_placement(self, state)
        if placement is not None:
            self._adopt_placement(placement)
        if state["policy"] == self.policy_name and hasattr(self.policy, "load_state_dict"):
            self.policy.load_state_dict(state["policy_state"])
        self.steps_planned = int(state["steps_planned"])
        self.plan, self._routes, self._offsets_MLE, self._metrics = None, None, None, {}

    # ------------------------------------------------------------------ micro-batches
    @contextlib.contextmanager
    def micro_batch(self, m: int) -> Iterator[None]:
        """Install micro-batch ``m``'s replica plans and routes in every layer for the block.

        Every rank runs every micro-batch, in order, empty or not (see the module doc). The
        block agrees its position with the EP group as it starts (before the replica fetch, a
        collective) and as it ends normally, unless every layer was built with
        ``agree_input_errors=False``; a rank out of step raises the same ValueError everywhere.
        """
        if self.plan is None:
            raise RuntimeError("Balancer.micro_batch: no plan is installed (plan_step was not called, or the "
                               "last plan_step failed); call plan_step with this step's routes first")
        if isinstance(m, bool) or not isinstance(m, Integral):
            raise ValueError(f"Balancer.micro_batch: the micro-batch index must be an int, got {m!r}")
        phase = PHASES.index("train")  # the only phase the Balancer runs today
        agree_order = self.group is not None and any(layer.agree_input_errors for layer in self.layers)
        fault = "" if self._replicas is None else self._replicas.entry_fault(m)
        if agree_order:  # before the range check: a rank alone at a bad index is out of step
            found = agree_in_step(self.group, phase, m, BLOCK_START, fault)
            fault = "" if found is None else f"rank {found[0]}: {found[1]}"
        if fault:
            raise ValueError(f"Balancer.micro_batch: {fault}")
        if not 0 <= m < self.plan.num_micro_batches:
            raise IndexError(f"micro-batch {m} out of range [0, {self.plan.num_micro_batches})")
        ctxs = micro_batch_contexts(self.layers, self.plan, m, phase, self._routes[m], self._offsets_MLE[m],
                                    self._source_MLGE[m], self.rank, self._replicas)
        for layer, ctx in zip(self.layers, ctxs):
            layer.install(ctx)
        in_flight = sys.exc_info()[1]
        try:
            yield
            # a block closed by an ExitStack while an exception propagates did not end normally:
            # its rank may have left a collective half done, so it must not start another
            if agree_order and sys.exc_info()[1] is in_flight:
                agree_in_step(self.group, phase, m, BLOCK_END)
        finally:
            for layer in self.layers:
                layer.install(None)

    # ------------------------------------------------------------------ metrics
    def _record_metrics(self, plan: Plan, loads, migration, t_plan: float, t_step: float) -> None:
        t = self.topology
        static = Plan.without_replicas(Placement.contiguous(t, self.L), loads, t)
        ex = self.layers[0].experts
        bytes_per_expert = 3 * ex.dim * ex.hidden_dim * ex.gate_up_proj.element_size()
        self._metrics = {
            "policy": self.policy_name,
            "planned_gpu_loads": plan.gpu_loads(),  # [M, L, G]
            "planned_imbalance": float(plan.imbalance().mean()),
            "planned_imbalance_max": float(plan.imbalance().max()),
            "static_imbalance": float(static.imbalance().mean()),
            "experts_moved": 0 if migration is None else int(migration.experts_moved),
            "migration_bytes_sent": 0 if migration is None else int(migration.bytes_sent),
            "replica_bytes": float(plan.replicas().sum()) * bytes_per_expert,
            "planning_seconds": t_plan,
            "plan_step_seconds": t_step,
        }

    def metrics(self, gather_realised: bool = False, as_tensors: bool = False) -> dict:
        """This step's metrics as plain Python numbers, strings and (nested) lists.

        A logger takes the dict as it is (``wandb.log(balancer.metrics())``; TensorBoard's
        ``add_scalar`` per numeric key). Keys: ``policy``, ``planned_gpu_loads`` ``[M][L][G]``,
        ``planned_imbalance`` (mean) / ``planned_imbalance_max`` (busiest over mean GPU),
        ``static_imbalance`` (the same loads on the contiguous placement without replicas),
        ``experts_moved``, ``migration_bytes_sent``, ``replica_bytes``, ``planning_seconds``,
        ``plan_step_seconds``. With ``gather_realised`` (collective) also ``realised_gpu_loads``
        ``[M][L][G]``, the rows each rank's dispatch computed, and ``realised_imbalance``.
        ``as_tensors=True`` keeps the load tables as int64 tensors.
        """
        out = dict(self._metrics)
        if gather_realised and self.plan is not None:
            M = self.plan.num_micro_batches
            local = torch.zeros(M, self.L, dtype=torch.int64)
            for l, layer in enumerate(self.layers):
                for m, rows in layer.realised_rows.items():
                    if m < M:
                        local[m, l] = rows
            if self.group is None:
                real = local[..., None]
            else:
                allr = all_gather_flat(local, self.group)
                real = allr.permute(1, 2, 0)
            g = real.double()
            mean = g.mean(-1)
            imb = torch.where(mean > 0, g.amax(-1) / mean.clamp(min=1e-30), torch.ones_like(mean))
            out.update(realised_gpu_loads=real, realised_imbalance=float(imb.mean()))
        if not as_tensors:
            out = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        return out

    def __repr__(self) -> str:
        """One line: policy, layers, experts, topology and the installed plan (no tensors)."""
        plan = "none" if self.plan is None else f"{self.plan.num_micro_batches} micro-batches"
        return (f"Balancer(policy={self.policy_name!r}, layers={self.L}, experts={self.E}, top_k={self.K}, "
                f"topology=[{self.topology}], plan={plan})")
