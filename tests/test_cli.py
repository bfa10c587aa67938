"""relibra bench / launch through main(): JSON contract, table, errors."""

import io
import json
import zipfile

import numpy as np
import pytest

from relibra.cli import main
from relibra.sim.traces import save_trace_file

POL = "static,ideal"


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
    assert set(pol) == {"static", "ideal"}
    for key in ("step_time_s", "tokens_per_s", "speedup_vs_static", "speedup_vs_eplb_oracle", "gap_to_ideal",
                "imbalance_mean", "imbalance_worst", "bytes_moved", "planning_time_s"):
        assert key in pol["static"]
    assert pol["static"]["speedup_vs_static"] == pytest.approx(1.0)
    assert pol["ideal"]["step_time_s"] <= pol["static"]["step_time_s"]
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


def _npy(header: str, data: bytes) -> bytes:
    """An .npy member with a forged header dict text."""
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


def _hostile_traces(directory, good: str) -> dict[str, str]:
    """The trace files of issue 12: each used to end in a traceback (or a 16 GiB allocation)."""
    top_k = io.BytesIO()
    np.save(top_k, np.int64(8))
    loads = io.BytesIO()
    np.save(loads, np.zeros((2, 2, 3, 128), np.int64))
    members = {
        "bomb": _npy("{'descr': '|u1', 'fortran_order': False, 'shape': (17179869184,), }", bytes(2 << 20)),
        "not_npy": b"loads,1,2,3\n",
        "eight_tib": _npy("{'descr': '<i8', 'fortran_order': False, 'shape': (1024, 1024, 1024, 1024), }", bytes(64)),
        "truncated": loads.getvalue()[:-100],
    }
    paths = {}
    for name, member in members.items():
        paths[name] = str(directory / f"{name}.npz")
        with zipfile.ZipFile(paths[name], "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("loads" if name == "not_npy" else "loads.npy", member)
            zf.writestr("top_k.npy", top_k.getvalue())
    blob = bytearray(open(good, "rb").read())
    blob[len(blob) // 3] ^= 0xFF  # inside the LZMA-compressed loads
    paths["flipped"] = str(directory / "flipped.npz")
    open(paths["flipped"], "wb").write(bytes(blob))
    paths["directory"] = str(directory)
    return paths


def test_bench_hostile_trace_files_are_one_line_errors(small_trace, capsys, tmp_path):
    for name, path in _hostile_traces(tmp_path, small_trace).items():
        assert main(["bench", "--trace", path, "--preset", "qwen3-30b-a3b", "--policies", "static"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"relibra bench: error: trace file {path!r}") and err.count("\n") == 1, (name, err)
        assert "Traceback" not in err


def test_bench_policy_options_recorded_and_applied(small_trace, capsys):
    args = ["bench", "--trace", small_trace, "--preset", "qwen3-30b-a3b", "--nodes", "2", "--gpus-per-node", "4",
            "--policies", "static,eplb-oracle,eplb-oracle-global,ideal", "--json"]
    assert main(args + ["--option", "eplb-oracle.mode=global", "--option", "eplb-oracle.window=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy_options"] == {"eplb-oracle": {"mode": "global", "window": 2}}
    pol = out["policies"]
    assert pol["eplb-oracle"]["options"] == {"policy": "eplb", "source": "oracle", "mode": "global", "window": 2}
    assert pol["eplb-oracle-global"]["options"] == {"policy": "eplb", "source": "oracle", "mode": "global"}
    # forced to the same mode, the two rows plan the same: same step time
    assert pol["eplb-oracle"]["step_time_s"] == pytest.approx(pol["eplb-oracle-global"]["step_time_s"])
    assert pol["eplb-oracle-global"]["speedup_vs_eplb_oracle_global"] == pytest.approx(1.0)


@pytest.mark.parametrize("option, needle", [
    ("hybrid.no_such_option=1", "no_such_option"),     # option the policy does not take
    ("nosuch.window=2", "'nosuch'"),                   # policy not among the rows
    ("ideal.x=1", "'ideal'"),                          # ideal takes no options
    ("eplb-oracle.mode=sideways", "sideways"),         # value the policy rejects
    ("eplb-oracle.window=[1, 2]", "scalar"),           # YAML list, not a scalar
    ("window=2", "POLICY.OPTION=VALUE"),               # no policy part
])
def test_bench_bad_options_name_the_culprit(small_trace, capsys, option, needle):
    rc = main(["bench", "--trace", small_trace, "--preset", "qwen3-30b-a3b", "--nodes", "2", "--gpus-per-node", "4",
               "--policies", "static,eplb-oracle,hybrid,ideal", "--option", option])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_bench_describe(small_trace, capsys):
    args = ["bench", "--trace", small_trace, "--preset", "qwen3-30b-a3b", "--nodes", "2", "--gpus-per-node", "4",
            "--policies", "static,ideal", "--describe"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "busiest/idlest GPU" in out and "Qwen3-235B" in out
    assert main(args + ["--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["trace_stats"]
    assert stats["reference"] == "trace total" and stats["batches"] == 4
    assert stats["corr_with_long_run"]["4"] == pytest.approx(1.0)


def test_parse_options_yaml_scalars():
    from relibra.cli import parse_options

    got = parse_options(["eplb-history.window=3", "eplb-history.ema_decay=0.5", "eplb-history.history=ema"],
                        ["eplb-history"])
    assert got == {"eplb-history": {"window": 3, "ema_decay": 0.5, "history": "ema"}}
    assert isinstance(got["eplb-history"]["window"], int)


def test_launch_delegates(monkeypatch):
    import relibra.integrations.launcher as launcher

    seen = []
    monkeypatch.setattr(launcher, "main", lambda argv: seen.append(argv) or 0)
    assert main(["launch", "--foo", "x.py"]) == 0
    assert seen == [["--foo", "x.py"]]


@pytest.mark.parametrize("policies, needles", [
    ("static,hybird", ["'hybird'", "did you mean 'hybrid'"]),    # a typo gets the closest name
    ("static,xyzzy", ["'xyzzy'", "known: static"]),             # no close name: the known ones
    (" , ", ["names no policy"]),
])
def test_bench_unknown_policy_is_an_error_with_a_suggestion(small_trace, capsys, policies, needles):
    rc = main(["bench", "--trace", small_trace, "--preset", "qwen3-30b-a3b", "--nodes", "2", "--gpus-per-node", "4",
               "--policies", policies])
    assert rc == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # failed before simulating anything
    for needle in needles:
        assert needle in captured.err


def test_version(capsys):
    import relibra

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"relibra {relibra.__version__}"


def test_bench_plot_data_relative_loads_and_time_parts(small_trace):
    from relibra.sim.bench_plot import TIME_PARTS, relative_gpu_loads, time_breakdown
    from relibra.sim.cost import make_config
    from relibra.sim.simulate import simulate
    from relibra.sim.traces import load_trace_file

    loads, _, _ = load_trace_file(small_trace)
    cfg = make_config("qwen3-30b-a3b", "h100", {"num_moe_layers": 3})
    results = simulate(loads, cfg.topology(2, 4, 1), cfg, ["static", "hybrid", "ideal"])
    rel = relative_gpu_loads(results)
    assert sorted(rel) == ["hybrid", "static"]  # ideal is the flat reference, not drawn
    for r in rel.values():
        assert r.shape == (3, 8)
        np.testing.assert_allclose(r.mean(axis=1), 1.0)  # relative to each layer's mean: one scale for all
    assert rel["hybrid"].max() < rel["static"].max()  # balance is visible on that scale
    parts = time_breakdown(results)
    for name, r in results.items():
        assert list(parts[name]) == [label for _, label in TIME_PARTS]
        assert sum(parts[name].values()) == pytest.approx(r.step_time_s)  # the parts make up the step
    assert parts["static"]["migration"] == 0.0 and parts["static"]["replicas"] == 0.0
