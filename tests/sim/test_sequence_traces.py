"""Per-sequence traces from the generator: the command that writes them and what they hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from relibra.sim.traces import TraceConfig, generate, read_trace_file, sequence_steps

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--steps", "1", "--micro-batches", "3", "--tokens-per-micro-batch", "4096", "--group-size", "4",
         "--response-len-median", "200", "--prompt-len-median", "50", "--max-len", "1024"]


def test_make_default_trace_per_sequence_on_a_small_size(tmp_path):
    """The documented command writes a format-2 trace whose loads are the generator's (same seed)
    and whose sequences sum to them."""
    out = tmp_path / "v2.npz"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "make_default_trace.sh"), "--per-sequence",
                           "--out", str(out), *SMALL], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert "sequences per step at most" in proc.stdout
    trace = read_trace_file(str(out))
    assert trace.format == 2 and trace.meta["per_sequence"] and trace.meta["concentration"] == 512
    cfg = TraceConfig(steps=1, micro_batches=3, tokens_per_micro_batch=4096, group_size=4,
                      response_len_median=200.0, prompt_len_median=50.0, max_len=1024, concentration=512.0)
    np.testing.assert_array_equal(trace.loads.numpy(), generate(cfg))
    steps = sequence_steps(trace)
    assert trace.sequences.tokens_per_micro_batch == 4096
    for s, step in enumerate(steps):
        np.testing.assert_array_equal(step.loads(), trace.loads[s].numpy())
        assert (step.sequence_loads.sum(-1) == 8 * step.sequence_tokens[:, None]).all()  # top_k copies per token
        assert (np.diff(step.micro_batch_of) >= 0).all()  # rollout order
