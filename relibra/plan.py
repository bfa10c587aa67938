"""Plans: where every logical expert lives and which physical slot computes which tokens.

Legend (see also :mod:`relibra.topology`):

    M  micro-batches of the step      L  MoE layers          E  logical experts
    G  GPUs                           N  nodes               H  home slots per GPU
    S  spare slots per GPU            R  spare slots = G*S   P  physical slots = G*(H+S)
    X  most copies any expert has

A :class:`Placement` fixes the home slot of every logical expert for a whole step (it holds
weights and optimizer state; ``reorder`` changes it once a step). A :class:`Plan` adds, for
every micro-batch and layer, the contents of the spare slots (replicas, -1 when empty) and
``slot_tokens``: how many of its expert's token copies each physical slot computes.

Physical slot ``p`` is on GPU ``p // (H + S)``; its first ``H`` slots are home slots, the
next ``S`` spare slots. So ``phy2log[m, l]`` (``[P]``) reads, per GPU, its ``H`` home experts
followed by its ``S`` spare experts.

Token split rule (shared by the simulator and the layer, see
:func:`relibra.kernels.reference.assign_copies`): the token copies routed to expert ``e``,
ordered by source rank, then token, then k, fill the copies of ``e`` in ascending physical
slot order, each copy taking ``slot_tokens`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .topology import Topology

__all__ = ["Placement", "ReplicaPlan", "Plan", "as_loads", "even_slot_tokens", "slot_ranks"]


def as_loads(loads: Any, name: str = "loads", ndim: int = 3) -> torch.Tensor:
    """Convert ``loads`` (tensor, ndarray or nested list) to an int64 CPU tensor, checking it.

    Raises ValueError naming ``name`` for a wrong rank, a float tensor holding NaN,
    non-integral or negative values.
    """
    if not isinstance(loads, torch.Tensor):
        try:
            loads = torch.as_tensor(loads)
        except Exception as exc:  # pragma: no cover - torch's own message is fine
            raise ValueError(f"{name} cannot be read as a tensor: {exc}") from exc
    if loads.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(loads.shape)}")
    if loads.dtype == torch.bool or loads.is_complex():
        raise ValueError(f"{name} must hold integer token counts, got dtype {loads.dtype}")
    if loads.is_floating_point():
        if torch.isnan(loads).any():
            raise ValueError(f"{name} contains NaN")
        if torch.isinf(loads).any():
            raise ValueError(f"{name} contains inf")
        if (loads != loads.round()).any():
            raise ValueError(f"{name} must hold integer token counts, got fractional values")
    loads = loads.detach().to(device="cpu", dtype=torch.int64)
    if loads.numel() and int(loads.min()) < 0:
        idx = tuple(int(i) for i in (loads < 0).nonzero()[0])
        raise ValueError(f"{name} contains a negative load {int(loads[idx])} at index {idx}")
    return loads


def slot_ranks(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of every physical slot among the copies of its expert, and copies per expert.

    Args:
        phy2log: ``[..., P]`` int64 logical expert of each slot, -1 for an empty slot.
        num_experts: E.
    Returns:
        ``rank [..., P]`` (0 for the lowest-numbered copy; -1 for empty slots) and
        ``logcnt [..., E]``.
    """
    batch, P = phy2log.shape[:-1], phy2log.shape[-1]
    flat = phy2log.reshape(-1, P)
    valid = flat >= 0
    safe = torch.where(valid, flat, num_experts)  # empty slots count in a dummy column
    logcnt = torch.zeros(flat.shape[0], num_experts + 1, dtype=torch.int64)
    logcnt.scatter_add_(1, safe, torch.ones_like(safe))
    rank = torch.where(valid, 0, -1)
    # only copies of experts held more than once need a rank above 0; home slots hold every
    # expert once and spare slots are few, so sort just those (a 1-D sort of a few entries)
    dup = valid & (logcnt.gather(1, safe) > 1)
    row, slot = dup.nonzero(as_tuple=True)  # row-major: ascending slot within each row
    if row.numel():
        group = row * (num_experts + 1) + flat[row, slot]
        order = group.argsort(stable=True)  # by (row, expert), then slot
        g_sorted = group[order]
        n = g_sorted.numel()
        new_group = torch.ones(n, dtype=torch.bool)
        new_group[1:] = g_sorted[1:] != g_sorted[:-1]
        pos = torch.arange(n)
        start = torch.cummax(torch.where(new_group, pos, 0), 0).values
        rank[row[order], slot[order]] = pos - start
    return rank.reshape(*batch, P), logcnt[:, :num_experts].reshape(*batch, num_experts)


def even_slot_tokens(phy2log: torch.Tensor, loads: torch.Tensor) -> torch.Tensor:
    """Split every expert's load evenly over its copies (EPLB's rule; static's trivially).

    Args:
        phy2log: ``[..., P]`` logical expert per physical slot, -1 empty.
        loads: ``[..., E]`` tokens per logical expert.
    Returns:
        ``slot_tokens [..., P]``: copy ``j`` of ``c`` gets ``n // c + (j < n % c)`` tokens.
    """
    E = loads.shape[-1]
    rank, logcnt = slot_ranks(phy2log, E)
    valid = phy2log >= 0
    safe = torch.where(valid, phy2log, 0)
    share = torch.where(valid, loads.gather(-1, safe), 0)
    # only copies of replicated experts split (few): divide on those entries alone
    idx = (valid & (logcnt.gather(-1, safe) > 1)).nonzero(as_tuple=True)
    if idx[0].numel():
        n, c = share[idx], logcnt.gather(-1, safe)[idx]
        share[idx] = n // c + (rank[idx] < n % c).to(torch.int64)
    return share


@dataclass(frozen=True)
class Placement:
    """Home slot of every logical expert, per layer, for a whole step.

    Attributes:
        home_experts: ``[L, G*H]`` int64, the logical expert in each home slot; home slot
            ``k`` is on GPU ``k // H``. Each row is a permutation of ``0..E-1``.
    """

    home_experts: torch.Tensor

    @classmethod
    def contiguous(cls, topology: Topology, num_layers: int) -> "Placement":
        """Megatron-LM's fixed placement: GPU g homes experts ``g*H .. g*H+H-1``."""
        row = torch.arange(topology.num_experts, dtype=torch.int64)
        return cls(row.expand(num_layers, -1).clone())

    @classmethod
    def from_home_gpu(cls, home_gpu: torch.Tensor, topology: Topology) -> "Placement":
        """Build from ``home_gpu [L, E]`` (GPU of each expert); a GPU's homes sorted by id.

        Raises ValueError naming the layer and GPU when a GPU gets more than H homes.
        """
        home_gpu = torch.as_tensor(home_gpu, dtype=torch.int64)
        G, H, E = topology.num_gpus, topology.home_slots_per_gpu, topology.num_experts
        if home_gpu.dim() != 2 or home_gpu.shape[1] != E:
            raise ValueError(f"home_gpu must have shape [L, {E}], got {tuple(home_gpu.shape)}")
        if home_gpu.numel() and (home_gpu.min() < 0 or home_gpu.max() >= G):
            raise ValueError(f"home_gpu holds a GPU id outside [0, {G})")
        counts = torch.zeros(home_gpu.shape[0], G, dtype=torch.int64)
        counts.scatter_add_(1, home_gpu, torch.ones_like(home_gpu))
        if (counts != H).any():
            layer, gpu = (int(i) for i in (counts != H).nonzero()[0])
            raise ValueError(
                f"layer {layer}: GPU {gpu} is given {int(counts[layer, gpu])} home experts, "
                f"it has exactly {H} home slots"
            )
        key = home_gpu * E + torch.arange(E)
        return cls(key.argsort(dim=1))

    @property
    def num_layers(self) -> int:
        return self.home_experts.shape[0]

    def home_slot(self) -> torch.Tensor:
        """``[L, E]`` index of each expert's home slot (inverse of ``home_experts``)."""
        inv = torch.empty_like(self.home_experts)
        inv.scatter_(1, self.home_experts, torch.arange(self.home_experts.shape[1]).expand_as(inv))
        return inv

    def home_gpu(self, topology: Topology) -> torch.Tensor:
        """``[L, E]`` GPU that homes each logical expert."""
        return self.home_slot() // topology.home_slots_per_gpu

    def validate(self, topology: Topology) -> None:
        he = self.home_experts
        E = topology.num_experts
        if he.dim() != 2 or he.shape[1] != E:
            raise ValueError(
                f"placement.home_experts must have shape [L, {E}] "
                f"({topology.num_gpus} GPUs x {topology.home_slots_per_gpu} home slots), "
                f"got {tuple(he.shape)}"
            )
        if he.dtype != torch.int64:
            raise ValueError(f"placement.home_experts must be int64, got {he.dtype}")
        if he.numel() and (he.min() < 0 or he.max() >= E):
            raise ValueError(f"placement.home_experts holds an expert id outside [0, {E})")
        counts = torch.zeros(he.shape[0], E, dtype=torch.int64).scatter_add_(1, he, torch.ones_like(he))
        if (counts != 1).any():
            layer, expert = (int(i) for i in (counts != 1).nonzero()[0])
            what = "no home slot (no copy)" if counts[layer, expert] == 0 else f"{int(counts[layer, expert])} home slots"
            raise ValueError(f"placement, layer {layer}: expert {expert} has {what}")

    def moved_experts(self, other: "Placement", topology: Topology) -> torch.Tensor:
        """``[L, E]`` bool: experts whose home GPU differs between ``self`` and ``other``."""
        if other.home_experts.shape != self.home_experts.shape:
            raise ValueError(
                f"placements differ in shape: {tuple(self.home_experts.shape)} vs "
                f"{tuple(other.home_experts.shape)}"
            )
        return self.home_gpu(topology) != other.home_gpu(topology)

    def bytes_moved(self, other: "Placement", topology: Topology, bytes_per_expert: float) -> float:
        """Bytes sent to turn ``other`` into ``self`` (each moved expert costs ``bytes_per_expert``)."""
        return float(self.moved_experts(other, topology).sum()) * float(bytes_per_expert)

    def equal(self, other: "Placement") -> bool:
        return torch.equal(self.home_experts, other.home_experts)


@dataclass(frozen=True)
class ReplicaPlan:
    """Spare-slot contents and token split of one micro-batch, all layers.

    Attributes:
        spare_experts: ``[L, R]`` logical expert in each spare slot, -1 when empty; spare
            slot ``r`` is on GPU ``r // S``.
        slot_tokens: ``[L, P]`` token copies each physical slot computes.
    """

    spare_experts: torch.Tensor
    slot_tokens: torch.Tensor


@dataclass(frozen=True)
class Plan:
    """Placement plus one replica plan per micro-batch: everything one step needs.

    Attributes:
        topology: the topology the plan is for.
        placement: home slots for the step.
        spare_experts: ``[M, L, R]`` int64, -1 empty.
        slot_tokens: ``[M, L, P]`` int64 token copies computed by each physical slot.
        intra_node_replicas: the policy promises every replica sits in its expert's home node.
        policy: name of the policy that made it.
        info: free-form metadata (planning time, ...); not compared.
    """

    topology: Topology
    placement: Placement
    spare_experts: torch.Tensor
    slot_tokens: torch.Tensor
    intra_node_replicas: bool = True
    policy: str = ""
    info: dict = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------ builders
    @classmethod
    def without_replicas(
        cls, placement: Placement, loads: Any, topology: Topology, policy: str = ""
    ) -> "Plan":
        """A plan whose spare slots stay empty: every expert computes on its home GPU."""
        loads = as_loads(loads)
        M, L, _ = loads.shape
        spare = torch.full((M, L, topology.num_spare_slots), -1, dtype=torch.int64)
        phy2log = _phy2log(placement.home_experts.expand(M, -1, -1), spare, topology)
        return cls(topology, placement, spare, even_slot_tokens(phy2log, loads), True, policy)

    @classmethod
    def with_spares(
        cls,
        placement: Placement,
        spare_experts: torch.Tensor,
        loads: Any,
        topology: Topology,
        intra_node_replicas: bool = True,
        policy: str = "",
    ) -> "Plan":
        """A plan from spare-slot contents ``[M, L, R]``, splitting loads evenly over copies."""
        loads = as_loads(loads)
        M, L, _ = loads.shape
        spare_experts = spare_experts.expand(M, L, topology.num_spare_slots).contiguous()
        phy2log = _phy2log(placement.home_experts.expand(M, -1, -1), spare_experts, topology)
        return cls(topology, placement, spare_experts, even_slot_tokens(phy2log, loads),
                   intra_node_replicas, policy)

    # ------------------------------------------------------------------ sizes
    @property
    def num_micro_batches(self) -> int:
        return self.spare_experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.spare_experts.shape[1]

    def replica_plan(self, micro_batch: int) -> ReplicaPlan:
        """The spare slots and split of one micro-batch (what the layer installs)."""
        if not 0 <= micro_batch < self.num_micro_batches:
            raise IndexError(f"micro-batch {micro_batch} out of range [0, {self.num_micro_batches})")
        return ReplicaPlan(self.spare_experts[micro_batch], self.slot_tokens[micro_batch])

    # ------------------------------------------------------------------ vLLM / EPLB maps
    def phy2log(self) -> torch.Tensor:
        """``[M, L, P]`` logical expert in every physical slot, -1 for an empty spare slot."""
        M = self.num_micro_batches
        return _phy2log(self.placement.home_experts.expand(M, -1, -1), self.spare_experts, self.topology)

    def logcnt(self) -> torch.Tensor:
        """``[M, L, E]`` copies of every logical expert."""
        return slot_ranks(self.phy2log(), self.topology.num_experts)[1]

    def log2phy(self) -> torch.Tensor:
        """``[M, L, E, X]`` physical slots of every expert in ascending order, -1 padded."""
        E = self.topology.num_experts
        phy2log = self.phy2log()
        rank, logcnt = slot_ranks(phy2log, E)
        M, L, P = phy2log.shape
        X = max(int(logcnt.max()) if logcnt.numel() else 1, 1)
        out = torch.full((M, L, E * X + 1), -1, dtype=torch.int64)
        flat_index = torch.where(phy2log >= 0, phy2log * X + rank, E * X)
        out.scatter_(2, flat_index, torch.arange(P).expand(M, L, P).clone())
        return out[..., :-1].reshape(M, L, E, X)

    # ------------------------------------------------------------------ derived loads
    def expert_loads(self) -> torch.Tensor:
        """``[M, L, E]`` the loads this plan splits (its slots' tokens summed per expert)."""
        phy2log = self.phy2log()
        E = self.topology.num_experts
        out = torch.zeros(*phy2log.shape[:2], E + 1, dtype=torch.int64)
        out.scatter_add_(2, torch.where(phy2log >= 0, phy2log, E), self.slot_tokens)
        return out[..., :-1]

    def gpu_loads(self, loads: Any = None) -> torch.Tensor:
        """``[M, L, G]`` token copies each GPU computes under this plan.

        ``loads`` (``[M, L, E]``), when given, must be the loads the plan was made for;
        a mismatch raises ValueError (a plan is exact for one step's loads).
        """
        if loads is not None:
            self._check_loads(as_loads(loads))
        M, L, _ = self.slot_tokens.shape
        t = self.topology
        return self.slot_tokens.reshape(M, L, t.num_gpus, t.slots_per_gpu).sum(-1)

    def node_loads(self) -> torch.Tensor:
        """``[M, L, N]`` token copies each node computes."""
        g = self.gpu_loads()
        return g.reshape(*g.shape[:2], self.topology.num_nodes, self.topology.gpus_per_node).sum(-1)

    def imbalance(self, loads: Any = None) -> torch.Tensor:
        """``[M, L]`` busiest GPU over mean GPU (1.0 is perfect, and where a layer has no tokens)."""
        g = self.gpu_loads(loads).to(torch.float64)
        mean = g.mean(-1)
        return torch.where(mean > 0, g.amax(-1) / mean.clamp(min=1e-30), torch.ones_like(mean))

    def replicas(self) -> torch.Tensor:
        """``[M, L]`` filled spare slots (replica weight copies per micro-batch and layer)."""
        return (self.spare_experts >= 0).sum(-1)

    def cross_node_tokens(self, source_loads: Any) -> torch.Tensor:
        """``[M, L]`` token copies whose source and destination GPUs are on different nodes.

        Args:
            source_loads: ``[M, L, G, E]`` token copies each source rank sends to each expert.
                They are dispatched by the split rule in the module docstring.
        """
        t = self.topology
        src = as_loads(source_loads, "source_loads", ndim=4)
        want = (self.num_micro_batches, self.num_layers, t.num_gpus, t.num_experts)
        if tuple(src.shape) != want:
            raise ValueError(f"source_loads must have shape {list(want)}, got {tuple(src.shape)}")
        log2phy = self.log2phy()  # [M, L, E, X]
        M, L, E, X = log2phy.shape
        gathered = self.slot_tokens.gather(2, log2phy.clamp(min=0).reshape(M, L, E * X)).view(M, L, E, X)
        copy_tokens = torch.where(log2phy >= 0, gathered, 0)
        copy_node = log2phy.clamp(min=0) // t.slots_per_gpu // t.gpus_per_node
        src_e = src.permute(0, 1, 3, 2)  # [M, L, E, G]
        s_end = src_e.cumsum(-1)
        c_end = copy_tokens.cumsum(-1)
        overlap = (torch.minimum(s_end[..., :, None], c_end[..., None, :])
                   - torch.maximum((s_end - src_e)[..., :, None], (c_end - copy_tokens)[..., None, :])).clamp(min=0)
        src_node = torch.arange(t.num_gpus) // t.gpus_per_node  # [G]
        crossing = src_node[:, None] != copy_node[..., None, :]  # [M, L, E, G, X]
        return (overlap * crossing).sum(dim=(-1, -2, -3))

    # ------------------------------------------------------------------ checks
    def _check_loads(self, loads: torch.Tensor) -> None:
        M, L, E = self.num_micro_batches, self.num_layers, self.topology.num_experts
        if tuple(loads.shape) != (M, L, E):
            raise ValueError(f"loads must have shape [{M}, {L}, {E}], got {tuple(loads.shape)}")
        split = self.expert_loads()
        if not torch.equal(split, loads):
            m, l, e = (int(i) for i in (split != loads).nonzero()[0])
            raise ValueError(
                f"micro-batch {m}, layer {l}: the token split of expert {e} adds up to "
                f"{int(split[m, l, e])}, its load is {int(loads[m, l, e])}"
            )

    def validate(self, topology: Topology | None = None, loads: Any = None) -> None:
        """Raise ValueError naming the first fault of this plan on ``topology``.

        Checks: every expert has exactly one home (so at least one copy); no GPU holds more
        experts than its slots; no GPU holds two copies of one expert; replicas sit in their
        home node when the plan promises intra-node replicas; no empty slot gets tokens;
        and, when ``loads`` are given, every expert's split adds up to its load.
        """
        t = self.topology if topology is None else topology
        if t != self.topology:
            raise ValueError(f"plan was made for topology ({self.topology}), not ({t})")
        self.placement.validate(t)
        E, G, S = t.num_experts, t.num_gpus, t.spare_slots_per_gpu
        L = self.placement.num_layers
        if self.spare_experts.dim() != 3 or tuple(self.spare_experts.shape[1:]) != (L, G * S):
            raise ValueError(
                f"spare_experts must have shape [M, {L}, {G * S}] ({G} GPUs x {S} spare slots), "
                f"got {tuple(self.spare_experts.shape)}: a GPU would be over-full"
            )
        M = self.spare_experts.shape[0]
        P = t.num_physical_slots
        if tuple(self.slot_tokens.shape) != (M, L, P):
            raise ValueError(f"slot_tokens must have shape [{M}, {L}, {P}], got {tuple(self.slot_tokens.shape)}")
        for name in ("spare_experts", "slot_tokens"):
            if getattr(self, name).dtype != torch.int64:
                raise ValueError(f"plan.{name} must be int64, got {getattr(self, name).dtype}")
        spare = self.spare_experts
        bad = (spare < -1) | (spare >= E)
        if bad.any():
            m, l, r = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"micro-batch {m}, layer {l}: spare slot {r} holds expert id {int(spare[m, l, r])} outside [0, {E})"
            )
        if self.slot_tokens.numel() and self.slot_tokens.min() < 0:
            m, l, p = (int(i) for i in (self.slot_tokens < 0).nonzero()[0])
            raise ValueError(f"micro-batch {m}, layer {l}: physical slot {p} gets a negative token count")
        phy2log = self.phy2log()
        empty_busy = (phy2log < 0) & (self.slot_tokens > 0)
        if empty_busy.any():
            m, l, p = (int(i) for i in empty_busy.nonzero()[0])
            raise ValueError(f"micro-batch {m}, layer {l}: empty spare slot {p} is given tokens")
        sorted_ids = phy2log.view(M, L, G, t.slots_per_gpu).sort(dim=-1).values
        dup = (sorted_ids[..., 1:] == sorted_ids[..., :-1]) & (sorted_ids[..., 1:] >= 0)
        if dup.any():
            m, l, g, k = (int(i) for i in dup.nonzero()[0])
            raise ValueError(
                f"micro-batch {m}, layer {l}: GPU {g} holds two copies of expert {int(sorted_ids[m, l, g, k + 1])}"
            )
        if self.intra_node_replicas and S > 0:
            home_node = self.placement.home_gpu(t) // t.gpus_per_node  # [L, E]
            spare_node = (torch.arange(G * S) // S // t.gpus_per_node).expand_as(spare)
            expert_node = home_node.expand(M, -1, -1).gather(2, spare.clamp(min=0))
            outside = (spare >= 0) & (expert_node != spare_node)
            if outside.any():
                m, l, r = (int(i) for i in outside.nonzero()[0])
                e = int(spare[m, l, r])
                raise ValueError(
                    f"micro-batch {m}, layer {l}: replica of expert {e} in spare slot {r} (GPU {r // S}) "
                    f"is outside its home node {int(home_node[l, e])}, but policy "
                    f"{self.policy or '?'} promises intra-node replicas"
                )
        if loads is not None:
            self._check_loads(as_loads(loads))


def _phy2log(home_experts_MLK: torch.Tensor, spare_MLR: torch.Tensor, topology: Topology) -> torch.Tensor:
    """Interleave home ``[M, L, G*H]`` and spare ``[M, L, G*S]`` slots into ``[M, L, P]``."""
    M, L = spare_MLR.shape[:2]
    G, H, S = topology.num_gpus, topology.home_slots_per_gpu, topology.spare_slots_per_gpu
    home = home_experts_MLK.reshape(M, L, G, H)
    spare = spare_MLR.reshape(M, L, G, S)
    return torch.cat([home, spare], dim=-1).reshape(M, L, G * (H + S))
