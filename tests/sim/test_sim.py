"""Simulator: the ideal run bounds every policy; steady-state accounting; skipped policies."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relibra.sim import DEFAULT_POLICIES, simulate
from relibra.sim.cost import CostConfig

CFG = CostConfig(hidden=64, expert_intermediate=32, num_experts=8, top_k=2, num_moe_layers=2,
                 num_expert_groups=1, non_moe_params=1e4, attn_width=64, extra_params=0.0,
                 peak_flops=1e12, mfu=0.5, intra_node_bandwidth=1e9, inter_node_bandwidth=1e8)
TOPO = CFG.topology(2, 2, 1)


def _policies():
    return list(DEFAULT_POLICIES)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 50.0), st.sampled_from(["uniform", "hot", "zeros"]))
def test_ideal_never_slower_than_any_policy(seed, skew, shape):
    rng = np.random.default_rng(seed)
    S, M, L, E = 2, 3, 2, 8
    if shape == "zeros":
        loads = np.zeros((S, M, L, E), dtype=np.int64)
        loads[..., 0] = rng.integers(1, 50, size=(S, M, L))
    else:
        p = rng.dirichlet(np.full(E, skew if shape == "hot" else 1e3), size=(S, M, L))
        loads = np.stack([rng.multinomial(int(rng.integers(1, 400)), pp) for pp in p.reshape(-1, E)]).reshape(
            S, M, L, E
        )
    res = simulate(loads, TOPO, CFG, _policies())
    ideal = res["ideal"].step_time_s
    for name, r in res.items():
        if not r.skipped:
            assert r.step_time_s >= ideal * (1 - 1e-9), (name, r.step_time_s, ideal)
            assert r.gap_to_ideal >= -1e-9


def test_static_numbers_and_warmup_excluded():
    rng = np.random.default_rng(0)
    loads = rng.integers(0, 100, size=(3, 2, 2, 8))
    loads[0] *= 10  # a heavy warm-up step must not count
    res = simulate(loads, TOPO, CFG, ["static", "ideal"], warmup_steps=1)
    st_ = res["static"]
    assert st_.speedup_vs_static == pytest.approx(1.0)
    assert res["ideal"].speedup_vs_static >= 1.0
    tokens = loads[1:, :, 0].sum(-1).sum(-1) / CFG.top_k
    assert st_.tokens_per_s == pytest.approx(tokens.mean() / st_.step_time_s)
    g = loads.reshape(3, 2, 2, 4, 2).sum(-1).astype(float)  # static: 2 experts per GPU
    imb = g.max(-1) / g.mean(-1)
    assert st_.imbalance_mean == pytest.approx(imb[1:].mean())
    assert st_.imbalance_worst == pytest.approx(imb[1:].max())
    assert st_.bytes_moved == 0.0 and st_.planning_time_s >= 0.0


def test_eplb_global_row_and_single_thread_planning_time():
    topo = CFG.topology(2, 2, 1)
    rng = np.random.default_rng(1)
    loads = rng.integers(0, 100, size=(2, 2, 2, 8))
    torch.set_num_threads(2)
    res = simulate(loads, topo, CFG, ["static", "eplb-oracle", "eplb-oracle-global", "ideal"])
    assert torch.get_num_threads() == 2  # timing's one-thread setting is restored
    g = res["eplb-oracle-global"]
    assert g.skipped is None and g.options == {"policy": "eplb", "source": "oracle", "mode": "global"}
    assert res["eplb-oracle"].options == {"policy": "eplb", "source": "oracle"}
    assert g.speedup_vs_eplb_oracle_global == pytest.approx(1.0)
    assert res["static"].speedup_vs_eplb_oracle_global == pytest.approx(g.step_time_s / res["static"].step_time_s)
    assert all(r.planning_time_s >= 0.0 for r in res.values())


def test_timed_plan_restores_threads_on_error():
    from relibra.sim.simulate import timed_plan

    class Boom:
        def plan(self, loads, topology):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")

    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="boom"):
        timed_plan(Boom(), None, TOPO)
    assert torch.get_num_threads() == 2


def test_gap_breakdown_adds_up_to_gap():
    from relibra.sim import gap_breakdown

    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.full(8, 0.3), size=(3, 3, 2))
    loads = np.stack([rng.multinomial(300, pp) for pp in p.reshape(-1, 8)]).reshape(3, 3, 2, 8)
    res = simulate(loads, TOPO, CFG, _policies())
    for name, r in res.items():
        parts = gap_breakdown(res, name)
        if r.skipped or parts is None:
            continue
        assert sum(parts.values()) == pytest.approx(r.gap_to_ideal, abs=1e-9), name
        assert parts["compute"] >= -1e-9 and parts["replicas"] >= 0 and parts["migration"] >= 0
    assert gap_breakdown(res, "no-such") is None


def test_missing_policy_is_skipped_not_fatal():
    loads = np.ones((2, 1, 2, 8), dtype=np.int64)
    res = simulate(loads, TOPO, CFG, ["static", "no-such-policy", "ideal"])
    assert "unknown policy" in res["no-such-policy"].skipped
    assert res["static"].skipped is None


def test_trace_must_fit_topology():
    with pytest.raises(ValueError, match="experts"):
        simulate(np.ones((2, 1, 2, 16), dtype=np.int64), TOPO, CFG, ["static"])
    with pytest.raises(ValueError, match="warmup_steps"):
        simulate(np.ones((1, 1, 2, 8), dtype=np.int64), TOPO, CFG, ["static"], warmup_steps=1)
