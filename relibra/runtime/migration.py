"""Reorder migration: move home experts (weights, gradients, optimizer state) between ranks.

Legend (see :mod:`relibra.topology`):

    L  MoE layers      E  logical experts      G  ranks of the expert-parallel group
    H  home slots per rank (E / G)

For one MoE layer ``l`` every rank ``r`` holds, in each per-expert tensor, the rows of its
``H`` home experts in the order of its home slots::

    param (local)                [H, ...]   row j = expert placement.home_experts[l, r*H + j]
    param.grad (if not None)     [H, ...]
    optimizer.state[param][k]    [H, ...]   (AdamW exp_avg, exp_avg_sq, ...); 0-dim state
                                            such as AdamW ``step`` is shared by all rows and kept

:func:`migrate_experts` rewrites those rows so that they
follow a new placement. An expert whose home rank changes is sent point to point
(``batch_isend_irecv``); one that only changes slot on its rank is a local permutation. The
move is a transaction in six stages, each a function of :mod:`.migration_stages`:

1. validate and agree: every rank checks its input and all-gathers (error text, signature of
   shapes/dtypes/placements); every rank raises the same ``ValueError`` before any transfer if
   any rank is wrong;
2. pack: each sender packs the rows it sends to a peer into one byte buffer (every piece
   16-byte aligned) plus one checksum per piece (:mod:`.checksums`); receivers allocate fresh
   staging buffers; nothing is posted yet;
3. agree everyone packed: one ``all_reduce``; a rank that failed to pack makes every rank
   raise :class:`MigrationError` before any transfer, so none is left waiting on a receive;
4. transfer and verify: the transfers run, receivers recompute the checksums;
5. agree the verdict: ``all_gather`` of every rank's verdict; any failure raises the same
   :class:`MigrationError` everywhere and nothing was changed;
6. stage and commit: the new local tensors are built, then written in place with ``copy_``
   (parameter identity, and so the optimizer, is preserved).

With ``agree_group`` (the expert-data-parallel replicas of this rank, which run the same
migration in their own expert-parallel groups on other shards of the same experts), every
verdict of stages 1, 3 and 5 is also agreed over that group: if any replica's migration fails,
every replica raises and none commits, so the shards never end up under different placements.

The caller switches its placement only after :func:`migrate_experts` returned.

With ``defer_state=True`` the move comes in two halves. The weights and gradients go through
the six stages at once (2 of the 16 bytes a mixed-precision AdamW parameter takes); the
optimizer state (fp32 master copy and moments) is packed and agreed with them, then posted over
a process group of its own and left in flight: the report's ``state_move``
(:class:`~relibra.runtime.state_move.StateMove`) waits for it, verifies and commits it (stages
4b to 6) when ``finish()`` is called, which must happen before the next ``optimizer.step()``.
The forward and backward passes in between need only the weights, so on a GPU the state's
bytes travel while the step computes. If that half fails, ``finish()`` moves the weights and
gradients back, so every rank is on ``old`` again with its state untouched.

The stages themselves live in :mod:`relibra.runtime.migration_stages`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ..plan import Placement
from ..topology import Topology
from .comm import comm_device
from .migration_stages import (
    MigrationError,
    Move,
    agree_packed,
    agree_verdict,
    pack,
    stage_and_commit,
    transfer_and_verify,
    validate_and_agree,
)
from .state_move import StateMove, state_link

__all__ = ["Move", "MigrationError", "MigrationReport", "plan_moves", "migrate_experts", "permute_experts"]


@dataclass(frozen=True)
class MigrationReport:
    """What one :func:`migrate_experts` call did.

    Attributes:
        experts_moved: expert homes that changed rank, summed over layers (same on every rank).
        local_reorders: experts that changed slot on the same rank, summed over layers.
        bytes_sent: bytes this rank sent (packed rows with padding, plus checksums).
        bytes_received: bytes this rank received.
        seconds: wall time of the call on this rank.
        moves: per layer, the moves of :func:`plan_moves`.
        state_move: with ``defer_state``, the optimizer state's half still in flight (call its
            ``finish()`` before ``optimizer.step()``); None when nothing was deferred.
    """

    experts_moved: int
    local_reorders: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    moves: tuple[tuple[Move, ...], ...]
    state_move: StateMove | None = None


def plan_moves(old: Placement, new: Placement, topology: Topology, layer: int) -> list[Move]:
    """Experts of ``layer`` whose home slot differs between ``old`` and ``new``.

    Pure and deterministic (same result on every rank). Sorted by expert id.

    Returns:
        ``[Move(expert, src_rank, src_local_slot, dst_rank, dst_local_slot), ...]`` with local
        slots in ``[0, H)``. Moves with ``src_rank == dst_rank`` are local permutations.
    Raises:
        ValueError: a placement does not validate on ``topology`` or ``layer`` is out of range.
    """
    old.validate(topology)
    new.validate(topology)
    for name, p in (("old", old), ("new", new)):
        if not 0 <= layer < p.num_layers:
            raise ValueError(f"layer {layer} out of range for the {name} placement ({p.num_layers} layers)")
    H = topology.home_slots_per_gpu
    old_slot = old.home_slot()[layer].tolist()
    new_slot = new.home_slot()[layer].tolist()
    return [
        Move(e, o // H, o % H, n // H, n % H)
        for e, (o, n) in enumerate(zip(old_slot, new_slot))
        if o != n
    ]


# ---------------------------------------------------------------------------------- migrate
def migrate_experts(
    tensors_by_layer: Sequence[Sequence[torch.Tensor]],
    optimizer: torch.optim.Optimizer | None,
    old: Placement,
    new: Placement,
    topology: Topology,
    group: dist.ProcessGroup | None = None,
    *,
    agree_group: dist.ProcessGroup | None = None,
    defer_state: bool = False,
) -> MigrationReport:
    """Move home experts from ``old`` to ``new`` placement: rows, grads and optimizer state.

    Collective over ``group`` (default: the world group), whose rank ``r`` is GPU ``r`` of
    ``topology``. Call it on every rank with the same placements, between optimizer steps.
    The stages are those of the module doc.

    Args:
        tensors_by_layer: per MoE layer, this rank's per-expert parameters (e.g.
            ``[experts.gate_up_proj, experts.down_proj]``), each a DTensor ``Shard(0)`` or a
            plain tensor whose local shape is ``[H, ...]`` in ``old``'s home-slot order.
        optimizer: its ``state[param]`` tensors with leading dim H move with the rows; 0-dim
            state (AdamW ``step``) is kept and must agree across ranks. ``None``: no state.
        old, new: placements ``[L, E]`` of the same L layers.
        topology: the expert-parallel topology (``num_gpus`` must equal the group size).
        group: the expert-parallel process group.
        agree_group: optional group whose ranks must reach the same verdict (this rank's
            expert-data-parallel replicas, each migrating its own shards); every rank of it
            must call :func:`migrate_experts` with the same placements.
        defer_state: move the optimizer state later (module doc): it is posted now, and the
            report's ``state_move.finish()`` completes it (collective, before the next
            ``optimizer.step()``). Until then the state's rows still follow ``old``.
    Returns:
        A :class:`MigrationReport`. Afterwards local row ``j`` of every tensor holds expert
        ``new.home_experts[l, r*H + j]``; the tensor objects are the same (written in place).
    Raises:
        ValueError: on every rank, before any transfer, when any rank's input is wrong
            (placements, shapes, dtypes, devices, optimizer state) or ranks disagree.
        MigrationError: on every rank, when a transfer failed or a checksum did not match;
            no tensor was changed on any rank.
    """
    t0 = time.perf_counter()
    rank = dist.get_rank(group)
    pieces_by_layer = validate_and_agree(tensors_by_layer, optimizer, old, new, topology, group, agree_group)
    moves = tuple(tuple(plan_moves(old, new, topology, l)) for l in range(old.num_layers))
    n_transfers = sum(m.is_transfer for ms in moves for m in ms)
    n_local = sum(not m.is_transfer for ms in moves for m in ms)
    device = next((pc.local.device for ps in pieces_by_layer for pc in ps), comm_device(group))
    now, later = pieces_by_layer, None
    if defer_state and (n_transfers or n_local) and any(pc.state for ps in pieces_by_layer for pc in ps):
        now = [[pc for pc in ps if not pc.state] for ps in pieces_by_layer]
        later = [[pc for pc in ps if pc.state] for ps in pieces_by_layer]
    exchange = pack(now, moves, group, device)
    deferred = pack(later, moves, group, device, transport=state_link(group)) if later is not None else None
    agree_packed(exchange.error or (deferred.error if deferred is not None else ""), n_transfers, group, agree_group)
    error = transfer_and_verify(exchange, rank) or exchange.error
    agree_verdict(error, n_transfers, group, agree_group)
    state_move = None
    if deferred is not None:  # posted before the weights commit: the senders' rows are packed already
        tensors = [list(ps) for ps in tensors_by_layer]
        state_move = StateMove.post(deferred, later, moves, old, new, topology, tensors, group, agree_group,
                                    n_transfers)
    stage_and_commit(now, moves, exchange.received, old, new, topology, rank)
    sent = exchange.bytes_sent + (deferred.bytes_sent if deferred is not None else 0)
    received = exchange.bytes_received + (deferred.bytes_received if deferred is not None else 0)
    return MigrationReport(n_transfers, n_local, sent, received, time.perf_counter() - t0, moves, state_move)


@torch.no_grad()
def permute_experts(tensors_by_layer: Sequence[Sequence[torch.Tensor]], optimizer: torch.optim.Optimizer | None,
                    old: Placement, new: Placement) -> None:
    """One process (every expert local): reorder rows, grads and optimizer state from ``old``'s
    slot order to ``new``'s, in place; :func:`migrate_experts`' single-process counterpart.

    ``tensors_by_layer``: per layer, plain per-expert tensors ``[E, ...]`` in ``old``'s order.
    """
    old_slot = old.home_slot()
    for l, params in enumerate(tensors_by_layer):
        rows = old_slot[l][new.home_experts[l]]
        for p in params:
            ts = [p] + ([p.grad] if p.grad is not None else [])
            if optimizer is not None:
                ts += [v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor) and v.dim() > 0]
            for x in ts:
                x.copy_(x[rows])
