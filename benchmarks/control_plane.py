"""Cost of the control-plane agreement that guards every ReLibraMoE forward, CPU gloo.

    python benchmarks/control_plane.py [--calls 200 --batches 5 --worlds 2 4]

``ReLibraMoE.forward`` agrees its input verdict and its position (phase, micro-batch, layer)
over the expert-parallel group with :func:`relibra.runtime.comm.agree` (one all-reduce of two
int64 when all is well), so a bad input or a rank out of step raises on all. This prints, per
world size (gloo ranks on this machine, a flat group), microseconds per call: ``agree`` at one
position key with no error (the cost every forward pays), with the last rank elsewhere (plus
an all-gather of the keys), ``first_error`` with no error and with an error on the last rank
(the all-reduce plus the text exchange), and a bare ``all_reduce`` of one int64 for reference.
Best batch of ``--calls`` calls, after a warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from relibra.runtime.comm import agree, first_error
from relibra.testing import run_world


def _per_call(fn, calls: int, batches: int) -> float:
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(batches):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _worker(rank, mesh, calls, batches):
    group = dist.group.WORLD
    last = dist.get_world_size() - 1
    flag = torch.zeros(1, dtype=torch.int64)
    return {
        "agree at one position, no error": _per_call(lambda: agree("", group, 12345), calls, batches),
        "agree, last rank out of step": _per_call(
            lambda: agree("", group, 12345 + (rank == last)), calls, batches),
        "first_error, no error": _per_call(lambda: first_error("", group), calls, batches),
        "first_error, error on one rank": _per_call(
            lambda: first_error("bad input" if rank == last else "", group), calls, batches),
        "all_reduce of one int64": _per_call(lambda: dist.all_reduce(flag, group=group), calls, batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    rows = []
    for world in args.worlds:
        results = run_world(_worker, world_size=world, nodes=1, args=(args.calls, args.batches), timeout=300)
        for op in results[0]:
            rows.append((world, op, max(r[op] for r in results)))  # the slowest rank's figure
    head = f"{'ranks':>5s}  {'operation':38s} {'us per call':>11s}"
    print(head)
    print("-" * len(head))
    for world, op, us in rows:
        print(f"{world:5d}  {op:38s} {us:11.0f}")


if __name__ == "__main__":
    main()
