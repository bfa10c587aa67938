"""Load-balance metrics as other systems report them, from per-GPU loads.

Legend: see CONTRIBUTING.md (M micro-batches, L MoE layers, G GPUs).

- ``max_vio``: ``(max - mean) / mean`` of the GPUs' token copies, as verl reports it (0 is
  perfect balance; 1.0 means the busiest GPU does twice the mean);
- ``balancedness``: ``mean / max``, as vLLM's expert-parallel load balancer logs it (1.0 is
  perfect; the step runs at this fraction of its balanced speed).

A layer without tokens reads as balanced (``max_vio`` 0, ``balancedness`` 1).
"""

from __future__ import annotations

import torch

__all__ = ["max_vio", "balancedness"]


def _mean_max(gpu_loads_MLG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.as_tensor(gpu_loads_MLG).to(torch.float64)
    return g.mean(-1), g.amax(-1)


def max_vio(gpu_loads_MLG: torch.Tensor) -> torch.Tensor:
    """``[M, L]`` float64 ``(max - mean) / mean`` over the last (GPU) dimension of ``[M, L, G]`` loads."""
    mean, peak = _mean_max(gpu_loads_MLG)
    return torch.where(mean > 0, (peak - mean) / mean.clamp(min=1e-30), torch.zeros_like(mean))


def balancedness(gpu_loads_MLG: torch.Tensor) -> torch.Tensor:
    """``[M, L]`` float64 ``mean / max`` over the last (GPU) dimension of ``[M, L, G]`` loads."""
    mean, peak = _mean_max(gpu_loads_MLG)
    return torch.where(peak > 0, mean / peak.clamp(min=1e-30), torch.ones_like(mean))
