"""The RL step in the simulator and the bench: packings, phases, verl's and vLLM's balance metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from relibra.balance_metrics import balancedness, max_vio
from relibra.cli import main
from relibra.placement import Placement
from relibra.plan import Plan
from relibra.policies.hybrid import HybridPolicy
from relibra.sim.cost import ideal_step_cost, make_config, step_cost
from relibra.sim.rl_step import StepPacker, early_rows, forward_config, ideal_phase_cost, phase_step_cost, plan_on
from relibra.sim.simulate import simulate
from relibra.sim.traces import TraceConfig, generate_sequences, save_sequence_trace, save_trace_file

L, E = 3, 128  # qwen3-30b-a3b's experts, three layers
TRACE = dict(steps=3, micro_batches=4, tokens_per_micro_batch=4096, group_size=4, concentration=8.0,
             prompt_len_median=64.0, response_len_median=300.0, max_len=2048, top_k=8)


@pytest.fixture(scope="module")
def steps():
    popularity = np.random.default_rng(0).dirichlet(np.full(E, 0.5), size=L)
    return list(generate_sequences(TraceConfig(**TRACE), popularity=popularity))


@pytest.fixture(scope="module")
def v2_trace(steps, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("v2") / "v2.npz")
    save_sequence_trace(path, steps, meta={"test": True})
    return path


def setup():
    cfg = make_config("qwen3-30b-a3b", "h100", {"num_moe_layers": L})
    return cfg, cfg.topology(2, 4, 1)


def test_balance_metrics_by_hand():
    g = torch.tensor([[[4, 2, 0, 2], [0, 0, 0, 0]]])  # [1, 2, 4]: mean 2, max 4; a layer without tokens
    assert max_vio(g).tolist() == [[1.0, 0.0]]
    assert balancedness(g).tolist() == [[0.5, 1.0]]


def test_one_training_phase_is_todays_cost(steps):
    cfg, topo = setup()
    loads = torch.from_numpy(steps[0].loads())
    previous = Placement.contiguous(topo, L)
    plan = HybridPolicy().plan(loads, topo)
    cost, per_phase = phase_step_cost(plan, loads, cfg, previous, ("train",), None)
    assert cost == step_cost(plan, loads, cfg, previous=previous) and per_phase == [cost.total_s]
    ideal, _ = ideal_phase_cost(loads, topo, cfg, ("train",))
    assert ideal == ideal_step_cost(loads, topo, cfg)


def _second_step(steps):
    """``(cfg, topo, loads, policy, previous, plan)``: hybrid's plan of step 1 after step 0."""
    cfg, topo = setup()
    loads = torch.from_numpy(steps[1].loads())
    policy = HybridPolicy()
    policy.plan(torch.from_numpy(steps[0].loads()), topo)
    previous = policy.placement
    return cfg, topo, loads, policy, previous, policy.plan(loads, topo)


def test_forward_passes_cost_forward_work_on_the_previous_placement(steps):
    cfg, topo, loads, policy, previous, plan = _second_step(steps)
    assert not plan.placement.equal(previous)
    early = plan_on(policy, loads, previous, topo)
    assert early.placement.equal(previous) and int(early.replicas().sum()) > 0  # fresh replicas, old homes
    cost, (logprob, ref, train) = phase_step_cost(plan, loads, cfg, previous, ("logprob", "ref", "train"), policy,
                                                  overlap_micro_batches=None)  # every forward-only pass early
    forward = step_cost(early, loads, forward_config(cfg))
    assert logprob == ref == pytest.approx(forward.total_s)
    assert train == pytest.approx(step_cost(plan, loads, cfg, previous=previous).total_s)  # migration once
    assert forward.reorder_s == 0 and forward.total_s < train / 2
    # forward-only: compute and dense work a third of a training pass (backward is 2x), all-to-all half
    full = step_cost(early, loads, cfg)
    assert forward.expert_compute_s == pytest.approx(full.expert_compute_s / 3)
    assert forward.a2a_s == pytest.approx(full.a2a_s / 2)
    assert cost.tokens == full.tokens and cost.total_s == pytest.approx(logprob + ref + train)
    # a policy without replan runs the forward passes on the previous placement without replicas
    bare, expected = plan_on(object(), loads, previous, topo), Plan.without_replicas(previous, loads, topo)
    assert bare.placement.equal(previous) and int(bare.replicas().sum()) == 0
    assert torch.equal(bare.slot_tokens, expected.slot_tokens)


def test_the_experts_move_after_the_early_micro_batches(steps):
    cfg, topo, loads, policy, previous, plan = _second_step(steps)
    M, fwd = loads.shape[0], forward_config(cfg)
    assert M > 2 and early_rows(("logprob", "ref", "train"), M) == 1
    assert early_rows(("logprob", "ref", "train"), M, overlap_micro_batches=None) == 2 * M
    assert early_rows(("logprob", "train"), M, overlap=False) == 0 and early_rows(("train",), M) == 0
    before = plan_on(policy, loads, previous, topo)

    # default: micro-batch 0 of the log-prob pass on the old homes, then the move, then the step's plan
    cost, (logprob, ref, train) = phase_step_cost(plan, loads, cfg, previous, ("logprob", "ref", "train"), policy)
    head = step_cost(before.micro_batches(0, 1), loads[:1], fwd)
    # the moved experts' optimizer state travels behind the rest of the step up to its optimizer step
    hide = sum(c.expert_compute_s + c.non_moe_s + c.extra_s for c in (
        step_cost(plan.micro_batches(1, M), loads[1:], fwd), step_cost(plan, loads, fwd), step_cost(plan, loads, cfg)))
    tail = step_cost(plan.micro_batches(1, M), loads[1:], fwd, previous=previous, state_hide_s=hide)
    assert tail.reorder_s > 0 and logprob == pytest.approx(head.total_s + tail.total_s)
    assert ref == pytest.approx(step_cost(plan, loads, fwd).total_s)
    assert train == pytest.approx(step_cost(plan, loads, cfg).total_s)  # no second move
    assert cost.tokens == pytest.approx(step_cost(plan, loads, cfg).tokens)
    # k = M + 1: the log-prob pass on the old homes, the move as the reference pass's second micro-batch starts
    _, (logprob_k, ref_k, _) = phase_step_cost(plan, loads, cfg, previous, ("logprob", "ref", "train"), policy,
                                               overlap_micro_batches=M + 1)
    assert logprob_k == pytest.approx(step_cost(before, loads, fwd).total_s)
    hide_k = sum(c.expert_compute_s + c.non_moe_s + c.extra_s for c in (
        step_cost(plan.micro_batches(1, M), loads[1:], fwd), step_cost(plan, loads, cfg)))
    assert ref_k == pytest.approx(step_cost(before.micro_batches(0, 1), loads[:1], fwd).total_s + step_cost(
        plan.micro_batches(1, M), loads[1:], fwd, previous=previous, state_hide_s=hide_k).total_s)


def test_simulate_packings_and_phases(steps):
    cfg, topo = setup()
    loads = np.stack([st.loads() for st in steps])
    rollout = simulate(loads, topo, cfg, ["static", "hybrid", "ideal"])
    for mode in ("tokens", "routes"):
        packer = StepPacker(steps, mode, topo)
        packed = simulate(loads, topo, cfg, ["static", "hybrid", "ideal"], packer=packer)
        assert packed["ideal"].step_time_s == pytest.approx(rollout["ideal"].step_time_s)  # no packing changes it
        assert packed["static"].step_time_s < rollout["static"].step_time_s  # groups of 4 at concentration 8
        assert len(packer.seconds) == 2 * len(steps)  # every step of both policies
        assert packed["static"].max_vio == pytest.approx(packed["static"].imbalance_mean - 1)
        assert 0 < packed["hybrid"].balancedness <= 1 and packed["hybrid"].max_vio < packed["static"].max_vio
    phased = simulate(loads, topo, cfg, ["hybrid", "ideal"], phases=("logprob", "train", "train"),
                      overlap_micro_batches=None)  # the whole log-prob pass on the step before's placement
    parts = phased["hybrid"].breakdown_s["phases_s"]
    assert [p["phase"] for p in parts] == ["logprob", "train", "train"]
    assert sum(p["seconds"] for p in parts) == pytest.approx(phased["hybrid"].step_time_s)
    assert parts[1]["seconds"] == pytest.approx(rollout["hybrid"].step_time_s)  # the first epoch moves experts
    assert parts[2]["seconds"] < parts[1]["seconds"]  # the second does not
    blocking = simulate(loads, topo, cfg, ["hybrid"], phases=("logprob", "train", "train"), overlap=False)
    first = blocking["hybrid"].breakdown_s["phases_s"]
    assert first[0]["seconds"] != pytest.approx(parts[0]["seconds"])  # the log-prob pass on the step's placement
    assert first[1]["seconds"] == first[2]["seconds"] == pytest.approx(parts[2]["seconds"])  # the move went first
    # the default: one log-prob micro-batch on the old placement, the move inside the log-prob pass
    default = simulate(loads, topo, cfg, ["hybrid"], phases=("logprob", "train", "train"))["hybrid"]
    passes = default.breakdown_s["phases_s"]
    assert passes[1]["seconds"] == passes[2]["seconds"] == pytest.approx(parts[2]["seconds"])
    assert default.step_time_s < phased["hybrid"].step_time_s


def test_bench_packing_and_phases_json(v2_trace, capsys):
    args = ["bench", "--trace", v2_trace, "--preset", "qwen3-30b-a3b", "--nodes", "2", "--gpus-per-node", "4",
            "--policies", "static,hybrid,ideal", "--json"]
    assert main(args) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["packing"]["mode"] == "rollout" and default["phases"] == ["train"]
    assert main(args + ["--packing", "routes", "--phases", "logprob,ref,train"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["packing"]["mode"] == "routes" and out["phases"] == ["logprob", "ref", "train"]
    assert out["packing"]["tokens_per_micro_batch"] == 4096 and len(out["packing"]["sequences_per_step"]) == 3
    static = out["policies"]["static"]
    assert set(default["policies"]["static"]) == set(static)  # the policies object keeps its shape
    for key in ("max_vio", "balancedness", "step_time_s", "imbalance_mean"):
        assert key in static
    assert [p["phase"] for p in static["breakdown_s"]["phases_s"]] == ["logprob", "ref", "train"]
    assert static["step_time_s"] > default["policies"]["static"]["step_time_s"]  # three passes, not one


def test_bench_packing_needs_sequences(tmp_path, capsys):
    v1 = str(tmp_path / "v1.npz")
    save_trace_file(v1, np.ones((2, 2, L, E), np.int64), 8)
    base = ["bench", "--trace", v1, "--preset", "qwen3-30b-a3b", "--nodes", "2", "--policies", "static"]
    assert main(base + ["--packing", "tokens"]) == 2
    err = capsys.readouterr().err
    assert "--packing tokens needs a per-sequence (format 2) trace" in err and "--per-sequence" in err
    assert main(base + ["--phases", "logprob,ref"]) == 2
    assert "has no training phase" in capsys.readouterr().err
    assert main(base + ["--phases", "logprob,reff,train"]) == 2
    assert "unknown phase 'reff'" in capsys.readouterr().err
