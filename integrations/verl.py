"""verl: micro-batches packed by routes, behind the signature of verl's ``rearrange_micro_batches``.

verl splits each mini-batch into micro-batches of at most ``max_token_len`` tokens with
``verl.utils.seqlen_balancing.rearrange_micro_batches(batch, max_token_len, ...)``, which
balances sequence lengths (Karmarkar-Karp). :func:`rearrange_micro_batches` here takes the same
arguments and returns the same ``(micro_batches, micro_bsz_idx)``, with the same number of
micro-batches, but chooses which sequences share a micro-batch by their recorded routes
(``batch["routed_experts"]``, verl's rollout routing replay): :func:`relibra.packing.pack` spreads
a prompt group's responses, and so its hot experts, over the micro-batches. Pass the index lists'
routes to ``Balancer.plan_step`` in the same order. verl is never imported; nothing needs it.

    from relibra.integrations.verl import rearrange_micro_batches
    micro_batches, idx = rearrange_micro_batches(mini_batch.batch, max_token_len, dp_group=dp_group,
                                                 num_experts=256, first_k_dense=3)

Legend: see CONTRIBUTING.md (Z sequences, M micro-batches, L MoE layers, E experts, K top-k).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.distributed as dist

from relibra.packing import pack, pack_tokens
from relibra.placement import Placement
from relibra.routing import count_loads, from_verl, route_fault, select_moe_layers
from relibra.runtime.comm import all_reduce_, first_error
from relibra.topology import Topology

__all__ = ["rearrange_micro_batches", "route_balanced_partitions"]


def route_balanced_partitions(sequence_loads: Any, seqlen_list: Sequence[int], k_partitions: int,
                              max_token_len: int | None = None, topology: Topology | None = None,
                              placement: Placement | None = None) -> list[list[int]]:
    """``k_partitions`` index lists (ascending) of the sequences, packed by their routes.

    The route-aware counterpart of verl's ``get_seqlen_balanced_partitions(seqlen_list,
    k_partitions, equal_size=False)``. ``sequence_loads [Z, L, E]``: each sequence's expert token
    copies. No partition holds more than ``max_token_len`` tokens when whole sequences fit so
    (None: no cap of its own); otherwise the cap is the token packing's fullest partition (LPT,
    within ``total / k + longest``), as verl's own partitions do not cap either. ``topology`` and
    ``placement`` (default: one GPU) only score the packing objective; the spread does not need them.
    Raises ValueError naming the fault (shapes, counts, a partition count above the sequences).
    """
    tokens = torch.as_tensor(list(seqlen_list), dtype=torch.int64)
    Z = tokens.numel()
    if isinstance(k_partitions, bool) or not isinstance(k_partitions, int) or not 1 <= k_partitions <= max(Z, 1):
        raise ValueError(f"k_partitions must be an int in [1, {Z}] (the number of sequences), got {k_partitions!r}")
    loads = torch.as_tensor(sequence_loads)
    if loads.dim() != 3:
        raise ValueError(f"sequence_loads must have 3 dimensions [Z, L, E], got shape {tuple(loads.shape)}")
    E = loads.shape[2]
    topology = topology or Topology(1, 1, E)
    placement = placement or Placement.contiguous(topology, loads.shape[1])
    lpt = pack_tokens(tokens, k_partitions, max(int(tokens.sum()), 1))  # no cap: always places everything
    lpt_fullest = int(torch.zeros(k_partitions, dtype=torch.int64).index_add_(0, lpt, tokens).max())
    budget = lpt_fullest if max_token_len is None else max(int(max_token_len), int(tokens.max()) if Z else 0)
    if budget < lpt_fullest:  # the LPT start does not fit the cap: try the cap, else fall back to LPT's fullest
        try:
            packing = pack(loads, tokens, k_partitions, budget, placement, topology)
        except ValueError:
            packing = pack(loads, tokens, k_partitions, lpt_fullest, placement, topology, start=lpt)
    else:
        packing = pack(loads, tokens, k_partitions, budget, placement, topology, start=lpt)
    return packing.groups()


def _micro_batch_count(total: int, Z: int, max_token_len: int, min_num_micro_batch: int | None,
                       num_batches_divided_by: int | None, dp_group: Any, same_micro_num_in_dp: bool) -> int:
    """verl's count: ``min(Z, ceil(total / max_token_len))``, at least ``min_num_micro_batch``, the
    maximum over the data-parallel group, rounded up to a multiple of ``num_batches_divided_by``."""
    M = min(Z, math.ceil(total / max_token_len))
    if min_num_micro_batch is not None:
        M = max(M, int(min_num_micro_batch))
    if dist.is_available() and dist.is_initialized() and same_micro_num_in_dp:
        agreed = torch.tensor([M], dtype=torch.int64)
        all_reduce_(agreed, dp_group, op=dist.ReduceOp.MAX)
        M = int(agreed)
    if num_batches_divided_by is not None:
        M = -(-M // int(num_batches_divided_by)) * int(num_batches_divided_by)
    return M


def _select(batch: Any, index: list[int]) -> Any:
    """Rows ``index`` of a TensorDict, or of every tensor of a dict (other values kept whole)."""
    if hasattr(batch, "batch_size"):  # TensorDict
        return batch[torch.tensor(index, dtype=torch.int64)]
    rows = torch.tensor(index, dtype=torch.int64)
    return {k: v.index_select(0, rows.to(v.device)) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _sequence_loads(batch: Any, num_experts: int, routes_key: str, mask_key: str, moe_layers: Sequence[int] | None,
                    first_k_dense: int | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(sequence_loads [Z, L, E], tokens [Z], fault text)`` of the batch's recorded routes."""
    try:
        mask = batch[mask_key]
        routes = from_verl(batch, mask_key, routes_key)
    except (KeyError, ValueError) as exc:
        return torch.zeros(0), torch.zeros(0), f"rearrange_micro_batches: {exc}"
    tokens = torch.as_tensor(mask).sum(1).to(device="cpu", dtype=torch.int64)
    selected = []
    for b, seq in enumerate(routes):
        try:
            seq = select_moe_layers(seq.cpu(), num_experts, moe_layers=moe_layers, first_k_dense=first_k_dense,
                                    name=f"sequence {b}'s routes")
        except ValueError as exc:
            return torch.zeros(0), torch.zeros(0), f"rearrange_micro_batches: {exc}"
        fault = route_fault(seq, (int(tokens[b]), None, None), num_experts, name=f"sequence {b}'s routes")
        if fault:
            return torch.zeros(0), torch.zeros(0), f"rearrange_micro_batches: {fault}"
        selected.append(seq)
    return count_loads(selected, num_experts), tokens, ""


def rearrange_micro_batches(batch: Any, max_token_len: int, dp_group: Any = None,
                            num_batches_divided_by: int | None = None, same_micro_num_in_dp: bool = True,
                            min_num_micro_batch: int | None = None, use_dynamic_bsz_balance: bool = True, *,
                            num_experts: int,
                            routes_key: str = "routed_experts", mask_key: str = "attention_mask",
                            moe_layers: Sequence[int] | None = None, first_k_dense: int | None = None,
                            topology: Topology | None = None, placement: Placement | None = None
                            ) -> tuple[list[Any], list[list[int]]]:
    """verl's ``rearrange_micro_batches``, packing by routes (module docstring).

    Args:
        batch: a TensorDict or dict holding ``attention_mask [B, S]`` and ``routed_experts
            [B, S, Lg, K]`` (``mask_key`` / ``routes_key``); its other tensors are split alike.
        max_token_len, dp_group, num_batches_divided_by, same_micro_num_in_dp, min_num_micro_batch:
            as verl's: the micro-batch count is ``min(B, ceil(tokens / max_token_len))``, at least
            ``min_num_micro_batch``, the same on every rank of ``dp_group``, a multiple of
            ``num_batches_divided_by``. No micro-batch holds more than ``max_token_len`` tokens
            when whole sequences fit so; else at most the token packing's fullest (as verl's).
        use_dynamic_bsz_balance: as verl's: the heaviest micro-batches (by tokens) go to the
            middle of the order, the lightest to both ends (pipeline warm-up and cool-down).
        num_experts: E of the MoE layers.
        moe_layers, first_k_dense: which of the routes' ``Lg`` layers are MoE layers
            (:func:`relibra.routing.select_moe_layers`; default: all).
        topology, placement: the expert-parallel topology and the current placement (e.g. a
            Balancer's), to score the packing; default one GPU (the spread does not need them).

    Returns:
        ``(micro_batches, micro_bsz_idx)``: the batch's rows per micro-batch, and their indices.

    Raises:
        ValueError naming the fault (missing key, bad route, a sequence over ``max_token_len``),
        the same on every rank of ``dp_group`` (agreed before the count's all-reduce).
    """
    loads, tokens, fault = _sequence_loads(batch, num_experts, routes_key, mask_key, moe_layers, first_k_dense)
    if not fault and tokens.numel() and int(tokens.max()) > max_token_len:
        b = int(tokens.argmax())
        fault = (f"rearrange_micro_batches: sequence {b} has {int(tokens[b])} tokens, more than "
                 f"max_token_len={max_token_len}")
    if not fault and tokens.numel() == 0:
        fault = "rearrange_micro_batches: the batch holds no sequence"
    if dist.is_available() and dist.is_initialized() and same_micro_num_in_dp:
        found = first_error(fault, dp_group)
        if found is not None:
            raise ValueError(f"rank {found[0]}: {found[1]}")
    elif fault:
        raise ValueError(fault)
    M = _micro_batch_count(int(tokens.sum()), tokens.numel(), max_token_len, min_num_micro_batch,
                           num_batches_divided_by, dp_group, same_micro_num_in_dp)
    if M > tokens.numel():
        raise ValueError(f"rearrange_micro_batches: {M} micro-batches for {tokens.numel()} sequences")
    parts = route_balanced_partitions(loads, tokens.tolist(), M, max_token_len, topology, placement)
    if use_dynamic_bsz_balance:
        weight = [int(tokens[p].sum()) for p in parts]
        order = sorted(range(M), key=lambda m: (weight[m], parts[m][0] if parts[m] else 0), reverse=True)
        order = order[::2][::-1] + order[1::2]  # light ones at both ends, as verl orders them
        parts = [parts[m] for m in order]
    return [_select(batch, p) for p in parts], parts
