"""The world ``relibra measure`` and ``relibra calibrate`` run in: one process per rank.

On CPU (no torchrun): G = nodes x gpus_per_node processes with gloo, each on ONE torch thread
and pinned to one core (``os.sched_setaffinity``, rank r on the r-th core this process may use),
so a rank owns a core the way a GPU rank owns its GPU. With more ranks than cores, ranks share
cores and the busiest rank no longer sets the pace alone: :func:`shared_core_warning` says so.

Under torchrun (``WORLD_SIZE`` / ``LOCAL_RANK`` set) every process is already a rank: NCCL on
``cuda:LOCAL_RANK`` when CUDA is available (gloo on CPU otherwise), the same code.

``launch(fn, nodes, gpus_per_node, args)`` calls ``fn(rank, mesh, device, *args)`` on every rank
(mesh ``(node, gpu)`` for several nodes, 1-D otherwise) and returns rank 0's result (None on the
other ranks of a torchrun world).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

__all__ = ["launch", "under_torchrun", "usable_cores", "shared_core_warning", "busy_machine_warning"]


def under_torchrun() -> bool:
    """True when this process is one rank of a torchrun (torch.distributed.run) world."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def usable_cores() -> list[int]:
    """Cores this process may run on, ascending."""
    return sorted(os.sched_getaffinity(0))


def shared_core_warning(world_size: int) -> str:
    """A warning when ``world_size`` CPU ranks would share cores, else ""."""
    if under_torchrun() and torch.cuda.is_available():
        return ""
    cores = len(usable_cores())
    if world_size <= cores:
        return ""
    return (f"warning: {world_size} ranks share {cores} cores: a rank waiting for the busiest one gives its "
            f"core away, so shared cores hide the gain from balance (measured speed-ups understate it)")


def busy_machine_warning() -> str:
    """A warning when other processes already keep the cores busy (1-minute load average), else ""."""
    cores = len(usable_cores())
    load = os.getloadavg()[0]
    if load <= 0.5 * cores:
        return ""
    return (f"warning: load average {load:.2f} on {cores} cores before the run: other processes compete for the "
            f"ranks' cores, so times are slower and noisier than on a quiet machine")


def _pinned(rank: int, mesh, fn: Callable[..., Any], cores: list[int], args: tuple) -> Any:
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    torch.set_num_threads(1)
    return fn(rank, mesh, torch.device("cpu"), *args)


def _torchrun(fn: Callable[..., Any], nodes: int, gpus_per_node: int, args: tuple) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if world != nodes * gpus_per_node:
        raise ValueError(f"torchrun started {world} processes, but --nodes {nodes} x --gpus-per-node "
                         f"{gpus_per_node} = {nodes * gpus_per_node} ranks")
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend, kind = torch.device("cuda", local), "nccl", "cuda"
    else:  # a CPU world under torchrun: pinned as without it
        device, backend, kind = torch.device("cpu"), "gloo", "cpu"
        cores = usable_cores()
        os.sched_setaffinity(0, {cores[local % len(cores)]})
        torch.set_num_threads(1)
    dist.init_process_group(backend)
    try:
        if nodes > 1:
            mesh = init_device_mesh(kind, (nodes, gpus_per_node), mesh_dim_names=("node", "gpu"))
        else:
            mesh = init_device_mesh(kind, (gpus_per_node,), mesh_dim_names=("gpu",))
        out = fn(dist.get_rank(), mesh, device, *args)
        return out if dist.get_rank() == 0 else None
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nodes: int, gpus_per_node: int, args: tuple = (),
           timeout: float = 3600.0) -> Any:
    """Run ``fn(rank, mesh, device, *args)`` on every rank; rank 0's result (see the module doc).

    A rank that raises makes every rank stop: :class:`relibra.testing.WorldError` (CPU) names it.
    """
    if under_torchrun():
        return _torchrun(fn, nodes, gpus_per_node, args)
    from ..testing import run_world

    G = nodes * gpus_per_node
    return run_world(_pinned, world_size=G, nodes=nodes, args=(fn, usable_cores(), args), timeout=timeout)[0]
