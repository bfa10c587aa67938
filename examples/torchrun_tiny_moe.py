"""relibra with plain PyTorch: torchrun, DDP, a tiny Hugging Face MoE, recorded routes, hybrid.

    torchrun --nproc_per_node 2 examples/torchrun_tiny_moe.py          # gloo on CPU, ~1 minute

Every process (one "GPU" of a 1 node x world expert-parallel mesh) builds the same random
Qwen3-MoE from its transformers config (no download; the router aux loss on), swaps its MoE
blocks for ReLibraMoE with experts sharded over the mesh, wraps it with ``wrap_ddp`` (the
replicated weights are averaged by DDP, the experts stay out of it) and trains for a few steps:

  rollout   sample this rank's sequences and record every token's experts with a
            ``RouteRecorder`` (the routes an inference engine returns, R3 layout [B, S, L, K])
  plan      ``balancer.plan_step(routes)``: one [T_m, L, K] tensor per micro-batch -> loads ->
            plan (expert moves once a step, replicas per micro-batch)
  train     per micro-batch ``with balancer.micro_batch(m)``: forward with the replayed routes,
            causal-LM loss + router aux loss, backward; AdamW step

The run is done twice from the same seed, with ``static`` (no balancing) and ``--policy``
(``hybrid``), and rank 0 prints ONE JSON line: both runs' losses, the GPU imbalance (busiest /
mean rank of the token copies computed, measured by the layers, mean over micro-batches and
layers) before (static) and after (the policy), and the largest difference of any loss and of
any final weight between the two runs (balancing must not change the math: ~1e-7 in fp32).

The random router is nudged towards two experts (a constant component in every embedding and
in those experts' router rows), so the skew of a trained model's routing shows in a random one.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="hybrid", help="balancing policy compared against static")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=4, help="sequences per rank per micro-batch")
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The same tiny Qwen3-MoE on every rank (seeded), router aux loss on, two hot experts."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=64,
                         tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.01)
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(cfg).float()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 0.03
        for layer in model.model.layers:
            layer.mlp.gate.weight[:2, 0] += 1.0
    return model


def rollout_tokens(args: argparse.Namespace, step: int, rank: int) -> torch.Tensor:
    """This rank's ``[M * sequences, seq_len]`` token ids of the step (the same in both runs)."""
    g = torch.Generator().manual_seed(10_000 * args.seed + 100 * step + rank)
    return torch.randint(0, 128, (args.micro_batches * args.sequences, args.seq_len), generator=g)


def run(policy: str, args: argparse.Namespace, mesh) -> dict:
    """Train ``args.steps`` steps with ``policy``; returns losses, imbalance and final weights."""
    from relibra import Balancer
    from relibra.integrations.ddp import wrap_ddp
    from relibra.integrations.replay import RouteRecorder
    from relibra.integrations.transformers import swap_moe_blocks

    rank, M = dist.get_rank(), args.micro_batches
    model = build_model(args)
    swap_moe_blocks(model, mesh)                       # experts sharded over the mesh (DTensors)
    ddp_model = wrap_ddp(model)                        # DDP for the rest; experts left to relibra
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    balancer = Balancer(model, mesh=mesh, policy=policy, optimizer=optimizer, spare_slots_per_gpu=1)
    losses, imbalance = [], []
    for step in range(args.steps):
        tokens = rollout_tokens(args, step, rank)
        with torch.no_grad(), RouteRecorder(model) as recorder:   # stands in for the inference engine
            model(tokens)
        routes_BSLK = recorder.routes()                            # [B, S, L, K] int64
        batches = tokens.chunk(M)
        routes = [r.flatten(0, 1) for r in routes_BSLK.chunk(M)]   # per micro-batch [T_m, L, K]
        balancer.plan_step(routes)                                 # collective: loads -> plan -> moves
        step_losses = []
        for m, ids in enumerate(batches):
            last = m == M - 1
            with balancer.micro_batch(m), (ddp_model.no_sync() if not last else _nothing()):
                out = ddp_model(input_ids=ids, labels=ids)         # LM loss + router aux loss
                (out.loss / M).backward()
            step_losses.append(float(out.loss.detach()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = balancer.metrics(gather_realised=True)
        imbalance.append(metrics["realised_imbalance"])
        losses.append(step_losses)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # logical expert order
    return {"losses": losses, "imbalance": sum(imbalance) / len(imbalance), "weights": weights}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    args = _parse()
    t0 = time.perf_counter()
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("node", "gpu"))
    runs = {name: run(name, args, mesh) for name in ("static", args.policy)}
    base, balanced = runs["static"], runs[args.policy]
    loss_diff = torch.tensor(max(abs(a - b) for sa, sb in zip(base["losses"], balanced["losses"])
                                 for a, b in zip(sa, sb)), dtype=torch.float64)
    weight_diff = torch.tensor(max(float((base["weights"][k] - balanced["weights"][k]).abs().max())
                                   for k in base["weights"]), dtype=torch.float64)
    for value in (loss_diff, weight_diff):
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(json.dumps({
            "policy": args.policy,
            "processes": world,
            "steps": args.steps,
            "micro_batches": args.micro_batches,
            "losses_static": [[round(x, 6) for x in s] for s in base["losses"]],
            f"losses_{args.policy}": [[round(x, 6) for x in s] for s in balanced["losses"]],
            "imbalance_static": round(base["imbalance"], 4),
            f"imbalance_{args.policy}": round(balanced["imbalance"], 4),
            "loss_max_abs_diff": float(loss_diff),
            "weight_max_abs_diff": float(weight_diff),
            "seconds": round(time.perf_counter() - t0, 1),
        }), flush=True)
    dist.barrier()  # every rank done with gloo before any tears it down (a rank exiting early can abort its peer)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
