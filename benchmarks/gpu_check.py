"""One prepared check of relibra on one GPU: tests, kernels, calibration, the layer, its memory.

    python benchmarks/gpu_check.py --out gpu_check.json                  # on a CUDA machine (one GPU)
    python benchmarks/gpu_check.py --device cpu --quick --out cpu.json   # the same code paths on CPU

On a GPU it is meant to take at most 8 minutes (about 4 expected: pytest up to 4, kernels 1, the
rest 1; budget a timeout of 10). It has never run on a GPU: the machines it was written on
(2026-11) had none, so only ``--device cpu --quick`` has run (about 15-25 s on 2 shared cores), and
no GPU profile has been measured yet. Sections, each with checks judged against their targets
(pass / fail / n/a), all written to one JSON file (``--out``) and printed as tables:

- ``tests``: pytest on tests/kernels, tests/runtime/test_layer.py and tests/runtime/test_no_host_sync.py
  in a subprocess; on CUDA their ``device`` tests run on the GPU with compiled Triton (no
  ``TRITON_INTERPRET``); on CPU (``--quick``) a fast subset through the interpreter;
- ``kernels``: permute / unpermute / assign_copies at DeepSeek-V3 shapes (4k..64k tokens x 7168,
  top-8, 256 experts; 288 slots with replicas at 32k), forward and backward, GB/s against a
  device-to-device copy and against the torch reference, and exactness against it
  (benchmarks/_gpu_check_kernels.py); targets at 32k x 7168: permute and unpermute >= 60 % of
  copy bandwidth and >= 3x the reference;
- ``calibrate``: relibra calibrate's probes in a world of one rank, bf16, at DeepSeek-V3 and
  Qwen3-30B-A3B expert sizes; on CUDA the profiles go to relibra/data/profiles/<gpu>-<model>.json
  (then ``relibra bench --preset deepseek-v3 --profile nvidia-h200-deepseek-v3``), on CPU next to
  ``--out`` (benchmarks/_gpu_check_calibrate.py);
- ``layer``: one ReLibraMoE layer, world of one, bf16, under replayed routes, against float32 on
  the CPU, and watched for host reads and (CUDA) synchronising calls; ``memory``: its peak
  memory against what its plan needs (benchmarks/_gpu_check_layer.py).

A section that raises is recorded as failed with its error, and the others still run. Exit
status 0 when no check failed, 1 otherwise, 2 when the device is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from contextlib import contextmanager

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEST_PATHS = ["tests/kernels", "tests/runtime/test_layer.py", "tests/runtime/test_no_host_sync.py"]
QUICK_TESTS = ["tests/kernels/test_kernels.py", "tests/runtime/test_layer.py", "tests/runtime/test_no_host_sync.py",
               "-k", "docstring_layout or roundtrip or gather_sum or replayed_routes_are or single_process_replay"]
SECTIONS = ("tests", "kernels", "calibrate", "layer", "memory")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="CPU: small shapes and a subset of the tests")
    p.add_argument("--out", default="gpu_check.json", help="the JSON file to write")
    p.add_argument("--profile-dir", default=None,
                   help="where calibrate writes profiles (default: relibra/data/profiles on CUDA, "
                        "next to --out on CPU)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: " + ",".join(SECTIONS[:4]))
    p.add_argument("--test-timeout", type=int, default=240, help="seconds for the pytest subprocess")
    return p.parse_args(argv)


def run_tests(device: torch.device, quick: bool, timeout: int) -> dict:
    """pytest in a subprocess (compiled Triton on CUDA, the interpreter on CPU); counts from its JUnit XML."""
    env = dict(os.environ)
    if device.type == "cuda":
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    args = QUICK_TESTS if quick else TEST_PATHS
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
        suite = ET.parse(xml).getroot() if os.path.exists(xml) else None
    suite = suite.find("testsuite") if suite is not None and suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) if suite is not None else 0 for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = proc.returncode == 0 and passed > 0
    tail = "" if ok else proc.stdout[-3000:] + proc.stderr[-2000:]
    check = dict(name=f"pytest {' '.join(args)}", value=f"{passed} passed, {counts['failures']} failed, "
                 f"{counts['errors']} errors, {counts['skipped']} skipped in {seconds:.0f} s",
                 target="all pass", status="pass" if ok else "fail")
    return dict(command=" ".join(cmd[1:]), returncode=proc.returncode, counts=counts, seconds=seconds,
                output_tail=tail, checks=[check])


@contextmanager
def world_of_one(device: torch.device):
    """A process group and 1-rank mesh in this process (NCCL on CUDA, gloo on CPU), torn down after."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from relibra.testing import free_port

    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh(device.type, (1,), mesh_dim_names=("gpu",))
    finally:
        dist.destroy_process_group()


def _section(results: dict, name: str, fn) -> None:
    """Run one section into ``results[name]``; an exception fails it, recorded with its traceback."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:  # recorded as a failed check with its traceback; the other sections still run
        out = dict(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                   checks=[dict(name=f"{name} section ran", value=f"{type(exc).__name__}: {str(exc)[:200]}",
                                target="no error", status="fail")])
    out["seconds"] = time.perf_counter() - t0
    results[name] = out


def _print_checks(results: dict) -> None:
    head = f"{'section':<10}{'check':<74}{'value':<44}{'target':<26}status"
    print(head)
    print("-" * len(head))
    for name, section in results.items():
        for c in section["checks"]:
            print(f"{name:<10}{c['name'][:73]:<74}{str(c['value'])[:43]:<44}{c['target'][:25]:<26}{c['status']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_check.py: no CUDA device here; nothing checked (use --device cpu --quick)")
        return 2
    if device.type == "cuda" and device.index is None:  # set_device and the mesh need an index
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":  # Triton only through its interpreter; set before triton is first imported
        os.environ["TRITON_INTERPRET"] = "1"
    import _gpu_check_calibrate as calibrate_section  # after TRITON_INTERPRET: they import relibra.kernels
    import _gpu_check_kernels as kernels_section
    import _gpu_check_layer as layer_section

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SECTIONS):
        print(f"--skip names unknown sections {sorted(skip - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.out))
    profile_dir = args.profile_dir or (os.path.join(ROOT, "relibra", "data", "profiles") if device.type == "cuda"
                                       else out_dir)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name} ({device}), torch {torch.__version__}, quick={args.quick}")
    t0 = time.perf_counter()
    results: dict = {}
    if "tests" not in skip:
        _section(results, "tests", lambda: run_tests(device, args.quick, args.test_timeout))
    if "kernels" not in skip:
        _section(results, "kernels", lambda: kernels_section.run(device, args.quick))
        if "rows" in results["kernels"]:
            print("\n".join(kernels_section.table(results["kernels"])))
    if not {"calibrate", "layer"} <= skip:
        with world_of_one(device) as mesh:
            if "calibrate" not in skip:
                _section(results, "calibrate", lambda: calibrate_section.run(mesh, device, args.quick, profile_dir))
                if "rows" in results["calibrate"]:
                    print("\n".join(calibrate_section.table(results["calibrate"])))
            if "layer" not in skip:
                pair = {}
                _section(results, "layer", lambda: pair.setdefault("both", layer_section.run(mesh, device))[0])
                results["memory"] = dict(pair["both"][1], seconds=0.0) if "both" in pair else dict(
                    checks=[dict(name="memory measured", value="layer section failed", target="a peak",
                                 status="fail")])
    statuses = [c["status"] for s in results.values() for c in s["checks"]]
    report = dict(device=name, device_type=device.type, quick=args.quick, torch=torch.__version__,
                  seconds=time.perf_counter() - t0, all_pass="fail" not in statuses,
                  sections=results)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    print()
    _print_checks(results)
    print(f"\n{statuses.count('pass')} pass, {statuses.count('fail')} fail, {statuses.count('n/a')} n/a "
          f"in {report['seconds']:.0f} s; wrote {args.out}")
    return 0 if report["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
