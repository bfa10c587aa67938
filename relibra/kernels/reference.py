"""Torch reference implementations of the dispatch ops (importable without triton).

Legend:

    T  tokens on this rank        K  copies per token (top-k)      D  hidden size
    N  token copies = T*K         G  groups (``num_groups``)       R  rows of the permuted buffer
    E  logical experts            X  most copies any expert has

Token layout of :func:`permute` (``align = 4``, ``dest_TK = [[1, 0], [1, -1], [0, 1]]``)::

    x_perm rows:  0: x[0] (0,1)   1: x[2] (2,0)   2: 0   3: 0      <- group 0, padded to 4
                  4: x[0] (0,0)   5: x[1] (1,0)   6: x[2] (2,1)  7: 0   <- group 1
    group_offsets = [0, 4, 8]     row_index_TK = [[4, 0], [5, -1], [1, 6]]

Copies are ordered by group, stably by token then k inside a group. Every function here is
vectorised (one stable sort, no python loop over tokens) and differentiable through plain
torch ops. None reads a tensor value on the host except :func:`permute` reading ``R`` to
allocate ``x_perm`` when the caller does not pass ``num_rows``, and the argument checks' value
scans on CPU tensors (``check_values=False`` skips them: callers that built the values, e.g. the
dispatch of replayed routes, whose every size is known before the forward). No op with a
data-dependent output shape (``nonzero``, ``bincount``, boolean indexing) is used.
"""

from __future__ import annotations

import torch

__all__ = ["group_ranks", "permute", "unpermute", "assign_copies", "check_permute_args",
           "check_unpermute_args", "check_assign_args"]


def group_ranks(keys_N: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable rank of every element among the elements of its group, and group sizes.

    Args:
        keys_N: ``[N]`` int64 group of each element in ``0..num_groups-1``, or -1 (ignored).
        num_groups: G.
    Returns:
        ``rank_N [N]`` int64: how many earlier elements share the element's group (0 for
        ignored elements) and ``counts_G [G]`` int64 elements per group.
    """
    N = keys_N.numel()
    key = torch.where(keys_N >= 0, keys_N, torch.full_like(keys_N, num_groups))
    counts = torch.zeros(num_groups + 1, dtype=torch.int64, device=keys_N.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    sorted_key, order = torch.sort(key, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(N, device=keys_N.device) - starts[sorted_key]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    rank = torch.where(keys_N >= 0, rank, torch.zeros_like(rank))
    return rank, counts[:num_groups]


def padded_offsets(counts_G: torch.Tensor, align: int) -> torch.Tensor:
    """``[G+1]`` int64 start row of each group after padding every group to ``align`` rows."""
    padded = (counts_G + (align - 1)) // align * align
    return torch.cat([padded.new_zeros(1), torch.cumsum(padded, 0)])


def buffer_rows(offsets_G1: torch.Tensor, num_rows: int | None, check_values: bool) -> int:
    """Rows ``R`` of the permuted buffer: ``num_rows`` when the caller knows it (checked against
    ``offsets_G1[-1]`` on CPU with ``check_values``), else read from the device (a host sync)."""
    if num_rows is None:
        return int(offsets_G1[-1])  # host sync: the buffer size
    if check_values and offsets_G1.device.type == "cpu" and int(num_rows) != int(offsets_G1[-1]):
        raise ValueError(f"num_rows={int(num_rows)} but dest_TK fills {int(offsets_G1[-1])} rows")
    return int(num_rows)


def check_permute_args(x_TD: torch.Tensor, dest_TK: torch.Tensor, num_groups: int, align: int,
                       num_rows: int | None = None, check_values: bool = True) -> None:
    """Raise ValueError naming the bad argument of :func:`permute` (shapes, dtypes; values on CPU
    unless ``check_values`` is False)."""
    if not isinstance(x_TD, torch.Tensor) or x_TD.dim() != 2 or not x_TD.is_floating_point():
        raise ValueError(f"x_TD must be a 2-D float tensor [T, D], got "
                         f"{getattr(x_TD, 'dtype', type(x_TD))} {tuple(getattr(x_TD, 'shape', ()))}")
    if not isinstance(dest_TK, torch.Tensor) or dest_TK.dim() != 2 or dest_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"dest_TK must be [T, K] with T = {x_TD.shape[0]}, got "
                         f"{tuple(getattr(dest_TK, 'shape', ()))}")
    if dest_TK.dtype != torch.int64:
        raise ValueError(f"dest_TK must be int64, got {dest_TK.dtype}")
    if dest_TK.device != x_TD.device:
        raise ValueError(f"dest_TK is on {dest_TK.device} but x_TD on {x_TD.device}")
    if int(num_groups) != num_groups or num_groups < 0:
        raise ValueError(f"num_groups must be a non-negative int, got {num_groups!r}")
    if int(align) != align or align < 1:
        raise ValueError(f"align must be an int >= 1, got {align!r}")
    if num_rows is not None and (int(num_rows) != num_rows or num_rows < 0):
        raise ValueError(f"num_rows must be None or an int >= 0, got {num_rows!r}")
    if check_values and dest_TK.device.type == "cpu" and dest_TK.numel():
        lo, hi = int(dest_TK.min()), int(dest_TK.max())
        if lo < -1 or hi >= num_groups:
            bad = lo if lo < -1 else hi
            raise ValueError(f"dest_TK holds group {bad}, outside -1..{num_groups - 1}")


def check_unpermute_args(y_RD: torch.Tensor, row_index_TK: torch.Tensor, weights_TK: torch.Tensor,
                         check_values: bool = True) -> None:
    """Raise ValueError naming the bad argument of :func:`unpermute`."""
    if not isinstance(y_RD, torch.Tensor) or y_RD.dim() != 2 or not y_RD.is_floating_point():
        raise ValueError(f"y_perm_RD must be a 2-D float tensor [R, D], got "
                         f"{tuple(getattr(y_RD, 'shape', ()))}")
    if not isinstance(row_index_TK, torch.Tensor) or row_index_TK.dim() != 2:
        raise ValueError(f"row_index_TK must be [T, K], got {tuple(getattr(row_index_TK, 'shape', ()))}")
    if row_index_TK.dtype != torch.int64:
        raise ValueError(f"row_index_TK must be int64, got {row_index_TK.dtype}")
    if not isinstance(weights_TK, torch.Tensor) or weights_TK.shape != row_index_TK.shape:
        raise ValueError(f"weights_TK must have the shape of row_index_TK {tuple(row_index_TK.shape)}, "
                         f"got {tuple(getattr(weights_TK, 'shape', ()))}")
    if not weights_TK.is_floating_point():
        raise ValueError(f"weights_TK must be a float tensor, got {weights_TK.dtype}")
    if row_index_TK.device != y_RD.device or weights_TK.device != y_RD.device:
        raise ValueError("y_perm_RD, row_index_TK and weights_TK must be on one device")
    if check_values and y_RD.device.type == "cpu" and row_index_TK.numel():
        lo, hi = int(row_index_TK.min()), int(row_index_TK.max())
        if lo < -1 or hi >= y_RD.shape[0]:
            bad = lo if lo < -1 else hi
            raise ValueError(f"row_index_TK holds row {bad}, outside -1..{y_RD.shape[0] - 1}")


def check_assign_args(topk_ids_TK: torch.Tensor, copy_slots_EX: torch.Tensor,
                      copy_ends_EX: torch.Tensor, token_offset_E: torch.Tensor, check_values: bool = True) -> None:
    """Raise ValueError naming the bad argument of :func:`assign_copies`."""
    named = {"topk_ids_TK": topk_ids_TK, "copy_slots_EX": copy_slots_EX,
             "copy_ends_EX": copy_ends_EX, "token_offset_E": token_offset_E}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            raise ValueError(f"{name} must be an int64 tensor, got {getattr(t, 'dtype', type(t))}")
        if t.device != topk_ids_TK.device:
            raise ValueError(f"{name} is on {t.device} but topk_ids_TK on {topk_ids_TK.device}")
    if topk_ids_TK.dim() != 2:
        raise ValueError(f"topk_ids_TK must be [T, K], got {tuple(topk_ids_TK.shape)}")
    if copy_slots_EX.dim() != 2 or copy_slots_EX.shape[1] < 1:
        raise ValueError(f"copy_slots_EX must be [E, X] with X >= 1, got {tuple(copy_slots_EX.shape)}")
    if copy_ends_EX.shape != copy_slots_EX.shape:
        raise ValueError(f"copy_ends_EX must have shape {tuple(copy_slots_EX.shape)}, "
                         f"got {tuple(copy_ends_EX.shape)}")
    if token_offset_E.shape != (copy_slots_EX.shape[0],):
        raise ValueError(f"token_offset_E must have shape ({copy_slots_EX.shape[0]},), "
                         f"got {tuple(token_offset_E.shape)}")
    E = copy_slots_EX.shape[0]
    if check_values and topk_ids_TK.device.type == "cpu" and topk_ids_TK.numel():
        lo, hi = int(topk_ids_TK.min()), int(topk_ids_TK.max())
        if lo < -1 or hi >= E:
            raise ValueError(f"topk_ids_TK holds expert {lo if lo < -1 else hi}, outside -1..{E - 1}")


def permute_index(dest_TK: torch.Tensor, num_groups: int, align: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index part of :func:`permute`: ``(row_index_TK, group_offsets [G+1], counts_G [G])``."""
    rank, counts = group_ranks(dest_TK.reshape(-1), num_groups)
    offsets = padded_offsets(counts, align)
    dest = dest_TK.reshape(-1)
    rows = offsets[dest.clamp(min=0)] + rank
    rows = torch.where(dest >= 0, rows, torch.full_like(rows, -1))
    return rows.view(dest_TK.shape), offsets, counts


def permute(x_TD: torch.Tensor, dest_TK: torch.Tensor, num_groups: int, align: int = 1,
            num_rows: int | None = None, check_values: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy every token once per destination, grouped by destination (see the module doc).

    Args:
        x_TD: ``[T, D]`` float tokens.
        dest_TK: ``[T, K]`` int64 destination group of each copy, -1 to drop it.
        num_groups: G.
        align: pad every group with zero rows to a multiple of ``align`` rows.
        num_rows: R when the caller knows it (it must equal ``group_offsets[-1]``): then
            nothing is read on the host. None reads it (a host sync on a GPU).
        check_values: scan ``dest_TK``'s values on CPU (and ``num_rows`` against them).
    Returns:
        ``x_perm_RD [R, D]`` (x's dtype; ``R = group_offsets[-1]``), ``row_index_TK [T, K]``
        int64 (-1 where dropped) and ``group_offsets [G+1]`` int64. Differentiable w.r.t. x.
    """
    check_permute_args(x_TD, dest_TK, num_groups, align, num_rows, check_values)
    row_index_TK, offsets, _ = permute_index(dest_TK, num_groups, align)
    R = buffer_rows(offsets, num_rows, check_values)
    rows = row_index_TK.reshape(-1)
    N = rows.numel()
    # the copy that fills each row (-1: padding); dropped copies land past R, each on its own row
    where_to = torch.where(rows >= 0, rows, R + torch.arange(N, device=rows.device))
    source_R = torch.full((R + N,), -1, dtype=torch.int64, device=rows.device)
    source_R = source_R.scatter_(0, where_to, torch.arange(N, device=rows.device))[:R]
    token_R = source_R.clamp(min=0) // max(dest_TK.shape[1], 1)
    x_perm = torch.where((source_R >= 0)[:, None], x_TD.index_select(0, token_R), 0)
    return x_perm, row_index_TK, offsets


def unpermute(y_perm_RD: torch.Tensor, row_index_TK: torch.Tensor, weights_TK: torch.Tensor,
              check_values: bool = True) -> torch.Tensor:
    """Weighted gather-sum back to token order.

    ``out_TD[t] = sum_k weights_TK[t, k] * y_perm_RD[row_index_TK[t, k]]``, skipping -1 rows
    (their weight and row are masked out before they meet, so a NaN there leaks into neither the
    sum nor the gradients). Accumulates in float32 (float64 for float64 data) and returns
    ``[T, D]`` in y_perm's dtype. Differentiable w.r.t. y_perm and weights. ``check_values``:
    scan ``row_index_TK`` on CPU.
    """
    check_unpermute_args(y_perm_RD, row_index_TK, weights_TK, check_values)
    T, K = row_index_TK.shape
    R, D = y_perm_RD.shape
    acc = torch.promote_types(y_perm_RD.dtype, torch.float32)
    valid_TK = row_index_TK >= 0
    if R == 0:  # every copy dropped (a shape, not a value): the sum of no rows is 0, y stays in the graph
        rows_TKD = y_perm_RD.sum(0).to(acc).expand(T, K, D)
    else:
        rows_TKD = y_perm_RD.index_select(0, row_index_TK.reshape(-1).clamp(min=0)).to(acc).view(T, K, D)
        rows_TKD = torch.where(valid_TK[..., None], rows_TKD, 0)
    w_TK = torch.where(valid_TK, weights_TK.to(acc), 0)
    return (rows_TKD * w_TK[..., None]).sum(1).to(y_perm_RD.dtype)


def assign_copies(topk_ids_TK: torch.Tensor, copy_slots_EX: torch.Tensor, copy_ends_EX: torch.Tensor,
                  token_offset_E: torch.Tensor, check_values: bool = True) -> torch.Tensor:
    """Physical slot of every token copy following a replica plan's token split (no host sync
    on CUDA tensors).

    Args:
        topk_ids_TK: ``[T, K]`` int64 logical expert of each copy, -1 for none.
        copy_slots_EX: ``[E, X]`` int64 slots holding expert e, ascending, -1 padded.
        copy_ends_EX: ``[E, X]`` int64 inclusive prefix sums of those copies' token counts
            (padding repeats the last value).
        token_offset_E: ``[E]`` int64 token copies of expert e on lower ranks.
    Returns:
        ``dest_TK [T, K]`` int64: the j-th copy of e here (token-then-k order) has position
        ``pos = token_offset_E[e] + j`` and goes to ``copy_slots_EX[e, c]`` for the first c with
        ``pos < copy_ends_EX[e, c]``; past the last end it goes to the last copy; -1 for -1 ids
        (and for experts without any copy). ``check_values``: scan ``topk_ids_TK`` on CPU.
    """
    check_assign_args(topk_ids_TK, copy_slots_EX, copy_ends_EX, token_offset_E, check_values)
    E, X = copy_slots_EX.shape
    ids = topk_ids_TK.reshape(-1)
    if E == 0:
        return torch.full_like(topk_ids_TK, -1)
    rank, _ = group_ranks(ids, E)
    e = ids.clamp(min=0)
    pos = token_offset_E[e] + rank
    c = (copy_ends_EX[e] <= pos[:, None]).sum(1)
    ncopies = (copy_slots_EX >= 0).sum(1)
    c = torch.minimum(c, (ncopies[e] - 1).clamp(min=0))
    slot = copy_slots_EX[e, c]
    dest = torch.where(ids >= 0, slot, torch.full_like(slot, -1))
    return dest.view(topk_ids_TK.shape)
