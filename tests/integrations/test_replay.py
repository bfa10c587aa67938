"""Routes recorded at generation replay in training: same ids, live gate scores, through padding and shuffling."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from relibra.integrations.replay import RouteRecorder, replay_routes, store_generation  # noqa: E402
from relibra.integrations.transformers import swap_moe_blocks  # noqa: E402
from relibra.routing import RouteStore  # noqa: E402
from relibra.runtime.balancer import Balancer  # noqa: E402

E, K, L = 8, 2, 2


def _model():
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                      num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=E, num_experts_per_tok=K, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.Qwen3MoeForCausalLM(cfg).float()


def _generate(model, B=4, P=5, N=4):
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, 64, (B, P), generator=g)
    torch.manual_seed(2)
    with torch.no_grad(), RouteRecorder(model) as rec:
        seqs = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=N,
                              min_new_tokens=N, eos_token_id=None, pad_token_id=0)
    return seqs, rec


def test_recorded_routes_are_the_routes_of_a_full_forward_in_r3_layout():
    model = _model()
    seqs, rec = _generate(model)
    B, S = seqs.shape
    assert rec.routes().shape == (B, S - 1, L, K)  # the last sampled token is never fed back
    swapped = copy.deepcopy(model)
    swap_moe_blocks(swapped)
    with torch.no_grad(), RouteRecorder(swapped) as full:  # hooks work on ReLibraMoE's gate too
        swapped(seqs)
    torch.testing.assert_close(full.routes()[:, :-1], rec.routes(), rtol=0, atol=0)
    per_seq = rec.sequences(seqs)
    assert [tuple(r.shape) for r in per_seq] == [(S - 1, L, K)] * B


def _left_padded(seqs, pad=3):
    B, S = seqs.shape
    ids = torch.zeros(B, S + pad, dtype=seqs.dtype)
    mask = torch.zeros(B, S + pad, dtype=torch.long)
    for b in range(B):
        shift = b % (pad + 1)  # ragged padding
        ids[b, shift:shift + S] = seqs[b]
        mask[b, shift:shift + S] = 1
    return ids, mask


def test_replay_after_shuffle_and_padding_equals_live_routing_and_keeps_router_grads():
    model = _model()
    seqs, rec = _generate(model)
    store = RouteStore(num_experts=E)
    store_generation(store, rec, seqs)
    swap_moe_blocks(model)
    perm = torch.tensor([2, 0, 3, 1])
    ids, mask = _left_padded(seqs[perm])
    routes_BSLK = store.gather_tokens(ids, mask)
    assert (routes_BSLK[~mask.bool()] == -1).all()

    def run(replay):
        model.zero_grad(set_to_none=True)
        if replay:
            with replay_routes(model, routes_BSLK):
                logits = model(ids, attention_mask=mask).logits
        else:
            logits = model(ids, attention_mask=mask).logits
        # the last real token has no recorded route (len - 1): compare and train on the others
        keep = mask.bool().clone()
        keep[torch.arange(len(keep)), mask.shape[1] - 1 - mask.flip(1).argmax(1)] = False
        logits[keep].square().mean().backward()
        return logits.detach()[keep], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    live_logits, live_grads = run(False)
    rep_logits, rep_grads = run(True)
    torch.testing.assert_close(rep_logits, live_logits, rtol=1e-5, atol=1e-5)
    for n in live_grads:
        if "mlp.gate.weight" in n or "experts" in n:
            torch.testing.assert_close(rep_grads[n], live_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(rep_grads[n].abs().sum() > 0 for n in rep_grads if "mlp.gate.weight" in n)


def test_replayed_ids_are_used_and_the_router_still_learns():
    model = _model()
    swap_moe_blocks(model)
    ids = torch.randint(0, 64, (2, 6))
    forced = torch.zeros(2 * 6, L, K, dtype=torch.int64)
    forced[..., 0], forced[..., 1] = 5, 7  # not what the router would choose for every token
    with RouteRecorder(model) as rec, replay_routes(model, forced):
        out = model(ids).logits
    assert (rec.routes().reshape(-1, L, K) == forced).all()
    out.sum().backward()
    g = model.model.layers[0].mlp.gate.weight.grad
    assert g is not None and g[[5, 7]].abs().sum() > 0  # live scores at the replayed ids carry gradient


def test_replay_through_balancer_micro_batch_matches_direct_replay():
    model = _model()
    seqs, rec = _generate(model)
    store = RouteStore(num_experts=E)
    store_generation(store, rec, seqs)
    swap_moe_blocks(model)
    batches = [seqs[:2], seqs[2:]]
    routes = [store.gather_tokens(b, torch.ones_like(b)).flatten(0, 1) for b in batches]
    direct = []
    for b, r in zip(batches, routes):
        with torch.no_grad(), replay_routes(model, r):
            direct.append(model(b).logits)
    bal = Balancer(model, policy="static")
    bal.plan_step(routes)
    for m, b in enumerate(batches):
        with torch.no_grad(), bal.micro_batch(m):
            torch.testing.assert_close(model(b).logits, direct[m], rtol=0, atol=0)


def test_bad_replayed_routes_raise_clear_errors():
    model = _model()
    swap_moe_blocks(model)
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match="one row per MoE layer"):
        with replay_routes(model, torch.zeros(4, L + 1, K, dtype=torch.int64)):
            pass
    with pytest.raises(ValueError, match="tokens"):
        with replay_routes(model, torch.zeros(5, L, K, dtype=torch.int64)):
            model(ids)
    with pytest.raises(ValueError, match="expert id"):
        with replay_routes(model, torch.full((4, L, K), E, dtype=torch.int64)):
            model(ids)
