"""Slot arithmetic shared by plans, policies and the layer: checked loads, copy ranks, splits.

Legend: E logical experts, P physical slots (``G * (H + S)``), M micro-batches, L MoE layers,
G GPUs, H home slots per GPU, S spare slots per GPU. See :mod:`relibra.plan` for the slot layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .topology import Topology

__all__ = ["as_loads", "slot_ranks", "even_slot_tokens", "interleave_slots"]


_INT64_MAX = 2**63 - 1
_SUM_BLOCK = 1 << 16  # entries per block of the exact running-sum check (bounded temporaries)


def as_loads(loads: Any, name: str = "loads", ndim: int = 3) -> torch.Tensor:
    """Convert ``loads`` (tensor, ndarray or nested list) to an int64 CPU tensor, checking it.

    Raises ValueError naming ``name`` for a wrong rank, a float tensor holding NaN,
    non-integral or negative values, and loads whose total exceeds int64 (naming the index
    where the running total passes it). The bound is on the whole tensor, not per micro-batch
    and layer: planners and the simulator add loads over experts, GPUs, nodes, micro-batches
    (a step's placement) and steps, in int64. All loads are non-negative, so every such sum is
    at most the total, and none of them can wrap around. Real totals are ~1e11 token copies.
    """
    if not isinstance(loads, torch.Tensor):
        try:
            loads = torch.as_tensor(loads)
        except Exception as exc:  # pragma: no cover - torch's own message is fine
            raise ValueError(f"{name} cannot be read as a tensor: {exc}") from exc
    if loads.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(loads.shape)}")
    if loads.dtype == torch.bool or loads.is_complex():
        raise ValueError(f"{name} must hold integer token counts, got dtype {loads.dtype}")
    if loads.is_floating_point():
        if torch.isnan(loads).any():
            raise ValueError(f"{name} contains NaN")
        if torch.isinf(loads).any():
            raise ValueError(f"{name} contains inf")
        if (loads != loads.round()).any():
            raise ValueError(f"{name} must hold integer token counts, got fractional values")
    loads = loads.detach().to(device="cpu", dtype=torch.int64)
    if not loads.numel():
        return loads
    low, high = (int(v) for v in torch.aminmax(loads))
    if low < 0:
        idx = tuple(int(i) for i in (loads < 0).nonzero()[0])
        raise ValueError(f"{name} contains a negative load {int(loads[idx])} at index {idx}")
    if high > _INT64_MAX // loads.numel():  # the total might not fit: find where it passes int64
        flat = loads.reshape(-1)
        total = 0
        for start in range(0, flat.numel(), _SUM_BLOCK):
            # exact running totals, split so no partial sum overflows:
            # total + high_run * 2**32 + low_run with high < 2**31, low < 2**32
            block = flat[start : start + _SUM_BLOCK]
            high_run, low_run = (block >> 32).cumsum(0), (block & 0xFFFFFFFF).cumsum(0)
            passes = high_run > (_INT64_MAX - total - low_run) >> 32
            if bool(passes.any()):
                first = start + int(passes.nonzero()[0])
                idx = tuple(int(i) for i in np.unravel_index(first, tuple(loads.shape)))  # torch's imports sympy
                raise ValueError(
                    f"{name} add up to more than int64 holds (2**63 - 1): the running total passes it at index "
                    f"{idx} (load {int(loads[idx])}); token counts this large would overflow per-GPU and per-step sums"
                )
            total += (int(high_run[-1]) << 32) + int(low_run[-1])
    return loads


def slot_ranks(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of every physical slot among the copies of its expert, and copies per expert.

    Args:
        phy2log: ``[..., P]`` int64 logical expert of each slot, -1 for an empty slot.
        num_experts: E.
    Returns:
        ``rank [..., P]`` (0 for the lowest-numbered copy; -1 for empty slots) and
        ``logcnt [..., E]``.
    """
    batch, P = phy2log.shape[:-1], phy2log.shape[-1]
    flat = phy2log.reshape(-1, P)
    valid = flat >= 0
    safe = torch.where(valid, flat, num_experts)  # empty slots count in a dummy column
    logcnt = torch.zeros(flat.shape[0], num_experts + 1, dtype=torch.int64)
    logcnt.scatter_add_(1, safe, torch.ones_like(safe))
    rank = torch.where(valid, 0, -1)
    # only copies of experts held more than once need a rank above 0; home slots hold every
    # expert once and spare slots are few, so sort just those (a 1-D sort of a few entries)
    dup = valid & (logcnt.gather(1, safe) > 1)
    row, slot = dup.nonzero(as_tuple=True)  # row-major: ascending slot within each row
    if row.numel():
        group = row * (num_experts + 1) + flat[row, slot]
        order = group.argsort(stable=True)  # by (row, expert), then slot
        g_sorted = group[order]
        n = g_sorted.numel()
        new_group = torch.ones(n, dtype=torch.bool)
        new_group[1:] = g_sorted[1:] != g_sorted[:-1]
        pos = torch.arange(n)
        start = torch.cummax(torch.where(new_group, pos, 0), 0).values
        rank[row[order], slot[order]] = pos - start
    return rank.reshape(*batch, P), logcnt[:, :num_experts].reshape(*batch, num_experts)


def even_slot_tokens(phy2log: torch.Tensor, loads: torch.Tensor) -> torch.Tensor:
    """Split every expert's load evenly over its copies (EPLB's rule; static's trivially).

    Args:
        phy2log: ``[..., P]`` logical expert per physical slot, -1 empty.
        loads: ``[..., E]`` tokens per logical expert.
    Returns:
        ``slot_tokens [..., P]``: copy ``j`` of ``c`` gets ``n // c + (j < n % c)`` tokens.
    """
    E = loads.shape[-1]
    rank, logcnt = slot_ranks(phy2log, E)
    valid = phy2log >= 0
    safe = torch.where(valid, phy2log, 0)
    share = torch.where(valid, loads.gather(-1, safe), 0)
    # only copies of replicated experts split (few): divide on those entries alone
    idx = (valid & (logcnt.gather(-1, safe) > 1)).nonzero(as_tuple=True)
    if idx[0].numel():
        n, c = share[idx], logcnt.gather(-1, safe)[idx]
        share[idx] = n // c + (rank[idx] < n % c).to(torch.int64)
    return share


def interleave_slots(home_experts_MLK: torch.Tensor, spare_MLV: torch.Tensor, topology: Topology) -> torch.Tensor:
    """Interleave home ``[M, L, G*H]`` and spare ``[M, L, G*S]`` slots into ``[M, L, P]``."""
    M, L = spare_MLV.shape[:2]
    G, H, S = topology.num_gpus, topology.home_slots_per_gpu, topology.spare_slots_per_gpu
    home = home_experts_MLK.reshape(M, L, G, H)
    spare = spare_MLV.reshape(M, L, G, S)
    return torch.cat([home, spare], dim=-1).reshape(M, L, G * (H + S))
