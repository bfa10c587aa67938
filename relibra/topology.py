"""The expert-parallel topology: nodes, GPUs, home and spare slots, links.

Legend of names used across relibra:

    N  nodes                     G  GPUs (ranks) in the expert-parallel group = N * gpus_per_node
    E  logical experts per layer H  home slots per GPU = E / G
    S  spare slots per GPU       P  physical slots = G * (H + S)

Physical slot ``p`` lives on GPU ``p // (H + S)``; on each GPU the first ``H`` slots are home
slots (they hold the expert's weights and optimizer state), the next ``S`` are spare slots
(filled with replicas). GPU ``g`` lives on node ``g // gpus_per_node``.

A *node* is one NVLink domain, whatever its size: the GPUs joined by the fast tier
(``intra_node_bandwidth``), 8 on an H100 or B200 HGX board, up to 72 on a GB200 NVL72 rack. The
slow tier (``inter_node_bandwidth``) joins domains. So one NVL72 rack is ``num_nodes=1``; with
256 experts, which 72 does not divide, it runs expert parallelism on 64 of its 72 GPUs
(``gpus_per_node=64``): every GPU of the expert-parallel group has the same ``H`` home slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["Topology"]


@dataclass(frozen=True)
class Topology:
    """Shape of the expert-parallel group for one MoE model.

    Args:
        num_nodes: nodes (NVLink domains) in the expert-parallel group.
        gpus_per_node: GPUs of the group in each NVLink domain (8 on HGX boards, up to 72 on
            GB200 NVL72; use a count that divides the experts, e.g. 64 of an NVL72's 72).
        num_experts: logical routed experts per MoE layer; must divide evenly by the GPUs.
        spare_slots_per_gpu: slots per GPU for replicas (0 disables replication).
        num_expert_groups: expert groups of group-limited routing (DeepSeek-V3: 8); used by
            the hierarchical EPLB. Must divide ``num_experts``.
        intra_node_bandwidth: bytes/s per GPU per direction inside a node (NVLink).
        inter_node_bandwidth: bytes/s per GPU per direction between nodes (InfiniBand, scale-out).
    """

    num_nodes: int
    gpus_per_node: int
    num_experts: int
    spare_slots_per_gpu: int = 0
    num_expert_groups: int = 1
    intra_node_bandwidth: float = 450e9
    inter_node_bandwidth: float = 50e9

    def __post_init__(self) -> None:
        for name in ("num_nodes", "gpus_per_node", "num_experts", "num_expert_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Topology.{name} must be a positive int, got {value!r}")
        spare = self.spare_slots_per_gpu
        if not isinstance(spare, int) or isinstance(spare, bool) or spare < 0:
            raise ValueError(f"Topology.spare_slots_per_gpu must be an int >= 0, got {spare!r}")
        if self.num_experts % self.num_gpus:
            fits = [g for g in range(self.gpus_per_node, 0, -1) if self.num_experts % (self.num_nodes * g) == 0]
            hint = (f"; run expert parallelism on {fits[0]} of each node's GPUs (gpus_per_node={fits[0]})"
                    if fits else "")
            raise ValueError(
                f"Topology.num_experts={self.num_experts} is not divisible by the "
                f"{self.num_gpus} GPUs ({self.num_nodes} nodes x {self.gpus_per_node}); "
                f"every GPU needs the same number of home slots{hint}"
            )
        if self.num_experts % self.num_expert_groups:
            raise ValueError(
                f"Topology.num_expert_groups={self.num_expert_groups} does not divide "
                f"num_experts={self.num_experts}"
            )
        for name in ("intra_node_bandwidth", "inter_node_bandwidth"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and value > 0 and (isinstance(value, int) or math.isfinite(value))):
                raise ValueError(f"Topology.{name} must be a finite positive number (bytes/s), got {value!r}")

    # ----------------------------------------------------------------------- sizes
    @property
    def num_gpus(self) -> int:
        """G: GPUs (ranks) in the expert-parallel group."""
        return self.num_nodes * self.gpus_per_node

    @property
    def home_slots_per_gpu(self) -> int:
        """H = E / G: home slots of every GPU."""
        return self.num_experts // self.num_gpus

    @property
    def slots_per_gpu(self) -> int:
        """H + S: all expert slots of one GPU."""
        return self.home_slots_per_gpu + self.spare_slots_per_gpu

    @property
    def num_physical_slots(self) -> int:
        """P = G * (H + S)."""
        return self.num_gpus * self.slots_per_gpu

    @property
    def num_spare_slots(self) -> int:
        """G * S: spare slots of the whole group."""
        return self.num_gpus * self.spare_slots_per_gpu

    @property
    def experts_per_node(self) -> int:
        return self.num_experts // self.num_nodes

    # ----------------------------------------------------------------------- maps
    def node_of_gpu(self, gpu: int) -> int:
        self._check_gpu(gpu)
        return gpu // self.gpus_per_node

    def gpus_of_node(self, node: int) -> range:
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node {node} out of range [0, {self.num_nodes})")
        return range(node * self.gpus_per_node, (node + 1) * self.gpus_per_node)

    def gpu_of_slot(self, slot: int) -> int:
        if not 0 <= slot < self.num_physical_slots:
            raise ValueError(f"physical slot {slot} out of range [0, {self.num_physical_slots})")
        return slot // self.slots_per_gpu

    def _check_gpu(self, gpu: int) -> None:
        if not 0 <= gpu < self.num_gpus:
            raise ValueError(f"GPU {gpu} out of range [0, {self.num_gpus})")

    # ----------------------------------------------------------------------- builders
    @classmethod
    def from_mesh(
        cls,
        mesh: "DeviceMesh",
        num_experts: int,
        spare_slots_per_gpu: int = 0,
        **kwargs,
    ) -> "Topology":
        """Build from a DeviceMesh whose dimensions are ``(node, gpu)``.

        A 1-D mesh is read as a single node. A mesh with more than two dimensions must be
        sliced to its expert-parallel ``(node, gpu)`` dimensions first.
        """
        shape = tuple(mesh.shape) if hasattr(mesh, "shape") else tuple(mesh.mesh.shape)
        if len(shape) == 1:
            nodes, gpus = 1, shape[0]
        elif len(shape) == 2:
            nodes, gpus = shape
        else:
            raise ValueError(
                f"Topology.from_mesh needs a 1-D or 2-D (node, gpu) DeviceMesh, got shape {shape}; "
                "slice the expert-parallel dimensions first"
            )
        return cls(
            num_nodes=int(nodes),
            gpus_per_node=int(gpus),
            num_experts=num_experts,
            spare_slots_per_gpu=spare_slots_per_gpu,
            **kwargs,
        )

    def __str__(self) -> str:
        return (
            f"{self.num_nodes} nodes x {self.gpus_per_node} GPUs, {self.num_experts} experts "
            f"({self.home_slots_per_gpu} home + {self.spare_slots_per_gpu} spare slots per GPU)"
        )
