"""RelibraGRPOTrainer (skipped without trl): routes recorded at TRL's generation drive the Balancer in training."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from relibra.integrations.accelerate import RelibraPlugin  # noqa: E402
from relibra.integrations.trl import RelibraGRPOTrainer  # noqa: E402
from relibra.runtime.layer import ReLibraMoE  # noqa: E402


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[EOS]": 1, **{f"t{i}": i for i in range(2, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]")
    fast.padding_side = "left"
    return fast


def _tiny_model():
    """A seeded two-layer Qwen3-MoE of 8 experts, top-2, built from a config (no download)."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, eos_token_id=1, pad_token_id=0)
    return transformers.Qwen3MoeForCausalLM(cfg).float()


def test_grpo_trainer_records_routes_and_plans_every_step(tmp_path):
    model = _tiny_model()
    prompts = [" ".join(f"t{(3 * i + j) % 60 + 2}" for j in range(2 + i % 3)) for i in range(8)]  # ragged prompts
    data = datasets.Dataset.from_dict({"prompt": prompts})
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=4, max_steps=2, report_to=[], use_cpu=True, logging_steps=1,
                          learning_rate=1e-3, save_strategy="no", bf16=False, seed=0)
    trainer = RelibraGRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
        args=args,
        train_dataset=data,
        processing_class=_tokenizer(),
        relibra_plugin=RelibraPlugin(policy="static", spare_slots_per_gpu=0),
    )
    assert any(isinstance(m, ReLibraMoE) for m in trainer.model.modules())
    assert trainer.aux_loss_enabled  # Qwen3-MoE's router_aux_loss_coef: the swapped gates feed the aux loss
    plans = []
    plan_step = trainer.balancer.plan_step
    trainer.balancer.plan_step = lambda routes, **kw: (plans.append([r.clone() for r in routes])
                                                       or plan_step(routes, **kw))
    trainer.train()
    aux = [h["aux_loss"] for h in trainer.state.log_history if "aux_loss" in h]
    assert len(aux) == 2 and all(a > 0 for a in aux), trainer.state.log_history  # computed every step
    assert len(plans) == 2 and len(trainer.route_store) > 0
    for routes in plans:
        for r in routes:
            assert r.shape[1:] == (2, 2)
            assert ((r >= 0).all(-1) | (r == -1).all(-1)).all()  # a token has all its routes or none
            assert (r >= 0).all(-1).any()
    assert (
        trainer.balancer.optimizer is trainer.optimizer.optimizer
        if hasattr(trainer.optimizer, "optimizer")
        else trainer.balancer.optimizer is trainer.optimizer
    )


def test_grpo_trainer_runs_the_old_policy_log_prob_pass_inside_the_balancer(tmp_path):
    """num_iterations=2: TRL scores the generation batch with the old policy's log-probs; those
    chunks run as the step's "logprob" pass, then one "train" pass per optimizer step over the
    generation batch's rows packed by their routes (equal rows per micro-batch)."""
    model = _tiny_model()
    prompts = [" ".join(f"t{(5 * i + j) % 60 + 2}" for j in range(2 + i % 3)) for i in range(8)]
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          gradient_accumulation_steps=2, num_iterations=2, max_completion_length=4, max_steps=2,
                          report_to=[], use_cpu=True, logging_steps=1, learning_rate=1e-3, save_strategy="no",
                          bf16=False, seed=0)
    trainer = RelibraGRPOTrainer(model=model, args=args,
                                 reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                                 train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                                 processing_class=_tokenizer(),
                                 relibra_plugin=RelibraPlugin(policy="hybrid", spare_slots_per_gpu=0))
    bal = trainer.balancer
    schedules, entered = [], []
    plan_step, micro_batch = bal.plan_step, bal.micro_batch

    def recording_plan_step(routes, phases=None, **kw):
        schedules.append((len(routes), phases))
        return plan_step(routes, phases=phases, **kw)

    def recording_micro_batch(m, phase=None):
        entered.append((m, phase))
        return micro_batch(m, phase)

    bal.plan_step, bal.micro_batch = recording_plan_step, recording_micro_batch
    trainer.train()
    assert len(schedules) == 1, schedules  # one generation cycle: 2 micro-batches x 2 iterations = 2 optimizer steps
    rows, phases = schedules[0]
    assert rows == 8 and [name for name, _ in phases] == ["logprob", "train", "train"]
    assert phases[0][1] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # TRL's chunks of per_device_train_batch_size rows
    groups = phases[1][1]
    assert phases[2][1] == groups and sorted(sum(groups, [])) == list(range(8)) and [len(g) for g in groups] == [4, 4]
    assert entered == [(0, "logprob"), (1, "logprob"), (0, 1), (1, 1), (0, 2), (1, 2)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(x)) for x in losses)
    assert bal.metrics()["pass_phases"] == ["logprob", "train", "train"]
