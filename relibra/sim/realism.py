"""How realistic a trace is: the statistics REFERENCE.md quotes for Qwen3-235B, of any trace.

Legend: ``S`` steps, ``M`` micro-batches, ``B`` batches taken in order, ``L`` MoE layers,
``E`` experts. ``relibra bench --describe`` prints them (:func:`format_description`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["describe", "format_description"]


def describe(loads_SMLE: Any, popularity_LE: Any = None, ep: int = 8,
             windows: tuple[int, ...] = (1, 4, 16, 50)) -> dict[str, Any]:
    """Realism statistics of a trace, the ones REFERENCE.md quotes for Qwen3-235B.

    Args:
        loads_SMLE: ``[S, M, L, E]`` (or ``[B, L, E]``) loads; the ``S*M`` micro-batches are
            taken in order as a sequence of batches.
        popularity_LE: the long-run load ``[L, E]``; None uses the trace's own total (then the
            window covering the whole trace correlates 1.0 by construction).
        ep: expert-parallel GPUs with contiguous placement (``E / ep`` experts per GPU).
        windows: numbers of consecutive batches averaged; windows longer than the trace are left out.

    Returns a dict: ``gpu_max_min_long_run`` / ``..._worst_layer`` (busiest over idlest GPU of
    the whole trace's load, mean over layers / worst layer), ``gpu_max_min_per_batch`` /
    ``..._worst`` (the same per batch: mean / worst over batches and layers), and
    ``corr_with_long_run`` ``{k: r}``: Pearson correlation of the load summed over ``k``
    consecutive batches with the long-run load, per layer, mean over layers and windows.
    The Qwen3-235B numbers (8-way EP): 2.3-4.4 long-run busiest/idlest, worst layer 11.8;
    correlations 0.57, 0.71, 0.75, 0.79 for 1, 4, 16, 50 batches (their batch size unknown).
    """
    x = np.asarray(loads_SMLE, dtype=np.float64)
    if x.ndim == 4:
        x = x.reshape(-1, *x.shape[2:])
    if x.ndim != 3:
        raise ValueError(f"describe: loads must be [S, M, L, E] or [B, L, E], got shape {x.shape}")
    B, L, E = x.shape
    if ep < 1 or E % ep:
        raise ValueError(f"describe: ep={ep} must divide the {E} experts")
    total = x.sum(0)
    ref = total if popularity_LE is None else np.asarray(popularity_LE, dtype=np.float64)
    if ref.shape != (L, E):
        raise ValueError(f"describe: popularity must be [L, E] = {(L, E)}, got {ref.shape}")

    def ratio(a):  # busiest / idlest GPU of contiguous placement, [..., L]
        g = a.reshape(*a.shape[:-1], ep, E // ep).sum(-1)
        return g.max(-1) / np.maximum(g.min(-1), 1e-9)

    def corr(a, b):  # per row Pearson
        a = a - a.mean(-1, keepdims=True)
        b = b - b.mean(-1, keepdims=True)
        return (a * b).sum(-1) / np.maximum(np.sqrt((a * a).sum(-1) * (b * b).sum(-1)), 1e-300)

    long_run = ratio(total)
    per_batch = ratio(x)
    out: dict[str, Any] = {"batches": B, "layers": L, "experts": E, "ep": ep,
                           "reference": "trace total" if popularity_LE is None else "popularity",
                           "gpu_max_min_long_run": float(long_run.mean()),
                           "gpu_max_min_long_run_worst_layer": float(long_run.max()),
                           "gpu_max_min_per_batch": float(per_batch.mean()),
                           "gpu_max_min_per_batch_worst": float(per_batch.max()),
                           "corr_with_long_run": {}}
    for k in windows:
        if k > B:
            continue
        w = x[: (B // k) * k].reshape(B // k, k, L, E).sum(1)
        out["corr_with_long_run"][k] = float(corr(w, ref[None]).mean())
    return out


def format_description(d: dict[str, Any]) -> str:
    """Two lines of :func:`describe`'s result next to the Qwen3-235B figures of REFERENCE.md."""
    corr = ", ".join(f"{k}: {v:.2f}" for k, v in d["corr_with_long_run"].items()) or "-"
    return (f"busiest/idlest GPU ({d['ep']}-way EP, contiguous): long run {d['gpu_max_min_long_run']:.2f} "
            f"(worst layer {d['gpu_max_min_long_run_worst_layer']:.1f}), per micro-batch "
            f"{d['gpu_max_min_per_batch']:.2f} (worst {d['gpu_max_min_per_batch_worst']:.1f})"
            f"  [Qwen3-235B: 2.3-4.4, worst layer 11.8]\n"
            f"correlation of k-batch sums with the long-run load ({d['reference']}): {corr}"
            f"  [Qwen3-235B: 1: 0.57, 4: 0.71, 16: 0.75, 50: 0.79]")
