"""The conformance check every balancing policy must pass: :func:`check_policy` and :func:`check_plan`.

Legend: M micro-batches, L MoE layers, E logical experts, G GPUs, N nodes, H home slots per GPU,
S spare slots per GPU, V spare slots = G*S, P physical slots.

``check_policy`` runs, as hypothesis tests over random topologies and loads (or steps of loads),
the invariants in :data:`INVARIANTS` and raises :class:`PolicyCheckError` naming the invariant,
with the shrunk counterexample in its message. hypothesis is imported when ``check_policy``
runs, never at ``import relibra.testing``.

A policy is given as a registered name, a factory (a class or a function returning a policy) or
a policy object. The determinism and step-after-step checks need fresh objects: a name builds
them with ``relibra.get_policy(name, **options)``, a factory by calling it with ``options``, and
an object is copied with ``copy.deepcopy`` (an object that cannot be copied needs a factory).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterator, Union

import torch

from ..plan import Plan
from ..policies.static import StaticPolicy
from ..registry import get_policy
from ..topology import Topology

__all__ = ["INVARIANTS", "REPLICA_CONTRACTS", "PolicyCheckError", "check_plan", "check_policy"]

#: where a policy's replicas may sit: nowhere, in their expert's home node, or anywhere
REPLICA_CONTRACTS = ("none", "intra_node", "any")

#: every invariant check_policy tests, by the name its failures carry
INVARIANTS = {
    "accepts-valid-loads": "plan(loads, topology) returns on valid loads instead of raising",
    "returns-plan": "it returns a relibra.Plan covering the step's M micro-batches and L layers",
    "loads-untouched": "the loads passed in are not modified",
    "gpu-capacity": "no GPU holds more experts than its H home + S spare slots",
    "plan-validates": "Plan.validate passes: one home per expert, no duplicate copy on a GPU, no tokens "
                      "for empty slots, int64, the plan's topology",
    "replica-contract": "replicas only where the declared contract allows (none / intra_node / any) and, "
                        "when the plan promises intra_node_replicas, inside their expert's home node",
    "loads-conserved": "every expert's copies compute exactly its load",
    "deterministic": "the same input gives the same plan: two fresh policy objects, and the same steps "
                     "fed to two fresh objects, plan identically (every rank plans the same step)",
    "steps-stay-valid": "one object called step after step keeps passing every check above",
    "never-worse-than-static": "(opt-in) the busiest GPU of every micro-batch and layer is never above "
                               "static's",
    "same-loads-move-nothing": "(opt-in) planning the same loads again keeps every expert's home GPU",
}

Contract = Union[str, Callable[[Topology], str]]


class PolicyCheckError(AssertionError):
    """A policy broke an invariant. ``invariant`` names it (a key of :data:`INVARIANTS`);
    ``topology`` and ``loads`` (a list of ``[M, L, E]``, one per step) are the counterexample."""

    def __init__(self, invariant: str, message: str, topology: Topology, loads: list[torch.Tensor]):
        self.invariant, self.topology, self.loads = invariant, topology, loads
        super().__init__(f"[{invariant}] {message}\n  counterexample: {_describe_case(topology, loads)}")


def _describe_case(topology: Topology, loads: list[torch.Tensor]) -> str:
    """The counterexample as Python one can paste: the topology and every step's loads."""
    t = topology
    text = (f"Topology(num_nodes={t.num_nodes}, gpus_per_node={t.gpus_per_node}, num_experts={t.num_experts}, "
            f"spare_slots_per_gpu={t.spare_slots_per_gpu}, num_expert_groups={t.num_expert_groups})")
    for k, loads_MLE in enumerate(loads):
        label = "loads" if len(loads) == 1 else f"step {k + 1} loads"
        text += f", {label} {list(loads_MLE.shape)} = torch.tensor({loads_MLE.tolist()})"
    return text


# ------------------------------------------------------------------ one plan
def check_plan(plan: Any, topology: Topology, loads: torch.Tensor, replicas: str = "any") -> None:
    """Raise :class:`PolicyCheckError` if ``plan`` breaks a per-plan invariant for ``loads [M, L, E]``.

    In order: ``returns-plan``, ``gpu-capacity``, ``plan-validates``, ``replica-contract``
    (``replicas`` is one of :data:`REPLICA_CONTRACTS`), ``loads-conserved``.
    """
    fault = _plan_fault(plan, topology, loads, _checked_contract(replicas))
    if fault:
        raise PolicyCheckError(*fault, topology, [loads])


def _checked_contract(replicas: str) -> str:
    if replicas not in REPLICA_CONTRACTS:
        raise ValueError(f"replicas must be one of {REPLICA_CONTRACTS}, got {replicas!r}")
    return replicas


def _plan_fault(plan: Any, t: Topology, loads_MLE: torch.Tensor, replicas: str) -> tuple[str, str] | None:
    """(invariant, message) of the first invariant ``plan`` breaks, or None."""
    M, L, E = loads_MLE.shape
    if not isinstance(plan, Plan):
        return "returns-plan", f"plan() returned {type(plan).__name__}, not a relibra.Plan"
    tensors = {"spare_experts": (plan.spare_experts, 3), "slot_tokens": (plan.slot_tokens, 3),
               "placement.home_experts": (plan.placement.home_experts, 2)}
    for name, (tensor, ndim) in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != ndim:
            return "returns-plan", f"plan.{name} must be a {ndim}-D tensor, got {_shape_of(tensor)}"
    covered = (tuple(plan.spare_experts.shape[:2]), tuple(plan.slot_tokens.shape[:2]),
               plan.placement.home_experts.shape[0])
    if covered != ((M, L), (M, L), L):
        return "returns-plan", (f"the loads have {M} micro-batches and {L} layers; the plan covers "
                                f"spare_experts {covered[0]}, slot_tokens {covered[1]}, {covered[2]} placement layers")
    fault = _capacity_fault(plan, t)
    if fault:
        return "gpu-capacity", fault
    try:  # everything but the replica promise, which replica-contract reports by name
        dataclasses.replace(plan, intra_node_replicas=False).validate(t)
    except ValueError as exc:
        return "plan-validates", str(exc)
    fault = _replica_fault(plan, t, replicas)
    if fault:
        return "replica-contract", fault
    split = plan.expert_loads()
    if not torch.equal(split, loads_MLE):
        m, l, e = (int(i) for i in (split != loads_MLE).nonzero()[0])
        return "loads-conserved", (f"micro-batch {m}, layer {l}: expert {e} has load {int(loads_MLE[m, l, e])}, "
                                   f"its copies compute {int(split[m, l, e])}")
    return None


def _shape_of(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _capacity_fault(plan: Plan, t: Topology) -> str:
    """Why some GPU holds more experts than its slots, or ""."""
    G, H, S = t.num_gpus, t.home_slots_per_gpu, t.spare_slots_per_gpu
    own = plan.topology
    if isinstance(own, Topology) and own.num_gpus == G and own.slots_per_gpu > t.slots_per_gpu:
        return (f"the plan was made for {own.home_slots_per_gpu} home + {own.spare_slots_per_gpu} spare slots "
                f"per GPU; each of the {G} GPUs has {H} + {S}")
    widths = (("spare_experts", plan.spare_experts.shape[2], G * S, f"{G} GPUs x {S} spare slots"),
              ("slot_tokens", plan.slot_tokens.shape[2], t.num_physical_slots, f"{G} GPUs x {H + S} slots"),
              ("placement.home_experts", plan.placement.home_experts.shape[1], G * H, f"{G} GPUs x {H} home slots"))
    for name, width, room, what in widths:
        if width > room:
            return f"plan.{name} fills {width} slots per micro-batch and layer, there are {room} ({what})"
    return ""


def _replica_fault(plan: Plan, t: Topology, replicas: str) -> str:
    """Why a replica sits where the contract or the plan's own promise forbids it, or ""."""
    spare = plan.spare_experts  # [M, L, V]
    filled = spare >= 0
    if replicas == "none" and bool(filled.any()):
        m, l, r = (int(i) for i in filled.nonzero()[0])
        return (f"micro-batch {m}, layer {l}: spare slot {r} (GPU {r // t.spare_slots_per_gpu}) holds a replica "
                f"of expert {int(spare[m, l, r])}, but the contract is replicas='none'")
    if replicas == "any" and not plan.intra_node_replicas:
        return ""
    S = max(t.spare_slots_per_gpu, 1)
    home_node = plan.placement.home_gpu(t) // t.gpus_per_node  # [L, E]
    expert_node = home_node.expand(spare.shape[0], -1, -1).gather(2, spare.clamp(min=0))  # [M, L, V]
    slot_node = torch.arange(spare.shape[2]) // S // t.gpus_per_node  # [V]
    outside = filled & (expert_node != slot_node)
    if not bool(outside.any()):
        return ""
    m, l, r = (int(i) for i in outside.nonzero()[0])
    e = int(spare[m, l, r])
    rule = "the contract is replicas='intra_node'" if replicas != "any" else (
        f"the plan (policy {plan.policy or '?'}) promises intra_node_replicas=True")
    return (f"micro-batch {m}, layer {l}: the replica of expert {e} in spare slot {r} sits on GPU {r // S} "
            f"of node {int(slot_node[r])}, outside its home node {int(home_node[l, e])}; {rule}")


def _plan_difference(a: Plan, b: Plan) -> str:
    """Where two plans differ, or "" if they are the same plan."""
    fields = (("placement.home_experts", a.placement.home_experts, b.placement.home_experts),
              ("spare_experts", a.spare_experts, b.spare_experts), ("slot_tokens", a.slot_tokens, b.slot_tokens))
    for name, x, y in fields:
        if x.shape != y.shape:
            return f"plan.{name} has shape {tuple(x.shape)} once and {tuple(y.shape)} once"
        if not torch.equal(x, y):
            index = tuple(int(i) for i in (x != y).nonzero()[0])
            return f"plan.{name}{list(index)} is {int(x[index])} once and {int(y[index])} once"
    if a.intra_node_replicas != b.intra_node_replicas:
        return f"plan.intra_node_replicas is {a.intra_node_replicas} once and {b.intra_node_replicas} once"
    return ""


# ------------------------------------------------------------------ resolving the policy
def _factory(policy: Any, options: dict) -> tuple[Callable[[], Any], str]:
    """A function returning a fresh policy object, and the policy's name for messages."""
    if isinstance(policy, str):
        get_policy(policy, **options)  # unknown names and options fail here, before hypothesis
        return (lambda: get_policy(policy, **options)), repr(policy)
    if inspect.isclass(policy) or (callable(policy) and not callable(getattr(policy, "plan", None))):
        name = getattr(policy, "__qualname__", None) or repr(policy)
        return (lambda: policy(**options)), name
    if callable(getattr(policy, "plan", None)):
        if options:
            raise ValueError(f"options {sorted(options)} need a policy name or factory, not a policy object")
        try:
            copy.deepcopy(policy)
        except Exception as exc:
            raise TypeError(f"check_policy copies a policy object with copy.deepcopy to get fresh ones, and "
                            f"{type(policy).__name__} cannot be copied ({exc}); pass its factory instead") from exc
        return (lambda: copy.deepcopy(policy)), type(policy).__qualname__
    raise TypeError(f"policy must be a registered name, a factory or an object with plan(), got {policy!r}")


class _Run:
    """One policy under test: fresh objects, checked plans, the context of each failure."""

    def __init__(self, factory: Callable[[], Any], name: str, replicas: Contract):
        self.factory, self.name, self.replicas = factory, name, replicas

    def fresh(self) -> Any:
        policy = self.factory()
        if not callable(getattr(policy, "plan", None)):
            raise TypeError(f"the factory of policy {self.name} built {type(policy).__name__}, which has no plan()")
        return policy

    def contract(self, topology: Topology) -> str:
        return _checked_contract(self.replicas(topology) if callable(self.replicas) else self.replicas)

    def plan(self, policy: Any, loads_MLE: torch.Tensor, topology: Topology, steps: list[torch.Tensor],
             context: str = "") -> Plan:
        """``policy.plan`` on a copy of the loads; raise naming the invariant if the plan breaks one."""
        given = loads_MLE.clone()
        try:
            plan = policy.plan(given, topology)
        except Exception as exc:  # reported with the counterexample, never swallowed
            message = f"{context}plan() raised {type(exc).__name__}: {exc}"
            raise self.error("accepts-valid-loads", message, topology, steps) from exc
        if not torch.equal(given, loads_MLE):
            raise self.error("loads-untouched", f"{context}plan() modified the loads it was given", topology, steps)
        fault = _plan_fault(plan, topology, loads_MLE, self.contract(topology))
        if fault:
            invariant, message = fault
            if context:  # a later step of one object: the step-after-step invariant, naming the inner one
                invariant, message = "steps-stay-valid", f"{context}[{fault[0]}] {message}"
            raise self.error(invariant, message, topology, steps)
        return plan

    def error(self, invariant: str, message: str, topology: Topology, steps: list[torch.Tensor]) -> PolicyCheckError:
        return PolicyCheckError(invariant, f"policy {self.name}: {message}", topology, steps)


# ------------------------------------------------------------------ the hypothesis tests
def _one_step(run: _Run, topology: Topology, loads_MLE: torch.Tensor, never_worse_than_static: bool,
              same_loads_move_nothing: bool) -> None:
    steps = [loads_MLE]
    policy = run.fresh()
    plan = run.plan(policy, loads_MLE, topology, steps)
    difference = _plan_difference(plan, run.plan(run.fresh(), loads_MLE, topology, steps))
    if difference:
        raise run.error("deterministic", f"two fresh policy objects planned the same loads differently: "
                        f"{difference}", topology, steps)
    if never_worse_than_static:
        busiest_ML = plan.gpu_loads().amax(-1)
        static_ML = StaticPolicy().plan(loads_MLE, topology).gpu_loads().amax(-1)
        worse = busiest_ML > static_ML
        if bool(worse.any()):
            m, l = (int(i) for i in worse.nonzero()[0])
            raise run.error("never-worse-than-static", f"micro-batch {m}, layer {l}: the busiest GPU computes "
                            f"{int(busiest_ML[m, l])} token copies, under static {int(static_ML[m, l])}",
                            topology, steps)
    if same_loads_move_nothing:
        again = run.plan(policy, loads_MLE, topology, steps, context="the same loads planned again: ")
        moved = again.placement.moved_experts(plan.placement, topology)  # [L, E]
        if bool(moved.any()):
            l, e = (int(i) for i in moved.nonzero()[0])
            raise run.error("same-loads-move-nothing", f"planning the same loads again moved {int(moved.sum())} "
                            f"experts, e.g. layer {l} expert {e}", topology, steps)


def _many_steps(run: _Run, topology: Topology, steps: list[torch.Tensor]) -> None:
    first, second = run.fresh(), run.fresh()
    for k, loads_MLE in enumerate(steps):
        context = f"step {k + 1} of {len(steps)} on one policy object: " if k else ""
        plan = run.plan(first, loads_MLE, topology, steps, context)
        difference = _plan_difference(plan, run.plan(second, loads_MLE, topology, steps, context))
        if difference:
            raise run.error("deterministic", f"two fresh policy objects fed the same steps planned step {k + 1} "
                            f"differently: {difference}", topology, steps)


def check_policy(
    policy: Any,
    *,
    replicas: Contract = "any",
    options: dict | None = None,
    max_examples: int = 25,
    topologies: Any = None,
    loads: Callable[..., Any] | None = None,
    steps: int = 3,
    never_worse_than_static: bool = False,
    same_loads_move_nothing: bool = False,
    settings: Any = None,
) -> None:
    """Check a balancing policy against every invariant in :data:`INVARIANTS`, as hypothesis tests.

    Raises :class:`PolicyCheckError` (an AssertionError) naming the first broken invariant, with
    hypothesis's shrunk counterexample (topology and loads, as Python) in its message.

    Args:
        policy: a registered name, a factory (class or function returning a policy object) or
            a policy object (copied with ``copy.deepcopy`` for every fresh object it needs).
        replicas: where the policy's replicas may sit: ``"none"``, ``"intra_node"`` or
            ``"any"``, or a function ``topology -> contract`` (e.g. eplb: intra-node where it
            plans hierarchically). A plan that promises ``intra_node_replicas`` is held to it
            whatever the contract.
        options: keyword options for the name or factory (``get_policy(name, **options)``).
        max_examples: hypothesis examples per test (two tests; each example plans a few times).
        topologies: a hypothesis strategy of :class:`~relibra.topology.Topology` (default
            :func:`relibra.testing.strategies.topologies`).
        loads: a function ``(topology, layers=...) -> strategy`` of int64 ``[M, L, E]`` loads
            (default :func:`relibra.testing.strategies.loads`; ``functools.partial`` narrows it).
        steps: at most this many consecutive steps fed to one object (the step-after-step and
            determinism-over-steps test draws 2 to ``steps``); 1 skips that test.
        never_worse_than_static: opt in to ``never-worse-than-static``.
        same_loads_move_nothing: opt in to ``same-loads-move-nothing``.
        settings: a ``hypothesis.settings`` to start from (default: the loaded profile); the
            deadline and the explain phase are always off, and one failure is reported.

    Call it from a plain test function, not from inside a ``@given`` test (hypothesis does not
    nest).
    """
    try:
        from hypothesis import HealthCheck, Phase, given
        from hypothesis import settings as hypothesis_settings
    except ImportError as exc:
        raise ImportError('check_policy needs hypothesis: pip install "relibra[testing]"') from exc
    from . import strategies

    if not callable(replicas):
        _checked_contract(replicas)
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be an int >= 1, got {max_examples!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    run = _Run(*_factory(policy, dict(options or {})), replicas)
    topologies = strategies.topologies() if topologies is None else topologies
    loads = strategies.loads if loads is None else loads
    parent = hypothesis_settings(settings)
    run_settings = hypothesis_settings(  # the explain phase reruns a failure many times; the message names it
        parent, max_examples=max_examples, deadline=None, report_multiple_bugs=False,
        phases=[phase for phase in parent.phases if phase != Phase.explain],
        suppress_health_check=[*parent.suppress_health_check, HealthCheck.too_slow, HealthCheck.data_too_large],
    )

    @run_settings
    @given(case=strategies.topology_and_loads(topologies, loads))
    def one_step(case):
        with _seeded_torch():
            _one_step(run, *case, never_worse_than_static, same_loads_move_nothing)

    @run_settings
    @given(case=strategies.topology_and_loads(topologies, functools.partial(strategies.step_loads, loads=loads),
                                              steps=(2, steps)))
    def step_after_step(case):
        with _seeded_torch():
            _many_steps(run, *case)

    one_step()
    if steps > 1:
        step_after_step()


@contextlib.contextmanager
def _seeded_torch() -> Iterator[None]:
    """torch's global RNG seeded to 0 for one example and restored after it, so a policy drawing
    from it without a seed fails ``deterministic`` reproducibly (hypothesis seeds ``random`` and
    numpy itself) and the caller's RNG state is left as it was."""
    state = torch.default_generator.get_state()
    torch.default_generator.manual_seed(0)
    try:
        yield
    finally:
        torch.default_generator.set_state(state)
