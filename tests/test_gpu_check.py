"""benchmarks/gpu_check.py --device cpu --quick: every section runs and writes its JSON, and the checks
a CPU can pass do pass (tests, kernels exact against the reference, profiles written, the layer in
bf16 against float32, no host read in the replayed forward + backward)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from relibra.sim.profile import load_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_quick_run_writes_every_section_and_passes_what_a_cpu_can(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device_type"] == "cpu" and report["quick"] and report["all_pass"]
    sections = report["sections"]
    assert set(sections) == {"tests", "kernels", "calibrate", "layer", "memory"}
    for name, section in sections.items():
        assert section["checks"], f"section {name} judged nothing"
        for check in section["checks"]:
            assert set(check) == {"name", "value", "target", "status"}
            assert check["status"] in ("pass", "n/a"), f"{name}: {check}"
    assert sections["tests"]["counts"]["tests"] >= 5 and sections["tests"]["returncode"] == 0
    # the kernels: Triton (interpreted) against the reference, every op and direction
    triton = [r for r in sections["kernels"]["rows"] if r["backend"] == "triton"]
    assert {(r["op"], r["dir"]) for r in triton} == {("assign_copies", "fwd"), ("permute", "fwd"), ("permute", "bwd"),
                                                     ("unpermute", "fwd"), ("unpermute", "bwd")}
    assert all(r["exact"] for r in triton if r["op"] != "unpermute" and r["dir"] == "fwd")
    # speed targets and the GPU-only checks are not judged on a CPU
    statuses = {c["name"].split(":")[0]: c["status"] for c in sections["kernels"]["checks"]}
    assert statuses["permute fwd at 32768 x 7168, G 256"] == "n/a"
    assert sections["memory"]["peak_bytes"] is None and sections["memory"]["planned_bytes"] > 0
    # profiles of both expert sizes, readable by relibra bench --profile
    assert len(sections["calibrate"]["profiles"]) == 2
    for path in sections["calibrate"]["profiles"]:
        assert os.path.dirname(path) == str(tmp_path)
        profile = load_profile(path)
        assert profile.world_size == 1 and profile.cost["peak_flops"] > 0
        assert profile.measured["not_measured"] == sections["calibrate"]["not_measured"]
    layer = sections["layer"]
    assert set(layer["errors"]) == {"output", "grad x", "grad router", "grad gate_up_proj", "grad down_proj"}
    assert all(0 < e <= 2e-2 for e in layer["errors"].values())  # bf16 against float32: close, not equal
    assert layer["host_reads"] == []
    assert "pass," in proc.stdout and "wrote" in proc.stdout
