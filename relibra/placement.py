"""Placement: the home slot of every logical expert, per layer, for a whole step.

Legend: L MoE layers, E logical experts, G GPUs, H home slots per GPU. Home slot ``k`` is on
GPU ``k // H``; reorder changes the placement once a step, and the home slot holds the expert's
weights and optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .topology import Topology

__all__ = ["Placement"]


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
            what = (
                "no home slot (no copy)" if counts[layer, expert] == 0 else f"{int(counts[layer, expert])} home slots"
            )
            raise ValueError(f"placement, layer {layer}: expert {expert} has {what}")

    def moved_experts(self, other: "Placement", topology: Topology) -> torch.Tensor:
        """``[L, E]`` bool: experts whose home GPU differs between ``self`` and ``other``."""
        if other.home_experts.shape != self.home_experts.shape:
            raise ValueError(
                f"placements differ in shape: {tuple(self.home_experts.shape)} vs {tuple(other.home_experts.shape)}"
            )
        return self.home_gpu(topology) != other.home_gpu(topology)

    def bytes_moved(self, other: "Placement", topology: Topology, bytes_per_expert: float) -> float:
        """Bytes sent to turn ``other`` into ``self`` (each moved expert costs ``bytes_per_expert``)."""
        return float(self.moved_experts(other, topology).sum()) * float(bytes_per_expert)

    def equal(self, other: "Placement") -> bool:
        return torch.equal(self.home_experts, other.home_experts)
