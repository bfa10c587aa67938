"""Cost of the control plane around ReLibraMoE: the forward's agreement (CPU gloo) and the host
layouts of a replayed micro-batch.

    python benchmarks/control_plane.py [--calls 200 --batches 5 --worlds 2 4] [--layouts-only]

``ReLibraMoE.forward`` agrees its input verdict and its position (phase, micro-batch, layer)
over the expert-parallel group with :func:`relibra.runtime.comm.agree` (one all-reduce of two
int64 when all is well), so a bad input or a rank out of step raises on all. This prints, per
world size (gloo ranks on this machine, a flat group), microseconds per call: ``agree`` at one
position key with no error (the cost every forward pays), with the last rank elsewhere (plus
an all-gather of the keys), ``first_error`` with no error and with an error on the last rank
(the all-reduce plus the text exchange), and a bare ``all_reduce`` of one int64 for reference.
Best batch of ``--calls`` calls, after a warm-up.

Then, in this process, the time ``Balancer.micro_batch`` spends on the layouts of one replayed
micro-batch for all layers (``slot_tables`` + ``replay_layouts``: every split size, row order
and grouped-GEMM offset, so that the forward and backward read nothing back from the device),
for the layer benchmark's size and two model-sized ones (``copies``: token copies each rank
sends per layer), with ``replicate`` plans of random skewed loads, best of ``--batches``
repeats, on one thread; and, of that, the row orders' expansion, which runs on the device on a
GPU (one value per received row) and on the CPU here.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from relibra import Topology, get_policy
from relibra.runtime.comm import agree, first_error
from relibra.runtime.layout import replay_layouts, slot_order, slot_tables, split_counts
from relibra.testing import run_world

#: (name, nodes, GPUs per node, experts, MoE layers, spare slots per GPU, token copies per rank)
LAYOUT_SIZES = [("layer benchmark", 2, 2, 16, 2, 1, 1024), ("Qwen3-30B-A3B, 8 GPUs", 1, 8, 128, 48, 1, 32768),
                ("DeepSeek-V3, 64 GPUs", 8, 8, 256, 58, 2, 65536)]


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


def _layout_ms(nodes, gpus, E, L, S, copies, batches) -> tuple[float, float]:
    """Milliseconds for one micro-batch's layouts of all layers on rank 0 and, of them, the row
    orders' expansion (``slot_order``: device work on a GPU, on the CPU here); best of batches."""
    t = Topology(nodes, gpus, E, S)
    gen = torch.Generator().manual_seed(0)
    G, SL = t.num_gpus, t.slots_per_gpu
    popularity = torch.rand(L, 1, E, generator=gen) ** 4 + 0.05  # a few hot experts per layer
    source_LGE = torch.distributions.Multinomial(copies, probs=popularity.expand(L, G, E)).sample().long()
    plan = get_policy("replicate").plan(source_LGE.sum(1)[None], t)
    best, orders = float("inf"), float("inf")
    for _ in range(batches):
        start = time.perf_counter()
        tables = slot_tables(plan.placement.home_experts, plan.spare_experts[0], plan.slot_tokens[0], t)
        replay_layouts(tables, source_LGE, t, 0, "cpu")
        best = min(best, time.perf_counter() - start)
        recv_LGS = split_counts(tables, source_LGE, SL)[:, :, :SL]
        start = time.perf_counter()
        slot_order(recv_LGS, "cpu")
        orders = min(orders, time.perf_counter() - start)
    return best * 1e3, orders * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layouts-only", action="store_true", help="skip the agreement (gloo) part")
    args = parser.parse_args()
    rows = []
    for world in [] if args.layouts_only else args.worlds:
        results = run_world(_worker, world_size=world, nodes=1, args=(args.calls, args.batches), timeout=300)
        for op in results[0]:
            rows.append((world, op, max(r[op] for r in results)))  # the slowest rank's figure
    head = f"{'ranks':>5s}  {'operation':38s} {'us per call':>11s}"
    print(head)
    print("-" * len(head))
    for world, op, us in rows:
        print(f"{world:5d}  {op:38s} {us:11.0f}")
    head = (f"\n{'layouts of one replayed micro-batch':36s} {'GPUs':>5s} {'E':>4s} {'L':>3s} {'S':>2s} "
            f"{'ms':>7s} {'of which row orders':>20s}")
    print(head)
    print("-" * (len(head) - 1))
    torch.set_num_threads(1)  # one core, as a rank owns; spare the shared cores' thread hand-offs
    for name, nodes, gpus, E, L, S, copies in LAYOUT_SIZES:
        ms, orders = _layout_ms(nodes, gpus, E, L, S, copies, args.batches)
        print(f"{name:36s} {nodes * gpus:5d} {E:4d} {L:3d} {S:2d} {ms:7.1f} {orders:20.1f}")

if __name__ == "__main__":
    main()
