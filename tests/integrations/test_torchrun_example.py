"""examples/torchrun_tiny_moe.py under torchrun (2 gloo processes): balanced run equals static."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torchrun_tiny_moe.py"


@pytest.mark.distributed
def test_torchrun_example_prints_one_json_line_and_matches_static():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout  # one JSON line, from rank 0 only
    out = json.loads(lines[0])
    assert out["policy"] == "hybrid" and out["processes"] == 2
    assert len(out["losses_static"]) == out["steps"] == 3
    assert out["loss_max_abs_diff"] <= 1e-5 and out["weight_max_abs_diff"] <= 1e-5, out
    assert out["imbalance_hybrid"] < out["imbalance_static"], out  # balancing did something
