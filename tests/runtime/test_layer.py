"""ReLibraMoE: router semantics, replayed routes, state_dict in logical order; a gloo world
(2 nodes x 2 GPUs) checks the sharded layer against the single-process one without a Balancer.
Single-process tests taking ``device`` also run on CUDA when a GPU is present (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from relibra import ReLibraMoE
from relibra.testing import run_world


def _naive(layer: ReLibraMoE, x, ids, w):
    out = torch.zeros_like(x)
    I = layer.hidden_dim
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            h = layer.experts.gate_up_proj[e] @ x[t]
            out[t] += w[t, k] * (layer.experts.down_proj[e] @ (F.silu(h[:I]) * h[I:]))
    return out


def test_softmax_router_with_shared_expert_matches_naive_loop(device):
    torch.manual_seed(0)
    layer = ReLibraMoE(8, 6, 8, 2, shared_expert_hidden_dim=4, shared_expert_gate=True, device=device)
    x = torch.randn(2, 5, 8).to(device)
    y = layer(x)
    assert y.shape == x.shape
    x2 = x.reshape(-1, 8)
    s = (x2 @ layer.gate.weight.T).softmax(-1)
    w, ids = s.topk(2)
    ref = _naive(layer, x2, ids, w / w.sum(-1, keepdim=True))
    ref = ref + torch.sigmoid(layer.shared_expert_gate(x2)) * layer.shared_expert(x2)
    torch.testing.assert_close(y.reshape(-1, 8), ref, atol=1e-5, rtol=1e-5)


def test_deepseek_router_group_limited_with_bias_and_scale(device):
    torch.manual_seed(1)
    layer = ReLibraMoE(8, 4, 8, 2, score_func="sigmoid", num_expert_groups=4, topk_groups=1,
                       score_correction_bias=True, route_scale=2.5, device=device)
    layer.gate.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 0]))
    x = torch.randn(6, 8).to(device)
    ids, w = layer.gate(x)
    assert (ids // 2 == 3).all(), "bias on expert 6 makes group 3 the only kept group"
    s = (x @ layer.gate.weight.T).sigmoid()
    expect = s.gather(1, ids)
    torch.testing.assert_close(w, 2.5 * expect / expect.sum(-1, keepdim=True))
    assert "gate.e_score_correction_bias" in layer.state_dict()


def test_replayed_routes_are_used_and_router_still_learns(device):
    torch.manual_seed(2)
    layer = ReLibraMoE(8, 6, 8, 2, device=device)
    x = torch.randn(7, 8).to(device)
    routes = torch.tensor([[7, 0], [1, -1], [2, 3], [3, 2], [0, 7], [5, 5], [6, 1]], device=device)
    y = layer(x, routes)
    s = (x @ layer.gate.weight.T).softmax(-1)
    w = s.gather(1, routes.clamp(min=0)) * (routes >= 0)
    torch.testing.assert_close(y, _naive(layer, x, routes, w / w.sum(-1, keepdim=True)), atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
    unused = sorted(set(range(8)) - set(routes.flatten().tolist()))
    assert unused == [4]
    for e in unused:
        assert layer.experts.gate_up_proj.grad[e].abs().sum() == 0


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[0, 8]] * 3), "not an expert id"),
    (torch.zeros(3, 3, dtype=torch.int64), "must have shape"),
    (torch.zeros(3, 2), "integer expert ids"),
    ([[0, 1]] * 3, "routes must be a tensor"),
    (torch.zeros(3, 2, dtype=torch.int64, device="meta"), "routes is on meta, but the tokens are on cpu"),
])
def test_bad_routes_raise_value_error(bad, match):
    layer = ReLibraMoE(8, 6, 8, 2)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(3, 8), bad)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(3, 7), r"x must end in dim=8, got shape \(3, 7\)"),
    (torch.tensor(1.0), r"x must end in dim=8, got shape \(\)"),
    (torch.empty(3, 8, device="meta"), "x is on meta, but the layer's weights are on cpu"),
    ([[0.0] * 8] * 3, "x must be a tensor"),
])
def test_bad_tokens_raise_value_error(bad, match):
    layer = ReLibraMoE(8, 6, 8, 2)
    with pytest.raises(ValueError, match=match):
        layer(bad)


def test_state_dict_round_trip_uses_transformers_names(device):
    torch.manual_seed(3)
    a, b = ReLibraMoE(8, 6, 8, 2, device=device), ReLibraMoE(8, 6, 8, 2, device=device)
    sd = a.state_dict()
    assert sd["experts.gate_up_proj"].shape == (8, 12, 8) and sd["experts.down_proj"].shape == (8, 8, 6)
    b.load_state_dict(sd)
    x = torch.randn(4, 8).to(device)
    torch.testing.assert_close(a(x), b(x))


def _layer_worker(rank, mesh):
    torch.manual_seed(0)
    ref = ReLibraMoE(8, 6, 8, 2, score_func="sigmoid", shared_expert_hidden_dim=4)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(3 + r, 8, generator=g) for r in range(4)]
    xs[2] = xs[2][:0]  # rank 2 has no token
    routes = [torch.randint(0, 8, (x.shape[0], 2), generator=g) for x in xs]
    x_all, r_all = torch.cat(xs), torch.cat(routes)
    start = sum(x.shape[0] for x in xs[:rank])
    out = {}
    # a permuted placement: home slots do not follow logical order
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    layer = ReLibraMoE(8, 6, 8, 2, mesh, score_func="sigmoid", shared_expert_hidden_dim=4)
    layer._set_home_experts(perm)
    layer.load_state_dict(ref.state_dict())
    assert layer.experts.gate_up_proj.to_local().shape == (2, 12, 8)
    torch.testing.assert_close(
        layer.experts.gate_up_proj.to_local(), ref.experts.gate_up_proj[perm[2 * rank : 2 * rank + 2]]
    )
    for mode in ("live", "replayed"):
        ref.zero_grad()
        layer.zero_grad()
        r_ref = None if mode == "live" else r_all
        r_me = None if mode == "live" else routes[rank]
        y_ref = ref(x_all, r_ref)
        y = layer(xs[rank], r_me)
        out[mode + "_out"] = float((y - y_ref[start : start + xs[rank].shape[0]]).abs().max()) if y.numel() else 0.0
        y_ref.square().sum().backward()
        y.square().sum().backward()
        full = layer.experts.down_proj.grad.full_tensor()
        logical = torch.empty_like(full)
        logical[perm] = full
        out[mode + "_expert_grad"] = float((logical - ref.experts.down_proj.grad).abs().max())
    sd = layer.state_dict()
    out["state_dict"] = all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    return out


def test_sharded_layer_equals_single_process_under_a_permuted_placement():
    for rank, res in enumerate(run_world(_layer_worker, timeout=120)):
        for key in ("live_out", "replayed_out", "live_expert_grad", "replayed_expert_grad"):
            assert res[key] < 1e-5, f"rank {rank}: {key} differs by {res[key]}"
        assert res["state_dict"], f"rank {rank}: state_dict is not in logical order"


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=0), r"dim must be an int >= 1, got 0"),
    (dict(hidden_dim=-3), r"hidden_dim must be an int >= 1, got -3"),
    (dict(num_experts=0), r"num_experts must be an int >= 1, got 0"),
    (dict(top_k=9), r"top_k must be an int in \[1, 8\], got 9"),
    (dict(top_k=2.0), r"top_k must be an int, got 2.0"),
    (dict(dim=True), r"dim must be an int, got True"),
    (dict(score_func="relu"), r"score_func must be 'softmax' or 'sigmoid', got 'relu'"),
    (dict(route_scale=0.0), r"route_scale must be a finite number > 0, got 0.0"),
    (dict(route_scale=float("inf")), r"route_scale must be a finite number > 0, got inf"),
    (dict(num_expert_groups=3), r"num_expert_groups=3 must divide num_experts=8"),
    (dict(num_expert_groups=4, topk_groups=5), r"topk_groups must be an int in \[1, 4\], got 5"),
    (dict(num_expert_groups=8, topk_groups=1), r"top_k=2 experts cannot be chosen from topk_groups=1 groups of 1"),
    (dict(norm_topk_prob="yes"), r"norm_topk_prob must be True or False, got 'yes'"),
    (dict(score_correction_bias=1), r"score_correction_bias must be True or False, got 1"),
    (dict(shared_expert_hidden_dim=0), r"shared_expert_hidden_dim must be an int >= 1, got 0"),
    (dict(shared_expert_gate=True), r"shared_expert_gate must be True \(with shared_expert_hidden_dim\)"),
    (dict(spare_slots_per_gpu=-1), r"spare_slots_per_gpu must be an int >= 0, got -1"),
    (dict(dtype=torch.int64), r"dtype must be a floating-point torch.dtype or None, got torch.int64"),
    (dict(agree_input_errors=None), r"agree_input_errors must be True or False, got None"),
    (dict(mesh="cpu"), r"mesh must be a DeviceMesh or None, got str"),
])
def test_every_constructor_argument_is_checked_by_name(kwargs, match):
    args = dict(dim=8, hidden_dim=6, num_experts=8, top_k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ReLibraMoE(**args)

