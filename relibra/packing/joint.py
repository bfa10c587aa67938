"""Packing and reorder planned together: pack, reorder on the packed loads, re-pack.

Legend: see CONTRIBUTING.md (Z sequences, M micro-batches, L MoE layers, E logical experts).

Which sequences share a micro-batch changes the loads ``reorder`` balances, and the placement
``reorder`` picks changes what a good packing is. :func:`pack_with_reorder` alternates the two:
pack under the current placement, reorder on the packed loads (from the current placement, at
``migration_weight``), re-pack under the new placement starting from the packing before (so the
re-pack is never worse there), ``rounds`` times. docs/packing.md measures what it buys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..placement import Placement
from ..policies.reorder import reorder_placement
from ..topology import Topology
from .objective import Packing
from .routes import pack

__all__ = ["JointPlan", "pack_with_reorder"]


@dataclass(frozen=True)
class JointPlan:
    """A step's packing and the placement it was packed for.

    Attributes:
        packing: the final packing (its ``objective`` is under ``placement``).
        placement: the home placement ``reorder`` chose for the packed loads.
        first_packing: the packing under the starting placement, before any reorder.
    """

    packing: Packing
    placement: Placement
    first_packing: Packing

    @property
    def loads(self) -> torch.Tensor:
        """``[M, L, E]`` loads of the final packing."""
        return self.packing.loads


def pack_with_reorder(sequence_loads: Any, sequence_tokens: Any, num_micro_batches: int, tokens_per_micro_batch: int,
                      topology: Topology, previous: Placement | None = None, *, migration_weight: float = 0.02,
                      max_swaps: int = 200, rounds: int = 1, start: Any = None, **pack_options: Any) -> JointPlan:
    """Pack, reorder, re-pack (``rounds`` times). Deterministic.

    Args:
        sequence_loads, sequence_tokens, num_micro_batches, tokens_per_micro_batch, start,
            pack_options: as for :func:`~relibra.packing.pack`.
        topology: nodes, GPUs and experts.
        previous: the placement of the step before; None is the first step: the contiguous
            start, left for free (``migration_weight`` 0 in that step, as ``reorder`` does).
        migration_weight: ``reorder``'s price of moving an expert (see
            :class:`~relibra.policies.reorder.ReorderPolicy`; its default, 0.02).
        max_swaps: ``reorder``'s local-search rounds.
        rounds: reorder + re-pack rounds (int >= 1); it stops early once a re-pack keeps the packing.

    Raises:
        ValueError as :func:`~relibra.packing.pack` does, or for ``rounds`` < 1.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"pack_with_reorder option rounds must be an int >= 1, got {rounds!r}")
    loads = torch.as_tensor(sequence_loads)
    if loads.dim() != 3:
        raise ValueError(f"sequence_loads must have 3 dimensions [Z, L, E], got shape {tuple(loads.shape)}")
    first = previous is None
    current = Placement.contiguous(topology, loads.shape[1]) if first else previous
    weight = 0.0 if first else migration_weight
    packing = first_packing = pack(loads, sequence_tokens, num_micro_batches, tokens_per_micro_batch, current,
                                   topology, start=start, **pack_options)
    placement = current
    for _ in range(rounds):
        placement = reorder_placement(packing.loads, topology, current, weight, max_swaps)
        repacked = pack(loads, sequence_tokens, num_micro_batches, tokens_per_micro_batch, placement, topology,
                        start=packing.micro_batch_of, **pack_options)
        settled = torch.equal(repacked.micro_batch_of, packing.micro_batch_of)
        packing = repacked
        if settled:
            break
    return JointPlan(packing, placement, first_packing)
