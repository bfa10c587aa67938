"""``reorder``: once a step, re-home experts so every micro-batch is balanced across nodes.

Inter-batch expert reordering (ReLibra). From the exact loads of all the step's micro-batches
``[M, L, E]`` it picks a new placement with exactly ``H`` home experts per GPU:

1. experts -> nodes, per layer: longest-first packing (heaviest summed load first, into the
   node that raises ``sum_m max_n node_load[m, n]`` least), then local search swapping expert
   pairs between the node that is busiest in the worst micro-batches and the nodes lightest
   there, accepting swaps that lower that sum (plus the migration cost);
2. experts -> GPUs inside each node, per (layer, node): the same two steps against
   ``sum_m max_g gpu_load[m, g]``.

Replicas inside a node cannot repair a node that is overloaded in one micro-batch, so the
node objective is per micro-batch, not on the summed load. Spare slots stay empty.

Migration: ``migration_weight`` w prices one expert changing home node at ``w`` times the
layer's mean expert load of the step (tokens), against the objective in tokens; a move between
GPUs of one node costs that times ``inter_node_bandwidth / intra_node_bandwidth``. The policy
remembers its placement between ``plan`` calls.

- ``w > 0`` (later steps): incremental search from the previous placement. Stage 1 swaps expert
  pairs between nodes, first against the overload objective (every node's load above its
  micro-batch's mean, summed: smooth where several nodes tie for the busiest, where swaps
  against ``F`` stall), then against ``F``; the overload stage raises the move price on GPUs
  that already send more experts than the mean, because the busiest sender sets the migration
  time. Stage 2 swaps between GPUs of a node; an expert that arrived on a node stays on the GPU
  freed by one that left it, so every GPU receives as many experts as it sends. A swap is applied only
  when its gain exceeds its move cost, the best gain per moved expert first, one swap per
  problem per round, at most ``max_swaps`` rounds per search, all layers at once. Stage 1 keeps
  a layer's previous nodes unless ``F + cost`` drops below keeping them, and a large ``w``
  keeps them.
- ``w = 0``: ignores the previous placement (fresh search as above), except that each stage
  keeps the previous assignment where it scores as well (so unchanged loads move nothing).
- The first plan of a fresh policy (or after the topology or layer count changes) is free: the
  move away from the contiguous start is a one-time cost amortised over training, so that plan
  is the fresh search whatever ``w`` (ties still keep the contiguous start), then settled: for
  ``w > 0`` the incremental search at ``w`` runs from it until it moves nothing, so the same
  loads planned again keep the placement (this can only lower the node objective).
"""

from __future__ import annotations

import math
import time

import torch

from ..plan import Placement, Plan
from ..topology import Topology
from .base import check_loads
from .budget import SearchBudget, check_budget_options
from .packing_search import BinPairs, MovePrices, greedy_pack, objective, swap_search

__all__ = ["ReorderPolicy", "reorder_placement", "incremental_node_search", "INCREMENTAL_PAIRS", "WORK_BUDGET"]

# bin pairs of the incremental search: each of the 2 busiest bins with the bin lightest where it leads
# (wider pairs cost more time than they gain)
INCREMENTAL_PAIRS = BinPairs(busiest=2, partners=1)
# bin pairs of the overload descent that precedes it (wider pairs cost more time than they gain)
_OVERLOAD_PAIRS = BinPairs(busiest=2, partners=1)
# overload moves cost this many times the move price (cheaper moves too much, dearer keeps imbalance)
_OVERLOAD_MOVE_PRICE = 2.0
# at most this many overload rounds (about 20 suffice on the default trace)
_OVERLOAD_ROUNDS = 60
# fresh search: at most this many rounds of the incremental search to settle the result
_SETTLE_ROUNDS = 8
#: default work budget of one plan call's searches (:class:`~relibra.policies.budget.SearchBudget`):
#: about 0.6 s of one core on the development machines; typical loads spend a fraction of it
WORK_BUDGET = 2.5e8
# how steeply the node stage's move price rises on GPUs sending more experts than the mean
_SPREAD = 10.0


def reorder_placement(loads_MLE: torch.Tensor, topology: Topology, previous: Placement | None = None,
                      migration_weight: float = 0.0, max_swaps: int = 200, settle_weight: float = 0.0,
                      budget: SearchBudget | None = None) -> Placement:
    """New home placement for ``loads_MLE [M, L, E]`` (see module docstring). Deterministic
    (unless ``budget`` bounds wall-clock seconds).

    ``settle_weight`` (fresh search only, ``migration_weight = 0``): repeat the incremental
    search at that weight from the result until it moves nothing (at most ``_SETTLE_ROUNDS``),
    so that the same loads planned again at that weight keep the placement. ``budget``: shared
    by every search of the call; once spent, the searches left keep their start.
    """
    if previous is not None and migration_weight > 0:
        return _incremental(loads_MLE, topology, previous, migration_weight, max_swaps, budget)
    M, L, E = loads_MLE.shape
    N, Gn = topology.num_nodes, topology.gpus_per_node
    w_LEM = loads_MLE.to(torch.float64).permute(1, 2, 0).contiguous()
    prev_gpu = previous.home_gpu(topology) if previous is not None else None  # [L, E]
    # 1. experts -> nodes
    node = _search(w_LEM, N, prev_gpu // Gn if previous is not None else None, max_swaps, budget, "node search")
    # 2. experts -> GPUs inside each node: items of (layer, node) in expert-id order
    experts, w_BIM = _node_items(w_LEM, node, N)
    prev_local = None
    if previous is not None:
        prev_local = _local(prev_gpu, experts, N, Gn)
    gpu = _search(w_BIM, Gn, prev_local, max_swaps, budget, "GPU search")
    placement = _assemble(gpu, experts, topology)
    for _ in range(_SETTLE_ROUNDS if settle_weight > 0 else 0):
        settled = _incremental(loads_MLE, topology, placement, settle_weight, max_swaps, budget, "settle: ")
        if settled.equal(placement) or (budget is not None and budget.cut):
            break
        placement = settled
    return placement


def _incremental(loads_MLE: torch.Tensor, topology: Topology, previous: Placement, migration_weight: float,
                 max_swaps: int, budget: SearchBudget | None = None, stage: str = "") -> Placement:
    """Local search from ``previous``: node-level swaps, then GPU-level swaps inside nodes, each
    applied only when its gain exceeds its move cost, best gain per move first."""
    M, L, E = loads_MLE.shape
    N, Gn = topology.num_nodes, topology.gpus_per_node
    w_LEM = loads_MLE.to(torch.float64).permute(1, 2, 0).contiguous()
    prev_gpu = previous.home_gpu(topology)  # [L, E]
    prev_node = prev_gpu // Gn
    unit = w_LEM.sum((1, 2)) / E * migration_weight  # [L] cost of one inter-node move
    node = incremental_node_search(w_LEM, prev_node, N, unit, max_swaps, prev_gpu, topology.num_gpus, budget, stage)
    # an expert that arrives on a node takes the GPU freed by one that left it (same count per
    # (layer, node)): pair them in (layer, node, expert id) order
    start_gpu = prev_gpu.clone()
    moved = node != prev_node  # [L, E]
    if bool(moved.any()):
        lay, exp = moved.nonzero(as_tuple=True)  # row-major: by layer, then expert id
        key_in = (lay * N + node[lay, exp]) * E + exp
        key_out = (lay * N + prev_node[lay, exp]) * E + exp
        arrivals, leavers = key_in.argsort(), key_out.argsort()
        start_gpu[lay[arrivals], exp[arrivals]] = prev_gpu[lay[leavers], exp[leavers]]
    experts, w_BIM = _node_items(w_LEM, node, N)
    start_local = _local(start_gpu, experts, N, Gn)
    prev_local = _local(prev_gpu, experts, N, Gn)  # -1: arrived from another node
    ratio = topology.inter_node_bandwidth / topology.intra_node_bandwidth
    intra_unit = (unit * ratio).repeat_interleave(N)
    # an arrival stays on the GPU its partner left: that GPU then sends and receives one expert,
    # and the node stage spread the senders. Its price (more than the problem's whole load, which
    # bounds any gain) keeps every swap from moving it; the others are priced as intra moves.
    arrived = prev_local < 0
    fixed = (w_BIM.sum((1, 2)) + 1.0)[:, None]
    prices = torch.where(arrived, fixed, intra_unit[:, None])
    moves = MovePrices(torch.where(arrived, start_local, prev_local), intra_unit, lambda assign: prices)
    _stage(budget, stage + "incremental GPU search")
    gpu = swap_search(w_BIM, start_local, Gn, pairs=INCREMENTAL_PAIRS, moves=moves, max_rounds=max_swaps,
                      budget=budget)
    return _assemble(gpu, experts, topology)


def incremental_node_search(w_LEM: torch.Tensor, prev_node: torch.Tensor, N: int, unit: torch.Tensor,
                            max_swaps: int, prev_gpu: torch.Tensor | None = None, num_gpus: int = 0,
                            budget: SearchBudget | None = None, stage: str = "") -> torch.Tensor:
    """Stage 1 of the incremental search: ``[L, E]`` node of every expert, from ``prev_node``.

    Swaps that lower the busiest node of a micro-batch stall when several nodes tie for the
    maximum: lowering one of them gains nothing until all are lowered. So the search first
    descends the smoother overload objective (every node's load above its micro-batch's mean,
    summed; moves priced at ``_OVERLOAD_MOVE_PRICE`` x ``unit``), then polishes against the
    step-time objective ``F`` (sum over micro-batches of the busiest node) at ``unit``. Each
    layer keeps the previous assignment unless ``F + unit * moves`` drops below its ``F``.
    """
    base = unit * _OVERLOAD_MOVE_PRICE
    price = None if prev_gpu is None else _spread_prices(prev_node, prev_gpu, num_gpus, base)
    _stage(budget, stage + "incremental node search (overload)")
    node = swap_search(w_LEM, prev_node, N, score="overload", pairs=_OVERLOAD_PAIRS,
                       moves=MovePrices(prev_node, base, price), max_rounds=min(max_swaps, _OVERLOAD_ROUNDS),
                       budget=budget)
    _stage(budget, stage + "incremental node search")
    node = swap_search(w_LEM, node, N, pairs=INCREMENTAL_PAIRS, moves=MovePrices(prev_node, unit),
                       max_rounds=max_swaps, budget=budget)
    priced = objective(w_LEM, node, N) + unit * (node != prev_node).sum(-1)
    keep = priced >= objective(w_LEM, prev_node, N)
    return torch.where(keep[:, None], prev_node, node)


def _spread_prices(prev_node: torch.Tensor, prev_gpu: torch.Tensor, num_gpus: int, unit: torch.Tensor):
    """Move prices ``[L, E]`` that rise on GPUs already sending more experts than the mean.

    Moved experts leave from their home GPU (and, paired with the arrivals, the same GPU
    receives as many), and the slowest GPU sets the migration time: a GPU ``c`` departures
    above the mean ``m`` (over all layers) prices its experts at ``unit * (1 + _SPREAD * c /
    (m + 1))``; at or below the mean, at ``unit``.
    """
    gpu = prev_gpu.reshape(-1)

    def price(assign: torch.Tensor) -> torch.Tensor:
        moved = (assign != prev_node).reshape(-1).to(unit.dtype)
        count = torch.zeros(num_gpus, dtype=unit.dtype).scatter_add_(0, gpu, moved)
        mean = count.mean()
        factor = 1.0 + _SPREAD * (count - mean).clamp(min=0) / (mean + 1.0)
        return unit[:, None] * factor[prev_gpu]

    return price


def _node_items(w_LEM: torch.Tensor, node_LE: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts of every (layer, node) in id order ``[L, N, E/N]`` and their loads ``[L*N, E/N, M]``."""
    L, E, M = w_LEM.shape
    per_node = E // N
    experts = (node_LE * E + torch.arange(E)).argsort(dim=1).view(L, N, per_node)
    w_BIM = w_LEM.gather(1, experts.reshape(L, E)[:, :, None].expand(L, E, M)).view(L * N, per_node, M)
    return experts, w_BIM


def _local(gpu_LE: torch.Tensor, experts: torch.Tensor, N: int, Gn: int) -> torch.Tensor:
    """``[L*N, E/N]`` GPU inside the node of every expert of ``experts``, -1 if on another node."""
    L, _, per_node = experts.shape
    pg = gpu_LE.gather(1, experts.reshape(L, -1)).view(L, N, per_node)
    local = pg - torch.arange(N)[None, :, None] * Gn
    return torch.where((local >= 0) & (local < Gn), local, -1).view(L * N, per_node)


def _assemble(gpu_BI: torch.Tensor, experts: torch.Tensor, topology: Topology) -> Placement:
    L, N, per_node = experts.shape
    Gn = topology.gpus_per_node
    home_gpu = torch.empty(L, N * per_node, dtype=torch.int64)
    home_gpu.scatter_(1, experts.reshape(L, -1),
                      (gpu_BI.view(L, N, per_node) + torch.arange(N)[None, :, None] * Gn).reshape(L, -1))
    return Placement.from_home_gpu(home_gpu, topology)


def _stage(budget: SearchBudget | None, name: str) -> None:
    """Name the stage now searching, for ``budget.cut``."""
    if budget is not None:
        budget.stage = "reorder " + name


def _search(w_BIM: torch.Tensor, K: int, prev_BI: torch.Tensor | None, max_swaps: int,
            budget: SearchBudget | None = None, stage: str = "") -> torch.Tensor:
    """Fresh search (``w = 0``): swap search from the longest-first packing (then over the
    incremental search's bin pairs as well); where the previous
    assignment scores as well (``F``, per problem), keep the previous one: no moves.

    Items whose previous bin is outside this problem (``-1``) make the previous assignment
    incomplete; such problems take the search result.
    """
    _stage(budget, stage)
    fresh = swap_search(w_BIM, greedy_pack(w_BIM, K), K, max_rounds=max_swaps, budget=budget)
    # polish over the incremental search's bin pairs too, so that a later step with the same
    # loads finds no improving swap there and moves nothing at any weight
    polish = BinPairs(INCREMENTAL_PAIRS.busiest, max(2, INCREMENTAL_PAIRS.partners))
    fresh = swap_search(w_BIM, fresh, K, pairs=polish, max_rounds=max_swaps, budget=budget)
    if prev_BI is None:
        return fresh
    B, I, _ = w_BIM.shape
    bins = prev_BI.clamp(min=-1) % (K + 1)  # -1 (outside this problem) counts in bin K
    counts = torch.zeros(B, K + 1, dtype=torch.int64).scatter_add_(1, bins, torch.ones_like(prev_BI))
    whole = (counts[:, :K] == I // K).all(-1)  # the previous assignment is complete here
    if not bool(whole.any()):
        return fresh
    rows = whole.nonzero().squeeze(1)
    kept = prev_BI[rows]
    better = objective(w_BIM[rows], kept, K) <= objective(w_BIM[rows], fresh[rows], K) * (1 + 1e-12)
    out = fresh.clone()
    out[rows[better]] = kept[better]
    return out


class ReorderPolicy:
    """Inter-batch reordering; spare slots stay empty.

    Args:
        migration_weight: price of moving one expert to another node, in units of the
            layer's mean expert load of the step (float >= 0; 0 prices moves at nothing).
            The default, 0.02, moves few experts a step and keeps the balance of a free search
            on the default trace (the sweep: ``relibra bench --option
            hybrid.migration_weight=W``).
        max_swaps: local-search rounds per stage (int >= 0; 0 keeps the greedy packing, or the
            previous placement for ``w > 0``).
        work_budget: work units all searches of one ``plan`` call may spend
            (:func:`~relibra.policies.budget.round_cost`; ``inf``: no bound). Counted, so every
            rank planning the same step stops at the same round. The default,
            :data:`WORK_BUDGET`, is about 0.6 s of one core on the development machines on any
            loads; typical loads spend a fraction of it.
        time_budget_s: opt-in bound on the wall-clock seconds of one ``plan`` call's searches
            (None: none). Not deterministic: only where one rank plans and broadcasts (the
            Balancer), never where every rank calls ``plan`` for itself.

    A plan a budget cut short says so in ``plan.info["budget_cut"]`` ("" when none did).
    """

    def __init__(self, migration_weight: float = 0.02, max_swaps: int = 200, work_budget: float = WORK_BUDGET,
                 time_budget_s: float | None = None) -> None:
        if (
            isinstance(migration_weight, bool)
            or not isinstance(migration_weight, (int, float))
            or not math.isfinite(migration_weight)
            or migration_weight < 0
        ):
            raise ValueError(f"reorder option migration_weight must be a finite number >= 0, got {migration_weight!r}")
        if isinstance(max_swaps, bool) or not isinstance(max_swaps, int) or max_swaps < 0:
            raise ValueError(f"reorder option max_swaps must be an int >= 0, got {max_swaps!r}")
        check_budget_options("reorder", work_budget, time_budget_s)
        self.migration_weight = float(migration_weight)
        self.max_swaps = max_swaps
        self.work_budget = float(work_budget)
        self.time_budget_s = time_budget_s
        self.placement: Placement | None = None
        self._topology: Topology | None = None

    def budget(self) -> SearchBudget:
        """A fresh budget for one ``plan`` call, from this policy's options."""
        return SearchBudget(self.work_budget, self.time_budget_s)

    def next_placement(self, loads: torch.Tensor, topology: Topology, budget: SearchBudget | None = None
                       ) -> Placement:
        """Compute this step's placement and remember it (``loads`` already checked)."""
        L = loads.shape[1]
        prev = self.placement
        first = prev is None or self._topology != topology or prev.num_layers != L
        if first:  # the first move away from the contiguous start is free (one-time cost)
            prev = Placement.contiguous(topology, L)
        weight = 0.0 if first else self.migration_weight
        placement = reorder_placement(loads, topology, prev, weight, self.max_swaps,
                                      settle_weight=self.migration_weight if first else 0.0, budget=budget)
        self.placement, self._topology = placement, topology
        return placement

    def placement_kept(self, placement: Placement) -> None:
        """The Balancer kept the experts on ``placement`` instead of this step's plan (the move
        did not pay): the next step searches from, and prices its moves against, ``placement``."""
        self.placement = placement

    def plan(self, loads: torch.Tensor, topology: Topology) -> Plan:
        loads = check_loads(loads, topology)
        start = time.perf_counter()
        budget = self.budget()
        placement = self.next_placement(loads, topology, budget)
        plan = Plan.without_replicas(placement, loads, topology, policy="reorder")
        plan.info.update(reorder_seconds=time.perf_counter() - start, reorder_work=budget.spent,
                         budget_cut=budget.cut)
        return plan

    def state_dict(self) -> dict:
        """What the next plan depends on: ``{"placement": [L, E] int64, "topology": its fields}``
        of the last plan, or ``{}`` before the first. Plain tensors and numbers."""
        if self.placement is None:
            return {}
        return {"placement": self.placement.home_experts.clone(), "topology": dict(vars(self._topology))}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output. Raises ValueError naming the key, with the policy
        unchanged, unless ``state`` is ``{}`` or a placement that validates on its topology."""
        if not isinstance(state, dict):
            raise ValueError(f"reorder state must be a dict, got {type(state).__name__}")
        if not state:
            self.placement, self._topology = None, None
            return
        if set(state) != {"placement", "topology"}:
            raise ValueError(f"reorder state must hold the keys 'placement' and 'topology', got {sorted(state)}")
        fields, home = state["topology"], state["placement"]
        try:
            if not isinstance(fields, dict):
                raise ValueError(f"must be a dict of Topology fields, got {type(fields).__name__}")
            topology = Topology(**fields)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"reorder state key 'topology': {exc}") from None
        if not isinstance(home, torch.Tensor):
            raise ValueError(f"reorder state key 'placement' must be a tensor [L, E], got {type(home).__name__}")
        placement = Placement(home.detach().cpu().clone())
        try:
            placement.validate(topology)
        except ValueError as exc:
            raise ValueError(f"reorder state key 'placement': {exc}") from None
        self.placement, self._topology = placement, topology
