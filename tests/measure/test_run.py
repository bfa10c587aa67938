"""relibra measure / calibrate end to end on a tiny 2-rank gloo world (seconds)."""

import json

import pytest

from relibra.cli import main
from relibra.sim.profile import load_profile

pytestmark = pytest.mark.distributed

TINY = ["--dim", "16", "--hidden", "32", "--experts", "4", "--top-k", "2", "--layers", "1"]
STEPS = ["--tokens", "64", "--micro-batches", "2", "--steps", "2", "--warmup-steps", "1"]


def test_calibrate_then_measure_with_the_profile(tmp_path, capsys):
    prof = str(tmp_path / "p.json")
    assert main(["calibrate", *TINY, "--out", prof]) == 0
    assert "wrote" in capsys.readouterr().out
    p = load_profile(prof)
    assert p.world_size == 2 and p.machine["backend"] == "gloo" and p.sizes["experts"] == 4
    assert p.cost["peak_flops"] > 0 and p.cost["a2a_bytes"] == 4.0 and p.cost["replica_reuse"] == 1.0
    assert len(p.measured["gemm"]["rows"]) == len(p.measured["gemm"]["fwd_bwd_s_per_slot"])

    assert main(["measure", *TINY, *STEPS, "--policies", "static,replicate,hybrid", "--profile", prof,
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["profile"] == f"file {prof}" and out["topology"]["ranks"] == 2
    pol = out["policies"]
    assert list(pol) == ["static", "replicate", "hybrid"]
    for row in pol.values():
        for key in ("measured_step_s", "measured_min_s", "modelled_step_s", "planned_imbalance",
                    "realised_imbalance"):
            assert row[key] > 0
        assert row["measured_min_s"] <= row["measured_step_s"] and row["measured_cpu_s"] > 0
        # disturbed steps (another process held a core) are retried, at most 3 x --steps rounds
        assert 2 <= row["steps_timed"] <= 6 and row["steps_undisturbed"] <= row["steps_timed"]
        assert len(row["measured_steps_s"]) == (row["steps_undisturbed"] or row["steps_timed"])
    # skewed routes: static's GPU 0 carries 1 + skew of the mean; replicas even it out, and what
    # the layers computed is what was planned
    assert pol["static"]["planned_imbalance"] > 1.5
    assert pol["replicate"]["planned_imbalance"] < 1.1
    for row in pol.values():
        assert row["realised_imbalance"] == pytest.approx(row["planned_imbalance"])
    # the GEMM probe ran before and after the steps and is set against the profile's price of it
    g = out["gemm_probe"]
    assert len(g["before_s"]) == len(g["after_s"]) == 5 and g["modelled_s"] > 0
    assert g["before"] == pytest.approx(sorted(g["before_s"])[2] / g["modelled_s"])

    # a profile of another world is refused before anything runs
    assert main(["measure", *TINY, *STEPS, "--nodes", "2", "--gpus-per-node", "2", "--skew", "0", "--profile",
                 prof]) == 2
    err = capsys.readouterr().err
    assert "measured with gloo on 2 ranks; this run has 4 ranks" in err and err.count("\n") == 1


def test_measure_without_profile_probes_first(capsys):
    assert main(["measure", *TINY, *STEPS, "--policies", "static,reorder", "--nodes", "2", "--gpus-per-node",
                 "1", "--skew", "0"]) == 0
    text = capsys.readouterr().out
    assert "measured in this run" in text and "reorder" in text and "x static" in text
    assert "GEMM probe (2 slots x 512 rows, forward + backward) against the profile's price of it" in text
