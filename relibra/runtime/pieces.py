"""What a migration moves: the per-expert tensors of every layer, as row pieces.

Legend: L MoE layers, H home slots per rank. For each layer, every parameter given to
:func:`relibra.runtime.migration.migrate_experts` contributes its local rows ``[H, ...]``, those
of its gradient and those of each optimizer state tensor that is not 0-dim; each is a
:class:`Piece`. Rows are packed 16-byte aligned (:data:`ALIGN`) so views of any dtype work.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch

from ..plan import Placement

__all__ = ["ALIGN", "Piece", "local_tensor", "collect_pieces"]

ALIGN = 16  # bytes; every piece starts aligned so views of any dtype work


class Piece(NamedTuple):
    """One per-expert tensor of one layer: ``local [H, ...]``, its row size in bytes, and whether
    it is optimizer state."""

    name: str                 # e.g. "layer 0 param 1 state exp_avg"
    local: torch.Tensor
    row_nbytes: int
    state: bool = False       # optimizer state (what a deferred migration moves later)

    @property
    def row_padded(self) -> int:
        return -(-self.row_nbytes // ALIGN) * ALIGN


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise (shares storage)."""
    inner = getattr(t, "_local_tensor", None)
    return inner if isinstance(inner, torch.Tensor) else t


def collect_pieces(tensors_by_layer, optimizer, old, new, topology, world):
    """Stage 1 of a migration on this rank: check the input, collect every layer's pieces.

    Returns ``(pieces_by_layer, error, signature)``: the pieces (the parameter, its grad, its
    optimizer state with leading dim H, in that order), the first fault as text ("" if none)
    and one line per fact every rank must agree on (placement digests, dtypes and shapes,
    0-dim optimizer state). Never raises: the caller shares the error with every rank first.
    """
    sig: list[str] = []
    pieces_by_layer: list[list[Piece]] = []
    try:
        if not isinstance(old, Placement) or not isinstance(new, Placement):
            return [], f"old and new must be Placement objects, got {type(old).__name__}, {type(new).__name__}", sig
        old.validate(topology)
        new.validate(topology)
        if world != topology.num_gpus:
            return [], f"the process group has {world} ranks but the topology has {topology.num_gpus} GPUs", sig
        L, H = old.num_layers, topology.home_slots_per_gpu
        if new.num_layers != L:
            return [], f"old placement has {L} layers, new has {new.num_layers}", sig
        if len(tensors_by_layer) != L:
            return [], f"tensors_by_layer has {len(tensors_by_layer)} layers, the placements have {L}", sig
        for name, p in (("old", old), ("new", new)):
            digest = hashlib.sha256(p.home_experts.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
            sig.append(f"{name} placement sha256={digest}")
        state = getattr(optimizer, "state", {}) if optimizer is not None else {}
        seen: set[int] = set()
        device = None
        for l, params in enumerate(tensors_by_layer):
            pieces: list[Piece] = []
            for i, p in enumerate(params):
                if not isinstance(p, torch.Tensor):
                    return [], f"layer {l} param {i} is a {type(p).__name__}, not a tensor", sig
                if id(p) in seen:
                    return [], f"layer {l} param {i} appears twice in tensors_by_layer", sig
                seen.add(id(p))
                named = [("", p)]
                if p.grad is not None:
                    named.append(("grad", p.grad))
                st = state.get(p, {}) if hasattr(state, "get") else {}
                for key in sorted(st, key=str):
                    v = st[key]
                    if not isinstance(v, torch.Tensor):
                        continue
                    if v.dim() == 0:  # shared by all rows (AdamW step): kept, must agree
                        sig.append(f"layer {l} param {i} state {key!s}={float(local_tensor(v).detach().cpu())!r}")
                        continue
                    named.append((f"state {key!s}", v))
                for kind, t in named:
                    loc = local_tensor(t)
                    what = f"layer {l} param {i}" + (f" {kind}" if kind else "")
                    if loc.dim() < 1 or loc.shape[0] != H:
                        return [], (f"{what} has local shape {tuple(loc.shape)}; its leading dim must be "
                                    f"the H={H} home slots of this rank"), sig
                    if device is None:
                        device = loc.device
                    elif loc.device != device:
                        return [], f"{what} is on {loc.device}, other expert tensors on {device}", sig
                    row_nbytes = loc[0].numel() * loc.element_size()
                    pieces.append(Piece(what, loc, row_nbytes, kind.startswith("state")))
                    sig.append(f"{what}: {loc.dtype} {tuple(loc.shape)}")
            pieces_by_layer.append(pieces)
        return pieces_by_layer, "", sig
    except Exception as exc:  # noqa: BLE001 - any local fault must reach every rank as text
        return [], f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc), sig
