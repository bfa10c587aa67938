"""TRL: a ``GRPOTrainer`` that records routes at generation and drives the relibra Balancer.

``RelibraGRPOTrainer`` (this module needs ``trl``; ``relibra`` itself never imports it):

- ``__init__``: after TRL's setup, :func:`relibra.integrations.accelerate.prepare` swaps the
  model's MoE blocks (experts sharded over the expert-parallel mesh, kept out of DDP) and
  builds ``self.balancer``; the optimizer TRL creates later is handed to the Balancer.
- generation (TRL's own ``transformers`` path, no vLLM): a :class:`RouteRecorder` on the
  gates records every fed token's experts; each sequence (real prompt tokens + completion up to
  EOS) goes into ``self.route_store`` under its token-content key, aligned to ``len - 1``.
- training: at the first micro-batch of each optimizer step, the routes of the step's
  micro-batches are looked up by content (they survive TRL's padding and shuffling) and
  ``balancer.plan_step`` plans and moves experts; each ``training_step`` (forward and backward,
  which recomputes the forward under activation checkpointing) runs inside
  ``balancer.micro_batch(m)``, which installs the replica plan and replays the routes.

With ``use_vllm=True`` TRL drops vLLM's ``routed_experts`` (TRL 1.16), so this trainer refuses it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

try:
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"relibra.integrations.trl needs trl (pip install trl): {exc}") from exc

from relibra.routing import RouteStore

from .accelerate import prepare
from .replay import RouteRecorder

__all__ = ["RelibraGRPOTrainer", "put_generation_routes"]


def put_generation_routes(store, recorder: RouteRecorder, prompt_ids: list, completion_ids: list) -> list[str]:
    """Store each sequence's routes from a left-padded ``generate`` run (TRL's layout).

    Row ``b`` held ``prompt_ids[b]`` right-aligned in the first ``W`` positions (the prefill
    width) and its completion from position ``W`` on; its real tokens are
    ``prompt_ids[b] + completion_ids[b]`` and its routes the ``n - 1`` positions before the last.
    """
    routes = recorder.routes()
    W = recorder.prefill_positions
    if len(prompt_ids) != routes.shape[0] or len(completion_ids) != routes.shape[0]:
        raise ValueError(f"{len(prompt_ids)} prompts / {len(completion_ids)} completions for "
                         f"{routes.shape[0]} recorded rows")
    keys = []
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        tokens = list(p) + list(c)
        start = W - len(p)
        if start < 0:
            raise ValueError(f"prompt {b} has {len(p)} tokens, more than the prefill width {W}")
        keys.append(store.put_tokens(torch.tensor(tokens), routes[b, start:start + len(tokens) - 1]))
    return keys


class RelibraGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with rollout routing replay and relibra balancing (see the module doc)."""

    def __init__(self, *args: Any, relibra_plugin=None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "use_vllm", False):
            raise ValueError("RelibraGRPOTrainer: use_vllm=True is not supported (TRL drops vLLM's routed_experts)")
        self.balancer = prepare(self.accelerator, self.model, None, relibra_plugin)
        if self.balancer is None:
            raise ValueError("RelibraGRPOTrainer: the RelibraPlugin is disabled")
        self.route_store = RouteStore(num_experts=self.balancer.E)
        # TRL's router aux loss (on when the config has a router_aux_loss_coef) stays as TRL set it:
        # the swapped gates hand transformers their live router logits even while routes are replayed
        self._relibra_mb = None

    def create_optimizer(self, *args: Any, **kwargs: Any):
        opt = super().create_optimizer(*args, **kwargs)
        self.balancer.optimizer = opt
        return opt

    def _generate_single_turn(self, prompt_ids, *args: Any, **kwargs: Any):
        model = self.accelerator.unwrap_model(self.model)
        with RouteRecorder(model) as rec:
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        put_generation_routes(self.route_store, rec, prompt_ids, completion_ids)
        return completion_ids, logprobs

    def _routes_of(self, inputs: dict) -> torch.Tensor:
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        return self.route_store.gather_tokens(ids, mask).flatten(0, 1)  # [B*S, L, K]

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)  # generates + buffers when due
        if self.model.training and self._relibra_mb is not None:
            accum = self.current_gradient_accumulation_steps
            m = self._step % accum
            if m == 0:  # first micro-batch of an optimizer step: plan the whole step
                spg = self.args.steps_per_generation
                batches = [self._buffered_inputs[(self._step + j) % spg] for j in range(accum)]
                self.balancer.plan_step([self._routes_of(b) for b in batches])
            self._relibra_mb.enter_context(self.balancer.micro_batch(m))
        return inputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        # the micro-batch context spans forward AND backward: activation checkpointing
        # (on by default in GRPOConfig) recomputes the MoE forward during backward
        self._relibra_mb = contextlib.ExitStack()
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._relibra_mb.close()
            self._relibra_mb = None
