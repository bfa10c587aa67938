"""Host-side layouts of the dispatch: slot tables, split sizes and row orders, before the forward.

Legend: L MoE layers, E logical experts, X most copies of one expert, G ranks of the
expert-parallel group, H home and S spare slots per rank, SL = H + S local slots, P = G * SL
physical slots, N rows one rank receives.

With replayed routes and a plan every size the dispatch needs is known before the micro-batch:
the plan fixes which physical slots hold each expert's copies and how many token copies each
takes (``slot_tokens``), and every rank's expert counts of the routes (``source_loads``) fix
which source rank feeds which copy, in the order :func:`relibra.kernels.assign_copies` follows.
:func:`replay_layouts` turns them into every layer's split sizes (Python ints) and row orders
(index tensors, moved to the device once) in one vectorised pass on the host, so that the
forward and backward of a replayed micro-batch read no device value back::

    slot_tables   home row [G*H] + spare row [G*S] + slot_tokens [P]  ->  copy_slots_EX, copy_ends_EX
    split_counts  tables + source_loads [G, E]  ->  [G, P] token copies each rank sends each slot
    slot_order    received counts [G, SL] (blocks in (source, slot) order) -> the permutation to
                  (slot, source) order that the grouped GEMM wants, and its inverse
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..slots import slot_ranks
from ..topology import Topology

__all__ = ["SlotTable", "slot_table", "slot_tables", "split_counts", "slot_order", "ReplayLayout",
           "replay_layouts"]

_BIG = torch.iinfo(torch.int64).max // 4  # the end of a sole copy: it takes every token copy


@dataclass(frozen=True)
class SlotTable:
    """Where the copies of every expert of one layer are, for one micro-batch.

    Attributes:
        copy_slots_EX: ``[E, X]`` int64 physical slots of each expert, ascending, -1 padded.
        copy_ends_EX: ``[E, X]`` int64 inclusive prefix sums of the copies' token counts.
        spare_experts_R: ``[G*S]`` int64 spare-slot contents, -1 empty.
        has_replicas: some spare slot is filled (so replica weights must be fetched).
    """

    copy_slots_EX: torch.Tensor
    copy_ends_EX: torch.Tensor
    spare_experts_R: torch.Tensor
    has_replicas: bool

    def to(self, device) -> "SlotTable":
        """The same table on ``device`` (one copy per tensor; a no-op where it already is)."""
        return SlotTable(self.copy_slots_EX.to(device), self.copy_ends_EX.to(device),
                         self.spare_experts_R.to(device), self.has_replicas)


def _copy_tables(phy2log_LP: torch.Tensor, slot_tokens_LP: torch.Tensor | None, num_experts: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(copy_slots_LEX, copy_ends_LEX, copies_L)`` for X = the most copies over all layers.

    ``copy_ends_LEX`` are the cumulative token counts (padding repeats the last end); without
    ``slot_tokens_LP`` every end is "unbounded". ``copies_L``: the most copies in each layer.
    """
    L, P = phy2log_LP.shape
    E = num_experts
    rank_LP, logcnt_LE = slot_ranks(phy2log_LP, E)
    copies_L = logcnt_LE.amax(1).clamp(min=1)
    X = int(copies_L.max()) if L else 1
    flat = torch.full((L, E * X + 1), -1, dtype=torch.int64)
    where = torch.where(phy2log_LP >= 0, phy2log_LP * X + rank_LP, E * X)
    flat.scatter_(1, where, torch.arange(P).expand(L, P))
    slots = flat[:, :-1].view(L, E, X)
    if slot_tokens_LP is None:
        return slots, torch.full((L, E, X), _BIG, dtype=torch.int64), copies_L
    tok = torch.where(slots >= 0, slot_tokens_LP.gather(1, slots.clamp(min=0).view(L, -1)).view(L, E, X), 0)
    return slots, tok.cumsum(2), copies_L


def slot_tables(home_LK: torch.Tensor, spare_LV: torch.Tensor, slot_tokens_LP: torch.Tensor | None,
                topology: Topology) -> list[SlotTable]:
    """Every layer's :class:`SlotTable` (on the host) from its home row ``home_LK [L, G*H]``, spare
    row ``spare_LV [L, G*S]`` (-1 empty) and token split ``slot_tokens_LP [L, P]`` (None: every
    expert computes on its home slot). Each table keeps its own layer's X."""
    G, H, S = topology.num_gpus, topology.home_slots_per_gpu, topology.spare_slots_per_gpu
    L = home_LK.shape[0]
    phy2log = torch.cat([home_LK.view(L, G, H), spare_LV.view(L, G, S)], 2).reshape(L, -1)
    slots, ends, copies = _copy_tables(phy2log, slot_tokens_LP, topology.num_experts)
    tables = []
    for l, X in enumerate(copies.tolist()):
        ends_l = ends[l, :, :X] if X > 1 else torch.full_like(ends[l, :, :1], _BIG)
        spare = spare_LV[l].clone()
        tables.append(SlotTable(slots[l, :, :X].contiguous(), ends_l.contiguous(), spare, bool((spare >= 0).any())))
    return tables


def slot_table(home_experts_K: torch.Tensor, topology: Topology, spare_experts_R: torch.Tensor | None = None,
               slot_tokens_P: torch.Tensor | None = None, device=None) -> SlotTable:
    """One layer's :func:`slot_tables`: home row ``[G*H]`` and, optionally, a replica plan row
    (``spare_experts_R [G*S]``, ``slot_tokens_P [P]``). Without one, every expert computes on
    its home slot."""
    if spare_experts_R is None:
        spare_experts_R = torch.full((topology.num_spare_slots,), -1, dtype=torch.int64)
    tokens = None if slot_tokens_P is None else slot_tokens_P.cpu()[None]
    (table,) = slot_tables(home_experts_K.cpu()[None], spare_experts_R.cpu()[None], tokens, topology)
    return table.to(device)


def split_counts(tables: list[SlotTable], source_loads_LGE: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
    """``[L, G, P]`` token copies each source rank sends to each physical slot, per layer (host).

    Exactly what :func:`relibra.kernels.assign_copies` produces for routes whose per-rank expert
    counts are ``source_loads_LGE``: the copies of expert e from rank s occupy positions
    ``[off[s, e], off[s, e] + load[s, e])`` of e's order over all ranks, copy c of e takes
    positions ``[end[c-1], end[c])``, and positions past the last end go to the last copy. So
    each physical slot takes from each source rank the overlap of two ranges (O(L * G * P)).
    """
    L, G, E = source_loads_LGE.shape
    P = G * slots_per_rank
    X = max((t.copy_slots_EX.shape[1] for t in tables), default=1)
    slots = torch.full((L, E, X), -1, dtype=torch.int64)
    ends = torch.zeros(L, E, X, dtype=torch.int64)
    for l, t in enumerate(tables):
        x = t.copy_slots_EX.shape[1]
        slots[l, :, :x], ends[l, :, :x] = t.copy_slots_EX.cpu(), t.copy_ends_EX.cpu()
    copies = (slots >= 0).sum(2, keepdim=True)                                   # [L, E, 1]
    ends = torch.where(torch.arange(X) == copies - 1, _BIG, ends)                # the last copy takes the rest
    starts = torch.cat([torch.zeros(L, E, 1, dtype=torch.int64), ends[..., :-1]], 2)
    # each physical slot's expert and range of that expert's positions (column P: empty slots)
    where = torch.where(slots >= 0, slots, P).view(L, E * X)
    expert_LP = torch.full((L, P + 1), -1, dtype=torch.int64)
    expert_LP.scatter_(1, where, torch.arange(E).repeat_interleave(X).expand(L, -1))
    start_LP = torch.zeros(L, P + 1, dtype=torch.int64).scatter_(1, where, starts.view(L, -1))[:, None, :P]
    end_LP = torch.zeros(L, P + 1, dtype=torch.int64).scatter_(1, where, ends.view(L, -1))[:, None, :P]
    expert_LP = expert_LP[:, None, :P]
    e_LGP = expert_LP.clamp(min=0).expand(L, G, P)
    src_start = source_loads_LGE.cumsum(1) - source_loads_LGE                    # [L, G, E]
    lo = torch.maximum(src_start.gather(2, e_LGP), start_LP)
    hi = torch.minimum((src_start + source_loads_LGE).gather(2, e_LGP), end_LP)
    return torch.where(expert_LP >= 0, (hi - lo).clamp(min=0), 0)


def slot_order(recv_LGS: torch.Tensor, device=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Row orders of received blocks, per layer, built on ``device`` from host counts.

    ``recv_LGS [L, G, SL]`` (host): rows this rank receives from each source rank for each local
    slot; they arrive ordered by (source, slot). Returns ``(to_slot, from_slot)``, lists of
    ``[N_l]`` int64 on ``device``: row ``to_slot[j]`` of the received buffer is row j of the
    (slot, source)-ordered one that the grouped GEMM reads, and ``from_slot`` is its inverse.
    One small copy to the device, then one pass for all layers there; every size is a host int,
    so nothing is read back.
    """
    L, G, SL = recv_LGS.shape
    per_layer = recv_LGS.reshape(L, -1).sum(1)                                   # [L] N_l
    N = int(per_layer.sum())
    recv_start = (recv_LGS.reshape(L, -1).cumsum(1) - recv_LGS.reshape(L, -1)).view(L, G, SL)
    by_slot = recv_LGS.transpose(1, 2).reshape(L, -1)                            # blocks in (slot, source) order
    layer_base = per_layer.cumsum(0) - per_layer                                 # [L]
    # row j of block b (in slot order) comes from recv_start[b] + (j - slot_start[b]); j counts
    # from the layer's base in the one arange over all layers
    shift = recv_start.transpose(1, 2).reshape(L, -1) - (by_slot.cumsum(1) - by_slot) - layer_base[:, None]
    # each row's block and layer by a sorted search of the blocks' ends (repeat_interleave with
    # output_size reads nothing back either, but its CPU kernel is slow with long blocks)
    small = torch.cat([shift.reshape(-1), by_slot.reshape(-1).cumsum(0), layer_base, per_layer.cumsum(0)]).to(device)
    shift_d, block_end_d, base_d, layer_end_d = small.split([L * G * SL, L * G * SL, L, L])
    arange = torch.arange(N, device=small.device)
    to_slot = shift_d[torch.searchsorted(block_end_d, arange, right=True)] + arange
    base = base_d[torch.searchsorted(layer_end_d, arange, right=True)]
    from_global = torch.empty(N, dtype=torch.int64, device=small.device).scatter_(0, to_slot + base, arange - base)
    sizes = per_layer.tolist()
    return list(to_slot.split(sizes)), list(from_global.split(sizes))


@dataclass(frozen=True)
class ReplayLayout:
    """Every size one layer's dispatch of a replayed micro-batch needs, known before its forward.

    Attributes:
        send_splits / recv_splits: rows this rank sends to / receives from each rank (``G`` ints).
        slot_counts: rows this rank computes per local slot (``H + S`` ints: home, then spare).
        to_slot_order / from_slot_order: ``[N]`` int64 on the device, see :func:`slot_order`.
        home_offsets / spare_offsets: ``[H]`` / ``[S]`` int32 on the device: end row of each
            slot's block in the home / spare part (the grouped GEMM's ``offs``).
    """

    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    slot_counts: tuple[int, ...]
    to_slot_order: torch.Tensor
    from_slot_order: torch.Tensor
    home_offsets: torch.Tensor
    spare_offsets: torch.Tensor


def _to_device(tensors: list[torch.Tensor], device) -> list[torch.Tensor]:
    """``tensors`` (one dtype) on ``device`` through one copy, in their shapes."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    return [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def replay_layouts(tables: list[SlotTable], source_loads_LGE: torch.Tensor, topology: Topology, rank: int,
                   device) -> tuple[list[SlotTable], list[ReplayLayout]]:
    """Every layer's slot table and :class:`ReplayLayout` for EP rank ``rank``, on ``device``.

    ``tables``: the host tables of :func:`slot_tables`; ``source_loads_LGE [L, G, E]``: every
    rank's expert counts of its replayed routes. Host work on counts (no per-token work), three
    small copies to the device (counts for the row orders, int32 offsets, the tables) and the row
    orders expanded there.
    """
    H, S = topology.home_slots_per_gpu, topology.spare_slots_per_gpu
    SL = H + S
    counts_LGP = split_counts(tables, source_loads_LGE, SL)
    L, G, _ = counts_LGP.shape
    send_LG = counts_LGP[:, rank].view(L, G, SL).sum(2)
    recv_LGS = counts_LGP[:, :, rank * SL:(rank + 1) * SL]
    to_slot, from_slot = slot_order(recv_LGS, device)
    slot_LS = recv_LGS.sum(1)
    offsets = torch.cat([slot_LS[:, :H].cumsum(1), slot_LS[:, H:].cumsum(1)], 1).to(torch.int32)
    offs = _to_device(list(offsets), device)
    flat_tables = _to_device([x for t in tables for x in (t.copy_slots_EX, t.copy_ends_EX, t.spare_experts_R)],
                             device)
    out_tables, layouts = [], []
    for l, t in enumerate(tables):
        out_tables.append(SlotTable(*flat_tables[3 * l:3 * l + 3], t.has_replicas))
        layouts.append(ReplayLayout(tuple(send_LG[l].tolist()), tuple(recv_LGS[l].sum(1).tolist()),
                                    tuple(slot_LS[l].tolist()), to_slot[l], from_slot[l],
                                    offs[l][:H], offs[l][H:]))
    return out_tables, layouts
