"""wrap_ddp: a swapped transformers MoE under plain DistributedDataParallel on 2 gloo ranks.

The reference is one process running the unswapped model on each rank's batch in turn, with
the mean of the ranks' losses (what DDP optimises), the router aux loss included. The world
runs the swapped model with experts sharded over the 2 ranks, wrapped by ``wrap_ddp``, with the
routes the reference took replayed through a ``hybrid`` Balancer.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from relibra.integrations.ddp import expert_parameter_names, wrap_ddp  # noqa: E402
from relibra.integrations.replay import RouteRecorder  # noqa: E402
from relibra.integrations.transformers import swap_moe_blocks  # noqa: E402
from relibra.runtime.balancer import Balancer  # noqa: E402
from relibra.testing import run_world  # noqa: E402

WORLD, B, S, STEPS, LR = 2, 2, 6, 2, 0.1
POLICIES = ("hybrid", "replicate")  # hybrid moves experts here, replicate copies hot ones


def _model():
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=64, tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.3)
    model = transformers.Qwen3MoeForCausalLM(cfg).float()
    with torch.no_grad():  # hot experts 0 and 1 (both homed on rank 0): every token leans their way
        model.model.embed_tokens.weight[:, 0] = 0.04
        for layer in model.model.layers:
            layer.mlp.gate.weight[:2, 0] = 1.0
    return model


def _batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (WORLD * B, S), generator=g) for _ in range(STEPS)]


def _logical_grads(model):
    """Every parameter's gradient, expert gradients gathered in logical expert order."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        if hasattr(g, "full_tensor"):
            layer = model.get_submodule(name.rsplit(".experts.", 1)[0])
            full = g.full_tensor()
            g = torch.empty_like(full)
            g[layer.home_experts_K] = full
        out[name] = g.detach().clone()
    return out


def _reference():
    torch.manual_seed(0)
    model = _model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    per_step = []
    for ids in _batches():
        losses, routes = [], []
        for r in range(WORLD):
            mine = ids[r * B:(r + 1) * B]
            with RouteRecorder(model) as rec:
                out = model(mine, labels=mine)
            (out.loss / WORLD).backward()
            losses.append(float(out.loss.detach()))
            routes.append(rec.routes().flatten(0, 1))  # [B*S, L, K]: this rank's replayed routes
        per_step.append((losses, routes, {k: v.clone() for k, v in _logical_grads(model).items()}))
        opt.step()
        opt.zero_grad()
    return init, per_step


def _ddp_run(rank, mesh, init, per_step, policy):
    model = _model()
    model.load_state_dict(init)
    swap_moe_blocks(model, mesh)
    ddp = wrap_ddp(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    bal = Balancer(model, mesh=mesh, policy=policy, optimizer=opt, spare_slots_per_gpu=1,
                   placement_min_gain=0)  # adopt every placement: moves under DDP are exercised
    out = {"loss": 0.0, "grad": 0.0, "replicas": 0, "moved": 0}
    for ids, (losses, routes, grads) in zip(_batches(), per_step):
        mine = ids[rank * B:(rank + 1) * B]
        bal.plan_step([routes[rank]])
        out["replicas"] += int(bal.plan.replicas().sum())
        out["moved"] += bal.metrics()["experts_moved"]
        with bal.micro_batch(0):
            res = ddp(mine, labels=mine)
            res.loss.backward()
        out["loss"] = max(out["loss"], abs(float(res.loss.detach()) - losses[rank]))
        got = _logical_grads(model)
        assert sorted(got) == sorted(grads)
        out["grad"] = max(out["grad"], max(float((got[k] - grads[k]).abs().max()) for k in grads))
        opt.step()
        opt.zero_grad()
    out["ignored"] = sorted(ddp.parameters_to_ignore)
    out["experts"] = sorted(expert_parameter_names(model))
    return out


def _ddp_worker(rank, mesh, init, per_step):
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    swap_moe_blocks(model, mesh)
    try:  # a bare DDP is refused when it is built, saying what to do
        DistributedDataParallel(model)
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    runs = {policy: _ddp_run(rank, mesh, init, per_step, policy) for policy in POLICIES}
    return refused, runs


@pytest.mark.distributed
def test_swapped_model_under_wrap_ddp_equals_one_process_with_the_aux_loss():
    init, per_step = _reference()
    results = run_world(_ddp_worker, world_size=WORLD, nodes=1, args=(init, per_step), timeout=240)
    for rank, (refused, runs) in enumerate(results):
        assert "wrap_ddp" in refused and "DTensors" in refused, refused
        for policy, res in runs.items():
            assert len(res["experts"]) == 4 and res["ignored"] == res["experts"]  # only the experts skip DDP
            assert res["loss"] < 1e-5, f"rank {rank} {policy}: loss differs by {res['loss']}"
            assert res["grad"] < 1e-5, f"rank {rank} {policy}: gradients differ by {res['grad']}"
        assert runs["hybrid"]["moved"] > 0 and runs["replicate"]["replicas"] > 0, runs  # balancing happened


def _mismatch_worker(rank, mesh):
    import torch.distributed as dist

    model = _model()
    swap_moe_blocks(model, mesh)
    solo = dist.new_group([0])  # collective: every rank creates it
    if rank != 0:
        return ""
    try:
        wrap_ddp(model, process_group=solo)
    except ValueError as exc:
        return str(exc)
    return "accepted"


@pytest.mark.distributed
def test_wrap_ddp_refuses_a_process_group_other_than_the_expert_parallel_group():
    message = run_world(_mismatch_worker, world_size=WORLD, nodes=1, timeout=120)[0]
    assert "ranks [0, 1]" in message and "ranks [0]" in message and "apply_fsdp" in message, message


def test_wrap_ddp_needs_an_initialised_process_group():
    model = _model()
    swap_moe_blocks(model)
    with pytest.raises(ValueError, match="init_process_group"):
        wrap_ddp(model)
