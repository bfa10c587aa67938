"""TRL: a ``GRPOTrainer`` that records routes at generation and drives the relibra Balancer.

``RelibraGRPOTrainer`` (this module needs ``trl``; ``relibra`` itself never imports it):

- ``__init__``: after TRL's setup, :func:`relibra.integrations.accelerate.prepare` swaps the
  model's MoE blocks (experts sharded over the expert-parallel mesh, kept out of DDP) and
  builds ``self.balancer``; the optimizer TRL creates later is handed to the Balancer.
- generation (TRL's own ``transformers`` path, no vLLM): a :class:`RouteRecorder` on the
  gates records every fed token's experts; each sequence (real prompt tokens + completion up to
  EOS) goes into ``self.route_store`` under its token-content key, aligned to ``len - 1``.
- one relibra step per generation cycle (TRL's ``steps_per_generation * num_iterations``
  training steps). Its passes: the old-policy log-prob pass TRL runs while scoring (when it runs
  one: ``num_iterations > 1``), in chunks of ``per_device_train_batch_size`` rows, then one
  ``train`` pass per optimizer step. ``balancer.plan_step`` gets every row's routes and that
  schedule as the log-prob pass starts (else after scoring): the log-prob chunks run inside
  ``balancer.micro_batch(k, "logprob")`` (replayed and balanced, on the placement of the step
  before while the step's placement is planned in the background), the experts move as the
  first training micro-batch starts.
- micro-batches: instead of TRL's random shuffle, the generation batch's rows are packed by
  their routes into ``steps_per_generation`` micro-batches of equal row counts
  (:func:`relibra.packing.pack`; ``relibra_packing=False`` keeps TRL's shuffle). Equal row counts
  keep every GRPO loss normalisation the same sum over sequences, whichever sequences share a
  micro-batch. Each ``training_step`` (forward and backward, which recomputes the forward under
  activation checkpointing) runs inside ``balancer.micro_batch(m, pass)``.

Limits: text models (image inputs are refused); a reference pass through the policy model itself
(PEFT, ``beta > 0`` without a reference model) runs outside the Balancer, unbalanced. With
``use_vllm=True`` TRL drops vLLM's ``routed_experts`` (TRL 1.16), so this trainer refuses it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

try:
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"relibra.integrations.trl needs trl (pip install trl): {exc}") from exc

from relibra.packing import pack
from relibra.routing import RouteStore, count_loads

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


def select_rows(batch: dict, rows: list[int]) -> dict:
    """Rows ``rows`` of TRL's generation batch: every tensor with a first dimension and every list
    indexed alike; 0-d tensors and None kept."""
    index = torch.tensor(rows, dtype=torch.int64)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = value.index_select(0, index.to(value.device))
        elif isinstance(value, list):
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value
    return out


class RelibraGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with rollout routing replay and relibra balancing (see the module doc).

    ``relibra_packing``: pack each generation batch's rows into micro-batches by their routes
    (default) instead of TRL's random shuffle.
    """

    def __init__(self, *args: Any, relibra_plugin=None, relibra_packing: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "use_vllm", False):
            raise ValueError("RelibraGRPOTrainer: use_vllm=True is not supported (TRL drops vLLM's routed_experts)")
        gas, spg = self.args.gradient_accumulation_steps, self.args.steps_per_generation
        if (spg * self.num_iterations) % gas:
            raise ValueError(f"RelibraGRPOTrainer: steps_per_generation ({spg}) x num_iterations "
                             f"({self.num_iterations}) must be a multiple of gradient_accumulation_steps ({gas}): a "
                             "generation cycle is one relibra step of whole optimizer steps")
        self.balancer = prepare(self.accelerator, self.model, None, relibra_plugin)
        if self.balancer is None:
            raise ValueError("RelibraGRPOTrainer: the RelibraPlugin is disabled")
        self.route_store = RouteStore(num_experts=self.balancer.E)
        self.relibra_packing = bool(relibra_packing)
        # TRL's router aux loss (on when the config has a router_aux_loss_coef) stays as TRL set it:
        # the swapped gates hand transformers their live router logits even while routes are replayed
        self._relibra_mb = None
        self._relibra_scoring = False  # inside _generate_and_score_completions of a training cycle
        self._relibra_groups: list[list[int]] | None = None  # the cycle's training micro-batches (rows)
        self._relibra_first_train = 0  # the schedule's index of the cycle's first training pass

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

    def _row_routes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Every row's routes ``[S, L, K]`` (-1 where the mask is 0), found by content."""
        return list(self.route_store.gather_tokens(input_ids, attention_mask).unbind(0))

    def _plan_cycle(self, row_routes: list[torch.Tensor], logprob_chunks: list[list[int]] | None) -> None:
        """Pack the cycle's rows into micro-batches and plan its passes (collective)."""
        Z, spg, gas = len(row_routes), self.args.steps_per_generation, self.args.gradient_accumulation_steps
        rollout = [list(range(m * Z // spg, (m + 1) * Z // spg)) for m in range(spg)]
        if self.relibra_packing:  # equal rows per micro-batch: every row counts one "token" of a budget of Z / spg
            start = torch.tensor([m for m, rows in enumerate(rollout) for _ in rows])
            groups = pack(count_loads(row_routes, self.balancer.E), torch.ones(Z, dtype=torch.int64), spg, Z // spg,
                          self.balancer.placement, self.balancer.topology, start=start).groups()
        else:  # TRL's shuffle, then equal chunks
            order = torch.randperm(Z).tolist()
            groups = [order[m * Z // spg:(m + 1) * Z // spg] for m in range(spg)]
        phases = [] if logprob_chunks is None else [("logprob", logprob_chunks)]
        self._relibra_first_train = len(phases)
        for j in range(spg * self.num_iterations // gas):  # one pass per optimizer step
            phases.append(("train", [groups[(j * gas + i) % spg] for i in range(gas)]))
        self.balancer.plan_step(row_routes, phases=phases)
        self._relibra_groups = groups

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           **kwargs: Any):
        old_policy_pass = self._relibra_scoring and model is self.model and not torch.is_grad_enabled() \
            and self._relibra_groups is None
        if not old_policy_pass:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, **kwargs)
        inputs = [k for k, v in kwargs.items() if v is not None and k not in ("compute_entropy", "compute_aux_loss")]
        if inputs:
            raise ValueError(f"RelibraGRPOTrainer: the log-prob pass of a model with {inputs} inputs is not supported "
                             "(text models only)")
        B = input_ids.size(0)
        size = batch_size or B
        chunks = [list(range(lo, min(lo + size, B))) for lo in range(0, B, size)]
        self._plan_cycle(self._row_routes(input_ids, attention_mask), chunks)
        out = []
        for k, rows in enumerate(chunks):
            lo, hi = rows[0], rows[-1] + 1
            with self.balancer.micro_batch(k, "logprob"):
                out.append(super()._get_per_token_logps_and_entropies(model, input_ids[lo:hi], attention_mask[lo:hi],
                                                                      logits_to_keep, hi - lo, **kwargs))
        logps = torch.cat([o[0] for o in out])
        entropies = None if out[0][1] is None else torch.cat([o[1] for o in out])
        aux_loss = None if out[0][2] is None else torch.stack([o[2] for o in out]).mean()  # TRL's: mean over chunks
        return logps, entropies, aux_loss

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        spg, gas = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        generate_every = spg * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            self._relibra_groups, self._relibra_scoring = None, True
            try:
                scored = self._generate_and_score_completions(generation_batch)
            finally:
                self._relibra_scoring = False
            if scored.get("pixel_values") is not None:
                raise ValueError("RelibraGRPOTrainer: image inputs are not supported (text models only)")
            if self._relibra_groups is None:  # no old-policy log-prob pass in this cycle: plan the training passes
                ids = torch.cat([scored["prompt_ids"], scored["completion_ids"]], dim=1)
                mask = torch.cat([scored["prompt_mask"], scored["completion_mask"]], dim=1)
                self._plan_cycle(self._row_routes(ids, mask), None)
            self._buffered_inputs = [select_rows(scored, rows) for rows in self._relibra_groups]
        inputs = self._buffered_inputs[self._step % spg]
        if self._relibra_mb is not None:
            c = self._step % generate_every
            self._relibra_mb.enter_context(self.balancer.micro_batch(c % gas, self._relibra_first_train + c // gas))
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
