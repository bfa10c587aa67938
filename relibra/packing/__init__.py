"""Which of a step's sequences share a micro-batch: packing by routes, by tokens, with reorder.

Gradient accumulation sums over micro-batches, so their composition is free to choose, and the
routes of every sequence are known before the step (rollout routing replay). The rollout order
keeps a GRPO prompt's responses together and piles its hot experts into one micro-batch;
packing by routes spreads them before any expert moves.

- :func:`pack`: route-aware packing under a placement, within a token budget per micro-batch
  (:mod:`.routes`; its objective in :mod:`.objective`);
- :func:`pack_tokens`: the token-only baseline (LPT on sequence lengths, :mod:`.tokens`);
- :func:`pack_with_reorder`: pack, reorder on the packed loads, re-pack (:mod:`.joint`);
- :func:`packing_objective`, :func:`sum_by_micro_batch`, :class:`Packing`.

Legend: see CONTRIBUTING.md (Z sequences of the step, M micro-batches, L MoE layers, E logical
experts). Inputs: ``sequence_loads [Z, L, E]`` (token copies of every
sequence), ``sequence_tokens [Z]``; output ``micro_batch_of [Z]``. docs/packing.md has the
algorithm, the objective and the measurements.
"""

from .joint import JointPlan, pack_with_reorder
from .objective import DEFAULT_GPU_WEIGHT, Packing, packing_objective, sum_by_micro_batch
from .routes import pack
from .tokens import pack_tokens

__all__ = ["DEFAULT_GPU_WEIGHT", "JointPlan", "Packing", "pack", "pack_tokens",
           "pack_with_reorder", "packing_objective", "sum_by_micro_batch"]
