"""relibra bench / launch through main(): JSON contract, table, errors."""

import json

import numpy as np
import pytest

from relibra.cli import main
from relibra.traces import save_trace_file

POL = "static,no-such-policy,ideal"


@pytest.fixture
def small_trace(tmp_path):
    rng = np.random.default_rng(0)
    loads = rng.integers(0, 2000, size=(2, 2, 3, 128))
    path = str(tmp_path / "t.npz")
    save_trace_file(path, loads, 8)
    return path


def test_bench_json_contract(small_trace, capsys):
    rc = main(["bench", "--trace", small_trace, "--preset", "qwen3-30b-a3b", "--nodes", "2",
               "--gpus-per-node", "4", "--spare-slots", "1", "--policies", POL, "--json",
               "--set", "mfu=0.4"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    pol = out["policies"]
    assert set(pol) == {"static", "no-such-policy", "ideal"}
    for key in ("step_time_s", "tokens_per_s", "speedup_vs_static", "speedup_vs_eplb_oracle", "gap_to_ideal",
                "imbalance_mean", "imbalance_worst", "bytes_moved", "planning_time_s"):
        assert key in pol["static"]
    assert pol["static"]["speedup_vs_static"] == pytest.approx(1.0)
    assert pol["ideal"]["step_time_s"] <= pol["static"]["step_time_s"]
    assert "unknown policy" in pol["no-such-policy"]["skipped"]
    assert out["cost"]["mfu"] == 0.4 and out["layers"] == 3


def test_bench_table_and_plot(small_trace, capsys, tmp_path):
    png = tmp_path / "b.png"
    assert main(["bench", "--trace", small_trace, "--preset", "qwen3-30b-a3b", "--nodes", "2",
                 "--gpus-per-node", "4", "--policies", "static,ideal", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "static" in out and "ideal" in out and "x static" in out
    assert png.stat().st_size > 1000


def test_bench_errors(small_trace, capsys, tmp_path):
    # 128-expert trace against the 256-expert DeepSeek-V3 preset
    assert main(["bench", "--trace", small_trace, "--policies", "static"]) == 2
    assert "experts" in capsys.readouterr().err
    assert main(["bench", "--trace", str(tmp_path / "none.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "--trace", small_trace, "--preset", "qwen3-30b-a3b", "--nodes", "2",
                 "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_launch_delegates(monkeypatch):
    import relibra.integrations.launcher as launcher

    seen = []
    monkeypatch.setattr(launcher, "main", lambda argv: seen.append(argv) or 0)
    assert main(["launch", "--foo", "x.py"]) == 0
    assert seen == [["--foo", "x.py"]]
