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
move is a transaction in six stages, each a function below:

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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from ..plan import Placement
from ..topology import Topology
from .checksums import checksums, first_mismatch, hash_weights
from .comm import all_gather_text, all_reduce_, comm_device, first_error
from .pieces import Piece, collect_pieces

__all__ = ["Move", "MigrationError", "MigrationReport", "plan_moves", "migrate_experts", "permute_experts"]


class Move(NamedTuple):
    """One logical expert of one layer whose home slot changes.

    ``src_rank == dst_rank`` is a local permutation (no transfer); see :attr:`is_transfer`.
    """

    expert: int
    src_rank: int
    src_local_slot: int
    dst_rank: int
    dst_local_slot: int

    @property
    def is_transfer(self) -> bool:
        return self.src_rank != self.dst_rank


class MigrationError(RuntimeError):
    """A transfer failed or arrived corrupted; every rank kept its old tensors."""


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
    """

    experts_moved: int
    local_reorders: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    moves: tuple[tuple[Move, ...], ...]


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


# ---------------------------------------------------------------------------------- agreement
def _input_fault(texts: list[str], world: int) -> str:
    """The first fault in every rank's stage-1 text (error line, then signature lines), or ""."""
    for r, t in enumerate(texts):
        e = t.split("\n", 1)[0]
        if e:
            return f"migrate_experts: rank {r}: {e} (no expert was moved on any rank)"
    sigs = [t.split("\n")[1:] for t in texts]
    for r in range(1, world):
        for a, b in zip_longest(sigs[0], sigs[r], fillvalue="<nothing>"):
            if a != b:
                return (f"migrate_experts: ranks disagree before any transfer: rank 0 has "
                        f"'{a}', rank {r} has '{b}' (no expert was moved on any rank)")
    return ""


def _agree(verdict: str, agree_group, exc_type: type[Exception]) -> None:
    """Raise ``exc_type`` on every rank if this rank's ``verdict`` (already the same within the
    expert-parallel group) or that of any rank of ``agree_group`` is non-empty."""
    if agree_group is not None:
        found = first_error(verdict, agree_group)
        if found is not None:
            r, text = found
            if not verdict:  # heard from another replica
                text = f"{text} (raised on expert-data-parallel replica {r}; this replica kept its experts too)"
            raise exc_type(text)
    elif verdict:
        raise exc_type(verdict)


# ---------------------------------------------------------------------------------- stages
#: Test hook (tests set it with monkeypatch to corrupt a transfer): when not None it is called
#: as ``hook(rank, {src_rank: received uint8 buffer})`` after the transfers, before verifying.
_received_hook: Callable[[int, dict[int, torch.Tensor]], None] | None = None


class _Row(NamedTuple):
    """One piece of one moved expert at ``offset`` bytes in the buffer between two ranks."""

    offset: int
    layer: int
    piece: Piece
    move: Move


@dataclass
class _Exchange:
    """This rank's side of the transfers, packed before any is posted (stage 2).

    ``received`` maps each peer that sends to this rank to ``(rows, uint8 staging buffer,
    [len(rows), 2] checksums)``; ``error`` is why packing failed ("" if it did not).
    """

    ops: list = field(default_factory=list)
    received: dict[int, tuple[list[_Row], torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    weights: torch.Tensor | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    error: str = ""


def _validate_and_agree(tensors_by_layer, optimizer, old, new, topology, group, agree_group) -> list[list[Piece]]:
    """Stage 1: check this rank's input, all-gather every rank's verdict and signature (shapes,
    dtypes, placements, 0-dim optimizer state) and raise the same ValueError on every rank, and
    on every rank of ``agree_group``, if any rank is wrong or two disagree. Returns this rank's
    pieces per layer."""
    world = dist.get_world_size(group)
    pieces_by_layer, error, sig = collect_pieces(tensors_by_layer, optimizer, old, new, topology, world)
    texts = all_gather_text(error.replace("\n", " ") + "\n" + "\n".join(sig), group)
    _agree(_input_fault(texts, world), agree_group, ValueError)
    return pieces_by_layer


def _rows_between(moves, pieces_by_layer, src: int, dst: int) -> tuple[list[_Row], int]:
    """Layout of the buffer rank ``src`` sends to ``dst`` and its size in bytes: per layer, per
    move in order, per piece; every piece 16-byte aligned. Every rank derives the same one."""
    rows, offset = [], 0
    for l, layer_moves in enumerate(moves):
        for mv in layer_moves:
            if mv.src_rank == src and mv.dst_rank == dst:
                for pc in pieces_by_layer[l]:
                    rows.append(_Row(offset, l, pc, mv))
                    offset += pc.row_padded
    return rows, offset


def _spans(rows: list[_Row]) -> list[tuple[int, int, torch.dtype]]:
    return [(r.offset, r.piece.row_nbytes, r.piece.local.dtype) for r in rows]


def _pack(pieces_by_layer, moves, group, device: torch.device) -> _Exchange:
    """Stage 2: pack every send buffer with its checksums and allocate every receive buffer,
    posting nothing yet. Never raises: a failure comes back as ``error`` for stage 3."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ex = _Exchange()
    max_row = max((pc.row_nbytes for ps in pieces_by_layer for pc in ps), default=1)
    try:
        with torch.no_grad():
            ex.weights = hash_weights(max(max_row, 1), device)
            for q in range(world):
                if q == rank:
                    continue
                peer = q if group is None else dist.get_global_rank(group, q)
                rows, size = _rows_between(moves, pieces_by_layer, rank, q)
                if rows:
                    buf = torch.zeros(size, dtype=torch.uint8, device=device)
                    for off, _, pc, mv in rows:
                        buf[off: off + pc.row_nbytes].view(pc.local.dtype).view(pc.local.shape[1:]).copy_(
                            pc.local[mv.src_local_slot])
                    sums = checksums(buf, _spans(rows), ex.weights)
                    ex.ops += [dist.P2POp(dist.isend, buf, peer, group, tag=0),
                               dist.P2POp(dist.isend, sums, peer, group, tag=1)]
                    ex.bytes_sent += buf.numel() + sums.numel() * 8
                rows, size = _rows_between(moves, pieces_by_layer, q, rank)
                if rows:
                    rbuf = torch.empty(size, dtype=torch.uint8, device=device)
                    rsums = torch.empty(len(rows), 2, dtype=torch.int64, device=device)
                    ex.received[q] = (rows, rbuf, rsums)
                    ex.ops += [dist.P2POp(dist.irecv, rbuf, peer, group, tag=0),
                               dist.P2POp(dist.irecv, rsums, peer, group, tag=1)]
                    ex.bytes_received += rbuf.numel() + rsums.numel() * 8
    except Exception as exc:  # noqa: BLE001 - shared in stage 3, before any rank posts a transfer
        ex.error = f"packing failed on rank {rank}: {type(exc).__name__}: {exc}"
    return ex


def _agree_packed(error: str, n_transfers: int, group, agree_group) -> None:
    """Stage 3: one all-reduce says whether every rank packed; if one did not, every rank (and
    every rank of ``agree_group``) raises the same MigrationError before any transfer is posted,
    so no rank is left waiting on a receive. Nothing to agree on without transfers."""
    if not n_transfers:  # every rank knows the same moves
        return
    flag = all_reduce_(torch.tensor([1 if error else 0], dtype=torch.int64), group)
    if int(flag[0]):
        found = first_error(error.replace("\n", " "), group)
        _agree(f"migrate_experts aborted before any transfer, every rank kept its old experts and "
               f"placement: {found[1] if found else 'a rank failed to pack'}", agree_group, MigrationError)


def _transfer_and_verify(ex: _Exchange, rank: int) -> str:
    """Stage 4: run the transfers into the staging buffers and recompute every received
    checksum. Returns why this rank's transfers failed or arrived corrupted ("" if intact)."""
    try:
        with torch.no_grad():
            if ex.ops:
                for work in dist.batch_isend_irecv(ex.ops):
                    work.wait()
            if _received_hook is not None:
                _received_hook(rank, {q: rbuf for q, (_, rbuf, _) in ex.received.items()})
            for q, (rows, rbuf, rsums) in ex.received.items():
                bad = first_mismatch(rsums, checksums(rbuf, _spans(rows), ex.weights))
                if bad >= 0:
                    _, l, pc, mv = rows[bad]
                    return (f"layer {l} expert {mv.expert} ({pc.name}) sent by rank {q} arrived corrupted "
                            f"on rank {rank}: checksum mismatch")
    except Exception as exc:  # noqa: BLE001 - a failed transfer: shared in stage 5, nothing committed
        return f"transfer failed on rank {rank}: {type(exc).__name__}: {exc}"
    return ""


def _agree_verdict(error: str, n_transfers: int, group, agree_group) -> None:
    """Stage 5: all-gather every rank's verdict; if any failed, every rank (and every rank of
    ``agree_group``) raises the same MigrationError naming the first failure, nothing changed."""
    verdict = ""
    if n_transfers:
        failed = [v for v in all_gather_text(error.replace("\n", " "), group) if v]
        if failed:
            verdict = (f"migrate_experts aborted, every rank kept its old experts and placement: "
                       f"{failed[0]}" + (f" (and {len(failed) - 1} more ranks failed)" if len(failed) > 1 else ""))
    elif error:  # cannot happen without transfers; keep ranks consistent anyway
        verdict = error
    _agree(verdict, agree_group, MigrationError)


@torch.no_grad()
def _stage_and_commit(pieces_by_layer, moves, received, old: Placement, new: Placement, topology: Topology,
                      rank: int) -> None:
    """Stage 6: build every changed local tensor in ``new``'s slot order from the kept rows and
    the staging buffers, then write them all in place with ``copy_`` (so the parameters, and the
    optimizer's hold on them, stay the same objects)."""
    H = topology.home_slots_per_gpu
    incoming = {(l, mv.expert): (q, off) for q, (rows, _, _) in received.items()
                for off, l, pc, mv in rows if pc is pieces_by_layer[l][0]}
    old_slots = old.home_slot()
    staged: list[tuple[torch.Tensor, torch.Tensor]] = []
    for l, layer_moves in enumerate(moves):
        if not any(rank in (mv.src_rank, mv.dst_rank) for mv in layer_moves):
            continue
        new_ids = new.home_experts[l, rank * H:(rank + 1) * H].tolist()
        old_slot = old_slots[l].tolist()
        rel, acc = [], 0  # offset of each piece inside one expert's chunk
        for pc in pieces_by_layer[l]:
            rel.append(acc)
            acc += pc.row_padded
        for k, pc in enumerate(pieces_by_layer[l]):
            fresh = torch.empty_like(pc.local)
            for j, e in enumerate(new_ids):
                src_gpu, src_row = divmod(old_slot[e], H)
                if src_gpu == rank:
                    fresh[j].copy_(pc.local[src_row])
                else:
                    q, off = incoming[(l, e)]
                    raw = received[q][1][off + rel[k]: off + rel[k] + pc.row_nbytes]
                    fresh[j].copy_(raw.view(pc.local.dtype).view(pc.local.shape[1:]))
            staged.append((pc.local, fresh))
    for dst, fresh in staged:
        dst.copy_(fresh)


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
    pieces_by_layer = _validate_and_agree(tensors_by_layer, optimizer, old, new, topology, group, agree_group)
    moves = tuple(tuple(plan_moves(old, new, topology, l)) for l in range(old.num_layers))
    n_transfers = sum(m.is_transfer for ms in moves for m in ms)
    n_local = sum(not m.is_transfer for ms in moves for m in ms)
    device = next((pc.local.device for ps in pieces_by_layer for pc in ps), comm_device(group))
    exchange = _pack(pieces_by_layer, moves, group, device)
    _agree_packed(exchange.error, n_transfers, group, agree_group)
    error = _transfer_and_verify(exchange, rank) or exchange.error
    _agree_verdict(error, n_transfers, group, agree_group)
    _stage_and_commit(pieces_by_layer, moves, exchange.received, old, new, topology, rank)
    return MigrationReport(n_transfers, n_local, exchange.bytes_sent, exchange.bytes_received,
                           time.perf_counter() - t0, moves)


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
