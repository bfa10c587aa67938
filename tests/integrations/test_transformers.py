"""swap_moe_blocks: tiny random transformers MoE models give the same logits and gradients after the swap."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from relibra.integrations.replay import RouteRecorder, replay_routes  # noqa: E402
from relibra.integrations.transformers import find_moe_blocks, swap_moe_blocks  # noqa: E402
from relibra.runtime.layer import ReLibraMoE  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _qwen3(norm=True, **kw):
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=norm, **kw))


def _qwen2(**kw):
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, **kw))


def _mixtral(**kw):
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, head_dim=8, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, **kw))


def _olmoe(**kw):
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        **COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, **kw))


def _deepseek(**kw):
    model = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4}, **kw,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    )
    with torch.no_grad():  # a non-zero correction bias, so the choice differs from topk(scores)
        for _, block, _ in find_moe_blocks(model):
            block.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.05)
            block.gate.weight.normal_(0, 0.5)
    return model


FAMILIES = {
    "qwen3_moe": _qwen3,
    "qwen3_moe_unnormalised": lambda **kw: _qwen3(False, **kw),
    "qwen2_moe": _qwen2,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek,
}


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    (logits.square().mean() + logits[..., 0].sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_swap_keeps_logits_and_grads(family):
    torch.manual_seed(0)
    ref = FAMILIES[family]().float().train()
    swapped = copy.deepcopy(ref)
    names = swap_moe_blocks(swapped)
    assert names and all(isinstance(swapped.get_submodule(n), ReLibraMoE) for n in names)
    assert not find_moe_blocks(swapped)
    # checkpoints load 1:1: same names, same shapes, same values
    sd_ref, sd_new = ref.state_dict(), swapped.state_dict()
    assert sorted(sd_ref) == sorted(sd_new)
    for k in sd_ref:
        torch.testing.assert_close(sd_new[k], sd_ref[k], rtol=0, atol=0, msg=k)
    ids = torch.randint(0, 64, (2, 7))
    logits_ref, g_ref = _run(ref, ids)
    logits_new, g_new = _run(swapped, ids)
    torch.testing.assert_close(logits_new, logits_ref, rtol=1e-5, atol=1e-5)
    assert sorted(g_ref) == sorted(g_new)
    checked = 0
    for k in g_ref:
        torch.testing.assert_close(g_new[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=k)
        checked += ("gate.weight" in k) + ("experts.gate_up_proj" in k)
    assert checked >= 2 * len(names)  # router and expert grads of every swapped block compared


def test_swapped_checkpoint_loads_into_fresh_hf_model():
    torch.manual_seed(1)
    src = _qwen2()
    swap_moe_blocks(src)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dst = _qwen2()
    dst.load_state_dict(src.state_dict(), strict=True)
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(dst(ids).logits, src(ids).logits, rtol=1e-5, atol=1e-5)


def test_mixtral_jitter_is_refused_before_any_swap():
    model = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            **COMMON,
            head_dim=8,
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            router_jitter_noise=0.1,
        )
    )
    with pytest.raises(ValueError, match="jitter"):
        swap_moe_blocks(model)
    assert len(find_moe_blocks(model)) == 2  # nothing was swapped


# ---------------------------------------------------------------------------- router logits / aux loss
AUX = dict(output_router_logits=True, router_aux_loss_coef=0.3)


def _aux_run(model, ids, routes=None):
    """Loss with the aux loss (labels given) plus a penalty on every layer's router logits; grads."""
    model.zero_grad(set_to_none=True)
    with replay_routes(model, routes) if routes is not None else contextlib.nullcontext():
        out = model(ids, labels=ids)
    penalty = sum(r.float().square().mean() for r in out.router_logits)  # reaches every layer's logits
    (out.loss + 0.1 * penalty).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same_grads(g_new, g_ref, names):
    assert sorted(g_new) == sorted(g_ref)
    for k in g_ref:
        torch.testing.assert_close(g_new[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=k)
    assert all(f"{n}.gate.weight" in g_ref for n in names)


@pytest.mark.parametrize("hooked_before_swap", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_router_logits_and_aux_loss_equal_the_unswapped_model(family, hooked_before_swap):
    torch.manual_seed(0)
    ref = FAMILIES[family](**AUX).float().train()
    ids = torch.randint(0, 64, (2, 7))
    if hooked_before_swap:  # transformers installs its recorder hooks on the first such forward
        ref(ids)
    swapped = copy.deepcopy(ref)
    names = swap_moe_blocks(swapped)
    out_ref, g_ref = _aux_run(ref, ids)
    out_new, g_new = _aux_run(swapped, ids)
    assert len(out_new.router_logits) == len(out_ref.router_logits) == len(names)
    for new, old in zip(out_new.router_logits, out_ref.router_logits):
        assert new.dtype == old.dtype and new.shape == old.shape
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)
    if family != "deepseek_v3":  # DeepSeek-V3's causal LM returns router logits but has no aux loss
        assert out_ref.aux_loss is not None and out_ref.aux_loss.requires_grad
        torch.testing.assert_close(out_new.aux_loss, out_ref.aux_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out_new.loss, out_ref.loss, rtol=1e-6, atol=1e-6)
    _assert_same_grads(g_new, g_ref, names)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_aux_loss_under_replayed_routes_comes_from_the_live_router(family):
    torch.manual_seed(0)
    ref = FAMILIES[family](**AUX).float().train()
    swapped = copy.deepcopy(ref)
    names = swap_moe_blocks(swapped)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad(), RouteRecorder(ref) as rec:  # the routes the unswapped model takes
        ref(ids)
    routes_BSLK = rec.routes()
    out_ref, g_ref = _aux_run(ref, ids)
    out_new, g_new = _aux_run(swapped, ids, routes_BSLK)
    torch.testing.assert_close(out_new.loss, out_ref.loss, rtol=1e-6, atol=1e-6)
    _assert_same_grads(g_new, g_ref, names)
    # other routes change the experts that compute, not the router's scores: the first MoE layer
    # sees the same input, so its logits are still the unswapped model's
    other = torch.randint(0, 8, routes_BSLK.shape)
    out_other, _ = _aux_run(swapped, ids, other)
    torch.testing.assert_close(out_other.router_logits[0], out_ref.router_logits[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out_other.logits, out_ref.logits)  # the replayed routes were used


def test_aux_loss_under_activation_checkpointing():
    torch.manual_seed(0)
    ref = _qwen3(**AUX).float().train()
    swapped = copy.deepcopy(ref)
    names = swap_moe_blocks(swapped)
    for model in (ref, swapped):  # the recompute must save what the forward saved
        model.activation_checkpointing_enable({"use_reentrant": False})
    ids = torch.randint(0, 64, (2, 7))
    out_ref, g_ref = _aux_run(ref, ids)
    out_new, g_new = _aux_run(swapped, ids)
    torch.testing.assert_close(out_new.aux_loss, out_ref.aux_loss, rtol=1e-6, atol=1e-7)
    _assert_same_grads(g_new, g_ref, names)
