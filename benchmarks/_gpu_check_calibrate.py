"""gpu_check section ``calibrate``: ``relibra calibrate``'s probes in a world of one rank, one profile per
expert size.

For every expert size (DeepSeek-V3: dim 7168 x expert hidden 2048; Qwen3-30B-A3B: 2048 x 768) it
runs :func:`relibra.measure.calibrate.calibrate_rank` in the world of one rank the caller set up
(bf16; on CPU float32 at small sizes: the grouped GEMM's rows sweep, forward and forward + backward; the stack's
plan_step, layer call and AdamW), fits a profile with :func:`relibra.measure.calibrate.fit_profile`
and writes it (validated) as ``<dir>/<device>-<model>.json``. One rank has no link: the link
parameters keep CostConfig's defaults and the profile lists them under ``measured.not_measured``.
"""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist

from relibra.measure import MeasureOptions
from relibra.measure.calibrate import calibrate_rank, fit_profile
from relibra.sim.profile import load_profile, profile_from_dict, save_profile

#: (bench preset, dim, expert hidden) of the probed expert sizes
SIZES = (("deepseek-v3", 7168, 2048), ("qwen3-30b-a3b", 2048, 768))
GPU_ROWS = (8, 32, 128, 512, 1024, 2048, 4096)


def device_slug(device: torch.device) -> str:
    """``nvidia-h200`` for an NVIDIA H200, ``cpu`` for the CPU: the first part of a profile's name."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def run(mesh, device: torch.device, quick: bool, profile_dir: str) -> dict:
    """Probe every size, write its profile into ``profile_dir``; rows of GEMM rates and checks."""
    cuda = device.type == "cuda"
    # CPU: float32 (bf16 GEMMs there are slow and noisy) and sizes whose GEMMs outlast the noise
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = SIZES if cuda else tuple(zip((name for name, _, _ in SIZES), (512, 256), (256, 128)))
    rows_sweep = GPU_ROWS if cuda else (32, 256, 1024)
    repeats = 5 if cuda else 3
    os.makedirs(profile_dir, exist_ok=True)
    rows, checks, written = [], [], []
    for preset, dim, hidden in sizes:
        # 8 experts, one layer: enough for the stack probes (the cost block holds only machine rates)
        o = MeasureOptions(nodes=1, gpus_per_node=1, spare_slots=0, dim=dim, hidden=hidden, experts=8,
                           top_k=8 if cuda else 2, layers=1, skew=0.0)
        raw = calibrate_rank(0, mesh, device, o, repeats, dtype, rows_sweep)
        profile = profile_from_dict(fit_profile(raw, o, str(dist.get_backend()), device.type),
                                    f"gpu_check {preset}")
        path = os.path.join(profile_dir, f"{device_slug(device)}-{preset}.json")
        save_profile(profile, path)
        load_profile(path)  # read back: the file is what bench --profile will take
        written.append(path)
        g = raw["gemm"]
        flops_per_row = 2 * 3 * dim * hidden
        for r, fwd, fb in zip(g["rows"], g["fwd_s_per_slot"], g["fwd_bwd_s_per_slot"]):
            rows.append(dict(model=preset, dim=dim, hidden=hidden, rows=r, fwd_tflops=r * flops_per_row / fwd / 1e12,
                             fwd_bwd_tflops=3 * r * flops_per_row / fb / 1e12))  # backward: 2 GEMMs per forward one
        c = profile.cost
        checks.append(dict(name=f"{preset} {dim}x{hidden} {g['dtype']}: profile written and valid",
                           value=(f"peak {c['peak_flops'] / 1e12:.1f} TFLOP/s, half rows {c['expert_half_rows']:.0f}, "
                                  f"backward x{c['backward_factor']:.2f}"),
                           target="valid profile, peak > 0", status="pass" if c["peak_flops"] > 0 else "fail"))
    return dict(dtype=str(dtype).removeprefix("torch."), profiles=written, rows=rows, checks=checks,
                not_measured=list(profile.measured["not_measured"]))


def table(section: dict) -> list[str]:
    """The section's GEMM rates as printed lines (fwd+bwd counts 3x the forward's flops)."""
    head = f"{'model':<15}{'dim':>6}{'hidden':>7}{'rows':>6}{'fwd TFLOP/s':>13}{'fwd+bwd TFLOP/s':>17}"
    lines = [f"grouped GEMM, {section['dtype']}, per expert slot; profiles: {', '.join(section['profiles'])}",
             f"not measured in a world of one (CostConfig defaults): {', '.join(section['not_measured'])}",
             head, "-" * len(head)]
    for r in section["rows"]:
        lines.append(f"{r['model']:<15}{r['dim']:>6}{r['hidden']:>7}{r['rows']:>6}{r['fwd_tflops']:>13.3f}"
                     f"{r['fwd_bwd_tflops']:>17.3f}")
    return lines
