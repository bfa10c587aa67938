"""Helpers for small multi-process gloo tests: spawn a world, run a function, collect results.

``run_world(fn, world_size=4, nodes=2, args=(), timeout=120)`` starts ``world_size`` processes on
a free port, builds a ``(node, gpu)`` DeviceMesh in each, calls ``fn(rank, mesh, *args)`` and
returns the list of every rank's result. If any rank raises, :class:`WorldError` is raised with
every rank's outcome (``.errors``: rank -> (exception type name, message)); if the world does
not finish within ``timeout`` seconds, every process is killed and TimeoutError is raised, so a
hung collective never hangs the test run.

Results travel back pickled by value (the worker's own objects, never a data file) through a
multiprocessing queue; keep them small (lists and dicts of CPU tensors are fine).
"""

from __future__ import annotations

import os
import pickle
import queue as _queue
import socket
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

__all__ = ["run_world", "free_port", "WorldError"]


class WorldError(RuntimeError):
    """Some rank raised. ``errors`` maps rank -> (exception type name, message)."""

    def __init__(self, errors: dict[int, tuple[str, str]], tracebacks: dict[int, str]):
        self.errors, self.tracebacks = errors, tracebacks
        lines = [f"rank {r}: {t}: {m}" for r, (t, m) in sorted(errors.items())]
        super().__init__("distributed run failed:\n" + "\n".join(lines) + "\n--- first traceback ---\n"
                         + tracebacks[min(tracebacks)])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, nodes, port, fn, args, out_queue):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        from torch.distributed.device_mesh import init_device_mesh

        if nodes > 1:
            mesh = init_device_mesh("cpu", (nodes, world_size // nodes), mesh_dim_names=("node", "gpu"))
        else:
            mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("gpu",))
        result = fn(rank, mesh, *args)
        # by value: a tensor put on a torch.multiprocessing queue travels as a shared-memory
        # handle that dies with this process, which may exit before the parent reads it
        out_queue.put((rank, "ok", pickle.dumps(result), ""))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out_queue.put((rank, "error", (type(exc).__name__, str(exc)), traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # pragma: no cover
                pass


def run_world(fn: Callable[..., Any], world_size: int = 4, nodes: int = 2, args: tuple = (),
              timeout: float = 120.0, grace: float = 15.0, start_method: str | None = None) -> list[Any]:
    """Run ``fn(rank, mesh, *args)`` on ``world_size`` gloo processes; see the module doc.

    Ranks are forked where the OS allows (``start_method`` or env ``RELIBRA_TEST_START_METHOD``
    override; with ``spawn`` ``fn`` must be a module-level function). Once a rank
    failed, the others get ``grace`` seconds to report before the world is killed.
    """
    if world_size % nodes:
        raise ValueError(f"world_size={world_size} is not divisible by nodes={nodes}")
    if start_method is None:  # fork skips re-importing torch in every rank (seconds on busy CPUs)
        start_method = os.environ.get("RELIBRA_TEST_START_METHOD") or (
            "fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ctx = mp.get_context(start_method)
    out_queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, nodes, port, fn, args, out_queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, tuple[str, str]] = {}
    tbs: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if errors:
                    raise WorldError(errors, tbs)
                missing = sorted(set(range(world_size)) - set(results) - set(errors))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout} s (hang?); "
                                   f"errors so far: {errors}")
            try:
                rank, status, payload, tb = out_queue.get(timeout=min(remaining, 1.0))
            except _queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None) and r not in results and r not in errors]
                if dead:
                    # a crashed rank never reports; give the others a moment, then fail
                    time.sleep(1.0)
                    while True:
                        try:
                            rank, status, payload, tb = out_queue.get_nowait()
                        except _queue.Empty:
                            break
                        if status == "ok":
                            results[rank] = pickle.loads(payload)
                        else:
                            errors[rank] = payload
                        if tb:
                            tbs[rank] = tb
                    for r in dead:
                        if r not in results and r not in errors:
                            errors[r] = ("ProcessDied", f"exit code {procs[r].exitcode}")
                            tbs[r] = ""
                    if len(results) + len(errors) < world_size:
                        raise WorldError(errors, tbs or {dead[0]: ""}) from None
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)  # written by our own worker above
            else:
                errors[rank] = payload
                tbs[rank] = tb
                # the others may be stuck in a collective the failed rank never joins
                deadline = min(deadline, time.monotonic() + grace)
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise WorldError(errors, tbs)
    return [results[r] for r in range(world_size)]
