"""gpu_check section ``kernels``: permute / unpermute / assign_copies, forward and backward, timed and
compared with the torch reference (helpers of benchmarks/kernels.py: plan, timer, copy bandwidth).

Legend: T tokens, K = 8 copies per token, D hidden, G groups (physical slots), R permuted rows,
N kept copies. Bytes counted per op (``el`` bytes per element of x):

    assign_copies  fwd  reads ids, writes dest (int64): 2 T K 8
    permute        fwd  reads T D, writes R D            bwd  reads N rows of grad, writes T D
    unpermute      fwd  reads N rows, writes T D         bwd  reads T D grad and N rows of y (for the
                                                              weights' gradient), writes R D

A row's ``exact`` says whether the backend's outputs (or gradients) equal the reference's bit for
bit; ``max_diff`` is the largest absolute difference. permute and assign_copies must be exact;
unpermute and the backward passes sum K products in float32, so they pass within bf16 tolerance
(``allclose`` rtol = atol = 2e-2) and report whether they are exact too.
"""

from __future__ import annotations

import time

import kernels as kernel_bench  # benchmarks/kernels.py (this directory is on sys.path)
import torch

from relibra import kernels
from relibra.kernels import reference as ref

K = kernel_bench.K
#: the shape the issue's speed targets are judged at (T, D, G)
TARGET_SHAPE = (32768, 7168, 256)
MIN_COPY_SHARE, MIN_SPEEDUP = 0.60, 3.0


def _compare(got, want) -> tuple[bool, float, bool]:
    """``(exact, max abs diff, within bf16 tolerance)`` of two tensors or tuples of tensors."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    exact = all(torch.equal(g, w) for g, w in zip(got, want))
    diff = max((float((g.float() - w.float()).abs().max()) if g.numel() else 0.0) for g, w in zip(got, want))
    close = all(torch.allclose(g.float(), w.float(), rtol=2e-2, atol=2e-2) for g, w in zip(got, want))
    return exact, diff, close


def _ops(backend, x, dest, G, w, x_perm, row_index, g_perm, g_out, plan):
    """``{(op, direction): fn}`` of one backend; a backward fn differentiates a graph built once."""
    ids, slots, ends, offset = plan
    xx = x.detach().clone().requires_grad_()
    perm_out = kernels.permute(xx, dest, G, backend=backend)[0]
    yy, ww = x_perm.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    un_out = kernels.unpermute(yy, row_index, ww, backend=backend)
    return {
        ("assign_copies", "fwd"): lambda: kernels.assign_copies(ids, slots, ends, offset, backend=backend),
        ("permute", "fwd"): lambda: kernels.permute(x, dest, G, backend=backend),
        ("permute", "bwd"): lambda: torch.autograd.grad(perm_out, xx, g_perm, retain_graph=True)[0],
        ("unpermute", "fwd"): lambda: kernels.unpermute(x_perm, row_index, w, backend=backend),
        ("unpermute", "bwd"): lambda: torch.autograd.grad(un_out, (yy, ww), g_out, retain_graph=True),
    }


def measure_shape(device: torch.device, T: int, D: int, G: int, backends: list[str], reps: int,
                  gen: torch.Generator, dtype: torch.dtype, timed: tuple[str, ...]) -> list[dict]:
    """Every op and direction of every backend at one shape; the reference runs first and is the oracle.

    Backends in ``timed`` get the median of ``reps`` runs; the others only the time of their one
    call (the Triton interpreter on CPU: exactness is all it can show)."""
    plan = kernel_bench.make_plan(T, G, device, gen)
    x = torch.randn(T, D, generator=gen, device=device).to(dtype)
    w = torch.rand(T, K, generator=gen, device=device)
    dest = ref.assign_copies(*plan)
    x_perm, row_index, _ = ref.permute(x, dest, G)
    R, N, el = x_perm.shape[0], int((row_index >= 0).sum()), x.element_size()
    g_perm = torch.randn(x_perm.shape, generator=gen, device=device).to(dtype)
    g_out = torch.randn(T, D, generator=gen, device=device).to(dtype)
    nbytes = {("assign_copies", "fwd"): 2 * T * K * 8, ("permute", "fwd"): (T + R) * D * el,
              ("permute", "bwd"): (N + T) * D * el, ("unpermute", "fwd"): (N + T) * D * el,
              ("unpermute", "bwd"): (T + N + R) * D * el}
    rows, want = [], {}
    for backend in ["reference"] + [b for b in backends if b != "reference"]:
        ops = _ops(backend, x, dest, G, w, x_perm, row_index, g_perm, g_out, plan)
        for (op, direction), fn in ops.items():
            t0 = time.perf_counter()
            out = fn()
            sec = time.perf_counter() - t0
            if backend == "reference":
                want[op, direction] = out
                exact, diff, close = True, 0.0, True
            else:
                exact, diff, close = _compare(out, want[op, direction])
            if backend in timed:
                sec = kernel_bench.timer(device, fn, reps)
            must_be_exact = direction == "fwd" and op != "unpermute"
            rows.append(dict(op=op, dir=direction, backend=backend, T=T, D=D, G=G, ms=sec * 1e3,
                             gbs=nbytes[op, direction] / sec / 1e9, exact=exact, max_diff=diff,
                             ok=exact if must_be_exact else close))
            del out
        del ops
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(device: torch.device, quick: bool) -> dict:
    """The section: rows of every shape, the copy bandwidth, and the checks against the targets."""
    if device.type == "cuda":
        tokens, D, dtype, reps = [4096, 8192, 16384, 32768, 65536], 7168, torch.bfloat16, 5
        shapes = [(T, D, 256) for T in tokens] + [(32768, D, 288)]
        timed = ("triton", "reference")
        copy_gbs = kernel_bench.copy_bandwidth(device, 2 << 30, reps)
    else:  # Triton through the interpreter (TRITON_INTERPRET=1): exactness only, its speed means nothing
        shapes, dtype, reps, timed = [(16, 8, 18)], torch.float32, 3, ("reference",)
        copy_gbs = kernel_bench.copy_bandwidth(device, 16 << 20, 3)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for T, D, G in shapes:
        shape_rows = measure_shape(device, T, D, G, ["triton", "reference"], reps, gen, dtype, timed)
        ref_ms = {(r["op"], r["dir"]): r["ms"] for r in shape_rows if r["backend"] == "reference"}
        for r in shape_rows:
            r["pct_copy"] = 100 * r["gbs"] / copy_gbs
            r["x_ref"] = ref_ms[r["op"], r["dir"]] / r["ms"]
        rows += shape_rows
    checks = [dict(name="kernels match the reference (permute, assign_copies exact; the rest bf16 tolerance)",
                   value=f"{sum(r['ok'] for r in rows)}/{len(rows)} rows",
                   target="all rows", status="pass" if all(r["ok"] for r in rows) else "fail")]
    for op in ("permute", "unpermute"):
        at = [r for r in rows if (r["T"], r["D"], r["G"]) == TARGET_SHAPE and r["op"] == op
              and r["dir"] == "fwd" and r["backend"] == "triton"]
        where = f"{op} fwd at {TARGET_SHAPE[0]} x {TARGET_SHAPE[1]}, G {TARGET_SHAPE[2]}"
        if not at:
            checks.append(dict(name=f"{where}: copy share and speed-up", value="n/a (not at this shape on CPU)",
                               target=f">= {MIN_COPY_SHARE:.0%} of copy, >= {MIN_SPEEDUP:.0f}x reference",
                               status="n/a"))
            continue
        r = at[0]
        checks.append(dict(name=f"{where}: share of copy bandwidth", value=f"{r['pct_copy']:.0f} %",
                           target=f">= {100 * MIN_COPY_SHARE:.0f} %",
                           status="pass" if r["pct_copy"] >= 100 * MIN_COPY_SHARE else "fail"))
        checks.append(dict(name=f"{where}: speed-up over the reference", value=f"{r['x_ref']:.2f}x",
                           target=f">= {MIN_SPEEDUP:.0f}x", status="pass" if r["x_ref"] >= MIN_SPEEDUP else "fail"))
    return dict(copy_gbs=copy_gbs, dtype=str(dtype).removeprefix("torch."), rows=rows, checks=checks)


def table(section: dict) -> list[str]:
    """The section's rows as printed lines."""
    head = (f"{'op':<14}{'dir':<5}{'backend':<10}{'T':>7}{'D':>6}{'G':>5}{'ms':>10}{'GB/s':>9}{'%copy':>7}"
            f"{'x ref':>7}  exact  ok")
    lines = [f"copy bandwidth (read + write): {section['copy_gbs']:.1f} GB/s, {section['dtype']}", head,
             "-" * len(head)]
    for r in section["rows"]:
        lines.append(f"{r['op']:<14}{r['dir']:<5}{r['backend']:<10}{r['T']:>7}{r['D']:>6}{r['G']:>5}{r['ms']:>10.3f}"
                     f"{r['gbs']:>9.1f}{r['pct_copy']:>6.0f}%{r['x_ref']:>7.2f}  {'yes' if r['exact'] else 'no ':<5}"
                     f"  {'yes' if r['ok'] else 'NO'}")
    return lines
