"""relibra.integrations: trainers and model libraries on top of relibra.

Submodules (import them directly; each imports its heavy dependency lazily):

- :mod:`relibra.integrations.plugin` / :mod:`.accelerate`: ``RelibraPlugin`` (settings from
  ``RELIBRA_*`` / ``RELIBRA_CONFIG``) and ``prepare(accelerator, model, optimizer)``.
- :mod:`relibra.integrations.launcher`: ``relibra launch`` (accelerate config with a ``relibra:`` section).
- :mod:`relibra.integrations.transformers`: ``swap_moe_blocks(model, mesh)`` (with
  :mod:`.router_logits`: the swapped gates feed transformers' router aux loss).
- :mod:`relibra.integrations.ddp`: ``wrap_ddp(model)``, plain DistributedDataParallel with the
  sharded experts left out.
- :mod:`relibra.integrations.replay`: ``RouteRecorder``, ``replay_routes``, ``store_generation``.
- :mod:`relibra.integrations.trl`: ``RelibraGRPOTrainer`` (needs ``trl``).
- :mod:`relibra.integrations.verl`: ``rearrange_micro_batches`` with verl's signature, packing
  micro-batches by recorded routes (needs nothing from verl).
- :mod:`relibra.integrations.torchtitan`: ``swap_moe_modules(model, mesh)`` and state-dict
  converters for torchtitan 0.3 MoE models (needs ``torchtitan``).
"""
