"""A plain ``optimizer.state_dict()`` that cannot silently land on the wrong experts.

Legend: L MoE layers, E experts, G ranks of the expert-parallel group.

Reorder moves every expert's optimizer state with its weights, so on each rank the rows of an
expert parameter's AdamW moments follow the placement, not the expert id. A plain
``optimizer.state_dict()`` therefore only means something under the placement (and the rank of
the expert-parallel group) it was saved under. :func:`stamp_optimizer` hooks the Balancer's
optimizer so that

- ``optimizer.state_dict()`` carries :data:`STAMP_KEY`: a digest of the placement ``[L, E]``,
  the topology and this rank;
- ``optimizer.load_state_dict(sd)`` of a stamped state dict raises ValueError before anything
  is loaded when the current placement, topology or rank differ from the stamp (with the way
  out: restore the Balancer first, ``balancer.load_state_dict``, which moves the experts to the
  saved placement, or save and load through :mod:`relibra.runtime.checkpoint`, which writes
  logical expert order and loads into any placement).

State dicts without a stamp (saved before a Balancer existed, or built by
``torch.distributed.checkpoint`` helpers, which keep only ``state`` and ``param_groups``) load
unchecked. The check is local (no collective): every rank compares its own stamp.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from ..placement import Placement
from ..topology import Topology

__all__ = ["STAMP_KEY", "placement_stamp", "stamp_optimizer"]

STAMP_KEY = "relibra_placement"


def placement_stamp(placement: Placement, topology: Topology, rank: int) -> str:
    """Digest of what the rows of this rank's expert optimizer state follow."""
    digest = hashlib.sha256(placement.home_experts.detach().cpu().contiguous().numpy().tobytes())
    return f"{topology.num_nodes}x{topology.gpus_per_node} rank {rank} placement sha256={digest.hexdigest()[:16]}"


def stamp_optimizer(optimizer, current: Callable[[], str]) -> None:
    """Hook ``optimizer`` (if it supports state-dict hooks) with the stamp ``current()`` gives."""
    if not hasattr(optimizer, "register_state_dict_post_hook"):
        return

    def add_stamp(opt, state_dict):
        state_dict[STAMP_KEY] = current()
        return state_dict

    def check_stamp(opt, state_dict):
        saved = state_dict.get(STAMP_KEY)
        if saved is None:
            return state_dict
        now = current()
        if saved != now:
            raise ValueError(
                f"optimizer.load_state_dict: this optimizer state was saved under {saved}, but the experts "
                f"are now under {now}; its per-expert rows would land on other experts. Restore the "
                "Balancer first (balancer.load_state_dict(...), which moves the experts to the saved "
                "placement) or save and load with relibra.runtime.checkpoint.get_state / set_state, "
                "which work across placements and world sizes")
        state_dict = dict(state_dict)
        del state_dict[STAMP_KEY]
        return state_dict

    optimizer.register_state_dict_post_hook(add_stamp)
    optimizer.register_load_state_dict_pre_hook(check_stamp)
