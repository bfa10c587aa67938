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

:func:`migrate_experts` rewrites those rows so that they follow a new placement. An expert
whose home rank changes is sent point to point (``batch_isend_irecv``); one that only changes
slot on its rank is a local permutation. The move is a transaction:

1. Validate locally and ``all_gather`` (error text, signature of shapes/dtypes/placements):
   every rank raises the same ``ValueError`` before any transfer if any rank is wrong.
2. Each sender packs the rows it sends to a peer into one byte buffer (every piece 16-byte
   aligned) plus one checksum per piece ``(weighted byte sum, float64 sum of the values)``.
   Every rank packs all its buffers first and the ranks agree (one ``all_reduce``) that all
   packed before any transfer is posted, so a rank failing to pack cannot leave its peers
   waiting on a receive; they all raise :class:`MigrationError` with nothing changed.
3. Receivers receive into fresh staging buffers and recompute the checksums.
4. ``all_gather`` of every rank's verdict. All good: the new local tensors are built, then
   written in place with ``copy_`` (parameter identity, and so the optimizer, is preserved).
   Otherwise every rank raises the same :class:`MigrationError` and nothing was changed.

With ``agree_group`` (the expert-data-parallel replicas of this rank, which run the same
migration in their own expert-parallel groups on other shards of the same experts), every
verdict of steps 1, 2 and 4 is also agreed over that group: if any replica's migration fails,
every replica raises and none commits, so the shards never end up under different placements.

The caller switches its placement only after :func:`migrate_experts` returned.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from itertools import zip_longest
from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from ..plan import Placement
from ..topology import Topology
from .comm import all_gather_text, all_reduce_, comm_device, first_error

__all__ = ["Move", "MigrationError", "MigrationReport", "plan_moves", "migrate_experts"]

_ALIGN = 16                 # bytes; every piece starts aligned so views of any dtype work
_HASH_PERIOD = 65521        # weights of the byte hash repeat with this period (a prime)
_HASH_BLOCK = _HASH_PERIOD * 64


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


# ---------------------------------------------------------------------------------- pieces
class _Piece(NamedTuple):
    """One per-expert tensor of one layer: ``local [H, ...]``, its row size in bytes."""

    name: str                 # e.g. "param 0 exp_avg"
    local: torch.Tensor
    row_nbytes: int

    @property
    def row_padded(self) -> int:
        return -(-self.row_nbytes // _ALIGN) * _ALIGN


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise (shares storage)."""
    inner = getattr(t, "_local_tensor", None)
    return inner if isinstance(inner, torch.Tensor) else t


def _collect(tensors_by_layer, optimizer, old, new, topology, world):
    """Local checks and the pieces of every layer. Returns ``(pieces_by_layer, error, signature)``.

    Never raises: the error text is shared with every rank first.
    """
    sig: list[str] = []
    pieces_by_layer: list[list[_Piece]] = []
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
            pieces: list[_Piece] = []
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
                        sig.append(f"layer {l} param {i} state {key!s}={float(_local(v).detach().cpu())!r}")
                        continue
                    named.append((f"state {key!s}", v))
                for kind, t in named:
                    loc = _local(t)
                    what = f"layer {l} param {i}" + (f" {kind}" if kind else "")
                    if loc.dim() < 1 or loc.shape[0] != H:
                        return [], (f"{what} has local shape {tuple(loc.shape)}; its leading dim must be "
                                    f"the H={H} home slots of this rank"), sig
                    if device is None:
                        device = loc.device
                    elif loc.device != device:
                        return [], f"{what} is on {loc.device}, other expert tensors on {device}", sig
                    row_nbytes = loc[0].numel() * loc.element_size()
                    pieces.append(_Piece(what, loc, row_nbytes))
                    sig.append(f"{what}: {loc.dtype} {tuple(loc.shape)}")
            pieces_by_layer.append(pieces)
        return pieces_by_layer, "", sig
    except Exception as exc:  # noqa: BLE001 - any local fault must reach every rank as text
        return [], f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc), sig


# ---------------------------------------------------------------------------------- checksums
def _hash_weights(n: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(min(n, _HASH_BLOCK), dtype=torch.int64, device=device)
    return (idx * 40503 + 1) % _HASH_PERIOD + 1


def _piece_checksum(raw_u8: torch.Tensor, dtype: torch.dtype, weights: torch.Tensor) -> torch.Tensor:
    """``[2]`` int64: position-weighted byte sum (exact) and the float64 sum's bits."""
    h = torch.zeros((), dtype=torch.int64, device=raw_u8.device)
    for s in range(0, raw_u8.numel(), _HASH_BLOCK):
        block = raw_u8[s: s + _HASH_BLOCK].to(torch.int64)
        h = h + (block * weights[: block.numel()]).sum()
    values = raw_u8.view(dtype)
    if values.is_complex():
        values = torch.view_as_real(values)
    f = values.to(torch.float64).sum().reshape(1).view(torch.int64)[0]
    return torch.stack([h, f])


def _checksums(buf: torch.Tensor, layout: list[tuple[int, _Piece]], weights) -> torch.Tensor:
    """``[len(layout), 2]`` checksums of the pieces ``(offset, piece)`` packed in ``buf``."""
    if not layout:
        return torch.zeros(0, 2, dtype=torch.int64, device=buf.device)
    return torch.stack([_piece_checksum(buf[o: o + pc.row_nbytes], pc.local.dtype, weights) for o, pc in layout])


def _first_mismatch(sent: torch.Tensor, got: torch.Tensor) -> int:
    """Index of the first piece whose checksums differ, -1 if none."""
    if sent.shape != got.shape:
        return 0
    hash_bad = sent[:, 0] != got[:, 0]
    fs, fg = sent[:, 1].view(torch.float64), got[:, 1].view(torch.float64)
    float_bad = ~torch.isclose(fs, fg, rtol=1e-9, atol=1e-12, equal_nan=True)
    bad = (hash_bad | float_bad).nonzero()
    return int(bad[0]) if bad.numel() else -1


# ---------------------------------------------------------------------------------- migrate
def _input_fault(texts: list[str], world: int) -> str:
    """The first fault in every rank's step-1 text (error line, then signature lines), or ""."""
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


def migrate_experts(
    tensors_by_layer: Sequence[Sequence[torch.Tensor]],
    optimizer: torch.optim.Optimizer | None,
    old: Placement,
    new: Placement,
    topology: Topology,
    group: dist.ProcessGroup | None = None,
    *,
    agree_group: dist.ProcessGroup | None = None,
    _corrupt: Callable[[int, dict[int, torch.Tensor]], None] | None = None,
) -> MigrationReport:
    """Move home experts from ``old`` to ``new`` placement: rows, grads and optimizer state.

    Collective over ``group`` (default: the world group), whose rank ``r`` is GPU ``r`` of
    ``topology``. Call it on every rank with the same placements, between optimizer steps.

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
        _corrupt: test hook, called as ``_corrupt(rank, {src_rank: received uint8 buffer})``
            after receiving and before verifying.
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
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cdev = comm_device(group)

    # 1. validate everywhere before any transfer
    pieces_by_layer, error, sig = _collect(tensors_by_layer, optimizer, old, new, topology, world)
    texts = all_gather_text(error.replace("\n", " ") + "\n" + "\n".join(sig), group)
    _agree(_input_fault(texts, world), agree_group, ValueError)

    L, H = old.num_layers, topology.home_slots_per_gpu
    moves = tuple(tuple(plan_moves(old, new, topology, l)) for l in range(L))
    n_transfers = sum(m.is_transfer for ms in moves for m in ms)
    n_local = sum(not m.is_transfer for ms in moves for m in ms)
    device = next((pc.local.device for ps in pieces_by_layer for pc in ps), cdev)

    # 2. pack: per peer, per (layer, move) in order, per piece; all ranks derive the same layout
    def layout(src: int, dst: int) -> tuple[list[tuple[int, int, _Piece, Move]], int]:
        out, off = [], 0
        for l in range(L):
            for mv in moves[l]:
                if mv.src_rank == src and mv.dst_rank == dst:
                    for pc in pieces_by_layer[l]:
                        out.append((off, l, pc, mv))
                        off += pc.row_padded
        return out, off

    max_row = max((pc.row_nbytes for ps in pieces_by_layer for pc in ps), default=1)
    ops, recv, bytes_sent, bytes_recv = [], {}, 0, 0
    error = ""
    try:  # pack every send buffer and allocate every receive buffer before posting anything
        with torch.no_grad():
            weights = _hash_weights(max(max_row, 1), device)
            for q in range(world):
                if q == rank:
                    continue
                peer = q if group is None else dist.get_global_rank(group, q)
                lay, size = layout(rank, q)
                if lay:
                    buf = torch.zeros(size, dtype=torch.uint8, device=device)
                    for off, _, pc, mv in lay:
                        buf[off: off + pc.row_nbytes].view(pc.local.dtype).view(pc.local.shape[1:]).copy_(
                            pc.local[mv.src_local_slot])
                    sums = _checksums(buf, [(o, pc) for o, _, pc, _ in lay], weights)
                    ops += [dist.P2POp(dist.isend, buf, peer, group, tag=0),
                            dist.P2POp(dist.isend, sums, peer, group, tag=1)]
                    bytes_sent += buf.numel() + sums.numel() * 8
                lay, size = layout(q, rank)
                if lay:
                    rbuf = torch.empty(size, dtype=torch.uint8, device=device)
                    rsums = torch.empty(len(lay), 2, dtype=torch.int64, device=device)
                    recv[q] = (lay, rbuf, rsums)
                    ops += [dist.P2POp(dist.irecv, rbuf, peer, group, tag=0),
                            dist.P2POp(dist.irecv, rsums, peer, group, tag=1)]
                    bytes_recv += rbuf.numel() + rsums.numel() * 8
    except Exception as exc:  # noqa: BLE001 - shared below, before any rank posts a transfer
        error = f"packing failed on rank {rank}: {type(exc).__name__}: {exc}"
    if n_transfers:  # all ranks agree (same moves): post the transfers only if every rank packed
        flag = all_reduce_(torch.tensor([1 if error else 0], dtype=torch.int64), group)
        if int(flag[0]):
            found = first_error(error.replace("\n", " "), group)
            # raises here, after telling the expert-data-parallel replicas (if any)
            _agree(f"migrate_experts aborted before any transfer, every rank kept its old experts and "
                   f"placement: {found[1] if found else 'a rank failed to pack'}", agree_group, MigrationError)
    try:
        with torch.no_grad():
            # 3. transfer into fresh staging buffers
            if ops:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
            if _corrupt is not None:
                _corrupt(rank, {q: rbuf for q, (_, rbuf, _) in recv.items()})
            for q, (lay, rbuf, rsums) in recv.items():
                bad = _first_mismatch(rsums, _checksums(rbuf, [(o, pc) for o, _, pc, _ in lay], weights))
                if bad >= 0:
                    _, l, pc, mv = lay[bad]
                    error = (f"layer {l} expert {mv.expert} ({pc.name}) sent by rank {q} arrived corrupted "
                             f"on rank {rank}: checksum mismatch")
                    break
    except Exception as exc:  # a failed transfer: share the reason, do not commit
        error = f"transfer failed on rank {rank}: {type(exc).__name__}: {exc}"

    # 4. every rank's verdict; all or nothing (also over the expert-data-parallel replicas)
    verdict = ""
    if n_transfers:
        verdicts = all_gather_text(error.replace("\n", " "), group)
        failed = [v for v in verdicts if v]
        if failed:
            verdict = (f"migrate_experts aborted, every rank kept its old experts and placement: "
                       f"{failed[0]}" + (f" (and {len(failed) - 1} more ranks failed)" if len(failed) > 1 else ""))
    elif error:  # cannot happen without transfers; keep ranks consistent anyway
        verdict = error
    _agree(verdict, agree_group, MigrationError)

    # 5. stage new local tensors, then commit in place
    staged: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        incoming = {(l, mv.expert): (q, off) for q, (lay, rbuf, _) in recv.items()
                    for off, l, pc, mv in lay if pc is pieces_by_layer[l][0]}
        old_slots = old.home_slot()
        for l in range(L):
            mine = [mv for mv in moves[l] if rank in (mv.src_rank, mv.dst_rank)]
            if not mine:
                continue
            new_ids = new.home_experts[l, rank * H:(rank + 1) * H].tolist()
            old_slot = old_slots[l].tolist()
            # offset of each piece inside one expert's chunk
            rel, acc = [], 0
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
                        raw = recv[q][1][off + rel[k]: off + rel[k] + pc.row_nbytes]
                        fresh[j].copy_(raw.view(pc.local.dtype).view(pc.local.shape[1:]))
                staged.append((pc.local, fresh))
        for dst, fresh in staged:
            dst.copy_(fresh)
    return MigrationReport(n_transfers, n_local, bytes_sent, bytes_recv, time.perf_counter() - t0, moves)
