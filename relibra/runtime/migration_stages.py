"""The stages of an expert migration (:mod:`relibra.runtime.migration`), one function each.

Legend: L MoE layers, H home slots per rank, G ranks of the expert-parallel group.

:func:`relibra.runtime.migration.migrate_experts` runs them in order for the weights and
gradients, and for the optimizer state unless that half is deferred;
:class:`relibra.runtime.state_move.StateMove` runs stages 4 to 6 of the deferred optimizer state
later (posted at once, awaited before ``optimizer.step``). Every stage works on a list of
:class:`~relibra.runtime.pieces.Piece` per layer, so either half is the same code on fewer pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from ..plan import Placement
from ..topology import Topology
from .checksums import checksums, first_mismatch, hash_weights
from .comm import all_gather_text, all_reduce_, first_error
from .pieces import Piece, collect_pieces

__all__ = ["Move", "MigrationError", "Exchange", "validate_and_agree", "pack", "agree_packed", "post",
           "wait_and_verify", "transfer_and_verify", "agree_verdict", "stage_and_commit"]


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
class Exchange:
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


def validate_and_agree(tensors_by_layer, optimizer, old, new, topology, group, agree_group) -> list[list[Piece]]:
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


def pack(pieces_by_layer, moves, group, device: torch.device, transport=None) -> Exchange:
    """Stage 2: pack every send buffer with its checksums and allocate every receive buffer,
    posting nothing yet. Never raises: a failure comes back as ``error`` for stage 3.

    ``group`` numbers the ranks (the expert-parallel group); the transfers go over ``transport``
    (default ``group``; the deferred optimizer state uses a group of its own, the same ranks).
    Peers are named by global rank, so the two groups may order their ranks differently."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    link = group if transport is None else transport
    ex = Exchange()
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
                    ex.ops += [dist.P2POp(dist.isend, buf, peer, link, tag=0),
                               dist.P2POp(dist.isend, sums, peer, link, tag=1)]
                    ex.bytes_sent += buf.numel() + sums.numel() * 8
                rows, size = _rows_between(moves, pieces_by_layer, q, rank)
                if rows:
                    rbuf = torch.empty(size, dtype=torch.uint8, device=device)
                    rsums = torch.empty(len(rows), 2, dtype=torch.int64, device=device)
                    ex.received[q] = (rows, rbuf, rsums)
                    ex.ops += [dist.P2POp(dist.irecv, rbuf, peer, link, tag=0),
                               dist.P2POp(dist.irecv, rsums, peer, link, tag=1)]
                    ex.bytes_received += rbuf.numel() + rsums.numel() * 8
    except Exception as exc:  # noqa: BLE001 - shared in stage 3, before any rank posts a transfer
        ex.error = f"packing failed on rank {rank}: {type(exc).__name__}: {exc}"
    return ex


def agree_packed(error: str, n_transfers: int, group, agree_group) -> None:
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


def post(ex: Exchange, rank: int) -> tuple[list, str]:
    """Stage 4a: post every transfer of ``ex`` without waiting. Returns ``(works, error)``."""
    try:
        return (dist.batch_isend_irecv(ex.ops) if ex.ops else []), ""
    except Exception as exc:  # noqa: BLE001 - a failed transfer: shared in stage 5, nothing committed
        return [], f"transfer failed on rank {rank}: {type(exc).__name__}: {exc}"


def wait_and_verify(ex: Exchange, works: list, rank: int) -> str:
    """Stage 4b: wait for the posted transfers and recompute every received checksum. Returns
    why this rank's transfers failed or arrived corrupted ("" if intact)."""
    try:
        with torch.no_grad():
            for work in works:
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


def transfer_and_verify(ex: Exchange, rank: int) -> str:
    """Stage 4: run the transfers into the staging buffers and verify them (4a then 4b)."""
    works, error = post(ex, rank)
    return error or wait_and_verify(ex, works, rank)


def agree_verdict(error: str, n_transfers: int, group, agree_group,
                  what: str = "migrate_experts aborted, every rank kept its old experts and placement") -> None:
    """Stage 5: all-gather every rank's verdict; if any failed, every rank (and every rank of
    ``agree_group``) raises the same MigrationError naming the first failure, nothing changed."""
    verdict = ""
    if n_transfers:
        failed = [v for v in all_gather_text(error.replace("\n", " "), group) if v]
        if failed:
            more = f" (and {len(failed) - 1} more ranks failed)" if len(failed) > 1 else ""
            verdict = f"{what}: {failed[0]}{more}"
    elif error:  # cannot happen without transfers; keep ranks consistent anyway
        verdict = error
    _agree(verdict, agree_group, MigrationError)


@torch.no_grad()
def stage_and_commit(pieces_by_layer, moves, received, old: Placement, new: Placement, topology: Topology,
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
