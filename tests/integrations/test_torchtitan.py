"""swap_moe_modules on torchtitan 0.3 MoE modules (skipped without torchtitan; CPU).

torchtitan computes its experts in bf16 whatever the parameter dtype, relibra in the parameter
dtype (fp32 here). As shipped, outputs and gradients agree at bf16 precision (and the same
comparison with w1 and w3 exchanged fails by far, so that tolerance still tells a right mapping
from a wrong one); with torchtitan's bf16 casts made no-ops they agree to fp32 rounding. Routing
(which experts, with which weights) is compared exactly.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn

pytest.importorskip("torchtitan")
from torchtitan.models.common.config_utils import (  # noqa: E402
    make_ffn_config,
    make_moe_config,
    make_routed_experts_config,
    make_router_config,
)

from relibra import Balancer  # noqa: E402
from relibra.integrations.replay import RouteRecorder  # noqa: E402
from relibra.integrations.torchtitan import (  # noqa: E402
    find_moe_modules,
    swap_moe_modules,
    to_relibra_state_dict,
    to_torchtitan_state_dict,
)
from relibra.runtime.layer import ReLibraMoE  # noqa: E402
from relibra.testing import run_world  # noqa: E402

D, F, E, K = 32, 16, 8, 2


def _init(std):
    return partial(nn.init.normal_, std=std)


def _moe_config(score_func="softmax", route_norm=True, groups=None, bias=False, shared=False, scale=1.0):
    return make_moe_config(
        num_experts=E,
        router=make_router_config(dim=D, num_experts=E, gate_param_init={"weight": _init(0.3)}, top_k=K,
                                  score_func=score_func, route_norm=route_norm, route_scale=scale,
                                  num_expert_groups=None if groups is None else groups[0],
                                  num_limited_groups=None if groups is None else groups[1]),
        routed_experts=make_routed_experts_config(
            dim=D, hidden_dim=F, num_experts=E, top_k=K, comm_backend="standard",
            param_init={"w1_EFD": _init(D ** -0.5), "w2_EDF": _init(F ** -0.5), "w3_EFD": _init(D ** -0.5)}),
        shared_experts=make_ffn_config(dim=D, hidden_dim=24, w1_param_init={"weight": _init(D ** -0.5)},
                                       w2w3_param_init={"weight": _init(D ** -0.5)}) if shared else None,
        load_balance_coeff=1e-3 if bias else None,
    )


class Stack(nn.Module):
    """Two torchtitan MoE layers with residuals, the way a decoder chains them (``layers.<i>.moe``)."""

    def __init__(self, **kw):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): nn.ModuleDict({"moe": _moe_config(**kw).build()}) for i in range(2)})
        for block in self.layers.values():
            block["moe"].init_states()
            if block["moe"].expert_bias_E is not None:  # a non-zero bias, so it changes the choice
                block["moe"].expert_bias_E.copy_(torch.randn(E) * 0.1)

    def forward(self, x_BLD):
        for block in self.layers.values():
            x_BLD = x_BLD + block["moe"](x_BLD)
        return x_BLD


CASES = {
    "qwen3": dict(score_func="softmax", route_norm=True),
    "deepseek_v3": dict(score_func="sigmoid", route_norm=True, groups=(4, 2), bias=True, shared=True, scale=2.5),
    "softmax_unnormalised_shared": dict(score_func="softmax", route_norm=False, shared=True),
}


def _run(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y.square().mean() + y[..., 0].sum()).backward()
    return y.detach(), x.grad.detach()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_swap_reproduces_the_torchtitan_moe(case):
    torch.manual_seed(0)
    ref = Stack(**CASES[case])
    swapped = Stack(**CASES[case])
    swapped.load_state_dict(ref.state_dict())
    names = swap_moe_modules(swapped, freeze_expert_bias=CASES[case].get("bias", False))
    assert names == ["layers.0.moe", "layers.1.moe"] and not find_moe_modules(swapped)
    assert all(isinstance(swapped.get_submodule(n), ReLibraMoE) for n in names)
    x = torch.randn(2, 7, D)
    # routing: the same experts with the same gate weights (torchtitan's router vs relibra's)
    for name in names:
        t_scores, t_ids, _ = ref.get_submodule(name).router(x, ref.get_submodule(name).expert_bias_E)
        r_ids, r_w = swapped.get_submodule(name).gate(x.reshape(-1, D))
        t_ids, order = t_ids.reshape(-1, K).sort(-1)
        r_ids, r_order = r_ids.sort(-1)
        assert torch.equal(t_ids, r_ids)
        torch.testing.assert_close(r_w.gather(1, r_order), t_scores.reshape(-1, K).gather(1, order))
    y_ref, gx_ref = _run(ref, x)
    y_new, gx_new = _run(swapped, x)
    assert _rel(y_new, y_ref) < 2e-2 and _rel(gx_new, gx_ref) < 2e-2  # bf16 experts in torchtitan
    g_ref = to_relibra_state_dict({n: p.grad for n, p in ref.named_parameters()})
    g_new = {n: p.grad for n, p in swapped.named_parameters()}
    assert sorted(g_new) == sorted(g_ref)
    for k in g_ref:
        assert _rel(g_new[k], g_ref[k]) < 3e-2, (k, _rel(g_new[k], g_ref[k]))
    # the tolerance tells a wrong mapping apart: w1 (gate) and w3 (up) exchanged
    wrong = Stack(**CASES[case])
    state = ref.state_dict()
    for p in ("layers.0.moe.", "layers.1.moe."):
        w1, w3 = p + "routed_experts.inner_experts.w1_EFD", p + "routed_experts.inner_experts.w3_EFD"
        state[w1], state[w3] = state[w3], state[w1]
    wrong.load_state_dict(state)
    swap_moe_modules(wrong, freeze_expert_bias=True)
    assert _rel(_run(wrong, x)[0] - x, y_ref - x) > 0.1


@pytest.mark.parametrize("case", sorted(CASES))
def test_swap_equals_torchtitan_computing_in_fp32(case, monkeypatch):
    """With torchtitan's bf16 casts made no-ops (test only), its MoE and the swap agree to fp32 rounding."""
    torch.manual_seed(0)
    ref = Stack(**CASES[case])
    swapped = Stack(**CASES[case])
    swapped.load_state_dict(ref.state_dict())
    swap_moe_modules(swapped, freeze_expert_bias=True)
    x = torch.randn(2, 7, D)
    y_new, gx_new = _run(swapped, x)
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *a, **k: self)  # GroupedExperts' casts
    y_ref, gx_ref = _run(ref, x)
    torch.testing.assert_close(y_new, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_new, gx_ref, rtol=1e-5, atol=1e-6)
    g_ref = to_relibra_state_dict({n: p.grad for n, p in ref.named_parameters()})
    for n, p in swapped.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_state_dict_converters_are_exact_inverses():
    torch.manual_seed(1)
    model = Stack(**CASES["deepseek_v3"])
    titan = {k: v.clone() for k, v in model.state_dict().items()}
    swap_moe_modules(model, freeze_expert_bias=True)
    mine = model.state_dict()
    converted = to_relibra_state_dict(titan)
    assert sorted(converted) == sorted(mine)
    for k in mine:
        assert torch.equal(converted[k], mine[k]), k
    back = to_torchtitan_state_dict(mine)
    assert sorted(back) == sorted(titan) and all(torch.equal(back[k], titan[k]) for k in titan)


def test_refusals_name_the_module_and_change_nothing():
    model = Stack(**CASES["deepseek_v3"])
    with pytest.raises(ValueError, match=r"layers\.0\.moe: load_balance_coeff=0\.001.*freeze_expert_bias=True"):
        swap_moe_modules(model)
    assert len(find_moe_modules(model)) == 2  # nothing was swapped
    with pytest.raises(ValueError, match="holds no torchtitan MoE"):
        swap_moe_modules(nn.Linear(2, 2))
    swap_moe_modules(model, freeze_expert_bias=True)
    assert all(m.load_balance_coeff is None for m in model.modules() if isinstance(m, ReLibraMoE))


def _titan_world(rank, mesh, state, x_all):
    """The swapped stack on 2 ranks: recorded routes replayed by a hybrid Balancer (forward + backward)."""
    model = Stack(**CASES["deepseek_v3"])
    model.load_state_dict(state)
    swap_moe_modules(model, mesh, freeze_expert_bias=True)
    x = x_all[rank].clone()
    with torch.no_grad(), RouteRecorder(model) as rec:
        model(x)
    routes = rec.routes().flatten(0, 1)  # [B*S, L, K]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal = Balancer(model, mesh=mesh, policy="hybrid", optimizer=opt, spare_slots_per_gpu=1)
    bal.plan_step([routes])
    with bal.micro_batch(0):
        x = x.requires_grad_(True)
        y = model(x)
        (y.square().mean() + y[..., 0].sum()).backward()
    return y.detach(), x.grad.detach(), routes, bal.metrics()


def test_swapped_torchtitan_moe_under_a_balancer_on_two_ranks_equals_one_process():
    torch.manual_seed(2)
    model = Stack(**CASES["deepseek_v3"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x_all = torch.randn(2, 2, 5, D)
    x_all[:, :, :, 0] += 2.0  # a shared direction: skewed routing, so hybrid has something to do
    results = run_world(_titan_world, world_size=2, nodes=1, args=(state, x_all), timeout=240)
    swap_moe_modules(model, freeze_expert_bias=True)
    for rank, (y, gx, routes, _) in enumerate(results):
        y_ref, gx_ref = _run(model, x_all[rank])
        with torch.no_grad(), RouteRecorder(model) as rec:
            model(x_all[rank])
        assert torch.equal(routes, rec.routes().flatten(0, 1))  # the same routes recorded on the ranks
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert results[0][3]["static_imbalance"] > results[0][3]["planned_imbalance"]  # balancing did something


def _tiny_qwen3_decoder():
    """A 2-layer torchtitan Qwen3-MoE decoder from torchtitan's own builders (flex attention)."""
    import torchtitan.models.qwen3 as qwen3
    from torchtitan.models.common.embedding import Embedding
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.rope import CosSinRoPE

    vocab, head_dim = 64, 8
    config = qwen3.Qwen3Model.Config(
        vocab_size=vocab, dim=D, norm=qwen3._qwen3_norm(D),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=D, param_init={"weight": _init(1.0)}),
        lm_head=Linear.Config(in_features=D, out_features=vocab, param_init={"weight": _init(D ** -0.5)}),
        layers=qwen3._build_qwen3_moe_layers(
            n_layers=2, dim=D, n_heads=4, n_kv_heads=2, head_dim=head_dim, moe_hidden_dim=F, num_experts=E,
            top_k=K, attn_backend="flex", moe_comm_backend="standard",
            rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=64, theta=1e6)))
    model = config.build()
    model.init_states()
    return model


def test_tiny_torchtitan_decoder_swapped_recorded_and_replayed(monkeypatch):
    """The whole decoder, forward only: torchtitan's flex attention has no backward on CPU."""
    torch.manual_seed(3)
    ref = _tiny_qwen3_decoder()
    model = _tiny_qwen3_decoder()
    model.load_state_dict(ref.state_dict())
    names = swap_moe_modules(model, freeze_expert_bias=True)
    assert names == ["layers.0.moe", "layers.1.moe"]
    tokens = torch.randint(0, 64, (2, 8))
    positions = torch.arange(8).expand(2, 8)
    masks = ref.get_attention_masks(positions)
    with torch.no_grad():
        with RouteRecorder(model) as rec:
            logits = model(tokens, positions, masks)
        routes_BSLK = rec.routes()
        assert routes_BSLK.shape == (2, 8, 2, K)
        balancer = Balancer(model, None, "static")
        balancer.plan_step([routes_BSLK.flatten(0, 1)])
        with balancer.micro_batch(0):  # the recorded routes replayed: the same logits
            replayed = model(tokens, positions, masks)
        torch.testing.assert_close(replayed, logits, rtol=0, atol=0)
        monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self, *a, **k: self)
        torch.testing.assert_close(logits, ref(tokens, positions, masks), rtol=1e-5, atol=1e-5)
