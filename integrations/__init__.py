"""relibra.integrations: Hugging Face accelerate, transformers and TRL on top of relibra.

Submodules (import them directly; each imports its heavy dependency lazily):

- :mod:`relibra.integrations.plugin` / :mod:`.accelerate`: ``RelibraPlugin`` (settings from
  ``RELIBRA_*`` / ``RELIBRA_CONFIG``) and ``prepare(accelerator, model, optimizer)``.
- :mod:`relibra.integrations.launcher`: ``relibra launch`` (accelerate config with a ``relibra:`` section).
- :mod:`relibra.integrations.transformers`: ``swap_moe_blocks(model, mesh)``.
- :mod:`relibra.integrations.replay`: ``RouteRecorder``, ``replay_routes``, ``store_generation``.
- :mod:`relibra.integrations.trl`: ``RelibraGRPOTrainer`` (needs ``trl``).
"""
