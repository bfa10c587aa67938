"""Triton versions of the dispatch ops (imported lazily by :mod:`relibra.kernels`).

Legend: T tokens, K copies per token, D hidden, N = T*K copies, G groups, R permuted rows,
E logical experts, X most copies of one expert, B = cdiv(N, BLOCK) blocks of copies.

How the index is built (no sort, no host sync except reading R in :func:`permute` when the
caller does not pass ``num_rows``)::

    keys_N ──_block_counts──> counts_BG ──cumsum over blocks──> block_off_BG (exclusive)
    keys_N + block_off_BG ──_block_rank──> rank of each copy inside its group
                                           (block offset + cumsum of a one-hot tile)

so the order is exactly the stable (group, token, k) order of the reference. Data moves
with one program per (token, D-block): permute reads each token row once and writes its K
copies; unpermute reads K rows and writes one, accumulating in float32.

On CPU tensors the kernels run under ``TRITON_INTERPRET=1`` (set before importing triton).
Row indices must come from :func:`permute` (every row referenced at most once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference

__all__ = ["permute", "unpermute", "assign_copies", "group_ranks"]

_BLOCK = 128  # copies per program in the index kernels
_GB = 32  # groups per one-hot tile


@triton.jit
def _block_counts(keys_ptr, counts_ptr, N, G, BLOCK: tl.constexpr, GB: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(keys_ptr + offs, mask=offs < N, other=-1)
    for g0 in range(0, G, GB):
        cols = g0 + tl.arange(0, GB)
        hot = (key[:, None] == cols[None, :]).to(tl.int32)
        cnt = tl.sum(hot, axis=0)
        tl.store(counts_ptr + b.to(tl.int64) * G + cols, cnt.to(tl.int64), mask=cols < G)


@triton.jit
def _block_rank(keys_ptr, block_off_ptr, base_ptr, out_ptr, N, G,
                ends_ptr, slots_ptr, last_ptr, X,
                BLOCK: tl.constexpr, GB: tl.constexpr, ASSIGN: tl.constexpr):
    """out = base[key] + (rank of the copy in its group); with ASSIGN the slot it falls in."""
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(keys_ptr + offs, mask=offs < N, other=-1)
    valid = key >= 0
    rank = tl.zeros([BLOCK], dtype=tl.int64)
    for g0 in range(0, G, GB):
        cols = g0 + tl.arange(0, GB)
        hot = (key[:, None] == cols[None, :]).to(tl.int32)
        inc = tl.cumsum(hot, axis=0) - hot  # earlier copies of the same group in this block
        rank += tl.sum(inc * hot, axis=1).to(tl.int64)
    safe = tl.where(valid, key, 0).to(tl.int64)
    rank += tl.load(block_off_ptr + b.to(tl.int64) * G + safe, mask=valid, other=0)
    val = tl.load(base_ptr + safe, mask=valid, other=0) + rank
    if ASSIGN:
        c = tl.zeros([BLOCK], dtype=tl.int64)
        for j in range(0, X):
            end = tl.load(ends_ptr + safe * X + j, mask=valid, other=0)
            c += (end <= val).to(tl.int64)
        last = tl.load(last_ptr + safe, mask=valid, other=0)
        c = tl.minimum(c, last)
        val = tl.load(slots_ptr + safe * X + c, mask=valid, other=-1)
    tl.store(out_ptr + offs, tl.where(valid, val, -1), mask=offs < N)


@triton.jit
def _scatter_rows(src_ptr, rows_ptr, w_ptr, dst_ptr, D, K,
                  HAS_W: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """dst[rows[t, k], d] = src[t, d] (* w[t, k]) for every k with rows[t, k] >= 0."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    x = tl.load(src_ptr + t * D + d, mask=dmask, other=0.0)
    for k in range(0, K):
        row = tl.load(rows_ptr + t * K + k)
        if HAS_W:
            w = tl.load(w_ptr + t * K + k).to(ACC)
            val = (x.to(ACC) * w).to(dst_ptr.dtype.element_ty)
        else:
            val = x
        keep = dmask & (row + tl.zeros([BLOCK_D], dtype=tl.int64) >= 0)  # vector mask (interpreter)
        tl.store(dst_ptr + row * D + d, val, mask=keep)


@triton.jit
def _gather_rows(src_ptr, rows_ptr, w_ptr, dst_ptr, D, K,
                 HAS_W: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """dst[t, d] = sum_k (w[t, k] *) src[rows[t, k], d] over rows >= 0, in float32."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for k in range(0, K):
        row = tl.load(rows_ptr + t * K + k)
        keep = dmask & (row + tl.zeros([BLOCK_D], dtype=tl.int64) >= 0)
        y = tl.load(src_ptr + row * D + d, mask=keep, other=0.0).to(ACC)
        if HAS_W:
            w = tl.load(w_ptr + t * K + k).to(ACC)
            acc += tl.where(row >= 0, y * w, 0.0)
        else:
            acc += y
    tl.store(dst_ptr + t * D + d, acc.to(dst_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _row_dots(g_ptr, y_ptr, rows_ptr, out_ptr, D, K, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """out[t, k] = sum_d g[t, d] * y[rows[t, k], d] (0 where rows[t, k] < 0), in float32."""
    i = tl.program_id(0).to(tl.int64)
    t = i // K
    row = tl.load(rows_ptr + i)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = (d < D) & (row + tl.zeros([BLOCK_D], dtype=tl.int64) >= 0)
        g = tl.load(g_ptr + t * D + d, mask=m, other=0.0).to(ACC)
        y = tl.load(y_ptr + row * D + d, mask=m, other=0.0).to(ACC)
        acc += g * y
    tl.store(out_ptr + i, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


@triton.jit
def _zero_padding(dst_ptr, offsets_ptr, counts_ptr, D, ALIGN, BLOCK_D: tl.constexpr):
    """Zero rows offsets[g] + counts[g] .. offsets[g + 1] (fewer than ALIGN) of group g."""
    g = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    start = tl.load(offsets_ptr + g) + tl.load(counts_ptr + g)
    stop = tl.load(offsets_ptr + g + 1)
    zero = tl.zeros([BLOCK_D], dtype=dst_ptr.dtype.element_ty)
    for i in range(0, ALIGN - 1):
        row = start + i
        keep = (d < D) & (row + tl.zeros([BLOCK_D], dtype=tl.int64) < stop)
        tl.store(dst_ptr + row * D + d, zero, mask=keep)


def _acc(dtype: torch.dtype):
    """float32 accumulation, float64 for float64 data (as the reference)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(D: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(D, 1))))


def _block_offsets(keys_N: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_off_BG exclusive over blocks, counts_G)`` for keys in -1..G-1."""
    N = keys_N.numel()
    B = triton.cdiv(N, _BLOCK)
    counts_BG = torch.empty(B, G, dtype=torch.int64, device=keys_N.device)
    _block_counts[(B,)](keys_N, counts_BG, N, G, BLOCK=_BLOCK, GB=_GB)
    block_off = torch.cumsum(counts_BG, 0) - counts_BG
    return block_off, counts_BG.sum(0)


def group_ranks(keys_N: torch.Tensor, base_G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(base_G[key] + stable rank in group, -1 for key -1; counts_G)`` for keys ``[N]``."""
    G = base_G.numel()
    keys_N = keys_N.contiguous()
    N = keys_N.numel()
    out = torch.full_like(keys_N, -1)
    if N == 0 or G == 0:
        return out, torch.zeros(G, dtype=torch.int64, device=keys_N.device)
    block_off, counts = _block_offsets(keys_N, G)
    _block_rank[(triton.cdiv(N, _BLOCK),)](keys_N, block_off, base_G, out, N, G, keys_N, keys_N, keys_N, 0,
                                           BLOCK=_BLOCK, GB=_GB, ASSIGN=False)
    return out, counts


def _scatter(src_TD, rows_TK, w_TK, R, dtype):
    T, D = src_TD.shape
    dst = torch.empty(R, D, dtype=dtype, device=src_TD.device)
    if T and D and rows_TK.shape[1]:
        bd = _block_d(D)
        _scatter_rows[(T, triton.cdiv(D, bd))](src_TD, rows_TK, w_TK if w_TK is not None else rows_TK,
                                               dst, D, rows_TK.shape[1], HAS_W=w_TK is not None,
                                               BLOCK_D=bd, ACC=_acc(dtype))
    return dst


def _gather(src_RD, rows_TK, w_TK, dtype):
    T, K = rows_TK.shape
    D = src_RD.shape[1]
    dst = torch.empty(T, D, dtype=dtype, device=src_RD.device)
    if T and D:
        bd = _block_d(D)
        _gather_rows[(T, triton.cdiv(D, bd))](src_RD, rows_TK, w_TK if w_TK is not None else rows_TK,
                                              dst, D, K, HAS_W=w_TK is not None, BLOCK_D=bd,
                                              ACC=_acc(dtype))
    return dst


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, rows_TK, offsets, counts, align, R):
        x_perm = _scatter(x_TD, rows_TK, None, R, x_TD.dtype)
        G, D = counts.numel(), x_TD.shape[1]
        if align > 1 and G and D and R:
            bd = _block_d(D)
            _zero_padding[(G, triton.cdiv(D, bd))](x_perm, offsets, counts, D, align, BLOCK_D=bd)
        ctx.save_for_backward(rows_TK)
        return x_perm

    @staticmethod
    def backward(ctx, g_RD):
        (rows_TK,) = ctx.saved_tensors
        return _gather(g_RD.contiguous(), rows_TK, None, g_RD.dtype), None, None, None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD, rows_TK, w_TK):
        ctx.save_for_backward(y_RD, rows_TK, w_TK)
        return _gather(y_RD, rows_TK, w_TK, y_RD.dtype)

    @staticmethod
    def backward(ctx, g_TD):
        y_RD, rows_TK, w_TK = ctx.saved_tensors
        g_TD = g_TD.contiguous()
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = torch.zeros_like(y_RD)  # rows nobody references (padding) get 0
            T, D = g_TD.shape
            if T and D and rows_TK.shape[1]:
                bd = _block_d(D)
                _scatter_rows[(T, triton.cdiv(D, bd))](g_TD, rows_TK, w_TK, grad_y, D, rows_TK.shape[1],
                                                       HAS_W=True, BLOCK_D=bd, ACC=_acc(y_RD.dtype))
        if ctx.needs_input_grad[2]:
            grad_w = torch.zeros_like(w_TK)
            if rows_TK.numel() and g_TD.shape[1]:
                _row_dots[(rows_TK.numel(),)](g_TD, y_RD, rows_TK, grad_w, g_TD.shape[1], rows_TK.shape[1],
                                              BLOCK_D=_block_d(min(g_TD.shape[1], 256)), ACC=_acc(y_RD.dtype))
        return grad_y, None, grad_w


def permute(x_TD: torch.Tensor, dest_TK: torch.Tensor, num_groups: int, align: int = 1,
            num_rows: int | None = None, check_values: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton :func:`relibra.kernels.reference.permute` (same contract, bit-exact result)."""
    reference.check_permute_args(x_TD, dest_TK, num_groups, align, num_rows, check_values)
    dest = dest_TK.contiguous().reshape(-1)
    G = int(num_groups)
    # rank first (base 0), then rows = padded offset + rank
    rank, counts = group_ranks(dest, torch.zeros(G, dtype=torch.int64, device=dest.device))
    offsets = reference.padded_offsets(counts, int(align))
    rows = torch.where(dest >= 0, offsets[dest.clamp(min=0)] + rank, rank).view(dest_TK.shape)
    R = reference.buffer_rows(offsets, num_rows, check_values)
    x_perm = _Permute.apply(x_TD.contiguous(), rows, offsets, counts, int(align), R)
    return x_perm, rows, offsets


def unpermute(y_perm_RD: torch.Tensor, row_index_TK: torch.Tensor, weights_TK: torch.Tensor,
              check_values: bool = True) -> torch.Tensor:
    """Triton :func:`relibra.kernels.reference.unpermute` (fp32 accumulation, y's dtype)."""
    reference.check_unpermute_args(y_perm_RD, row_index_TK, weights_TK, check_values)
    return _Unpermute.apply(y_perm_RD.contiguous(), row_index_TK.contiguous(), weights_TK.contiguous())


def assign_copies(topk_ids_TK: torch.Tensor, copy_slots_EX: torch.Tensor, copy_ends_EX: torch.Tensor,
                  token_offset_E: torch.Tensor, check_values: bool = True) -> torch.Tensor:
    """Triton :func:`relibra.kernels.reference.assign_copies` (no host sync)."""
    reference.check_assign_args(topk_ids_TK, copy_slots_EX, copy_ends_EX, token_offset_E, check_values)
    E, X = copy_slots_EX.shape
    ids = topk_ids_TK.contiguous().reshape(-1)
    N = ids.numel()
    out = torch.full_like(ids, -1)
    if N == 0 or E == 0:
        return out.view(topk_ids_TK.shape)
    last = ((copy_slots_EX >= 0).sum(1) - 1).clamp(min=0)
    block_off, _ = _block_offsets(ids, E)
    _block_rank[(triton.cdiv(N, _BLOCK),)](ids, block_off, token_offset_E.contiguous(), out, N, E,
                                           copy_ends_EX.contiguous(), copy_slots_EX.contiguous(), last, X,
                                           BLOCK=_BLOCK, GB=_GB, ASSIGN=True)
    return out.view(topk_ids_TK.shape)
