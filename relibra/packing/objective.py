"""What a packing costs under a placement, and the result every packer returns.

Legend: see CONTRIBUTING.md (Z sequences, M micro-batches, L MoE layers, E logical experts,
G GPUs, N nodes, H home slots per GPU).

The objective of a packing under a placement (home slots, no replicas) is::

    F = sum over micro-batches m and layers l of
            max_n node_load[m, l, n] / gpus_per_node  +  gpu_weight * max_g gpu_load[m, l, g]

in token copies per GPU. A layer of a micro-batch waits for its busiest GPU. Replicas inside
a node (``replicate``, ``hybrid``) can bring every GPU of a node down to the node's mean, but
never move load between nodes within a micro-batch: the node term is the step time with
perfect intra-node replicas, the GPU term what is left without them (``static``,
``reorder``). The GPU term counts ``gpu_weight`` (default 0.5), less than the node term,
because replicas repair it and nothing inside a micro-batch repairs the node term: the same
split as ``reorder``'s two stages (nodes first, GPUs inside nodes second).

Packing moves no load between micro-batches' totals: ``F`` is at least ``M`` times the
objective of the step's mean micro-batch (``sum_m max <= max sum``), reached when every
micro-batch carries the same share of every expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..placement import Placement
from ..topology import Topology

__all__ = ["DEFAULT_GPU_WEIGHT", "Packing", "packing_objective", "sum_by_micro_batch"]

#: weight of the busiest-GPU term against the busiest-node term (see the module docstring)
DEFAULT_GPU_WEIGHT = 0.5


@dataclass(frozen=True)
class Packing:
    """A step's sequences assigned to micro-batches, with what that costs.

    Attributes:
        micro_batch_of: ``[Z]`` int64 micro-batch of every sequence.
        loads: ``[M, L, E]`` int64 loads of every micro-batch (its sequences' loads summed).
        tokens: ``[M]`` int64 tokens of every micro-batch (each within the budget).
        objective: ``F`` of ``loads`` under the placement given to the packer.
        method: ``"routes"`` (route-aware); ``"start"`` (the given start was kept: it scored at
            least as well, or the greedy found no room); ``"tokens"`` (the greedy found no room
            and no start was given: the token-only packing).
        info: free-form numbers (``seconds``, ``start_objective``, ``exchanges``, ...); not compared.
    """

    micro_batch_of: torch.Tensor
    loads: torch.Tensor
    tokens: torch.Tensor
    objective: float
    method: str
    info: dict = field(default_factory=dict, compare=False)

    @property
    def num_micro_batches(self) -> int:
        return int(self.loads.shape[0])

    def groups(self) -> list[list[int]]:
        """The sequence indices of every micro-batch (ascending): the index lists
        :func:`relibra.routing.micro_batch_loads` and ``micro_batch_groups`` take."""
        order = torch.argsort(self.micro_batch_of, stable=True)
        counts = torch.bincount(self.micro_batch_of, minlength=self.num_micro_batches).tolist()
        return [part.tolist() for part in order.split(counts)]


def sum_by_micro_batch(sequence_loads_ZLE: torch.Tensor, micro_batch_of_Z: torch.Tensor,
                       num_micro_batches: int) -> torch.Tensor:
    """``[M, L, E]`` int64: the loads of every micro-batch, its sequences' loads summed."""
    Z, L, E = sequence_loads_ZLE.shape
    flat = sequence_loads_ZLE.reshape(Z, L * E)
    out = torch.zeros(num_micro_batches, L * E, dtype=torch.float64)  # exact: integer sums below 2**53
    for lo in range(0, Z, 64):  # blocks: no converted copy of the whole step (its page faults cost more)
        out.index_add_(0, micro_batch_of_Z[lo:lo + 64], flat[lo:lo + 64].to(torch.float64))
    return out.to(torch.int64).view(num_micro_batches, L, E)


def packing_objective(loads_MLE: torch.Tensor, placement: Placement, topology: Topology,
                      gpu_weight: float = DEFAULT_GPU_WEIGHT) -> float:
    """``F`` of the micro-batch loads ``[M, L, E]`` under ``placement`` (module docstring)."""
    M, L, E = loads_MLE.shape
    G, Gn, H = topology.num_gpus, topology.gpus_per_node, topology.home_slots_per_gpu
    slot_loads = loads_MLE.gather(2, placement.home_experts.expand(M, L, E))  # [M, L, G*H] in home-slot order
    gpu = slot_loads.view(M, L, G, H).sum(-1)
    node = gpu.view(M, L, topology.num_nodes, Gn).sum(-1)
    return float(node.amax(-1).sum()) / Gn + gpu_weight * float(gpu.amax(-1).sum())
