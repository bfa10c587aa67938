"""Token-only packing: the baseline that balances sequence lengths and ignores routes.

Legend: see CONTRIBUTING.md (Z sequences, M micro-batches).

Longest processing time first (LPT): sequences by tokens, longest first (ties by index), each
into the micro-batch holding the fewest tokens so far (ties: lowest index). It is what
sequence-length balancing does before training (verl re-packs micro-batches with
Karmarkar-Karp, which differs from LPT by a few tokens at these sizes). Graham's bound holds:
the fullest micro-batch holds at most ``total / M + (1 - 1/M) * longest`` tokens.
"""

from __future__ import annotations

import heapq
from typing import Any

import torch

from .inputs import check_budget, check_sequence_tokens

__all__ = ["pack_tokens"]


def pack_tokens(sequence_tokens: Any, num_micro_batches: int, tokens_per_micro_batch: int) -> torch.Tensor:
    """``micro_batch_of [Z]`` int64 by LPT on ``sequence_tokens [Z]``. Deterministic.

    Raises ValueError naming the fault of the input (see :func:`~relibra.packing.inputs.
    check_sequence_tokens`), or naming the sequence that LPT cannot place: the emptiest
    micro-batch has no room for it (a packing within the budget may still exist; the
    route-aware :func:`~relibra.packing.pack` then falls back to a given start).
    """
    M, budget = check_budget(num_micro_batches, tokens_per_micro_batch)
    tokens = check_sequence_tokens(sequence_tokens, M, budget)
    order = torch.argsort(-tokens, stable=True).tolist()
    length = tokens.tolist()
    heap = [(0, m) for m in range(M)]  # (tokens held, micro-batch): the emptiest on top
    out = [0] * len(length)
    for i in order:
        held, m = heapq.heappop(heap)
        if held + length[i] > budget:
            raise ValueError(
                f"token packing (LPT) cannot place sequence {i} ({length[i]} tokens): the emptiest of the "
                f"{M} micro-batches already holds {held} of tokens_per_micro_batch={budget}"
            )
        out[i] = m
        heapq.heappush(heap, (held + length[i], m))
    return torch.tensor(out, dtype=torch.int64)
