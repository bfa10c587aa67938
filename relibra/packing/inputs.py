"""Checked inputs of the packers: a step's sequences, the token budget, an assignment.

Legend: see CONTRIBUTING.md (Z sequences of the step, M micro-batches, L MoE layers, E logical experts).

Every fault raises one ValueError naming the thing (argument, sequence index, micro-batch),
before any work, so a bad step plans nothing.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

from ..placement import Placement
from ..slots import as_loads
from ..topology import Topology

__all__ = ["check_budget", "check_sequence_tokens", "check_sequence_loads", "check_assignment"]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive int, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _integer_vector(value: Any, name: str) -> torch.Tensor:
    """``value`` as a 1-D int64 CPU tensor; ValueError naming ``name`` for another rank or a
    non-integer entry."""
    vector = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if vector.dim() != 1:
        raise ValueError(f"{name} must have 1 dimension [Z], got shape {tuple(vector.shape)}")
    if vector.dtype not in _INTEGER_DTYPES:
        if not vector.is_floating_point() or not bool(torch.isfinite(vector).all()) \
                or bool((vector != vector.round()).any()):
            raise ValueError(f"{name} must hold integers, got dtype {vector.dtype}")
    return vector.detach().cpu().to(torch.int64)


def check_budget(num_micro_batches: Any, tokens_per_micro_batch: Any) -> tuple[int, int]:
    """``(M, budget)`` as ints; ValueError naming the argument unless both are positive ints."""
    return (_positive_int(num_micro_batches, "num_micro_batches"),
            _positive_int(tokens_per_micro_batch, "tokens_per_micro_batch"))


def check_sequence_tokens(sequence_tokens: Any, num_micro_batches: int, tokens_per_micro_batch: int) -> torch.Tensor:
    """``sequence_tokens [Z]`` as int64, each sequence within the budget, all within ``M`` budgets.

    Raises ValueError naming a sequence with negative tokens or longer than
    ``tokens_per_micro_batch``, or the total when the step holds more tokens than ``M``
    micro-batches can.
    """
    tokens = _integer_vector(sequence_tokens, "sequence_tokens")
    if tokens.numel() and int(tokens.min()) < 0:
        i = int(tokens.argmin())
        raise ValueError(f"sequence_tokens: sequence {i} has {int(tokens[i])} tokens")
    if tokens.numel():
        longest = int(tokens.argmax())
        if int(tokens[longest]) > tokens_per_micro_batch:
            raise ValueError(
                f"sequence {longest} has {int(tokens[longest])} tokens, more than "
                f"tokens_per_micro_batch={tokens_per_micro_batch}: it fits no micro-batch"
            )
    total = int(tokens.sum())
    if total > num_micro_batches * tokens_per_micro_batch:
        raise ValueError(
            f"the {tokens.numel()} sequences hold {total} tokens, more than num_micro_batches={num_micro_batches} "
            f"x tokens_per_micro_batch={tokens_per_micro_batch} = {num_micro_batches * tokens_per_micro_batch}"
        )
    return tokens


def check_sequence_loads(sequence_loads: Any, num_sequences: int, placement: Placement | None,
                         topology: Topology) -> torch.Tensor:
    """``sequence_loads [Z, L, E]`` as an integer CPU tensor (an integer dtype is kept: int32
    halves the memory of a DeepSeek-V3 step).

    Raises ValueError naming the shape (rows vs ``sequence_tokens``, experts vs the topology,
    layers vs the placement), a non-integer dtype or value, or a negative load.
    """
    loads = sequence_loads if isinstance(sequence_loads, torch.Tensor) else torch.as_tensor(np.asarray(sequence_loads))
    if loads.dtype in _INTEGER_DTYPES:
        loads = loads.detach().cpu()
        if loads.dim() != 3:
            raise ValueError(f"sequence_loads must have 3 dimensions [Z, L, E], got shape {tuple(loads.shape)}")
        if loads.numel() and int(loads.min()) < 0:
            idx = tuple(int(i) for i in (loads < 0).nonzero()[0])
            raise ValueError(f"sequence_loads contains a negative load {int(loads[idx])} at index {idx}")
    else:
        loads = as_loads(loads, "sequence_loads")
    Z, L, E = loads.shape
    if Z != num_sequences:
        raise ValueError(f"sequence_loads has {Z} sequences (rows), sequence_tokens has {num_sequences}")
    if E != topology.num_experts:
        raise ValueError(f"sequence_loads has {E} experts in its last dimension, the topology has "
                         f"{topology.num_experts}")
    if placement is not None and placement.num_layers != L:
        raise ValueError(f"sequence_loads has {L} layers, the placement has {placement.num_layers}")
    return loads


def check_assignment(micro_batch_of: Any, sequence_tokens: torch.Tensor, num_micro_batches: int,
                     tokens_per_micro_batch: int, name: str = "micro_batch_of") -> torch.Tensor:
    """``micro_batch_of [Z]`` as int64: every sequence in one micro-batch, none over the budget.

    Raises ValueError naming ``name``: wrong shape, a micro-batch id outside ``[0, M)`` (the
    sequence is named), or a micro-batch whose sequences exceed ``tokens_per_micro_batch``.
    """
    assign = _integer_vector(micro_batch_of, name)
    Z = sequence_tokens.numel()
    if assign.numel() != Z:
        raise ValueError(f"{name} has {assign.numel()} entries, there are {Z} sequences")
    outside = (assign < 0) | (assign >= num_micro_batches)
    if bool(outside.any()):
        i = int(outside.nonzero()[0])
        raise ValueError(f"{name}: sequence {i} is in micro-batch {int(assign[i])}, outside [0, {num_micro_batches})")
    used = torch.zeros(num_micro_batches, dtype=torch.int64).index_add_(0, assign, sequence_tokens)
    if bool((used > tokens_per_micro_batch).any()):
        m = int((used > tokens_per_micro_batch).nonzero()[0])
        raise ValueError(f"{name}: micro-batch {m} holds {int(used[m])} tokens, more than "
                         f"tokens_per_micro_batch={tokens_per_micro_batch}")
    return assign
