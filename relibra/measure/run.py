"""``relibra measure`` and ``relibra calibrate`` end to end: check, launch the world, report.

``run_measure(options, profile)`` returns the result object that ``relibra measure --json``
prints (``{"topology", "options", "profile", "cost", "gemm_probe", "policies": {NAME: {...}},
"warnings"}``); without a
profile it first runs :func:`relibra.measure.calibrate.calibrate_rank` in the same world and prices
with that. ``run_calibrate(options)`` returns a profile dict (:mod:`relibra.sim.profile`).
Under torchrun both return None on every rank but rank 0.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..sim.cost_config import CostConfig
from ..sim.profile import Profile, profile_from_dict
from .calibrate import calibrate_rank, fit_profile
from .options import MeasureOptions
from .report import add_ratios, gemm_drift, measured_config, policy_report
from .step import measure_rank
from .world import busy_machine_warning, launch, shared_core_warning, under_torchrun

__all__ = ["run_measure", "run_calibrate", "measure_fault", "backend_name"]


def backend_name() -> str:
    """The process-group backend this process would measure with."""
    return "nccl" if under_torchrun() and torch.cuda.is_available() else "gloo"


def measure_fault(o: MeasureOptions, profile: Profile | None) -> str:
    """Why ``relibra measure`` cannot run ``o`` with ``profile``, or "": a bad option, or a profile
    of another world (other rank count or backend)."""
    fault = o.fault()
    if fault or profile is None:
        return fault
    backend = backend_name()
    if profile.world_size != o.world_size or profile.machine["backend"] != backend:
        return (f"profile {profile.source} was measured with {profile.machine['backend']} on {profile.world_size} "
                f"ranks; this run has {o.world_size} ranks ({backend}): run relibra calibrate with the same "
                f"--nodes and --gpus-per-node")
    return ""


def _measure_world(rank: int, mesh, device: torch.device, o: MeasureOptions, calibrate_first: bool,
                   cost_model: CostConfig | None):
    raw = calibrate_rank(rank, mesh, device, o, repeats=1) if calibrate_first else None
    measured = measure_rank(rank, mesh, device, o, cost_model)
    return (raw, measured, str(dist.get_backend()), device.type) if rank == 0 else None


def _calibrate_world(rank: int, mesh, device: torch.device, o: MeasureOptions, repeats: int):
    raw = calibrate_rank(rank, mesh, device, o, repeats)
    return (raw, str(dist.get_backend()), device.type) if rank == 0 else None


def run_measure(o: MeasureOptions, profile: Profile | None = None) -> dict | None:
    """Measure every policy of ``o`` and price its plans (see the module doc)."""
    fault = measure_fault(o, profile)
    if fault:
        raise ValueError(fault)
    warnings = [w for w in (shared_core_warning(o.world_size), busy_machine_warning()) if w]
    before = os.getloadavg()[0]
    # the profile's model prices the Balancer's moves too (its placement guard; see Balancer)
    cost_model = None if profile is None else measured_config(o, profile)
    out = launch(_measure_world, o.nodes, o.gpus_per_node, (o, profile is None, cost_model))
    if out is None:
        return None
    raw, measured, backend, device = out
    after = os.getloadavg()[0]
    if profile is None:
        profile = profile_from_dict(fit_profile(raw, o, backend, device), "measured in this run (relibra calibrate "
                                                                          "probes, 1 repeat)")
    cfg = measured_config(o, profile)
    policies = {name: policy_report(measured["policies"][name], o, cfg) for name in o.policies}
    add_ratios(policies)
    topology = {"nodes": o.nodes, "gpus_per_node": o.gpus_per_node, "ranks": o.world_size, "experts": o.experts,
                "home_slots": o.home_slots, "spare_slots": o.spare_slots, "backend": backend, "device": device,
                "cores": len(os.sched_getaffinity(0)), "load_average_before": before, "load_average_after": after}
    return {"topology": topology, "options": o.to_dict(), "profile": profile.source,
            "cost": profile.cost, "gemm_probe": gemm_drift(measured["gemm_probe"], o, cfg), "policies": policies,
            "warnings": warnings}


def run_calibrate(o: MeasureOptions, repeats: int = 5) -> dict | None:
    """Measure the machine parameters on the world of ``o``; a profile dict (rank 0)."""
    o.check()
    before = os.getloadavg()
    out = launch(_calibrate_world, o.nodes, o.gpus_per_node, (o, repeats))
    if out is None:
        return None
    raw, backend, device = out
    return fit_profile(raw, o, backend, device, before)
