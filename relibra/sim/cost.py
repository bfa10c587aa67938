"""A cost model of one RL training step of an MoE model under a balancing plan.

Legend: ``M`` micro-batches, ``L`` MoE layers, ``E`` logical experts, ``G`` GPUs, ``N`` nodes,
``V`` spare slots (G*S), ``P`` physical slots.

It is a model, not a measurement (``relibra measure`` checks it against one; ``relibra
calibrate`` measures its machine parameters, :mod:`relibra.sim.profile` reads them). Per
micro-batch and MoE layer, forward plus backward (backward costs ``backward_factor`` = 2x
forward):

1. Expert compute. Slot ``s`` of GPU ``g`` computes ``r_s`` token copies (``plan.slot_tokens``);
   each costs ``3 matrices x 2 flops x hidden x expert_intermediate`` (gated MLP) forward, and a
   slot with any rows costs ``expert_half_rows`` rows more (its weights are read and its weight
   gradients written whatever ``r_s`` is: the grouped GEMM runs at ``r / (r + expert_half_rows)``
   of its large-batch rate). The layer waits for the busiest GPU:
   ``max_g sum_s (r_s + n_half [r_s > 0]) * flops / (peak_flops * mfu)``.
2. Non-MoE work (attention, shared expert, norms): ``2 * non_moe_params + 4 * attn_context *
   attn_width`` flops per token forward, spread evenly over GPUs (balanced by construction).
3. Token all-to-all: dispatch and combine forward, and their two backward transfers, each
   moving ``hidden * a2a_bytes`` per token copy. Tokens originate uniformly on all GPUs (or
   as given by ``source_loads [M, L, G, E]``, each expert's copies then fed in proportion to
   their share). Per GPU, send and receive on two tiers: intra-node (NVLink) and inter-node
   (InfiniBand) with their own bandwidths, full duplex, the tiers concurrent; a transfer
   takes as long as its slowest GPU on its slowest tier. A GPU hosting hot experts receives
   more. ``a2a_overlap`` of it hides behind compute.
4. Replicas. A spare slot that gets a new expert receives its weights (``2 B/param``) from the
   home GPU before the forward pass; a replica leaving a slot (or at the end of the step)
   sends its accumulated gradient back (``replica_grad_bytes`` per param). A home GPU sends
   each replicated expert once (broadcast tree); a GPU receives every replica it hosts. The
   tier is intra-node when the replica sits in its home node, else inter-node.
   ``replica_overlap`` of it hides behind compute. With ``replica_reuse`` = 1 (default, the
   method's design and what ``ReLibraMoE`` does) a replica kept in its slot for the next
   micro-batch costs nothing more (gradients accumulate in place), so a per-step replica set
   (EPLB) pays once a step; with ``replica_reuse`` = 0 every filled slot is fetched and its
   gradient returned every micro-batch (fractions in between pay that share).
   A (micro-batch, layer) with replicas pays ``message_latency_s`` twice (fetch, return).
5. Reorder: every expert whose home GPU changes moves weights and optimizer state
   (``state_bytes_per_param`` = 16) once a step; per GPU in and out counts on the tier of
   the move, and every byte a GPU sends or receives costs ``migration_s_per_byte`` more
   (packing and checksums of :func:`relibra.runtime.migration.migrate_experts`).
   The weights (``weight_bytes``) move before the pass, ``reorder_overlap`` of that hidden
   behind rollout. The optimizer state (the other ``state_bytes_per_param - weight_bytes``)
   travels during the training pass (``state_move_overlap`` of it; the Balancer's
   ``defer_optimizer_state``): only the time its transfer takes beyond the pass's compute
   (expert GEMMs and non-MoE work, when the links carry no all-to-all) is paid; the rest of
   it moves with the weights.
6. Optimizer and host: ``optimizer_s_per_param`` per parameter a GPU updates (its home experts,
   its share of the rest), ``layer_call_s`` of host work per MoE layer call (forward and
   backward of one micro-batch) and ``step_overhead_s`` per step (the Balancer's gathers and
   broadcasts), the same for every policy.
7. Ideal baseline: every GPU exactly at the mean load (its share of the busy experts' fixed
   costs), uniform traffic, nothing moved.

Not modelled: pipeline parallelism and its bubbles, token de-duplication per node (DeepEP),
memory limits, congestion beyond the per-GPU link bandwidths, per-token host work (permute,
unpermute), the planner's own time (``relibra bench`` reports it apart), dense layers and the
LM head (``extra_params`` adds them, balanced).

Parameters, presets and their defaults: :mod:`relibra.sim.cost_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..plan import Placement, Plan, as_loads
from ..policies.replica_cross import cross_node_price as _policy_price
from ..topology import Topology
from .cost_config import CLUSTER_PRESETS, MODEL_PRESETS, CostConfig, make_config

__all__ = ["CostConfig", "MODEL_PRESETS", "CLUSTER_PRESETS", "StepCost", "step_cost", "ideal_step_cost",
           "make_config", "expert_seconds", "slot_seconds", "fixed_seconds", "cross_node_price"]

@dataclass(frozen=True)
class StepCost:
    """Seconds of one step by part (already net of overlap), and its volumes.

    ``optimizer_s`` and ``overhead_s`` (host: layer calls and the step's fixed cost) are the
    same for every plan of one step's loads.
    """

    expert_compute_s: float
    non_moe_s: float
    a2a_s: float
    replica_s: float
    reorder_s: float
    extra_s: float
    tokens: float
    replica_bytes: float
    reorder_bytes: float
    optimizer_s: float = 0.0
    overhead_s: float = 0.0
    planning_s: float = 0.0  # planning on the critical path (live planning only)

    @property
    def total_s(self) -> float:
        return (self.expert_compute_s + self.non_moe_s + self.a2a_s + self.replica_s
                + self.reorder_s + self.extra_s + self.optimizer_s + self.overhead_s + self.planning_s)


def _fb(cfg: CostConfig) -> float:
    return 1.0 + cfg.backward_factor


def _tier_time(send_i, recv_i, send_o, recv_o, cfg: CostConfig) -> torch.Tensor:
    """Per-GPU time of one transfer: tiers concurrent, each full duplex. Inputs in bytes."""
    intra = torch.maximum(send_i, recv_i) / cfg.intra_node_bandwidth
    inter = torch.maximum(send_o, recv_o) / cfg.inter_node_bandwidth
    return torch.maximum(intra, inter)


def a2a_seconds(gpu_copies_MLG: torch.Tensor, topology: Topology, cfg: CostConfig,
                traffic_MLGG: torch.Tensor | None = None) -> torch.Tensor:
    """``[M, L]`` seconds of the 4 token transfers (dispatch, combine, fwd and bwd), net of overlap.

    Args:
        gpu_copies_MLG: token copies each GPU computes. With ``traffic_MLGG`` None the sources
            are uniform: source ``s`` sends ``c_d / G`` of GPU ``d``'s copies.
        traffic_MLGG: token copies sent from source ``s`` to destination ``d`` (overrides).
    """
    G, gpn = topology.num_gpus, topology.gpus_per_node
    node = torch.arange(G) // gpn
    same = node[:, None] == node[None, :]
    eye = torch.eye(G, dtype=torch.bool)
    if traffic_MLGG is None:
        c = gpu_copies_MLG.to(torch.float64)
        node_sum = c.reshape(*c.shape[:2], -1, gpn).sum(-1).repeat_interleave(gpn, dim=-1)
        total = c.sum(-1, keepdim=True)
        recv_i, recv_o = c * (gpn - 1) / G, c * (G - gpn) / G
        send_i, send_o = (node_sum - c) / G, (total - node_sum) / G
    else:
        t = traffic_MLGG.to(torch.float64)
        intra, inter = (same & ~eye).to(t.dtype), (~same).to(t.dtype)
        send_i, send_o = (t * intra).sum(-1), (t * inter).sum(-1)
        recv_i, recv_o = (t * intra).sum(-2), (t * inter).sum(-2)
    b = cfg.hidden * cfg.a2a_bytes
    one = _tier_time(send_i * b, recv_i * b, send_o * b, recv_o * b, cfg).amax(-1)
    latency = cfg.message_latency_s if G > 1 else 0.0
    # dispatch (to experts) and combine (back) take the same time: send and receive swap.
    return 4.0 * (one + latency) * (1.0 - cfg.a2a_overlap)


def source_traffic(plan: Plan, loads_MLE: torch.Tensor, source_loads_MLGE: torch.Tensor) -> torch.Tensor:
    """``[M, L, G, G]`` token copies from each source GPU to each destination GPU.

    Each copy of expert ``e`` takes its share ``slot_tokens / load_e`` of every source's copies
    of ``e`` (a proportional approximation of the split rule).
    """
    t = plan.topology
    phy2log = plan.phy2log()
    M, L, P = phy2log.shape
    load = loads_MLE.to(torch.float64).gather(2, phy2log.clamp(min=0))
    frac = torch.where((phy2log >= 0) & (load > 0), plan.slot_tokens / load.clamp(min=1), 0.0)
    gpu = (torch.arange(P) // t.slots_per_gpu).expand(M, L, P)
    w = torch.zeros(M, L, t.num_experts + 1, t.num_gpus, dtype=torch.float64)
    idx = torch.where(phy2log >= 0, phy2log, t.num_experts) * t.num_gpus + gpu
    w.view(M, L, -1).scatter_add_(2, idx, frac)
    return source_loads_MLGE.to(torch.float64) @ w[:, :, :-1]


def replica_seconds(plan: Plan, cfg: CostConfig) -> tuple[torch.Tensor, float]:
    """``[M, L]`` seconds of replica weight copies and gradient reductions (net of overlap), bytes.

    A slot whose expert changes between micro-batches costs a weight copy for the newcomer and
    a gradient reduction for the leaver; the last micro-batch's replicas reduce at step end. A
    slot that keeps its expert pays ``1 - replica_reuse`` of both.
    """
    t = plan.topology
    spare = plan.spare_experts
    M, L, V = spare.shape
    if V == 0:
        return torch.zeros(M, L, dtype=torch.float64), 0.0
    empty = torch.full((1, L, V), -1, dtype=spare.dtype)
    prev = torch.cat([empty, spare[:-1]], 0)
    nxt = torch.cat([spare[1:], empty], 0)
    filled = (spare >= 0).to(torch.float64)
    keep = 1.0 - cfg.replica_reuse  # share of a kept replica's copy / reduction still paid
    arrive = torch.where(spare != prev, filled, filled * keep)
    leave = torch.where(spare != nxt, filled, filled * keep)
    home_gpu = plan.placement.home_gpu(t)  # [L, E]
    slot_gpu = torch.arange(V) // t.spare_slots_per_gpu
    e_home = home_gpu.expand(M, -1, -1).gather(2, spare.clamp(min=0))  # [M, L, V]
    intra = (e_home // t.gpus_per_node) == (slot_gpu // t.gpus_per_node)
    total = torch.zeros(M, L, dtype=torch.float64)
    count = 0
    for moving, bytes_per_param in ((arrive, cfg.weight_bytes), (leave, cfg.replica_grad_bytes)):
        b = cfg.expert_params * bytes_per_param
        count += float(moving.sum()) * b
        total += cfg.message_latency_s * (moving.sum(-1) > 0)  # one transfer for all of them
        per_tier = []
        for tier in (intra, ~intra):
            m = moving * tier  # [M, L, V] share of a copy each slot pays
            recv = torch.zeros(M, L, t.num_gpus, dtype=torch.float64).scatter_add_(2, slot_gpu.expand(M, L, V), m)
            # the home GPU sends each expert once (broadcast tree), however many replicas
            has = torch.zeros(M, L, t.num_experts, dtype=torch.float64).scatter_reduce_(
                2, spare.clamp(min=0), m, reduce="amax")
            send = torch.zeros(M, L, t.num_gpus, dtype=torch.float64).scatter_add_(2, home_gpu.expand(M, -1, -1), has)
            per_tier.append((send * b, recv * b))
        (si, ri), (so, ro) = per_tier
        total += _tier_time(si, ri, so, ro, cfg).amax(-1)
    return total * (1.0 - cfg.replica_overlap), count


def reorder_seconds(placement: Placement, previous: Placement | None, topology: Topology,
                    cfg: CostConfig, hide_s: float = 0.0) -> tuple[float, float]:
    """Seconds (net of overlap) and bytes to move homes from ``previous`` to ``placement``.

    ``hide_s``: seconds of the training pass's compute the deferred optimizer state travels
    behind (module doc, part 5); only its transfer time beyond them is paid.
    """
    if previous is None:
        return 0.0, 0.0
    old, new = previous.home_gpu(topology), placement.home_gpu(topology)  # [L, E]
    moved = (old != new).to(torch.float64)
    if not bool(moved.any()):
        return 0.0, 0.0
    gpn, G = topology.gpus_per_node, topology.num_gpus
    intra = (old // gpn) == (new // gpn)
    params = []  # send_i, recv_i, send_o, recv_o: [G] parameters each GPU sends and receives per tier
    for tier in (intra, ~intra):
        m = (moved * tier).flatten()
        params.append(torch.zeros(G, dtype=torch.float64).scatter_add_(0, old.flatten(), m) * cfg.expert_params)
        params.append(torch.zeros(G, dtype=torch.float64).scatter_add_(0, new.flatten(), m) * cfg.expert_params)
    later_bytes = max(cfg.state_bytes_per_param - cfg.weight_bytes, 0.0) * cfg.state_move_overlap
    now_bytes = cfg.state_bytes_per_param - later_bytes  # per parameter, before the pass

    def transfer(bytes_per_param: float) -> torch.Tensor:
        return _tier_time(*(p * bytes_per_param for p in params), cfg)

    handled = sum(params) * cfg.state_bytes_per_param * cfg.migration_s_per_byte  # packed and checked, out and in
    now = float((transfer(now_bytes) + handled).max()) + cfg.message_latency_s
    later = float(transfer(later_bytes).max())
    seconds = now * (1.0 - cfg.reorder_overlap) + max(later - hide_s, 0.0)
    return seconds, float(moved.sum()) * cfg.expert_params * cfg.state_bytes_per_param


def _tokens(loads_MLE: torch.Tensor, cfg: CostConfig) -> torch.Tensor:
    """``[M]`` tokens per micro-batch: token copies of the first layer over top-k."""
    return loads_MLE[:, 0].sum(-1).to(torch.float64) / cfg.top_k


def _common(loads_MLE: torch.Tensor, G: int, cfg: CostConfig) -> tuple[float, float, float]:
    M, L, _ = loads_MLE.shape
    tokens = _tokens(loads_MLE, cfg)
    tok_per_gpu = float(tokens.sum()) / G * _fb(cfg) / cfg.flops
    per_token = 2.0 * cfg.non_moe_params + 4.0 * cfg.attn_context * cfg.attn_width
    return tok_per_gpu * per_token * L, tok_per_gpu * 2.0 * cfg.extra_params, float(tokens.sum())


def fixed_seconds(loads_MLE: torch.Tensor, G: int, cfg: CostConfig) -> tuple[float, float]:
    """``(optimizer_s, overhead_s)`` of one step: the same for every plan of these loads.

    The optimizer updates a GPU's ``L * E / G`` home experts and its share of the rest; the host
    pays ``layer_call_s`` per layer and micro-batch and ``step_overhead_s`` once.
    """
    M, L, E = loads_MLE.shape
    params = L * (E // G) * cfg.expert_params + (L * cfg.non_moe_params + cfg.extra_params) / G
    return params * cfg.optimizer_s_per_param, M * L * cfg.layer_call_s + cfg.step_overhead_s


def slot_seconds(rows: torch.Tensor, cfg: CostConfig) -> torch.Tensor:
    """Seconds of one expert slot's GEMMs, forward and backward, for ``rows`` (any shape) rows each.

    A slot with ``r > 0`` rows costs ``r + expert_half_rows`` rows (module doc, part 1).
    """
    r = torch.as_tensor(rows, dtype=torch.float64)
    return (r + cfg.expert_half_rows * (r > 0)) * 2.0 * cfg.expert_params * _fb(cfg) / cfg.flops


def expert_seconds(slot_tokens_MLP: torch.Tensor, topology: Topology, cfg: CostConfig) -> torch.Tensor:
    """``[M, L]`` seconds of the busiest GPU's expert GEMMs, forward and backward."""
    M, L, _ = slot_tokens_MLP.shape
    per_slot = slot_seconds(slot_tokens_MLP, cfg)
    return per_slot.reshape(M, L, topology.num_gpus, topology.slots_per_gpu).sum(-1).amax(-1)


def step_cost(plan: Plan, loads_MLE: Any, cfg: CostConfig, previous: Placement | None = None,
              source_loads_MLGE: Any = None, live_planning: bool = False,
              state_hide_s: float | None = None) -> StepCost:
    """Cost of one step of ``plan`` on its loads ``[M, L, E]``.

    Args:
        previous: the placement of the step before (None: nothing is moved).
        source_loads_MLGE: ``[M, L, G, E]`` copies each source GPU sends to each expert;
            None means uniform sources.
        live_planning: the plan is made at run time from the live router output (MoonEP,
            Megatron-Core's virtual-expert balancer): every micro-batch and MoE layer waits
            ``cfg.live_planning_s`` for it (``planning_s``).
        state_hide_s: seconds of compute the deferred optimizer state of a move travels behind
            (None: this plan's own; a step of several passes hides it behind every pass up to
            its first optimizer step, :func:`relibra.sim.rl_step.phase_step_cost`).
    """
    loads = as_loads(loads_MLE, "loads")
    t = plan.topology
    if loads.shape[2] != cfg.num_experts or loads.shape[2] != t.num_experts:
        raise ValueError(f"loads have {loads.shape[2]} experts; cost config has {cfg.num_experts}, "
                         f"topology {t.num_experts}")
    gpu = plan.gpu_loads(loads).to(torch.float64)  # [M, L, G]
    compute = float(expert_seconds(plan.slot_tokens, t, cfg).sum())
    traffic = None
    if source_loads_MLGE is not None:
        src = as_loads(source_loads_MLGE, "source_loads", ndim=4)
        if tuple(src.shape) != (*loads.shape[:2], t.num_gpus, t.num_experts) or not torch.equal(src.sum(2), loads):
            raise ValueError(f"source_loads must have shape {[*loads.shape[:2], t.num_gpus, t.num_experts]} "
                             f"and sum over sources to loads; got {tuple(src.shape)}")
        traffic = source_traffic(plan, loads, src)
    a2a = float(a2a_seconds(gpu, t, cfg, traffic).sum())
    rep, rep_bytes = replica_seconds(plan, cfg)
    non_moe, extra, tokens = _common(loads, t.num_gpus, cfg)
    hide = compute + non_moe + extra if state_hide_s is None else state_hide_s
    reo, reo_bytes = reorder_seconds(plan.placement, previous, t, cfg, hide_s=hide)
    optimizer, overhead = fixed_seconds(loads, t.num_gpus, cfg)
    planning = loads.shape[0] * loads.shape[1] * cfg.live_planning_s if live_planning else 0.0
    return StepCost(compute, non_moe, a2a, float(rep.sum()), reo, extra, tokens, rep_bytes, reo_bytes,
                    optimizer, overhead, planning)


def cross_node_price(cfg: CostConfig, topology: Topology) -> float:
    """Token copies on the busiest GPU that one cross-node replica costs under ``cfg`` on ``topology``.

    The planners' ``cross_node_price`` option (``replicate``, ``hybrid``): a cross-node replica
    pays where it lowers the busiest GPU of its micro-batch and layer by more than this. See
    :func:`relibra.policies.replica_cross.cross_node_price` for the formula; inf on one node.
    """
    return _policy_price(topology.num_nodes, topology.gpus_per_node, cfg.inter_node_bandwidth, cfg.expert_intermediate,
                         cfg.flops, cfg.backward_factor, cfg.weight_bytes, cfg.replica_grad_bytes, cfg.replica_overlap,
                         cfg.a2a_bytes, cfg.a2a_overlap)


def ideal_step_cost(loads_MLE: Any, topology: Topology, cfg: CostConfig) -> StepCost:
    """The idealised run: every GPU at the mean load, uniform traffic, nothing moved.

    Each GPU also carries its share of the busy experts' fixed GEMM cost
    (``expert_half_rows`` per expert with any load, over G).
    """
    loads = as_loads(loads_MLE, "loads")
    G = topology.num_gpus
    mean = loads.to(torch.float64).sum(-1, keepdim=True) / G  # [M, L, 1]
    gpu = mean.expand(*loads.shape[:2], G)
    busy = mean.sum() + cfg.expert_half_rows * float((loads > 0).sum()) / G
    compute = float(busy) * 2.0 * cfg.expert_params * _fb(cfg) / cfg.flops
    a2a = float(a2a_seconds(gpu, topology, cfg).sum())
    non_moe, extra, tokens = _common(loads, G, cfg)
    optimizer, overhead = fixed_seconds(loads, G, cfg)
    return StepCost(compute, non_moe, a2a, 0.0, 0.0, extra, tokens, 0.0, 0.0, optimizer, overhead)
