"""Timing probes that ``relibra calibrate`` fits the cost model from and ``relibra measure`` checks it with.

Legend: D dim, I hidden, r rows (token copies) one expert slot computes.

Every rank runs a probe at the same time (between barriers), as in a real step, and the slowest
rank's time counts. A probe's figure is the *median* of its samples, the statistic
``relibra measure`` reports step times with: on a shared machine the fastest sample is the one
moment nobody else ran, which a step of seconds never sees, so a profile of minima prices steps
as faster than they ever are. The GEMM probe is the figure that dominates a compute-bound step;
``measure`` runs it again before and after its steps, so a table says how fast the machine was
then against the profile (machines that share cores drift by tens of percent over minutes).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from ..runtime.comm import all_reduce_
from ..runtime.dispatch import expert_mlp

__all__ = ["timed_samples", "timed", "GemmProbe", "REFERENCE_ROWS"]

#: rows per slot of the GEMM probe ``measure`` repeats (the middle of calibrate's sweep)
REFERENCE_ROWS = 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_samples(fn: Callable[[], object], repeats: int, device: torch.device, warm: bool = True) -> list[float]:
    """Seconds of ``repeats`` runs of ``fn``, each the slowest rank's (one untimed run first when ``warm``)."""
    if warm:
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        all_reduce_(dt, None, op=dist.ReduceOp.MAX)  # through the GPU for NCCL
        times.append(float(dt))
    return times


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median of :func:`timed_samples` (module doc: why the median)."""
    return statistics.median(timed_samples(fn, repeats, device))


class GemmProbe:
    """``expert_mlp`` (the layer's grouped GEMM) over ``slots`` expert slots of r rows each.

    Args:
        dim, hidden: D and I of one expert (gate-up ``[2I, D]``, down ``[D, I]`` per slot).
        slots: expert slots in one call (a rank's home slots, at most 4 in the probes).
        device, dtype: where and in what the weights and rows live.

    The weights are shared by every row count; the rows of each r are made once and kept.
    """

    def __init__(self, dim: int, hidden: int, slots: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.dim, self.slots, self._kw = dim, slots, dict(device=device, dtype=dtype)
        self.gate_up = torch.randn(slots, 2 * hidden, dim, **self._kw).requires_grad_()
        self.down = torch.randn(slots, dim, hidden, **self._kw).requires_grad_()
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, dy)``, both ``[slots * rows, D]``."""
        if rows not in self._rows:
            n = self.slots * rows
            self._rows[rows] = (torch.randn(n, self.dim, **self._kw).requires_grad_(),
                                torch.randn(n, self.dim, **self._kw))
        return self._rows[rows]

    def forward(self, rows: int) -> None:
        x, _ = self._inputs(rows)
        with torch.no_grad():
            expert_mlp(x, self.gate_up, self.down, (rows,) * self.slots)

    def forward_backward(self, rows: int) -> None:
        """Forward and backward; the weight gradients accumulate, as over micro-batches."""
        x, dy = self._inputs(rows)
        expert_mlp(x, self.gate_up, self.down, (rows,) * self.slots).backward(dy)
