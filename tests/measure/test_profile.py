"""Profiles: round trip, every rejection names the thing, bench --profile prices with one."""

import json

import numpy as np
import pytest

from relibra.cli import main
from relibra.sim import profile as profile_module
from relibra.sim.cost import make_config
from relibra.sim.profile import MACHINE_PARAMETERS, load_profile, profile_config, profile_from_dict, save_profile
from relibra.sim.traces import save_trace_file


def good():
    cost = {k: 0.0 for k in MACHINE_PARAMETERS}
    cost.update(peak_flops=6e10, mfu=1.0, intra_node_bandwidth=1e9, inter_node_bandwidth=1e9, expert_half_rows=30.0,
                layer_call_s=0.002, a2a_bytes=4.0)
    return {"format": "relibra-profile", "version": 1, "machine": {"backend": "gloo", "device": "cpu"},
            "world": {"nodes": 1, "gpus_per_node": 2},
            "sizes": {"dim": 256, "hidden": 1024, "experts": 16, "top_k": 2, "layers": 2, "spare_slots": 1},
            "cost": cost, "measured": {}}


def test_round_trip(tmp_path):
    path = str(tmp_path / "p.json")
    saved = save_profile(good(), path)
    back = load_profile(path)
    assert back.cost == saved.cost and back.world_size == 2 and back.machine["backend"] == "gloo"
    assert back.source == f"file {path}"
    cfg = profile_config(back, make_config("qwen3-30b-a3b"))
    assert cfg.peak_flops == 6e10 and cfg.expert_half_rows == 30.0 and cfg.a2a_bytes == 4.0
    assert cfg.hidden == 2048 and cfg.num_experts == 128  # the model's shape stays the caller's


def test_optional_machine_parameters_may_be_left_out():
    cfg = profile_config(profile_from_dict(good()), make_config())
    assert "state_move_overlap" not in good()["cost"] and cfg.state_move_overlap == 1.0  # the model's default
    d = good()
    d["cost"]["state_move_overlap"] = 0.0  # what relibra calibrate writes for CPU ranks
    assert profile_config(profile_from_dict(d), make_config()).state_move_overlap == 0.0


def edit(path, value):
    d = good()
    *parents, last = path
    node = d
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return d


@pytest.mark.parametrize("path, value, text", [
    (("format",), "other", "format must be 'relibra-profile'"),
    (("version",), 2, "version must be 1, got 2"),
    (("cost",), [], "cost must be a JSON object, got list"),
    (("cost", "peak_flops"), KeyError, "cost lacks 'peak_flops'"),
    (("cost", "turbo"), 1.0, "cost has unknown key 'turbo'"),
    (("cost", "mfu"), 1.5, "cost.mfu is a fraction in [0, 1], got 1.5"),
    (("cost", "layer_call_s"), -1.0, "cost.layer_call_s must be >= 0"),
    (("cost", "message_latency_s"), "fast", "cost.message_latency_s must be a finite number, got 'fast'"),
    (("cost", "intra_node_bandwidth"), 0.0, "cost.intra_node_bandwidth must be > 0"),
    (("cost", "state_move_overlap"), 1.5, "cost.state_move_overlap is a fraction in [0, 1], got 1.5"),
    (("world", "nodes"), 0, "world.nodes must be an integer >= 1, got 0"),
    (("sizes", "experts"), 15, "sizes.experts=15 does not divide over world's 2 ranks"),
    (("machine", "backend"), None, "machine.backend must be a string"),
])
def test_inconsistent_profile_rejected_naming_the_key(path, value, text):
    with pytest.raises(ValueError) as exc:
        profile_from_dict(edit(path, value), "file p.json")
    assert str(exc.value).startswith("profile file p.json: ") and text in str(exc.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match=r"profile file .*none.json: cannot be read"):
        load_profile(str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "relibra-profile",')
    with pytest.raises(ValueError, match=r"bad.json: not JSON \(line 1"):
        load_profile(str(bad))
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\x80\x81\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_profile(str(binary))
    with pytest.raises(ValueError, match="must hold one JSON object, got list"):
        (tmp_path / "l.json").write_text("[]")
        load_profile(str(tmp_path / "l.json"))


def test_bench_prices_with_a_profile(tmp_path, capsys):
    rng = np.random.default_rng(0)
    trace = str(tmp_path / "t.npz")
    save_trace_file(trace, rng.integers(0, 2000, size=(2, 2, 3, 128)), 8)
    prof = str(tmp_path / "p.json")
    save_profile(good(), prof)
    common = ["bench", "--trace", trace, "--preset", "qwen3-30b-a3b", "--nodes", "2", "--gpus-per-node", "4",
              "--policies", "static,hybrid", "--json"]
    assert main(common) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(common + ["--profile", prof]) == 0
    priced = json.loads(capsys.readouterr().out)
    assert priced["cost"]["peak_flops"] == 6e10 and priced["cost"]["hidden"] == 2048
    # a CPU's 60 Gflop/s makes the step thousands of times slower than an H100's
    assert priced["policies"]["static"]["step_time_s"] > 1000 * plain["policies"]["static"]["step_time_s"]
    (tmp_path / "bad.json").write_text("{}")
    assert main(common + ["--profile", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relibra bench: error: profile file") and "format" in err and err.count("\n") == 1


def test_bench_profile_takes_the_name_of_a_shipped_profile(tmp_path, monkeypatch, capsys):
    """``--profile NAME`` finds relibra/data/profiles/NAME.json (here a stand-in directory); an unknown
    name is refused naming it and the shipped ones."""
    monkeypatch.setattr(profile_module, "PROFILE_DIR", str(tmp_path))
    save_profile(good(), str(tmp_path / "test-gpu-deepseek-v3.json"))
    assert profile_module.shipped_profiles() == ["test-gpu-deepseek-v3"]
    assert profile_module.profile_path("test-gpu-deepseek-v3") == str(tmp_path / "test-gpu-deepseek-v3.json")
    rng = np.random.default_rng(0)
    trace = str(tmp_path / "t.npz")
    save_trace_file(trace, rng.integers(0, 2000, size=(2, 2, 3, 128)), 8)
    common = ["bench", "--trace", trace, "--preset", "qwen3-30b-a3b", "--nodes", "2", "--gpus-per-node", "4",
              "--policies", "static", "--json"]
    assert main(common + ["--profile", "test-gpu-deepseek-v3"]) == 0
    assert json.loads(capsys.readouterr().out)["cost"]["peak_flops"] == 6e10
    assert main(common + ["--profile", "h900"]) == 2
    err = capsys.readouterr().err
    assert "profile 'h900': no such file, nor a profile shipped with relibra (shipped: test-gpu-deepseek-v3)" in err


def _raw_one_rank(fwd, fwd_bwd):
    """calibrate_rank's measurements in a world of one rank: no a2a, no migration."""
    return {"gemm": {"slots": 4, "dtype": "bfloat16", "rows": [8, 128, 1024], "fwd_s_per_slot": fwd,
                     "fwd_bwd_s_per_slot": fwd_bwd},
            "a2a": None,
            "step": {"tokens": 16, "plan_step_s": 1e-3, "micro_batch_s": 2e-3, "optimizer_params": 1000,
                     "optimizer_s": 1e-4, "migration": {"experts_per_layer": [], "bytes_sent": [], "seconds": []}}}


def test_a_world_of_one_rank_fits_a_profile_with_link_defaults_named():
    from relibra.measure import MeasureOptions
    from relibra.measure.calibrate import LINK_PARAMETERS, fit_profile
    from relibra.sim.cost import CostConfig

    o = MeasureOptions(nodes=1, gpus_per_node=1, spare_slots=0, dim=64, hidden=32, experts=8, top_k=2, layers=1)
    fwd = [1e-5 + r * 1e-7 for r in (8, 128, 1024)]
    p = profile_from_dict(fit_profile(_raw_one_rank(fwd, [3 * t for t in fwd]), o, "nccl", "cuda"))
    assert p.world_size == 1 and p.machine["dtype"] == "bfloat16"
    assert p.cost["peak_flops"] == pytest.approx(2 * 3 * 64 * 32 / 1e-7)
    assert p.cost["a2a_bytes"] == 2.0 and p.cost["state_bytes_per_param"] == 6.0
    assert p.measured["not_measured"] == list(LINK_PARAMETERS)
    for key in LINK_PARAMETERS:
        assert p.cost[key] == getattr(CostConfig(), key)


def test_gemm_times_that_do_not_grow_still_give_a_positive_rate():
    """Noise on a busy machine can make a small probe's times fall with rows: the rate then comes from
    the largest probe through the origin instead of a negative slope."""
    from relibra.measure import MeasureOptions
    from relibra.measure.calibrate import fit_profile

    o = MeasureOptions(nodes=1, gpus_per_node=1, spare_slots=0, dim=64, hidden=32, experts=8, top_k=2, layers=1)
    falling = [3e-4, 2e-4, 1e-4]
    p = profile_from_dict(fit_profile(_raw_one_rank(falling, falling), o, "gloo", "cpu"))
    assert p.cost["peak_flops"] == pytest.approx(2 * 3 * 64 * 32 * 1024 / 1e-4)


def test_gemm_drift_is_the_probe_over_the_profiles_price():
    from relibra.measure.options import MeasureOptions
    from relibra.measure.report import gemm_drift, measured_config
    from relibra.sim.profile import profile_from_dict

    o = MeasureOptions()  # the sizes of good()
    cfg = measured_config(o, profile_from_dict(good(), "test"))
    assert cfg.peak_flops == 6e10 and cfg.expert_half_rows == 30.0
    # price of 2 slots x 512 rows: (512 + n_half) rows each, 2 x 3 D I flops per row, (1 + backward) passes
    price = 2 * (512 + 30.0) * 2 * 3 * 256 * 1024 * (1 + cfg.backward_factor) / 6e10
    drift = gemm_drift({"rows": 512, "slots": 2, "before_s": [price, 2 * price, 9 * price],
                        "after_s": [0.5 * price]}, o, cfg)
    assert drift["modelled_s"] == pytest.approx(price)
    assert drift["before"] == pytest.approx(2.0) and drift["after"] == pytest.approx(0.5)
