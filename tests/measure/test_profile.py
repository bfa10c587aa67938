"""Profiles: round trip, every rejection names the thing, bench --profile prices with one."""

import json

import numpy as np
import pytest

from relibra.cli import main
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
