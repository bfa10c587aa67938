"""GRPO-style training of a tiny Qwen3-MoE with rollout routing replay and relibra balancing.

    relibra launch --config_file examples/accelerate_cpu.yaml examples/grpo_tiny_moe.py

Each process (a "GPU" of a 1 node x world expert-parallel mesh, gloo on CPU) builds the same
random Qwen3-MoE from a config (no download), swaps its MoE blocks for ReLibraMoE with experts
sharded over the mesh, and trains for a few steps:

  rollout   sample G responses per prompt with ``generate``; a RouteRecorder on the gates records
            every token's experts (the R3 layout [len - 1, layers, top_k]) into a RouteStore
  reward    a toy reward (share of response tokens in the lower quarter of the vocabulary),
            group-normalised advantages
  train     shuffle, split into micro-batches, look the routes up again by token content,
            ``balancer.plan_step(routes)`` (loads -> plan -> expert moves), then per micro-batch
            ``with balancer.micro_batch(m)``: forward with the replayed routes, policy-gradient
            loss, backward (DDP for replicated weights; experts by the all-to-all), AdamW step

The whole run is done twice from the same seed, with the ``static`` policy and with the
config's policy (``hybrid``). Per step it prints the GPU imbalance (max/mean of the expert-
parallel ranks' token loads, mean over micro-batches and layers) under each, and at the end one
JSON line ``{"imbalance_static", "imbalance_relibra", "loss_max_abs_diff"}``: balancing lowers
the imbalance and leaves the losses equal (fp32).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per rank per step")
    ap.add_argument("--group", type=int, default=4, help="responses per prompt (GRPO group)")
    ap.add_argument("--prompt-len", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=6)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    return ap.parse_args()


def build_model(args):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    return Qwen3MoeForCausalLM(cfg).float()


def rollout(model, store, args, step, rank):
    """Sample the step's responses and record their routes; returns ``(sequences_BS, prompt_len)``."""
    from relibra.integrations.replay import RouteRecorder, store_generation

    g = torch.Generator().manual_seed(10_000 * args.seed + 100 * step + rank)
    prompts = torch.randint(1, 64, (args.prompts, args.prompt_len), generator=g)
    prompts = prompts.repeat_interleave(args.group, dim=0)
    torch.manual_seed(10_000 * args.seed + 100 * step + rank)  # the same samples in both runs
    store.clear()
    with torch.no_grad(), RouteRecorder(model) as rec:
        seqs = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              eos_token_id=None, pad_token_id=0)
    store_generation(store, rec, seqs)
    return seqs, args.prompt_len


def advantages(seqs, prompt_len, group):
    reward = (seqs[:, prompt_len:] < 16).float().mean(1)
    r = reward.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten(), reward.mean()


def run(policy, args, accelerator):
    from relibra.integrations.accelerate import RelibraPlugin, prepare
    from relibra.routing import RouteStore

    model = build_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    balancer = prepare(accelerator, model, optimizer, RelibraPlugin(policy=policy))
    ddp_model, opt = accelerator.prepare(model, optimizer)
    store = RouteStore(num_experts=args.experts)
    rank, M = accelerator.process_index, args.micro_batches
    losses, imbalance = [], []
    for step in range(args.steps):
        seqs, P = rollout(model, store, args, step, rank)
        adv, mean_reward = advantages(seqs, P, args.group)
        perm = torch.randperm(seqs.shape[0], generator=torch.Generator().manual_seed(step))  # shuffle
        chunks = perm.chunk(M)
        batches = [seqs[idx] for idx in chunks]
        routes = [store.gather_tokens(b, torch.ones_like(b)).flatten(0, 1) for b in batches]  # [b*S, L, K]
        balancer.plan_step(routes)
        step_loss = []
        for m, idx in enumerate(chunks):
            ids = batches[m]
            with balancer.micro_batch(m):  # replica plan + replayed routes, for forward and backward
                logits = ddp_model(input_ids=ids).logits[:, :-1]
                logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                mask = torch.zeros_like(logp)
                mask[:, P - 1:] = 1.0  # response tokens
                # on-policy GRPO without KL: the clipped ratio is exp(logp - logp.detach()) = 1 with the
                # gradient of logp; the REINFORCE form below has the same gradient and a non-zero value
                loss = -(logp * adv[idx, None] * mask).sum() / mask.sum() / M
                accelerator.backward(loss)
            step_loss.append(float(loss.detach()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics = balancer.metrics(gather_realised=True)
        imb = metrics.get("realised_imbalance", metrics["planned_imbalance"])
        losses.append(step_loss)
        imbalance.append(imb)
        if accelerator.is_main_process:
            print(
                f"[{policy:>7}] step {step}  gpu imbalance (max/mean) {imb:.3f}  "
                f"planned {metrics['planned_imbalance']:.3f}  experts moved {metrics['experts_moved']}  "
                f"loss {sum(step_loss):+.6f}  reward {float(mean_reward):.3f}",
                flush=True,
            )
    return torch.tensor(losses, dtype=torch.float64), imbalance


def main():
    args = _parse()
    from accelerate import Accelerator

    from relibra.integrations.accelerate import RelibraPlugin

    accelerator = Accelerator(cpu=True)
    relibra_policy = RelibraPlugin().policy
    if relibra_policy == "static":
        relibra_policy = "hybrid"
    runs = {name: run(name, args, accelerator) for name in ("static", relibra_policy)}
    (loss_s, imb_s), (loss_r, imb_r) = runs["static"], runs[relibra_policy]
    diff = (loss_s - loss_r).abs().max()
    if dist.is_initialized():
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if accelerator.is_main_process:
        print(
            json.dumps(
                {
                    "imbalance_static": round(sum(imb_s) / len(imb_s), 4),
                    "imbalance_relibra": round(sum(imb_r) / len(imb_r), 4),
                    "loss_max_abs_diff": float(diff),
                    "policy": relibra_policy,
                    "processes": accelerator.num_processes,
                }
            ),
            flush=True,
        )
    accelerator.end_training() if hasattr(accelerator, "end_training") else None
    if dist.is_initialized():
        dist.barrier()  # every rank done before any tears gloo down (one exiting first can abort another)
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
