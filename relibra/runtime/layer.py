"""ReLibraMoE: a token-choice top-k MoE layer whose experts run where the balancing plan says.

Legend: T tokens on this rank, D = dim, I = hidden_dim, F = 2*I, E experts, K top-k,
G ranks of the expert-parallel group, H = E/G home slots and S spare slots per rank.

Parameters and buffers use the names of transformers 5.x fused MoE blocks (checkpoints load
1:1): ``gate.weight [E, D]`` (+ ``gate.e_score_correction_bias [E]``), ``experts.gate_up_proj
[E, F, D]``, ``experts.down_proj [E, D, I]`` and, optionally, ``shared_expert.*`` and
``shared_expert_gate.weight [1, D]``.

With a ``mesh`` (1-D, or 2-D ``(node, gpu)``) the expert weights are DTensors ``Shard(0)`` over
the flattened expert-parallel mesh; the local shard holds this rank's H home experts in the
order of the current placement (``experts.home_experts_K``). ``state_dict`` /
``load_state_dict`` always use logical expert order. ``mesh=None`` is the single-process
reference: every expert is local and computes on its own slot.

Per micro-batch, :class:`relibra.Balancer` installs a :class:`LayerMicroBatch` (slot table of
the replica plan, the replayed routes and the token offsets of lower ranks, every size of the
dispatch computed on the host, the replica weights, the micro-batch's index and phase); without
one the layer dispatches every token copy to its expert's home. With replayed routes the
forward and backward read no device value on the host (see :mod:`relibra.runtime.layout`);
the router's live choice, or routes passed to ``forward``, exchange and read the split sizes
(one host sync per layer), as does the input agreement below on a GPU-only process group.

Collective order. The dispatch pairs its collectives across the expert-parallel group by
order, so every rank runs every micro-batch of a step in the same order, empty or not (a rank
with no token in a micro-batch still runs its forward and backward, on an empty ``x``). Each
forward first agrees its position (phase, micro-batch, MoE layer) together with its input
verdict in one small all-reduce; a rank out of step (micro-batches in another order, an empty
micro-batch skipped) makes every rank raise the same ValueError naming where each side is,
instead of a collective mismatch that aborts or hangs the world.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..phases import PHASES, pass_label
from ..routing.routes import route_fault
from ..topology import Topology
from . import dispatch as _dispatch
from .comm import agree
from .layout import ReplayLayout, SlotTable, replay_layouts, slot_table, slot_tables
from .router import Router, check_int_argument

__all__ = ["BLOCK_END", "BLOCK_START", "PHASES", "Experts", "LayerMicroBatch", "ReLibraMoE", "agree_in_step",
           "micro_batch_contexts"]

# PHASES (re-exported): the names of the phases a micro-batch runs in, by id (relibra.phases); the
# Balancer installs the id of the micro-batch's pass (relibra.phases.pass_id)
#: the "layer" of the agreements :meth:`relibra.Balancer.micro_batch` makes as its block starts and ends
BLOCK_START, BLOCK_END = -2, -3


# sizes of the digits of a position key (46 bits, under comm.KEY_LIMIT)
_PHASE_IDS, _MICRO_BATCH_IDS, _LAYER_IDS = 2**8, 2**24, 2**14


def _position_key(phase: int, micro_batch: int, layer: int) -> int:
    """(phase, micro-batch, layer) as one key of :func:`relibra.runtime.comm.agree`: mixed radix,
    offset so that micro-batch -1 (none) and the BLOCK_* layers are non-negative digits."""
    digits = (phase, micro_batch + 1, layer - BLOCK_END)
    if not all(0 <= d < n for d, n in zip(digits, (_PHASE_IDS, _MICRO_BATCH_IDS, _LAYER_IDS))):
        raise ValueError(f"position (phase {phase}, micro-batch {micro_batch}, layer {layer}) is beyond the "
                         f"order check ({_PHASE_IDS} phases, {_MICRO_BATCH_IDS - 1} micro-batches, "
                         f"{_LAYER_IDS + BLOCK_END} layers)")
    return (digits[0] * _MICRO_BATCH_IDS + digits[1]) * _LAYER_IDS + digits[2]


def _describe_position(key: int) -> str:
    """What :func:`_position_key` packed, in words."""
    rest, layer = divmod(key, _LAYER_IDS)
    phase, micro_batch = divmod(rest, _MICRO_BATCH_IDS)
    micro_batch, layer = micro_batch - 1, layer + BLOCK_END
    name = pass_label(phase)
    where = f"{name} micro-batch {micro_batch}" if micro_batch >= 0 else f"{name}, outside any micro-batch block"
    if layer == BLOCK_START:
        return f"{where}, entering Balancer.micro_batch"
    if layer == BLOCK_END:
        return f"{where}, leaving Balancer.micro_batch"
    return f"{where}, forward of MoE layer {layer}" if layer >= 0 else f"{where}, forward of an unnumbered MoE layer"


def agree_in_step(group, phase: int, micro_batch: int, layer: int, fault: str = "") -> tuple[int, str] | None:
    """Agree over ``group`` on this rank's position and ``fault`` (one all-reduce when all is well).

    Raises the same ValueError on every rank when ranks stand at different positions (naming
    each side); else returns ``(rank, text)`` of the lowest rank with a fault, or None.
    """
    verdict = agree(fault, group, _position_key(phase, micro_batch, layer))
    if verdict is None:
        return None
    if verdict.keys is None:
        return verdict.rank, verdict.error
    sides: dict[int, list[int]] = {}
    for rank, key in enumerate(verdict.keys):
        sides.setdefault(key, []).append(rank)
    said = "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} at "
                     f"{_describe_position(key)}" for key, ranks in sides.items())
    raise ValueError(f"ranks of the expert-parallel group are out of step: {said}. Every rank must run every "
                     f"micro-batch of a step in the same order, empty or not (an empty micro-batch still runs "
                     f"its forward and backward): the MoE layers' collectives pair up by order")


@dataclass(frozen=True)
class LayerMicroBatch:
    """What a layer needs for one micro-batch (built by :meth:`relibra.Balancer.micro_batch`).

    Attributes:
        table: the replica plan's slot table, on the layer's device.
        routes_TK: ``[T, K]`` replayed routes (used when ``forward`` gets no routes), or None.
        token_offset_E: ``[E]`` token copies of each expert on lower ranks (replayed routes).
        layout: every size and row order of the dispatch of ``routes_TK`` (host-computed).
        index, phase: which micro-batch this is, in which pass (:func:`relibra.phases.pass_id`).
        spare_weights: the spare slots' weights ``([S, F, D], [S, D, I])``, fetched as the block
            started; or None, and then ``spare_source(gate_up, down)`` gives them from the
            forward (FSDP: the home weights are whole only there).
    """

    table: SlotTable
    routes_TK: torch.Tensor | None
    token_offset_E: torch.Tensor | None
    layout: ReplayLayout | None = None
    index: int = -1
    phase: int = 0
    spare_weights: tuple[torch.Tensor, torch.Tensor] | None = None
    spare_source: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


def micro_batch_contexts(layers: list, plan, m: int, phase: int, routes_TLK: torch.Tensor, offsets_LE: torch.Tensor,
                         source_LGE: torch.Tensor, rank: int, replicas) -> list[LayerMicroBatch]:
    """Every layer's :class:`LayerMicroBatch` for micro-batch ``m`` of ``plan`` (on EP rank ``rank``).

    ``routes_TLK [T, L, K]`` this rank's replayed routes, ``offsets_LE [L, E]`` the token copies of
    each expert on lower ranks, ``source_LGE [L, G, E]`` every rank's expert counts: all sizes of
    the dispatch are computed here on the host, for all layers at once, so the forward and backward
    read no device value. ``replicas`` (a :class:`relibra.runtime.replica_cache.ReplicaCache`, or
    None) enters m: it fetches now for all layers (one collective) unless the layers fetch in their
    forward.
    """
    dev, topology = layers[0].gate.weight.device, layers[0].topology
    host = slot_tables(plan.placement.home_experts, plan.spare_experts[m], plan.slot_tokens[m], topology)
    tables, layouts = replay_layouts(host, source_LGE, topology, rank, dev)
    routes_LTK = routes_TLK.transpose(0, 1).contiguous().to(dev)
    offsets_LE = offsets_LE.to(dev)
    spare = [None] * len(layers) if replicas is None else replicas.enter(m)
    source = None if replicas is None or replicas.prefetch else replicas.layer_weights
    return [LayerMicroBatch(tables[l], routes_LTK[l], offsets_LE[l], layouts[l], m, phase, spare[l],
                            None if source is None else functools.partial(source, l)) for l in range(len(layers))]


class Experts(nn.Module):
    """Fused gated-MLP expert weights; sharded by home slot with a mesh, logical in state_dict."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, topology: Topology | None,
                 ep_mesh=None, ep_rank: int = 0, dtype=None, device=None) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.ep_mesh, self.ep_rank = ep_mesh, ep_rank
        E = num_experts
        gate_up = torch.randn(E, 2 * hidden_dim, dim, dtype=dtype, device=device) * dim ** -0.5
        down = torch.randn(E, dim, hidden_dim, dtype=dtype, device=device) * hidden_dim ** -0.5
        self.home_experts_K = torch.arange(E)  # placement row of this layer (not a buffer)
        if ep_mesh is None:
            self.gate_up_proj = nn.Parameter(gate_up)
            self.down_proj = nn.Parameter(down)
        else:
            from torch.distributed.tensor import DTensor, Shard

            rows = self.local_home_experts(topology)
            self.gate_up_proj = nn.Parameter(DTensor.from_local(gate_up[rows].contiguous(), ep_mesh, [Shard(0)],
                                                                run_check=False))
            self.down_proj = nn.Parameter(DTensor.from_local(down[rows].contiguous(), ep_mesh, [Shard(0)],
                                                             run_check=False))

    def local_home_experts(self, topology: Topology) -> torch.Tensor:
        """``[H]`` logical experts of this rank's home slots, in slot order."""
        H = topology.home_slots_per_gpu
        return self.home_experts_K[self.ep_rank * H:(self.ep_rank + 1) * H]

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's home weights ``([H, F, D], [H, D, I])`` as plain tensors (differentiable)."""
        if self.ep_mesh is None:
            return self.gate_up_proj, self.down_proj
        return self.gate_up_proj.to_local(), self.down_proj.to_local()

    @torch.no_grad()
    def logical(self, name: str) -> torch.Tensor:
        """Full tensor of parameter ``name`` in logical expert order (a collective with a mesh)."""
        p = getattr(self, name)
        if self.ep_mesh is None:
            return p.detach()
        full = p.full_tensor()
        out = torch.empty_like(full)
        out[self.home_experts_K.to(full.device)] = full
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(self, name)
            destination[prefix + name] = p if (keep_vars and self.ep_mesh is None) else self.logical(name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("gate_up_proj", "down_proj"):
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            src = state_dict[key]
            if hasattr(src, "full_tensor"):
                src = src.full_tensor()
            p = getattr(self, name)
            want = (self.num_experts, *p.shape[1:])
            if tuple(src.shape) != want:
                error_msgs.append(f"size mismatch for {key}: checkpoint {tuple(src.shape)}, "
                                  f"model (logical) {want}")
                continue
            with torch.no_grad():
                if self.ep_mesh is None:
                    p.copy_(src)
                else:
                    H = p.to_local().shape[0]
                    rows = self.home_experts_K[self.ep_rank * H:(self.ep_rank + 1) * H]
                    p.to_local().copy_(src[rows.to(src.device)])
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):] not in ("gate_up_proj", "down_proj") \
                        and "." not in key[len(prefix):]:
                    unexpected_keys.append(key)


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, **kw), nn.Linear(dim, hidden, **kw)
        self.down_proj = nn.Linear(hidden, dim, **kw)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReLibraMoE(nn.Module):
    """Token-choice top-k MoE layer with expert parallelism by plan (see the module doc).

    ``forward(x, routes=None)``: ``x [T, D]`` or ``[B, S, D]`` (this rank's tokens); ``routes``
    ``[T, K]`` replayed expert ids (R3, -1 = none) replace the router's choice while the gate
    weights stay the live scores at those ids. Returns the shape of ``x``.

    Bad input to ``forward`` (``x``'s width or device, routes that do not fit ``x``) raises
    ValueError on every rank of the expert-parallel group, naming the rank, before any
    collective of the dispatch; so does a rank out of step (see the module doc: every rank runs
    every micro-batch, in the same order, empty or not). One small all-reduce per call agrees
    on both, so the other ranks do not wait in the dispatch until the process group's timeout
    or abort on mismatched collectives. ``agree_input_errors=False`` skips it (one collective
    and, on GPU, one host sync less per layer and micro-batch); a bad rank then raises alone
    and ranks out of step are not caught.

    Every size and option of the constructor is checked up front (ValueError naming it).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, mesh=None, *,
                 score_func: Literal["softmax", "sigmoid"] = "softmax", norm_topk_prob: bool = True,
                 route_scale: float = 1.0, num_expert_groups: int = 1, topk_groups: int | None = None,
                 score_correction_bias: bool = False, shared_expert_hidden_dim: int | None = None,
                 shared_expert_gate: bool = False, spare_slots_per_gpu: int = 0, dtype=None,
                 device=None, agree_input_errors: bool = True) -> None:
        super().__init__()
        hidden_dim = check_int_argument("hidden_dim", hidden_dim)
        if shared_expert_hidden_dim is not None:
            shared_expert_hidden_dim = check_int_argument("shared_expert_hidden_dim", shared_expert_hidden_dim)
        if shared_expert_gate is not False and (shared_expert_gate is not True or shared_expert_hidden_dim is None):
            raise ValueError(f"shared_expert_gate must be True (with shared_expert_hidden_dim) or False, "
                             f"got {shared_expert_gate!r} with shared_expert_hidden_dim={shared_expert_hidden_dim}")
        spare_slots_per_gpu = check_int_argument("spare_slots_per_gpu", spare_slots_per_gpu, 0)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        if not isinstance(agree_input_errors, bool):
            raise ValueError(f"agree_input_errors must be True or False, got {agree_input_errors!r}")
        if mesh is not None and not hasattr(mesh, "ndim"):
            raise ValueError(f"mesh must be a DeviceMesh or None, got {type(mesh).__name__}")
        if mesh is not None and mesh.ndim not in (1, 2):
            raise ValueError(f"mesh must be 1-D or 2-D (node, gpu), got {mesh.ndim} dimensions")
        self.agree_input_errors = agree_input_errors
        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.mesh = mesh
        self.gate = Router(dim, num_experts, top_k, score_func=score_func, norm_topk_prob=norm_topk_prob,
                           route_scale=route_scale, num_expert_groups=num_expert_groups,
                           topk_groups=topk_groups, score_correction_bias=score_correction_bias,
                           dtype=dtype, device=device)
        if mesh is None:
            self.topology = Topology(1, 1, num_experts, 0, num_expert_groups)
            ep_mesh, self.ep_rank, self.ep_group, self.node_group = None, 0, None, None
        else:
            self.topology = Topology.from_mesh(mesh, num_experts, spare_slots_per_gpu,
                                               num_expert_groups=num_expert_groups)
            ep_mesh = mesh if mesh.ndim == 1 else mesh._flatten("relibra_ep")
            self.ep_rank = ep_mesh.get_local_rank()
            self.ep_group = ep_mesh.get_group()
            self.node_group = mesh.get_group(mesh.ndim - 1)
        self.experts = Experts(num_experts, dim, hidden_dim, self.topology, ep_mesh, self.ep_rank,
                               dtype=dtype, device=device)
        self.shared_expert = (_MLP(dim, shared_expert_hidden_dim, dtype, device)
                              if shared_expert_hidden_dim is not None else None)
        self.shared_expert_gate = (nn.Linear(dim, 1, bias=False, dtype=dtype, device=device)
                                   if shared_expert_gate else None)
        self.moe_layer_index: int | None = None  # set by the Balancer (model order)
        self._micro_batch: LayerMicroBatch | None = None
        self._home_table: SlotTable | None = None
        self.realised_rows: dict[int, int] = {}  # micro-batch -> rows this rank computed

    # ------------------------------------------------------------------ placement / plans
    @property
    def home_experts_K(self) -> torch.Tensor:
        return self.experts.home_experts_K

    def _set_home_experts(self, row_K: torch.Tensor) -> None:
        """Change the placement row only (weights must have been moved to match)."""
        self.experts.home_experts_K = row_K.to(torch.int64).clone()
        self._home_table = None

    def set_topology(self, topology: Topology) -> None:
        """Adopt the Balancer's topology (same G and E; spare slots may differ: they hold no state)."""
        t = self.topology
        if (topology.num_gpus, topology.num_experts) != (t.num_gpus, t.num_experts):
            raise ValueError(f"layer topology ({t}) does not match the balancer's ({topology})")
        self.topology = topology
        self._home_table = None

    def install(self, ctx: LayerMicroBatch | None) -> None:
        self._micro_batch = ctx

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, routes: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self._micro_batch
        from_ctx = routes is None and ctx is not None and ctx.routes_TK is not None
        if isinstance(routes, torch.Tensor) and routes.dim() > 2:  # [B, S, K] like x [B, S, D]
            routes = routes.reshape(-1, routes.shape[-1])
        fault = self._input_fault(x, routes, ctx.routes_TK if from_ctx else None)
        if self.ep_group is not None and self.agree_input_errors:
            phase, m = (0, -1) if ctx is None else (ctx.phase, ctx.index)
            layer = -1 if self.moe_layer_index is None else self.moe_layer_index
            # before any collective of the dispatch
            found = agree_in_step(self.ep_group, phase, m, layer, fault)
            if found is not None:
                where = "" if self.moe_layer_index is None else f" (MoE layer {self.moe_layer_index})"
                raise ValueError(f"ReLibraMoE{where}: bad input on expert-parallel rank {found[0]}: {found[1]}")
        elif fault:
            raise ValueError(fault)
        shape = x.shape
        x_TD = x.reshape(-1, self.dim)
        if from_ctx:
            routes = ctx.routes_TK
        elif routes is not None:
            routes = routes.to(torch.int64)
        ids_TK, w_TK = self.gate(x_TD, routes)
        out = self._routed(x_TD, ids_TK, w_TK, ctx, from_ctx)
        if self.shared_expert is not None:
            shared = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared
            out = out + shared
        return out.reshape(shape)

    def _input_fault(self, x, routes_TK, installed_TK: torch.Tensor | None) -> str:
        """Why this rank cannot run ``forward(x, routes)``, or "" (no communication).

        Checks what would otherwise fail on this rank alone, after or inside a collective:
        ``x``'s type, width and device and its token count against the routes the Balancer
        installed (``installed_TK``, when they replace ``routes_TK``); passed routes go through
        :func:`relibra.routing.route_fault` (type, device, dtype, shape, ids).
        """
        if not isinstance(x, torch.Tensor):
            return f"x must be a tensor [..., {self.dim}], got {type(x).__name__}"
        if x.dim() == 0 or x.shape[-1] != self.dim:
            return f"x must end in dim={self.dim}, got shape {tuple(x.shape)}"
        if x.device != self.gate.weight.device:
            return f"x is on {x.device}, but the layer's weights are on {self.gate.weight.device}"
        T = x.numel() // self.dim
        if installed_TK is not None:
            if tuple(installed_TK.shape) != (T, self.top_k):
                return (f"installed routes have shape {tuple(installed_TK.shape)}, but x holds {T} tokens "
                        f"(need [{T}, {self.top_k}])")
            return ""
        if routes_TK is not None:
            return route_fault(routes_TK, (T, self.top_k), self.num_experts, device=x.device)
        return ""

    def _routed(self, x_TD, ids_TK, w_TK, ctx, from_ctx) -> torch.Tensor:
        t = self.topology
        if ctx is not None:
            table = ctx.table
        else:
            if self._home_table is None:
                self._home_table = slot_table(self.home_experts_K, t, device=x_TD.device)
            table = self._home_table
        E = self.num_experts
        if table.copy_slots_EX.shape[1] == 1:
            offset = torch.zeros(E, dtype=torch.int64, device=x_TD.device)  # one copy: offsets unused
        elif from_ctx and ctx.token_offset_E is not None:
            offset = ctx.token_offset_E
        else:
            offset = self._live_token_offset(ids_TK)
        gate_up, down = self.experts.local_weights()
        H, S = t.home_slots_per_gpu, t.spare_slots_per_gpu
        layout = ctx.layout if from_ctx else None
        x_local, meta = _dispatch.dispatch(x_TD, ids_TK, table, offset, t.num_gpus, H + S, self.ep_group, layout)
        if ctx is not None:
            self.realised_rows[ctx.index] = x_local.shape[0]
        counts = meta.slot_counts
        n_home = sum(counts[:H])  # rows are ordered by local slot: home slots first
        y_local = _dispatch.expert_mlp(x_local[:n_home], gate_up, down, counts[:H],
                                       None if layout is None else layout.home_offsets)
        if table.has_replicas:
            sg, sd = ctx.spare_weights if ctx.spare_weights is not None else ctx.spare_source(gate_up, down)
            # always in the graph (even with no spare rows here) so that every rank runs the
            # replicas' backward (a collective where a run ends), in the same order
            y_spare = _dispatch.expert_mlp(x_local[n_home:], sg, sd, counts[H:],
                                           None if layout is None else layout.spare_offsets)
            y_local = torch.cat([y_local, y_spare])
        return _dispatch.combine(y_local, meta, w_TK)

    def _live_token_offset(self, ids_TK: torch.Tensor) -> torch.Tensor:
        """Token copies of each expert on lower ranks (all_gather of per-rank counts)."""
        E = self.num_experts
        ids = ids_TK.reshape(-1)
        counts = torch.bincount(ids[ids >= 0], minlength=E)[:E]
        if self.ep_group is None:
            return torch.zeros_like(counts)
        all_counts = torch.empty(self.topology.num_gpus * E, dtype=counts.dtype, device=counts.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(all_counts, counts.contiguous(), group=self.ep_group)
        return all_counts.view(-1, E)[: self.ep_rank].sum(0)
