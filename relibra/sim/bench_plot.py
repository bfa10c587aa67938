"""``relibra bench --plot``: the modelled step time by part and every policy's GPU loads, drawn.

matplotlib is an optional extra (``pip install 'relibra[plot]'``); it is imported only here and
only when a plot is asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TIME_PARTS", "relative_gpu_loads", "time_breakdown", "plot_bench"]


#: step-time parts of the cost model drawn by ``--plot`` (``PolicyResult.breakdown_s`` key, label)
TIME_PARTS = (("expert_compute_s", "expert compute"), ("non_moe_s", "dense layers"), ("a2a_s", "all-to-all"),
              ("replica_s", "replicas"), ("reorder_s", "migration"), ("optimizer_s", "optimizer"),
              ("overhead_s", "host"), ("planning_s", "live planning"), ("extra_s", "other"))


def relative_gpu_loads(results: dict[str, Any]) -> dict[str, Any]:
    """Each policy's ``[L, G]`` token copies per GPU (one steady micro-batch) over the layer's mean.

    1.0 everywhere is perfect balance; a layer without tokens reads 1.0. ``ideal`` and skipped
    rows are left out.
    """
    import numpy as np

    out = {}
    for name, r in results.items():
        if r.skipped or name == "ideal" or r.gpu_loads_LG is None:
            continue
        g = np.asarray(r.gpu_loads_LG, dtype=np.float64)
        mean = g.mean(axis=1, keepdims=True)
        out[name] = np.divide(g, mean, out=np.ones_like(g), where=mean > 0)
    return out


def time_breakdown(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each policy's modelled step seconds by part (:data:`TIME_PARTS` labels), skipped rows left out."""
    return {name: {label: float(r.breakdown_s.get(key, 0.0)) for key, label in TIME_PARTS}
            for name, r in results.items() if not r.skipped}


def plot_bench(results: dict[str, Any], path: str) -> None:
    """Step-time breakdown per policy, and every policy's GPU load relative to the mean on one scale.

    Top: stacked bars of the modelled step time (expert compute, dense layers, all-to-all,
    replicas, migration, other). Below: one heatmap per policy of :func:`relative_gpu_loads`
    (MoE layer x GPU) on one diverging colour scale centred on 1.0 (0 blue, 2x the mean and
    above full red), so a balanced policy is a pale field and the busiest GPUs of an unbalanced
    one stand out.
    Raises ValueError when matplotlib is missing (``pip install 'relibra[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
    except ImportError as exc:
        raise ValueError(f"--plot needs matplotlib ({exc}); pip install 'relibra[plot]'") from None
    import numpy as np

    parts = time_breakdown(results)
    maps = relative_gpu_loads(results)
    cols = max(1, len(maps))
    fig = plt.figure(figsize=(max(10.0, 2.6 * cols + 1.5), 4.0 + 3.8 * bool(maps)), layout="constrained")
    grid = fig.add_gridspec(2 if maps else 1, cols, height_ratios=[1.0, 1.1] if maps else None)
    ax = fig.add_subplot(grid[0, :])
    names = list(parts)
    left = np.zeros(len(names))
    for _, label in TIME_PARTS:
        widths = np.array([parts[n][label] for n in names])
        ax.barh(names, widths, left=left, label=label)
        left += widths
    for i, total in enumerate(left):
        ax.text(total, i, f" {total:.2f}s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("modelled step time (s)")
    ax.set_title("step time by part (relibra.sim.cost model, steady steps)")
    ax.legend(loc="lower right", fontsize=7, ncol=3)
    if maps:
        norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)  # 2x the mean and more: full red
        im = None
        for i, (name, rel) in enumerate(maps.items()):
            axm = fig.add_subplot(grid[1, i])
            im = axm.imshow(rel, aspect="auto", cmap="RdBu_r", norm=norm)
            axm.set_title(f"{name}\nbusiest/mean {float(rel.max(axis=1).mean()):.2f} (1 micro-batch)", fontsize=9)
            axm.set_xlabel("GPU")
            if i == 0:
                axm.set_ylabel("MoE layer")
        fig.colorbar(im, ax=fig.axes[1:], label="GPU load / layer mean (1 = balanced)", extend="max")
    fig.savefig(path, dpi=110)
    plt.close(fig)
