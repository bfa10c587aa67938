"""Plans: where every logical expert lives and which physical slot computes which tokens.

Legend (see also :mod:`relibra.topology`):

    M  micro-batches of the step      L  MoE layers          E  logical experts
    G  GPUs                           N  nodes               H  home slots per GPU
    S  spare slots per GPU            V  spare slots = G*S   P  physical slots = G*(H+S)
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
from typing import Any

import torch

from .placement import Placement
from .slots import as_loads, even_slot_tokens, interleave_slots, slot_ranks
from .topology import Topology

__all__ = ["Placement", "ReplicaPlan", "Plan", "as_loads", "even_slot_tokens", "slot_ranks"]


@dataclass(frozen=True)
class ReplicaPlan:
    """Spare-slot contents and token split of one micro-batch, all layers.

    Attributes:
        spare_experts: ``[L, V]`` logical expert in each spare slot, -1 when empty; spare
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
        spare_experts: ``[M, L, V]`` int64, -1 empty.
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
        phy2log = interleave_slots(placement.home_experts.expand(M, -1, -1), spare, topology)
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
        """A plan from spare-slot contents ``[M, L, V]``, splitting loads evenly over copies."""
        loads = as_loads(loads)
        M, L, _ = loads.shape
        spare_experts = spare_experts.expand(M, L, topology.num_spare_slots).contiguous()
        phy2log = interleave_slots(placement.home_experts.expand(M, -1, -1), spare_experts, topology)
        return cls(topology, placement, spare_experts, even_slot_tokens(phy2log, loads),
                   intra_node_replicas, policy)

    # ------------------------------------------------------------------ sizes
    @property
    def num_micro_batches(self) -> int:
        return self.spare_experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.spare_experts.shape[1]

    def micro_batches(self, start: int, stop: int) -> "Plan":
        """This plan's micro-batches ``start..stop-1`` (the same placement, a copy of ``info``)."""
        return Plan(self.topology, self.placement, self.spare_experts[start:stop], self.slot_tokens[start:stop],
                    self.intra_node_replicas, self.policy, dict(self.info))

    def replica_plan(self, micro_batch: int) -> ReplicaPlan:
        """The spare slots and split of one micro-batch (what the layer installs)."""
        if not 0 <= micro_batch < self.num_micro_batches:
            raise IndexError(f"micro-batch {micro_batch} out of range [0, {self.num_micro_batches})")
        return ReplicaPlan(self.spare_experts[micro_batch], self.slot_tokens[micro_batch])

    # ------------------------------------------------------------------ vLLM / EPLB maps
    def phy2log(self) -> torch.Tensor:
        """``[M, L, P]`` logical expert in every physical slot, -1 for an empty spare slot."""
        M = self.num_micro_batches
        return interleave_slots(self.placement.home_experts.expand(M, -1, -1), self.spare_experts, self.topology)

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

    def __repr__(self) -> str:
        """One line: policy, sizes, topology, replicas and GPU imbalance (no tensors)."""
        M, L = self.num_micro_batches, self.num_layers
        text = (f"Plan(policy={self.policy!r}, micro_batches={M}, layers={L}, topology=[{self.topology}], "
                f"replicas={int(self.replicas().sum())}")
        P = self.topology.num_physical_slots
        if self.slot_tokens.numel() and tuple(self.slot_tokens.shape) == (M, L, P):  # else validate() says why
            imbalance = self.imbalance()
            text += f", imbalance mean {float(imbalance.mean()):.3f} max {float(imbalance.max()):.3f}"
        return text + ")"

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
