"""Token dispatch by plan: token copies -> physical slots -> all-to-all -> local experts -> back.

Legend: T tokens here, K top-k, D dim, E logical experts, G ranks of the expert-parallel (EP)
group, H home slots and S spare slots per rank, P = G*(H+S) physical slots, X most copies of
one expert, N rows received here.

Token layout (this rank ``r``)::

    x_TD --assign_copies--> dest_TK (physical slot p; rank p // (H+S), local slot p % (H+S))
         --permute(num_groups=P)--> send rows ordered (dest rank, local slot, token, k)
         --all_to_all_single--> recv rows ordered (source rank, local slot)
         --index_select--> rows ordered (local slot, source rank): one block per local slot
         --grouped GEMM over the H+S local slots--> y, back to (source rank, local slot)
         --all_to_all_single--> y rows in send order --unpermute(weights)--> out_TD

:func:`dispatch` returns a frozen :class:`DispatchMeta` that :func:`combine` consumes; nothing
is kept between them. The only host syncs are the counts (split sizes) of the all-to-all.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import kernels
from ..plan import slot_ranks
from ..topology import Topology

__all__ = ["SlotTable", "slot_table", "split_counts", "DispatchMeta", "dispatch", "combine", "expert_mlp"]


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


def slot_table(home_experts_K: torch.Tensor, topology: Topology, spare_experts_R: torch.Tensor | None = None,
               slot_tokens_P: torch.Tensor | None = None, device=None) -> SlotTable:
    """Build the slot table of one layer from its home row ``[G*H]`` and, optionally, a replica
    plan row (``spare_experts_R [G*S]``, ``slot_tokens_P [P]``). Without one, every expert
    computes on its home slot."""
    G, H, S, E = topology.num_gpus, topology.home_slots_per_gpu, topology.spare_slots_per_gpu, topology.num_experts
    if spare_experts_R is None:
        spare_experts_R = torch.full((G * S,), -1, dtype=torch.int64)
    phy2log = torch.cat([home_experts_K.view(G, H), spare_experts_R.view(G, S)], 1).reshape(-1)
    rank, logcnt = slot_ranks(phy2log[None], E)
    rank, logcnt = rank[0], logcnt[0]
    X = max(int(logcnt.max()), 1)
    flat = torch.full((E * X + 1,), -1, dtype=torch.int64)
    flat.scatter_(0, torch.where(phy2log >= 0, phy2log * X + rank, E * X), torch.arange(phy2log.numel()))
    copy_slots = flat[:-1].view(E, X)
    if slot_tokens_P is None or X == 1:
        big = torch.iinfo(torch.int64).max // 4
        ends = torch.full((E, X), big, dtype=torch.int64)
    else:
        tok = torch.where(copy_slots >= 0, slot_tokens_P[copy_slots.clamp(min=0)], 0)
        ends = tok.cumsum(1)
    return SlotTable(copy_slots, ends, spare_experts_R, bool((spare_experts_R >= 0).any())).to(device)


@dataclass(frozen=True)
class DispatchMeta:
    """What :func:`combine` needs to bring expert outputs home.

    Attributes:
        row_index_TK: ``[T, K]`` row of each copy in the send buffer (-1 dropped).
        send_splits / recv_splits: rows sent to / received from each rank.
        to_slot_order: ``[N]`` received row for each row of the slot-ordered buffer.
        from_slot_order: ``[N]`` inverse of ``to_slot_order``.
        slot_counts: rows per local slot (``H+S`` ints).
        group: the EP process group (None: single process).
    """

    row_index_TK: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    to_slot_order: torch.Tensor
    from_slot_order: torch.Tensor
    slot_counts: tuple[int, ...]
    group: object


def all_to_all_autograd(x: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 (identity without a group)."""
    if group is None:
        return x
    from torch.distributed.nn.functional import all_to_all_single

    out = x.new_empty(sum(out_splits), *x.shape[1:])
    with warnings.catch_warnings():  # torch 2.13 flags the autograd form as deprecated; it works
        warnings.simplefilter("ignore", FutureWarning)
        return all_to_all_single(out, x, list(out_splits), list(in_splits), group=group)


def split_counts(table: SlotTable, source_loads_GE: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
    """``[G, P]`` token copies each source rank sends to each physical slot, on the host.

    Exactly what :func:`relibra.kernels.assign_copies` will produce for routes whose per-rank
    expert counts are ``source_loads_GE`` (when the split covers them): the copies of expert e
    from rank s occupy positions ``[off[s, e], off[s, e] + load[s, e])`` of e's global order and
    each copy c of e takes positions ``[end[c-1], end[c])``. Lets :func:`dispatch` skip the
    counts exchange when routes were replayed.
    """
    slots, ends = table.copy_slots_EX.cpu(), table.copy_ends_EX.cpu()
    E, X = slots.shape
    G = source_loads_GE.shape[0]
    P = G * slots_per_rank
    starts = torch.cat([torch.zeros(E, 1, dtype=torch.int64), ends[:, :-1]], 1)
    src_start = source_loads_GE.cumsum(0) - source_loads_GE          # [G, E]
    src_end = src_start + source_loads_GE
    lo = torch.maximum(src_start[:, :, None], starts[None])          # [G, E, X]
    hi = torch.minimum(src_end[:, :, None], ends[None])
    n = (hi - lo).clamp(min=0) * (slots >= 0)[None]
    out = torch.zeros(G, P + 1, dtype=torch.int64)
    out.scatter_add_(1, torch.where(slots >= 0, slots, P).reshape(1, -1).expand(G, -1), n.reshape(G, -1))
    return out[:, :P]


def dispatch(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, table: SlotTable, token_offset_E: torch.Tensor,
             num_ranks: int, slots_per_rank: int, group=None, recv_counts_GS: list | None = None
             ) -> tuple[torch.Tensor, DispatchMeta]:
    """Send every token copy to its physical slot; return ``(x_local_ND, meta)``.

    ``x_local_ND`` holds the received rows ordered by local slot (then source rank, token, k);
    ``meta.slot_counts`` gives the block sizes for the grouped GEMM. ``recv_counts_GS``
    (``[G][H+S]`` ints from :func:`split_counts`), when known, replaces the counts exchange.
    """
    G, SL = num_ranks, slots_per_rank
    dest = kernels.assign_copies(topk_ids_TK, table.copy_slots_EX, table.copy_ends_EX, token_offset_E)
    x_send, row_index, offsets = kernels.permute(x_TD, dest, G * SL)
    counts_GS = (offsets[1:] - offsets[:-1]).view(G, SL)
    send_splits = tuple(counts_GS.sum(1).tolist())
    if recv_counts_GS is not None:
        recv_list = recv_counts_GS
    elif group is None:
        recv_list = counts_GS.tolist()
    else:
        recv = torch.empty_like(counts_GS)
        dist.all_to_all_single(recv, counts_GS.contiguous(), group=group)
        recv_list = recv.tolist()  # host sync: the split sizes
    recv_splits = tuple(sum(r) for r in recv_list)
    x_recv = all_to_all_autograd(x_send, recv_splits, send_splits, group)
    # received blocks (source, slot) -> (slot, source)
    starts = torch.tensor(recv_list, dtype=torch.int64).view(-1)
    starts = (starts.cumsum(0) - starts).view(G, SL)
    cnt = torch.tensor(recv_list, dtype=torch.int64)
    blocks_start = starts.T.reshape(-1)
    blocks_len = cnt.T.reshape(-1)
    N = int(cnt.sum())
    if N:
        base = torch.repeat_interleave(blocks_start - (blocks_len.cumsum(0) - blocks_len), blocks_len)
        to_slot = base + torch.arange(N)
    else:
        to_slot = torch.zeros(0, dtype=torch.int64)
    from_slot = torch.empty_like(to_slot).scatter_(0, to_slot, torch.arange(N))
    to_slot, from_slot = to_slot.to(x_TD.device), from_slot.to(x_TD.device)
    meta = DispatchMeta(row_index, send_splits, recv_splits, to_slot, from_slot,
                        tuple(cnt.sum(0).tolist()), group)
    return x_recv.index_select(0, to_slot), meta


def combine(y_local_ND: torch.Tensor, meta: DispatchMeta, weights_TK: torch.Tensor) -> torch.Tensor:
    """Bring expert outputs (slot order, as :func:`dispatch` gave them) home; weighted top-k sum."""
    y_recv = y_local_ND.index_select(0, meta.from_slot_order)
    y_send = all_to_all_autograd(y_recv, meta.send_splits, meta.recv_splits, meta.group)
    return kernels.unpermute(y_send, meta.row_index_TK, weights_TK.to(y_send.dtype))


def _grouped_linear(x_ND: torch.Tensor, w_SOI: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """``y[rows of slot s] = x[rows of slot s] @ w_SOI[s].T``; torch._grouped_mm when aligned."""
    esize = x_ND.element_size()
    aligned = (x_ND.shape[1] * esize) % 16 == 0 and (w_SOI.shape[1] * esize) % 16 == 0
    if aligned and hasattr(torch, "_grouped_mm") and x_ND.dtype in (torch.float32, torch.bfloat16):
        offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32).to(x_ND.device)
        try:
            return torch._grouped_mm(x_ND, w_SOI.transpose(-2, -1), offs=offs)
        except (RuntimeError, NotImplementedError):  # pragma: no cover - backend without support
            pass
    outs, start = [], 0
    for s, c in enumerate(counts):
        outs.append(x_ND[start:start + c] @ w_SOI[s].T)
        start += c
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w_SOI.shape[1])


def expert_mlp(x_ND: torch.Tensor, gate_up_SFD: torch.Tensor, down_SDH: torch.Tensor,
               counts: tuple[int, ...]) -> torch.Tensor:
    """Gated MLP of every local slot over its block of rows: ``down(silu(gate) * up)``.

    ``gate_up_SFD [S', 2*hidden, D]`` (rows 0:hidden gate, hidden: up), ``down_SDH [S', D, hidden]``.
    """
    hidden = down_SDH.shape[2]
    gu = _grouped_linear(x_ND, gate_up_SFD, counts)
    h = F.silu(gu[:, :hidden]) * gu[:, hidden:]
    return _grouped_linear(h.contiguous(), down_SDH, counts)
