"""Balancer: the training-loop face of relibra (plan per step, migrate, replicas per micro-batch).

Legend: M micro-batches of the step, L MoE layers (model order), E experts, K top-k,
G ranks of the expert-parallel group, T_m tokens of micro-batch m on this rank.

    balancer = Balancer(model, mesh=mesh, policy="hybrid", optimizer=opt, spare_slots_per_gpu=1)
    balancer.plan_step(routes)          # routes: list of M int tensors [T_m, L, K] (this rank's)
    for m, x in enumerate(micro_batches):
        with balancer.micro_batch(m):   # installs replica plans + routes of m in every layer
            model(x).sum().backward()
    opt.step()

An RL step of several passes over its sequences (docs/rl-step.md): routes per sequence and a
schedule, each pass with its own micro-batches (lists of sequence indices):

    balancer.plan_step(seq_routes, phases=[("logprob", rollout_groups), ("train", packed_groups)])
    for m, group in enumerate(rollout_groups):          # on the placement of the step before,
        with torch.no_grad(), balancer.micro_batch(m, "logprob"):   # while the step's is planned
            old_logps.append(model(batch(group)))
    for m, group in enumerate(packed_groups):           # m == 0: the experts move first
        with balancer.micro_batch(m, "train"):
            loss(model(batch(group))).backward()
    opt.step()

``plan_step`` is collective over the EP group. It validates the routes (and the schedule) locally
and agrees on the verdict before anything else, so bad input raises the same ValueError on every
rank and no collective is left hanging. Loads are all-gathered ([G, M, L, E]); rank 0 plans with
the policy, validates the plan and broadcasts it (or the policy's error, with its traceback, or
the news that planning was interrupted by KeyboardInterrupt / SystemExit, which rank 0 then
re-raises). If the placement changed, the experts (weights, grads, AdamW state) move with
:func:`relibra.runtime.migration.migrate_experts`; the layers adopt the new placement only after
it succeeded. With forward-only passes before the first training pass, the placement is planned
in the background while they run and the move waits for the first training micro-batch
(:mod:`relibra.runtime.step_planning` has the order of collectives).

Every rank runs every micro-batch of a pass, in the same order (0, 1, ..., M-1), empty or not,
and the passes in schedule order: a rank with no token in micro-batch m still enters
``micro_batch(m)`` and runs the model's forward (and backward) on its empty input, because the
layers' collectives pair up across ranks by order. ``micro_batch(m, phase)`` agrees (pass, m)
with the EP group as its block starts and ends, and every MoE layer's forward agrees (pass, m,
layer); a rank out of step (micro-batches in another order, an empty one skipped) makes every
rank raise the same ValueError naming where each side is, instead of aborting or hanging the
world. relibra can catch this only at its own collectives: a rank that skips the whole block of
a step's last micro-batch reaches the caller's next collective (a loss all-reduce, the
optimizer's) first.

Replicas live a run, not a micro-batch: one kept in its spare slot over micro-batches ``a..b`` of
a pass is fetched once as ``micro_batch(a)`` starts and its gradient, accumulated on the rank, goes
home once in ``b``'s backward, added into the home expert's gradient inside autograd. So run a
training pass's micro-batches 0..M-1 in order, each with its backward (in its block or after it,
before the next one's), before ``optimizer.step()``; expert weights must not change within a
pass. What breaks this raises on every rank (:mod:`relibra.runtime.replica_cache` has the
lifecycle, checkpointing and exceptions). Each pass has its replica cache of its own.
"""

from __future__ import annotations

import contextlib
import sys
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from ..plan import Placement, Plan
from ..registry import get_policy
from ..topology import Topology
from .comm import all_gather_flat
from .fsdp import fsdp_layers
from .layer import BLOCK_END, BLOCK_START, ReLibraMoE, agree_in_step, micro_batch_contexts
from .metrics import plain, planned_metrics, realised_metrics
from .optimizer_stamp import placement_stamp, stamp_optimizer
from .replica_cache import ReplicaCache, guard_optimizer
from .router import check_int_argument
from .schedule import BackgroundPlan, Pass, pass_fault, resolve_pass
from .state_move import StateMove
from .step_planning import StepPlanning

if TYPE_CHECKING:
    from ..sim.cost_config import CostConfig

__all__ = ["Balancer"]


class Balancer(StepPlanning):
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
        placement_min_gain: a new placement whose step (busiest GPUs summed over the training
            micro-batches and layers) is less than this fraction below the same loads' replica
            plan on the current placement is not adopted: the experts stay and nothing moves
            (the policy's ``placement_kept(placement)`` is called when it has one). 0 adopts
            every placement the policy plans. The default, 1 %, refuses moves that buy nothing
            (balanced routes; replicas that already level the current placement) and keeps the
            ones ``hybrid`` makes on RL traces at DeepSeek-V3 scale: there a reorder lowers the
            busiest GPUs by only 2-3 % against replicas on the old placement, yet in the cost
            model it saves about 4 % of the step (replica and cross-node traffic): at 5 % every
            placement is kept at concentration 16 and 64 and ``hybrid``'s gap to ideal doubles.
            Where moves are dear (a slow interconnect) raise it, or ``migration_weight``, or
            give ``cost_model``.
        cost_model: a :class:`~relibra.sim.cost_config.CostConfig` of this model on this machine
            (e.g. ``relibra.sim.profile.profile_config`` of a ``relibra calibrate`` profile), or
            None. With one, the placement guard compares modelled step times, the move's
            migration included (:func:`relibra.runtime.plan_share.move_pays`), and
            ``placement_min_gain`` is the margin: a move is made where the machine's links make
            it pay, whatever the policy's own move price assumed. Its expert count and MoE
            layer count must be the model's.
        edp_mesh: 1-D mesh of the expert-data-parallel replicas (ranks holding the same home
            slots, e.g. FSDP2 over it, see :mod:`relibra.runtime.fsdp`; default: the layers' ``edp_mesh``
            set by :func:`relibra.runtime.fsdp.apply_fsdp`). With more than one replica, EDP rank 0
            plans the placement on the loads summed over the replicas and broadcasts it; each
            EP group then splits its own tokens on it (``replicate_on`` if the policy's plan
            had replicas, no replicas otherwise), so every replica keeps the same homes.
        defer_optimizer_state: when experts move, move their weights and gradients before the
            micro-batch that needs them and their optimizer state (fp32 master copy and moments,
            most of the bytes) in the background while the step computes, finished by a hook
            before ``optimizer.step()`` (:mod:`relibra.runtime.state_move`; :meth:`complete_migration`).
            Exact either way. ``"auto"`` (default): where the experts live on a GPU; on CPU ranks
            the transfer shares the rank's core and the optimizer step waits for it, measured
            slower than the one-shot move (docs/migration.md). True / False: always / never. An
            optimizer without step and state-dict hooks moves everything at once.
        overlap_micro_batches: with forward-only passes before the first training pass (an RL
            step's log-prob pass), how many of their micro-batches run on the placement of the
            step before while the step's is planned in the background; the experts move as the
            next one starts, so the rest of the step runs on its own placement. 1 (default): a
            step plans in well under one log-prob micro-batch at DeepSeek-V3 size (0.3-0.7 s on
            one core), and every micro-batch more on the old placement costs more than it hides
            (docs/rl-step.md). None: every forward-only pass before the first training pass.
    """

    def __init__(self, model: nn.Module, mesh=None, policy: Any = "hybrid", optimizer=None,
                 spare_slots_per_gpu: int = 1, policy_options: dict | None = None,
                 replica_min_gain: float = 0.05, edp_mesh=None, placement_min_gain: float = 0.01,
                 cost_model: "CostConfig | None" = None, defer_optimizer_state: bool | str = "auto",
                 overlap_micro_batches: int | None = 1) -> None:
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
        if isinstance(placement_min_gain, bool) or not isinstance(placement_min_gain, Real) \
                or not 0.0 <= placement_min_gain < 1.0:
            raise ValueError(f"placement_min_gain must be a number in [0, 1), got {placement_min_gain!r}")
        self.placement_min_gain = float(placement_min_gain)
        if not isinstance(defer_optimizer_state, bool) and defer_optimizer_state != "auto":
            raise ValueError(f"defer_optimizer_state must be True, False or 'auto', got {defer_optimizer_state!r}")
        self.defer_optimizer_state = defer_optimizer_state
        if overlap_micro_batches is not None and (isinstance(overlap_micro_batches, bool) or not isinstance(
                overlap_micro_batches, Integral) or overlap_micro_batches < 1):
            raise ValueError(f"overlap_micro_batches must be an int >= 1 or None, got {overlap_micro_batches!r}")
        self.overlap_micro_batches = None if overlap_micro_batches is None else int(overlap_micro_batches)
        self.mesh, self.optimizer = mesh, optimizer
        self.E, self.K, self.L = first.num_experts, first.top_k, len(self.layers)
        self.cost_model = _check_cost_model(cost_model, self.E, self.L)
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
        self.plan: Plan | None = None  # the plan of the pass that runs (of the step, with one pass)
        self.steps_planned = 0  # successful plan_step calls (restored by load_state_dict)
        self._passes: list[Pass] | None = None  # the step's passes (schedule.py)
        self._current: Pass | None = None  # the pass whose micro-batch ran last
        self._pending: BackgroundPlan | None = None  # rank 0: the step's placement, planned in the background
        self._loads: torch.Tensor | None = None  # [M, L, E] the step's loads, every pass in schedule order
        self._plan_loads: torch.Tensor | None = None  # [M_train, L, E] the loads the policy plans on
        self._early_rows = 0  # micro-batches of the passes that run on the placement of the step before
        self._realised: dict[int, dict[int, int]] = {}  # layer -> row of the step -> rows this rank computed
        self._metrics: dict = {}
        self._replicas: ReplicaCache | None = None  # the replica weights and gradients of the pass that runs
        self._guarded = None  # the optimizer hooked by replica_cache.guard_optimizer
        self._state_move: StateMove | None = None  # the last move's optimizer state, in flight
        self._held = None  # the optimizer hooked by state_move.hold_optimizer
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

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The Balancer's part of a checkpoint, the same on every rank (collective): ``version``,
        ``policy``, ``policy_state`` (the planning rank's), ``placement [L, E]``, ``topology``,
        ``layers``, ``top_k``, ``steps_planned``; plain data (docs/checkpoints.md)."""
        from .checkpoint import planner_policy_state

        if self._pending is not None:  # the policy's state is read after its background planning
            self._pending.result()
        self.complete_migration()  # a checkpoint's optimizer state follows the saved placement
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

        self._end_step()  # a step's background planning finishes before the policy's state is replaced
        agree_fault(self, balancer_state_fault(self, state, strict), "Balancer.load_state_dict")
        placement = restored_placement(self, state)
        if placement is not None:
            self._adopt_placement(placement)
            self.complete_migration()  # a restore is no step to hide the state's move behind
        if state["policy"] == self.policy_name and hasattr(self.policy, "load_state_dict"):
            self.policy.load_state_dict(state["policy_state"])
        self.steps_planned = int(state["steps_planned"])
        self._end_step()

    # ------------------------------------------------------------------ micro-batches
    @contextlib.contextmanager
    def micro_batch(self, m: int, phase: int | str | None = None) -> Iterator[None]:
        """Install micro-batch ``m`` of a pass: its replica plans and routes in every layer.

        ``phase``: the pass, by its index in the schedule or its phase name when one pass has it
        (None: the training pass, with one). Every rank runs every micro-batch of a pass, in order,
        empty or not, and the passes in schedule order (see the module doc). The block agrees its
        position (pass, m) with the EP group as it starts (before any other collective: the
        replica fetch, :meth:`prepare_training` at the first training micro-batch) and as it ends
        normally, unless every layer was built with ``agree_input_errors=False``; a rank out of
        step raises the same ValueError everywhere.
        """
        if self._passes is None:
            raise RuntimeError("Balancer.micro_batch: no plan is installed (plan_step was not called, or the "
                               "last plan_step failed); call plan_step with this step's routes first")
        if isinstance(m, bool) or not isinstance(m, Integral):
            raise ValueError(f"Balancer.micro_batch: the micro-batch index must be an int, got {m!r}")
        index, fault = resolve_pass(self._passes, phase)
        step_pass = self._passes[index]
        fault = fault or pass_fault(self._passes, self._current, step_pass, m)
        cache = step_pass.cache if step_pass is self._current else None
        fault = fault or ("" if cache is None else cache.entry_fault(m))
        agree_order = self.group is not None and any(layer.agree_input_errors for layer in self.layers)
        if agree_order:  # before the range check: a rank alone at a bad index is out of step
            found = agree_in_step(self.group, step_pass.id, m, BLOCK_START, fault)
            fault = "" if found is None else f"rank {found[0]}: {found[1]}"
        if fault:
            raise ValueError(f"Balancer.micro_batch: {fault}")
        if not 0 <= m < step_pass.num_micro_batches:
            raise IndexError(f"micro-batch {m} out of range [0, {step_pass.num_micro_batches}) of pass "
                             f"{step_pass.index} ({step_pass.name})")
        early = m < step_pass.early  # planned on the placement of the step before
        if not early and step_pass.plan is None:  # the first micro-batch after the early ones: the move
            self.prepare_training()
        plan = step_pass.early_plan if early else step_pass.plan
        if step_pass is not self._current or plan is not self.plan:
            self._start_pass(step_pass, plan)
        ctxs = micro_batch_contexts(self.layers, plan, m, step_pass.id, step_pass.routes[m],
                                    step_pass.offsets_MLE[m], step_pass.source_MLGE[m], self.rank, step_pass.cache)
        for layer, ctx in zip(self.layers, ctxs):
            layer.install(ctx)
        in_flight = sys.exc_info()[1]
        try:
            yield
            # a block closed by an ExitStack while an exception propagates did not end normally:
            # its rank may have left a collective half done, so it must not start another
            if agree_order and sys.exc_info()[1] is in_flight:
                agree_in_step(self.group, step_pass.id, m, BLOCK_END)
        finally:
            for layer in self.layers:
                layer.install(None)

    def _start_pass(self, step_pass: Pass, plan: Plan) -> None:
        """Make ``step_pass`` run ``plan`` (its early plan or its plan): a replica cache of its own
        (the early plan's closes: its replicas sit on the placement the experts left, and a
        forward-only pass has no replica gradient), and the rows the pass before computed kept
        for :meth:`metrics`."""
        self._keep_realised()
        if step_pass is self._current and step_pass.cache is not None:
            step_pass.cache.close()
        self._current, self.plan = step_pass, plan
        if self.group is not None and self.topology.spare_slots_per_gpu:
            step_pass.cache = ReplicaCache(self.layers, plan.spare_experts, plan.placement.home_experts,
                                           plan.intra_node_replicas, self.topology, self.rank,
                                           prefetch=not self._fsdp)
            self._replicas = step_pass.cache
            if self.optimizer is not None and self.optimizer is not self._guarded:
                guard_optimizer(self.optimizer, lambda opt: self._replicas if opt is self.optimizer else None)
                self._guarded = self.optimizer

    def _keep_realised(self) -> None:
        """Move the layers' realised rows of the running pass into the step's table."""
        if self._current is None:
            return
        for l, layer in enumerate(self.layers):
            for m, rows in layer.realised_rows.items():
                self._realised.setdefault(l, {})[self._current.first + m] = rows
            layer.realised_rows = {}

    # ------------------------------------------------------------------ metrics
    def _record_metrics(self, parts: list[tuple[Plan, torch.Tensor]], passes: list[tuple[str, int]], migration,
                        t_plan: float, t_step: float, waited_seconds: float = 0.0) -> None:
        """``parts``: ``(plan, loads)`` of the planned micro-batches in schedule order; ``passes``
        their ``(phase, micro-batches)``."""
        ex = self.layers[0].experts
        bytes_per_expert = 3 * ex.dim * ex.hidden_dim * ex.gate_up_proj.element_size()
        self._metrics = planned_metrics(self.policy_name, parts, self.topology, migration, bytes_per_expert,
                                        t_plan, t_step, passes)
        self._metrics["planning_wait_seconds"] = waited_seconds

    def metrics(self, gather_realised: bool = False, as_tensors: bool = False) -> dict:
        """This step's metrics as plain Python numbers, strings and (nested) lists.

        A logger takes the dict as it is (``wandb.log(balancer.metrics())``; TensorBoard's
        ``add_scalar`` per numeric key). Keys (:mod:`relibra.runtime.metrics`): ``policy``,
        ``pass_phases`` and ``pass_micro_batches`` (the planned passes in schedule order: the rows
        of the tables below are their micro-batches in turn), ``planned_gpu_loads``
        ``[M][L][G]``, ``planned_imbalance`` (mean) / ``planned_imbalance_max`` (busiest over
        mean GPU), ``planned_max_vio`` ``[M][L]`` ((max - mean) / mean, verl's) and
        ``planned_balancedness`` ``[M][L]`` (mean / max, vLLM's) with their ``_mean``,
        ``static_imbalance`` (the same loads on the contiguous placement without replicas),
        ``experts_moved``, ``migration_bytes_sent``, ``replica_bytes``, ``planning_seconds``,
        ``plan_step_seconds``, ``planning_wait_seconds`` (how long the first training micro-batch
        waited for planning that ran in the background) and then ``prepare_training_seconds``
        (that wait, the plan's broadcast and the experts' move), and after ``optimizer.step()``
        ``state_move_wait_seconds`` (how long the step waited for the moved experts' optimizer
        state, when it travelled in the background). With ``gather_realised`` (collective)
        also ``realised_gpu_loads`` ``[M][L][G]`` (the rows each rank's dispatch computed),
        ``realised_imbalance``, ``realised_max_vio`` and ``realised_balancedness``.
        ``as_tensors=True`` keeps the tables as tensors.
        """
        out = dict(self._metrics)
        if gather_realised and self._passes is not None:
            self._keep_realised()
            M = sum(p.num_micro_batches for p in self._passes)
            local = torch.zeros(M, self.L, dtype=torch.int64)
            for l, rows in self._realised.items():
                for row, count in rows.items():
                    local[row, l] = count
            real = local[..., None] if self.group is None else all_gather_flat(local, self.group).permute(1, 2, 0)
            out.update(realised_metrics(real))
        return plain(out, as_tensors)

    def __repr__(self) -> str:
        """One line: policy, layers, experts, topology and the installed plan (no tensors)."""
        plan = "none" if self.plan is None else f"{self.plan.num_micro_batches} micro-batches"
        return (f"Balancer(policy={self.policy_name!r}, layers={self.L}, experts={self.E}, top_k={self.K}, "
                f"topology=[{self.topology}], plan={plan})")


def _check_cost_model(cost_model: Any, E: int, L: int) -> "CostConfig | None":
    """``cost_model`` if it is None or a CostConfig of ``E`` experts and ``L`` MoE layers (ValueError naming it)."""
    if cost_model is None:
        return None
    from ..sim.cost_config import CostConfig

    if not isinstance(cost_model, CostConfig):
        raise ValueError(f"cost_model must be a relibra.sim.cost_config.CostConfig or None, "
                         f"got {type(cost_model).__name__}")
    if (cost_model.num_experts, cost_model.num_moe_layers) != (E, L):
        raise ValueError(f"cost_model prices {cost_model.num_experts} experts x {cost_model.num_moe_layers} MoE "
                         f"layers; the model has {E} experts x {L} MoE layers")
    return cost_model
