"""``relibra calibrate``: measure, on the ranks at hand, what the cost model assumes.

Legend: G ranks, E experts, H = E / G home slots per rank, D dim, I hidden, L MoE layers,
r rows (token copies) one expert slot computes.

Every rank runs every probe at the same time (between barriers), as in a real step, and the
slowest rank's time counts; each figure is the median of its repeats, the statistic ``relibra
measure`` reports (:mod:`relibra.measure.probes` says why). Probes and the cost parameters
fitted from them (:func:`fit_profile`):

- ``gemm``: ``expert_mlp`` (the layer's grouped GEMM) over ``min(H, 4)`` slots of r rows each,
  forward and forward + backward, r from 8 to 1024, the sweep repeated (interleaved) rather than
  each row count timed in a run. A straight line per slot,
  ``t(r) = a + b r``, gives the forward rate ``peak_flops = 2 x 3 D I / b_fwd`` (``mfu`` 1),
  ``backward_factor = b_fb / b_fwd - 1`` and ``expert_half_rows = a_fb / b_fb``: the rows whose
  time one slot's fixed cost equals (weights read and weight gradients written whatever r is),
  i.e. efficiency ``r / (r + n_half)``.
- ``a2a``: ``all_to_all_single`` of B bytes per peer: ``t = latency + (G - 1) B / bandwidth``
  gives ``message_latency_s`` and both link bandwidths (all ranks of one host share one link
  kind; on several hosts the slowest pair shows).
- ``p2p``: ``batch_isend_irecv`` around the ring, B bytes each way: reported, not fitted.
- ``migration``: :func:`relibra.runtime.migration.migrate_experts` swapping k experts per layer
  between neighbouring ranks, with AdamW state: its time beyond ``bytes / bandwidth`` per byte
  moved in and out is ``migration_s_per_byte`` (packing and checksums).
- ``optimizer``: ``AdamW.step`` over this rank's expert and router parameters:
  ``optimizer_s_per_param``.
- ``layer_call``: a stack of L ``ReLibraMoE`` layers under a ``static`` Balancer with 16 tokens
  per rank: one micro-batch's forward + backward, less its modelled GEMM and transfers, per
  layer is ``layer_call_s``; ``plan_step`` is ``step_overhead_s``.

Every probe runs in ``dtype`` (float32 by default, as ``relibra calibrate``; bf16 on a GPU, as
``benchmarks/gpu_check.py``), and the profile's byte sizes follow it. A world of one rank (one
GPU) has no link to measure: ``a2a`` and ``migration`` are skipped there, and the link parameters
(``message_latency_s``, both bandwidths, ``migration_s_per_byte``) keep :class:`CostConfig`'s
defaults, listed in the profile under ``measured.not_measured``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from ..plan import Placement
from ..runtime.migration import migrate_experts
from ..sim.cost import CostConfig
from ..sim.profile import PROFILE_FORMAT, PROFILE_VERSION
from .options import MeasureOptions
from .probes import GemmProbe, timed, timed_samples
from .routes import step_routes
from .step import build_stack

__all__ = ["calibrate_rank", "fit_profile", "GEMM_ROWS", "A2A_BYTES", "LINK_PARAMETERS"]

GEMM_ROWS = (8, 32, 128, 512, 1024)
A2A_BYTES = (16 << 10, 256 << 10, 1 << 20, 4 << 20)
_TINY_TOKENS = 16
#: cost parameters only a world of several ranks can measure
LINK_PARAMETERS = ("intra_node_bandwidth", "inter_node_bandwidth", "message_latency_s", "migration_s_per_byte")


def _gemm(o: MeasureOptions, device: torch.device, repeats: int, dtype: torch.dtype = torch.float32,
          sweep: tuple[int, ...] = GEMM_ROWS) -> dict:
    """Seconds per slot of the GEMM probe over ``sweep``, forward and forward + backward: medians
    of ``repeats`` rounds, each round timing every row count once (so that a slow minute of the
    machine slows every row count alike instead of bending the line)."""
    slots = min(o.home_slots, 4)
    probe = GemmProbe(o.dim, o.hidden, slots, device, dtype)
    fwd: list[list[float]] = [[] for _ in sweep]
    fb: list[list[float]] = [[] for _ in sweep]
    for r in sweep:  # untimed: first-touch allocation, gradient buffers
        probe.forward(r)
        probe.forward_backward(r)
    for _ in range(repeats):
        for i, r in enumerate(sweep):
            fwd[i] += timed_samples(partial(probe.forward, r), 1, device, warm=False)
            fb[i] += timed_samples(partial(probe.forward_backward, r), 1, device, warm=False)
    med = statistics.median
    return {"slots": slots, "dtype": str(dtype).removeprefix("torch."), "rows": list(sweep),
            "fwd_s_per_slot": [med(t) / slots for t in fwd], "fwd_bwd_s_per_slot": [med(t) / slots for t in fb]}


def _ring(send: torch.Tensor, recv: torch.Tensor) -> None:
    """Send to the next rank and receive from the previous one (point to point)."""
    G, rank = dist.get_world_size(), dist.get_rank()
    ops = [dist.P2POp(dist.isend, send, (rank + 1) % G), dist.P2POp(dist.irecv, recv, (rank - 1) % G)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def _a2a(device: torch.device, repeats: int) -> dict:
    G = dist.get_world_size()
    out = {"bytes_per_peer": [], "a2a_s": [], "p2p_s": []}
    for nbytes in A2A_BYTES:
        n = nbytes // 4
        send = torch.randn(n * G, device=device)
        out["bytes_per_peer"].append(nbytes)
        out["a2a_s"].append(timed(partial(dist.all_to_all_single, torch.empty_like(send), send), repeats, device))
        out["p2p_s"].append(timed(partial(_ring, send[:n], torch.empty_like(send[:n])), repeats, device))
    return out


def _swap_placement(placement: Placement, G: int, H: int, k: int) -> Placement:
    """Rank g's first k home experts trade places with rank g+1's (g even), in every layer."""
    he = placement.home_experts.clone()
    for g in range(0, G - 1, 2):
        for j in range(k):
            a, b = g * H + j, (g + 1) * H + j
            he[:, [a, b]] = he[:, [b, a]]
    return Placement(he)


def _there_and_back(tensors, opt, old: Placement, new: Placement, topology, group, sent: list[int]) -> None:
    """Migrate ``old -> new`` and back (so the stack ends where it began); note the bytes sent."""
    sent.append(migrate_experts(tensors, opt, old, new, topology, group=group).bytes_sent)
    migrate_experts(tensors, opt, new, old, topology, group=group)


def _step_probes(rank: int, mesh, device: torch.device, o: MeasureOptions, repeats: int,
                 dtype: torch.dtype = torch.float32) -> dict:
    """Layer call, plan_step, AdamW and migration (with more than one rank) on a real static stack."""
    G = dist.get_world_size()
    layers, opt, bal = build_stack(o, mesh, device, "static", dtype)
    routes = step_routes(o.seed, 0, rank, 1, _TINY_TOKENS, o.layers, o.experts, o.top_k, G, 0.0)
    x = torch.randn(_TINY_TOKENS, o.dim, device=device, dtype=dtype)

    def micro_batch():
        with bal.micro_batch(0):
            h = x
            for layer in layers:
                h = layer(h)
            h.square().mean().backward()

    plan_step = timed(lambda: bal.plan_step(routes), repeats, device)
    call = timed(micro_batch, repeats, device)
    params = sum(getattr(p, "_local_tensor", p).numel() for p in layers.parameters())
    adamw = timed(opt.step, repeats, device)  # state exists after the untimed first call
    tensors = [[layer.experts.gate_up_proj, layer.experts.down_proj] for layer in layers]
    H = o.home_slots
    moves = {"experts_per_layer": [], "bytes_sent": [], "seconds": []}
    for k in sorted({1, max(1, H // 2)}) if G > 1 else ():  # one rank: nothing to move
        sent: list[int] = []
        swap = partial(_there_and_back, tensors, opt, bal.placement, _swap_placement(bal.placement, G, H, k),
                       bal.topology, bal.group, sent)
        moves["experts_per_layer"].append(k)
        moves["seconds"].append(timed(swap, repeats, device) / 2)
        moves["bytes_sent"].append(max(sent))
    return {"tokens": _TINY_TOKENS, "plan_step_s": plan_step, "micro_batch_s": call,
            "optimizer_params": params, "optimizer_s": adamw, "migration": moves}


def calibrate_rank(rank: int, mesh, device: torch.device, o: MeasureOptions, repeats: int = 3,
                   dtype: torch.dtype = torch.float32, gemm_rows: tuple[int, ...] = GEMM_ROWS) -> dict | None:
    """Every probe of the module doc on this rank, in ``dtype``, the GEMM over ``gemm_rows`` rows per
    slot; rank 0 returns the raw measurements (``a2a`` None in a world of one rank)."""
    out = {"gemm": _gemm(o, device, repeats, dtype, gemm_rows),
           "a2a": _a2a(device, repeats) if dist.get_world_size() > 1 else None,
           "step": _step_probes(rank, mesh, device, o, repeats, dtype)}
    return out if rank == 0 else None


def _line(x: list[float], t: list[float]) -> tuple[float, float]:
    """``(a, b)`` of ``t = a + b x`` by least squares on relative error, ``a`` clamped at 0.

    Times that do not grow with ``x`` (noise swamping a small probe on a busy machine) would give
    ``b <= 0``, no rate at all: the line then goes through the origin and the largest ``x``'s point.
    """
    X, T = np.asarray(x, dtype=np.float64), np.asarray(t, dtype=np.float64)
    w = 1.0 / T
    a, b = np.linalg.lstsq(np.stack([w, X * w], 1), np.ones_like(T), rcond=None)[0]
    if a < 0:  # a line through the origin
        a, b = 0.0, float((X * T * w * w).sum() / (X * X * w * w).sum())
    if b <= 0:
        last = int(X.argmax())
        a, b = 0.0, float(T[last] / X[last])
    return float(a), float(b)


def fit_profile(raw: dict, o: MeasureOptions, backend: str, device: str,
                load_average: tuple[float, float, float] | None = None) -> dict:
    """A profile (see :mod:`relibra.sim.profile`) from :func:`calibrate_rank`'s measurements.

    ``load_average``: the machine's before the probes (default: now).
    """
    g = raw["gemm"]
    a_f, b_f = _line(g["rows"], g["fwd_s_per_slot"])
    a_fb, b_fb = _line(g["rows"], g["fwd_bwd_s_per_slot"])
    expert_params = 3.0 * o.dim * o.hidden
    flops = 2.0 * expert_params / b_f
    backward_factor = max(0.0, b_fb / b_f - 1.0)
    half_rows = a_fb / b_fb
    G = o.world_size
    c = raw["a2a"]
    defaults = CostConfig()
    if c is None:  # one rank: no link
        latency, bandwidth = defaults.message_latency_s, defaults.intra_node_bandwidth
    else:
        latency, s_per_byte = _line([(G - 1) * b for b in c["bytes_per_peer"]], c["a2a_s"])
        bandwidth = 1.0 / s_per_byte
    s = raw["step"]
    inter = defaults.inter_node_bandwidth if c is None else bandwidth
    cost = dict(peak_flops=flops, mfu=1.0, backward_factor=backward_factor, expert_half_rows=half_rows,
                intra_node_bandwidth=bandwidth, inter_node_bandwidth=inter, message_latency_s=latency,
                optimizer_s_per_param=s["optimizer_s"] / s["optimizer_params"])
    # the tiny micro-batch: ~T K G / E rows per expert, every home slot busy
    rows = _TINY_TOKENS * o.top_k * G / o.experts
    gemm_s = o.home_slots * (rows + half_rows) * b_fb
    element = float(torch.empty(0, dtype=getattr(torch, g.get("dtype", "float32"))).element_size())
    a2a_s = 4 * (latency + _TINY_TOKENS * o.top_k * (G - 1) / G * o.dim * element / bandwidth) if G > 1 else 0.0
    cost["layer_call_s"] = max(0.0, s["micro_batch_s"] / o.layers - gemm_s - a2a_s)
    cost["step_overhead_s"] = s["plan_step_s"]
    m = s["migration"]
    if not m["bytes_sent"]:
        cost["migration_s_per_byte"] = defaults.migration_s_per_byte
    else:
        if len(m["bytes_sent"]) >= 2:
            _, per_byte = _line(m["bytes_sent"], m["seconds"])
        else:
            per_byte = m["seconds"][0] / m["bytes_sent"][0]
        cost["migration_s_per_byte"] = max(0.0, (per_byte - 1.0 / bandwidth) / 2.0)
    cost.update(a2a_bytes=element, weight_bytes=element, replica_grad_bytes=element,
                state_bytes_per_param=3 * element,  # weight + AdamW exp_avg, exp_avg_sq (grads are None then)
                a2a_overlap=0.0, replica_overlap=0.0, reorder_overlap=0.0, replica_reuse=1.0,
                state_move_overlap=0.0)  # one core per rank: the deferred state's transfer shares it
    measured = dict(raw, not_measured=list(LINK_PARAMETERS) if G == 1 else [])
    return {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION,
        "machine": {"host": platform.node(), "processor": platform.processor() or platform.machine(),
                    "cores": len(os.sched_getaffinity(0)), "backend": backend, "device": device,
                    "torch": torch.__version__, "dtype": g.get("dtype", "float32"),
                    "load_average": list(load_average or os.getloadavg())},
        "world": {"nodes": o.nodes, "gpus_per_node": o.gpus_per_node},
        "sizes": {k: v for k, v in dataclasses.asdict(o).items()
                  if k in ("dim", "hidden", "experts", "top_k", "layers", "spare_slots")},
        "cost": cost,
        "measured": measured,
    }
