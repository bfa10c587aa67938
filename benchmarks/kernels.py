"""Benchmark the dispatch ops (permute, unpermute, assign_copies): Triton vs torch reference.

For each shape (tokens T, hidden D, K = 8, G groups = physical slots) it prints time and
effective bandwidth of every op and backend, next to the device's measured copy bandwidth
(a large ``tensor.copy_``), and checks that the backends agree.

    python benchmarks/kernels.py                 # full grid on CUDA, bf16 (< 5 min on one GPU)
    python benchmarks/kernels.py --quick         # 8k/32k tokens x 7168, 256/288 groups
    python benchmarks/kernels.py --device cpu --quick   # tiny shapes, reference only (logic check)

Groups: 256 = one slot per expert (no replicas); 288 = 256 home slots + 32 spare slots that
replicate the 32 hottest experts, tokens split evenly between the copies (assign_copies).
Bytes counted: permute reads T*D and writes R*D (R rows incl. padding); unpermute reads the
N kept copies and writes T*D; assign_copies reads ids and writes dest (int64).
Exits 0 with a message when the requested device is missing.

Results: none on a GPU yet. The development machines (2026-11) have no GPU, so the
targets (permute / unpermute >= 60 % of copy bandwidth and >= 3x the reference at 32k x 7168)
are unmeasured; only ``--device cpu --quick`` (reference only) has been run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from relibra import kernels
from relibra.kernels import reference as ref

K = 8
E = 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--tokens", type=int, nargs="*", help="override token counts")
    p.add_argument("--hidden", type=int, nargs="*", help="override hidden sizes")
    p.add_argument("--groups", type=int, nargs="*", help="override group counts (>= 256 on CUDA)")
    p.add_argument("--align", type=int, default=1, help="group padding for permute")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per op")
    return p.parse_args(argv)


def timer(device: torch.device, fn, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after 2 warm-ups (CUDA events on GPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """GB/s of ``dst.copy_(src)`` counting read + write."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    sec = timer(device, lambda: dst.copy_(src), reps)
    return 2 * nbytes / sec / 1e9


def make_plan(T: int, groups: int, device: torch.device, gen: torch.Generator):
    """Routes over E experts and a replica plan with ``groups - E`` replicas of the hottest."""
    num_experts = min(E, groups)
    scores = torch.rand(T, num_experts, generator=gen, device=device)
    scores += torch.linspace(0, 0.5, num_experts, device=device)  # skew: some experts are hot
    ids = scores.topk(min(K, num_experts), dim=1).indices
    loads = torch.bincount(ids.reshape(-1), minlength=num_experts)
    replicas = groups - num_experts
    X = 2 if replicas else 1
    slots = torch.full((num_experts, X), -1, dtype=torch.int64, device=device)
    slots[:, 0] = torch.arange(num_experts, device=device)
    counts = torch.zeros(num_experts, X, dtype=torch.int64, device=device)
    counts[:, 0] = loads
    if replicas:
        hot = loads.topk(replicas).indices
        slots[hot, 1] = num_experts + torch.arange(replicas, device=device)
        counts[hot, 1] = loads[hot] // 2
        counts[hot, 0] = loads[hot] - loads[hot] // 2
    ends = counts.cumsum(1)
    return ids, slots, ends, torch.zeros(num_experts, dtype=torch.int64, device=device)


def bench_shape(device, T, D, groups, align, backends, reps, gen):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ids, slots, ends, offset = make_plan(T, groups, device, gen)
    x = torch.randn(T, D, generator=gen, device=device).to(dtype)
    w = torch.rand(T, K, generator=gen, device=device)
    dest = ref.assign_copies(ids, slots, ends, offset)
    x_perm, row_index, offsets = ref.permute(x, dest, groups, align)
    R, kept = x_perm.shape[0], int((row_index >= 0).sum())
    el = x.element_size()
    nbytes = {"assign_copies": 2 * T * K * 8,
              "permute": (T + R) * D * el,
              "unpermute": (kept + T) * D * el}
    rows, want = [], {"assign_copies": dest, "permute": x_perm, "unpermute": None}
    for backend in backends:
        ops = {
            "assign_copies": lambda b=backend: kernels.assign_copies(ids, slots, ends, offset, backend=b),
            "permute": lambda b=backend: kernels.permute(x, dest, groups, align, backend=b)[0],
            "unpermute": lambda b=backend: kernels.unpermute(x_perm, row_index, w, backend=b),
        }
        for op, fn in ops.items():
            out = fn()
            if want[op] is None:
                want[op] = out
            ok = torch.equal(out, want[op]) if op != "unpermute" else torch.allclose(
                out.float(), want[op].float(), rtol=2e-2, atol=2e-2)
            sec = timer(device, fn, reps)
            rows.append(dict(op=op, backend=backend, T=T, D=D, G=groups, ms=sec * 1e3,
                             gbs=nbytes[op] / sec / 1e9, ok=ok))
            del out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device here; nothing measured "
              "(use --device cpu --quick to check the script's logic).")
        return 0
    if device.type == "cuda":
        tokens = args.tokens or ([8192, 32768] if args.quick else [8192, 32768, 65536])
        hidden = args.hidden or ([7168] if args.quick else [2048, 7168])
        groups = args.groups or [256, 288]
        backends = ["triton", "reference"]
        reps = args.reps or (5 if args.quick else 10)
        name = torch.cuda.get_device_name(device)
        bw = copy_bandwidth(device, 2 << 30, reps)
    else:
        tokens = args.tokens or [64, 256]
        hidden = args.hidden or [24, 96]
        groups = args.groups or [16, 18]
        backends = ["reference"]  # Triton on CPU only runs under the (slow) interpreter
        reps = args.reps or 3
        name = "cpu"
        bw = copy_bandwidth(device, 64 << 20, reps)
    if args.quick and device.type == "cpu":
        tokens, hidden = tokens[:1], hidden[:1]
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"device: {name}   copy bandwidth (read+write): {bw:.0f} GB/s   K={K}  align={args.align}")
    head = (f"{'op':<14}{'backend':<10}{'T':>7}{'D':>6}{'G':>5}{'ms':>10}{'GB/s':>9}{'%copy':>7}"
            f"{'x ref':>7}  ok")
    print(head)
    print("-" * len(head))
    all_ok = True
    for T in tokens:
        for D in hidden:
            for G in groups:
                rows = bench_shape(device, T, D, G, args.align, backends, reps, gen)
                ref_ms = {r["op"]: r["ms"] for r in rows if r["backend"] == "reference"}
                for r in rows:
                    speed = ref_ms[r["op"]] / r["ms"] if r["op"] in ref_ms else float("nan")
                    all_ok &= r["ok"]
                    print(f"{r['op']:<14}{r['backend']:<10}{r['T']:>7}{r['D']:>6}{r['G']:>5}"
                          f"{r['ms']:>10.3f}{r['gbs']:>9.1f}{100 * r['gbs'] / bw:>6.0f}%{speed:>7.2f}"
                          f"  {'yes' if r['ok'] else 'NO'}")
    if not all_ok:
        print("MISMATCH between backends (see the ok column)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
