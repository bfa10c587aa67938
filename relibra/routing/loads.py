"""Recorded routes in, exact loads out.

Legend: T tokens, L MoE layers, K top_k, E logical experts, M micro-batches,
Q source ranks (the data-parallel / expert-parallel ranks that hold the tokens).

The pipeline::

    per-sequence routes [T_i, Lg, K]  --(moe_layers / first_k_dense)-->  [T_i, L, K]
        --(micro_batches: sizes or index lists)-->  loads_MLE [M, L, E] int64 (bincount)
        --(ranks: source rank of each sequence)-->  loads_MLQE [M, L, Q, E]

``routes_for_micro_batch`` concatenates one micro-batch's sequences into the ``[T, L, K]``
int64 routes tensor the Balancer and the layer consume; ``loads_from_routes`` counts it and
``count_loads`` counts a list of them (already checked) in one go.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .routes import PAD, as_routes, check_sequences

__all__ = [
    "count_loads",
    "loads_from_routes",
    "micro_batch_groups",
    "micro_batch_loads",
    "micro_batch_rank_loads",
    "routes_for_micro_batch",
]

def micro_batch_groups(
    num_sequences: int, micro_batches: Sequence[int] | Sequence[Sequence[int]] | None
) -> list[list[int]]:
    """Sequence indices of each micro-batch.

    ``micro_batches`` is ``None`` (one micro-batch of everything), a list of sizes (consecutive
    sequences; they must add up to ``num_sequences``) or a list of index lists (any order, no
    sequence twice; sequences in no list are left out).
    """
    if micro_batches is None:
        return [list(range(num_sequences))]
    groups = list(micro_batches)
    if not groups:
        raise ValueError("micro_batches is empty")
    if all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in groups):
        sizes = [int(g) for g in groups]
        if any(s < 0 for s in sizes):
            raise ValueError(f"micro_batches sizes must be >= 0, got {sizes}")
        if sum(sizes) != num_sequences:
            raise ValueError(
                f"micro_batches sizes {sizes} add up to {sum(sizes)}, but there are {num_sequences} sequences"
            )
        starts = np.cumsum([0] + sizes)
        return [list(range(int(a), int(b))) for a, b in zip(starts[:-1], starts[1:])]
    seen: dict[int, int] = {}
    out = []
    for m, group in enumerate(groups):
        if isinstance(group, (int, np.integer)):
            raise ValueError("micro_batches mixes sizes and index lists; give one or the other")
        idx = [int(i) for i in group]
        for i in idx:
            if not 0 <= i < num_sequences:
                raise ValueError(f"micro-batch {m} holds sequence {i}, out of range [0, {num_sequences})")
            if i in seen:
                raise ValueError(f"sequence {i} is in micro-batch {seen[i]} and micro-batch {m}")
            seen[i] = m
        out.append(idx)
    return out


def loads_from_routes(routes_TLK: Any, num_experts: int) -> torch.Tensor:
    """Exact loads ``[L, E]`` int64 of one routes tensor ``[T, L, K]`` (-1 entries ignored)."""
    routes = as_routes(routes_TLK, num_experts, name="routes_TLK")
    return count_loads([routes], num_experts)[0]


def count_loads(routes_TLK: Sequence[torch.Tensor], num_experts: int) -> torch.Tensor:
    """Exact loads ``[M, L, E]`` int64 of M routes tensors ``[T_m, L, K]`` whose ids are already
    checked to lie in ``[-1, E)`` (e.g. by :func:`~relibra.routing.route_fault`); -1 is dropped."""
    return _bincount_loads(list(routes_TLK), [[m] for m in range(len(routes_TLK))], num_experts, None, 1)[:, :, 0]


def _bincount_loads(
    seqs: list[torch.Tensor], groups: list[list[int]], num_experts: int, rank_of_seq: list[int] | None, num_ranks: int
) -> torch.Tensor:
    """Counts ``[M, L, Q, E]``: one bincount per micro-batch (memory bounded by one micro-batch).

    Ids must already be checked to lie in ``[-1, E)``.
    """
    num_layers = seqs[0].shape[1]
    out = torch.zeros(len(groups), num_layers, num_ranks, num_experts, dtype=torch.int64)
    layer = torch.arange(num_layers).view(1, num_layers, 1)
    for m, group in enumerate(groups):
        if not group:
            continue
        routes = torch.cat([seqs[i] for i in group])  # [T, L, K]
        if rank_of_seq is None:
            r_tok = torch.zeros(1, 1, 1, dtype=torch.int64)
        else:
            lengths = torch.tensor([seqs[i].shape[0] for i in group])
            r_tok = torch.repeat_interleave(torch.tensor([rank_of_seq[i] for i in group]), lengths).view(-1, 1, 1)
        # bin (l, r, e + 1) of E + 1 bins per (layer, rank): padding (-1) lands in bin 0, dropped
        index = routes + ((layer * num_ranks + r_tok) * (num_experts + 1) + 1)  # [T, L, K]
        counts = torch.bincount(index.view(-1), minlength=num_layers * num_ranks * (num_experts + 1))
        out[m] = counts.view(num_layers, num_ranks, num_experts + 1)[..., 1:]
    return out


def micro_batch_loads(
    sequences: Sequence[Any],
    num_experts: int,
    *,
    micro_batches: Sequence[int] | Sequence[Sequence[int]] | None = None,
    moe_layers: Sequence[int] | None = None,
    first_k_dense: int | None = None,
) -> torch.Tensor:
    """Exact loads ``[M, L, E]`` int64 of per-sequence routes grouped into micro-batches.

    Args:
        sequences: per-sequence route arrays ``[T_i, Lg, K]`` by global layer id (torch,
            numpy or lists; any integer dtype; -1 padding).
        num_experts: E, logical experts per MoE layer.
        micro_batches: sizes or index lists, see :func:`micro_batch_groups`.
        moe_layers / first_k_dense: which global layers are MoE, see :func:`moe_layer_ids`.
    """
    seqs = check_sequences(sequences, num_experts, moe_layers, first_k_dense)
    groups = micro_batch_groups(len(seqs), micro_batches)
    return _bincount_loads(seqs, groups, num_experts, None, 1)[:, :, 0]


def micro_batch_rank_loads(
    sequences: Sequence[Any],
    num_experts: int,
    ranks: Sequence[int],
    num_ranks: int,
    *,
    micro_batches: Sequence[int] | Sequence[Sequence[int]] | None = None,
    moe_layers: Sequence[int] | None = None,
    first_k_dense: int | None = None,
) -> torch.Tensor:
    """Exact loads per source rank ``[M, L, Q, E]`` int64; ``ranks[i]`` holds sequence ``i``.

    Summing over dimension 2 gives :func:`micro_batch_loads`.
    """
    seqs = check_sequences(sequences, num_experts, moe_layers, first_k_dense)
    if not isinstance(num_ranks, (int, np.integer)) or isinstance(num_ranks, bool) or num_ranks < 1:
        raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
    rank_list = [int(r) for r in (ranks.tolist() if hasattr(ranks, "tolist") else ranks)]
    if len(rank_list) != len(seqs):
        raise ValueError(f"ranks has {len(rank_list)} entries but there are {len(seqs)} sequences")
    for i, r in enumerate(rank_list):
        if not 0 <= r < num_ranks:
            raise ValueError(f"ranks[{i}] = {r} is out of range [0, {num_ranks})")
    groups = micro_batch_groups(len(seqs), micro_batches)
    return _bincount_loads(seqs, groups, num_experts, rank_list, int(num_ranks))


def routes_for_micro_batch(
    sequences: Sequence[Any],
    num_experts: int,
    indices: Sequence[int] | None = None,
    *,
    moe_layers: Sequence[int] | None = None,
    first_k_dense: int | None = None,
    drop_padding: bool = True,
) -> torch.Tensor:
    """One micro-batch's routes as the ``[T, L, K]`` int64 tensor the Balancer consumes.

    The chosen sequences (``indices``, default all, in the given order) are concatenated
    along tokens, keeping MoE layers only. With ``drop_padding`` a token whose every entry
    is -1 (a padding token) is removed; partial -1 entries stay (they are ignored by loads).
    ``loads_from_routes(result, E)`` equals the micro-batch's row of :func:`micro_batch_loads`.
    """
    seqs = check_sequences(sequences, num_experts, moe_layers, first_k_dense)
    if indices is None:
        indices = range(len(seqs))
    idx = micro_batch_groups(len(seqs), [list(indices)])[0]
    if not idx:
        return torch.zeros((0,) + tuple(seqs[0].shape[1:]), dtype=torch.int64)
    routes = torch.cat([seqs[i] for i in idx]).to(torch.int64)
    if drop_padding and routes.numel():
        routes = routes[(routes != PAD).flatten(1).any(dim=1)]
    return routes
