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
is kept between them. With a :class:`relibra.runtime.layout.ReplayLayout` (replayed routes and
a plan: every split size, buffer size and row order computed on the host before the forward)
nothing is read back from the device, forward or backward. Without one (live router, or routes
passed to the layer), the split sizes are exchanged and read on the host: one sync per layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import kernels
from .layout import ReplayLayout, SlotTable, slot_order

__all__ = ["DispatchMeta", "dispatch", "combine", "expert_mlp", "grouped_mm_capable"]


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


def dispatch(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, table: SlotTable, token_offset_E: torch.Tensor,
             num_ranks: int, slots_per_rank: int, group=None, layout: ReplayLayout | None = None
             ) -> tuple[torch.Tensor, DispatchMeta]:
    """Send every token copy to its physical slot; return ``(x_local_ND, meta)``.

    ``x_local_ND`` holds the received rows ordered by local slot (then source rank, token, k);
    ``meta.slot_counts`` gives the block sizes for the grouped GEMM. ``layout`` (replayed
    routes: :func:`relibra.runtime.layout.replay_layouts`) supplies every size, so nothing is
    read back from the device; without it the counts are exchanged and read on the host.
    """
    G, SL = num_ranks, slots_per_rank
    dest = kernels.assign_copies(topk_ids_TK, table.copy_slots_EX, table.copy_ends_EX, token_offset_E,
                                 check_values=False)  # ids checked by the layer or plan_step, slots built here
    if layout is not None:
        x_send, row_index, _ = kernels.permute(x_TD, dest, G * SL, num_rows=sum(layout.send_splits),
                                               check_values=False)
        x_recv = all_to_all_autograd(x_send, layout.recv_splits, layout.send_splits, group)
        meta = DispatchMeta(row_index, layout.send_splits, layout.recv_splits, layout.to_slot_order,
                            layout.from_slot_order, layout.slot_counts, group)
        return x_recv.index_select(0, layout.to_slot_order), meta
    x_send, row_index, offsets = kernels.permute(x_TD, dest, G * SL, check_values=False)
    counts_GS = (offsets[1:] - offsets[:-1]).view(G, SL)
    send_splits = tuple(counts_GS.sum(1).tolist())
    if group is None:
        recv_GS = counts_GS.cpu()
    else:
        recv = torch.empty_like(counts_GS)
        dist.all_to_all_single(recv, counts_GS.contiguous(), group=group)
        recv_GS = recv.cpu()  # host sync: the split sizes
    recv_splits = tuple(recv_GS.sum(1).tolist())
    x_recv = all_to_all_autograd(x_send, recv_splits, send_splits, group)
    (to_slot,), (from_slot,) = slot_order(recv_GS[None], x_TD.device)
    meta = DispatchMeta(row_index, send_splits, recv_splits, to_slot, from_slot, tuple(recv_GS.sum(0).tolist()),
                        group)
    return x_recv.index_select(0, to_slot), meta


def combine(y_local_ND: torch.Tensor, meta: DispatchMeta, weights_TK: torch.Tensor) -> torch.Tensor:
    """Bring expert outputs (slot order, as :func:`dispatch` gave them) home; weighted top-k sum."""
    y_recv = y_local_ND.index_select(0, meta.from_slot_order)
    y_send = all_to_all_autograd(y_recv, meta.send_splits, meta.recv_splits, meta.group)
    return kernels.unpermute(y_send, meta.row_index_TK, weights_TK.to(y_send.dtype), check_values=False)


#: dtypes torch._grouped_mm takes, by device type (CPU: measured with torch 2.13; CUDA: as documented
#: by torch.nn.functional.grouped_mm, bf16 on compute capability >= 8.0)
_GROUPED_MM_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}


def grouped_mm_capable(x_ND: torch.Tensor, w_SOI: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run ``x_ND`` against ``w_SOI[s].T`` per block.

    Decided from metadata alone, before the call: the torch build has ``_grouped_mm``; both
    tensors on one CPU or CUDA (compute capability >= 8.0) device in a dtype it takes there;
    ``x_ND [N, I]`` and ``w_SOI [S, O, I]`` row-major in their last two dims, with their row
    strides, the output's rows (``O`` elements: the backward multiplies by their gradient) and
    both data pointers multiples of 16 bytes. Anything else runs the loop.
    """
    if not hasattr(torch, "_grouped_mm") or x_ND.device != w_SOI.device or x_ND.dtype != w_SOI.dtype:
        return False
    dev = x_ND.device
    if x_ND.dtype not in _GROUPED_MM_DTYPES.get(dev.type, ()):
        return False
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 0):
        return False
    align = 16 // x_ND.element_size()
    return (x_ND.dim() == 2 and w_SOI.dim() == 3 and x_ND.stride(1) == 1 and w_SOI.stride(2) == 1
            and x_ND.stride(0) % align == 0 and w_SOI.stride(1) % align == 0 and w_SOI.shape[1] % align == 0
            and x_ND.data_ptr() % 16 == 0 and w_SOI.data_ptr() % 16 == 0)


def _grouped_linear(x_ND: torch.Tensor, w_SOI: torch.Tensor, counts: tuple[int, ...],
                    offsets: torch.Tensor | None) -> torch.Tensor:
    """``y[rows of slot s] = x[rows of slot s] @ w_SOI[s].T``: one grouped GEMM where
    :func:`grouped_mm_capable` says so (its errors propagate), else a loop over the slots.
    ``offsets``: ``[S]`` int32 end rows on x's device (computed from ``counts`` when None)."""
    if grouped_mm_capable(x_ND, w_SOI):
        if offsets is None:
            offsets = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(x_ND.device)
        return torch._grouped_mm(x_ND, w_SOI.transpose(-2, -1), offs=offsets)
    outs, start = [], 0
    for s, c in enumerate(counts):
        outs.append(x_ND[start:start + c] @ w_SOI[s].T)
        start += c
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w_SOI.shape[1])


def expert_mlp(x_ND: torch.Tensor, gate_up_SFD: torch.Tensor, down_SDH: torch.Tensor,
               counts: tuple[int, ...], offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Gated MLP of every local slot over its block of rows: ``down(silu(gate) * up)``.

    ``gate_up_SFD [S', 2*hidden, D]`` (rows 0:hidden gate, hidden: up), ``down_SDH [S', D, hidden]``;
    ``counts``: rows per slot; ``offsets``: their ``[S']`` int32 end rows on the device, if known
    (no copy to the device then).
    """
    hidden = down_SDH.shape[2]
    gu = _grouped_linear(x_ND, gate_up_SFD, counts, offsets)
    h = F.silu(gu[:, :hidden]) * gu[:, hidden:]
    return _grouped_linear(h.contiguous(), down_SDH, counts, offsets)
