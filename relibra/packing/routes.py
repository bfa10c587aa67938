"""Route-aware packing: which of a step's sequences share a micro-batch, chosen from their routes.

Legend: see CONTRIBUTING.md (Z sequences, M micro-batches, L MoE layers, E logical experts).

The responses of one GRPO prompt route alike, so the rollout order (a prompt's responses side
by side) piles each prompt's hot experts into one micro-batch. :func:`pack` spreads them. It
lowers the objective ``F`` of :mod:`relibra.packing.objective` (busiest node and GPU per
micro-batch and layer, under the placement) through a smooth stand-in, the spread

    V = sum over micro-batches m of |x_m|^2,      x_m = the loads [L, E] of micro-batch m,

which, the step's total being fixed, is the squared distance of the micro-batches from the
step's mean micro-batch. ``V`` is lowest when every micro-batch carries the same share of every
expert, which is where ``F`` reaches its lower bound under *any* placement (the one ``reorder``
picks next too) and where replica plans repeat from one micro-batch to the next. ``F`` itself
is a sum of maxima, flat almost everywhere: a greedy on it, or a local search on it after this
one, gains nothing (docs/packing.md has the measurements).

1. Spread greedy. Sequences by tokens, longest first (ties by index), each into the micro-batch
   with room whose loads have the smallest inner product with its own: the least rise of
   ``V`` (ties: fewest tokens, then lowest index). One pass; the scores of a block of
   sequences come from one matrix product, so it costs about ``Z * (M + 8) * L * E``
   multiply-adds. ``scored_sequences`` (or ``time_limit_s``) bounds it: the sequences left
   (the shortest) go, longest first, to the micro-batch with the fewest tokens.
2. Guard. With a ``start`` packing (the rollout order), the result is kept only if its ``F`` is
   lower; a packing is thus never worse than its start on the objective. When the greedy finds
   no room for a sequence, the start (else token packing) is returned.

Exactness: every score is a sum of products of non-negative integers. The block products run
in float32 where that is exact for the sums and certifiably close for the products, and every
choice the rounding could flip is rescored in float64, exact while the products stay below
2**53 (routed loads: ``L * top_k * tokens_per_micro_batch**2``, DeepSeek-V3 with a million
tokens per micro-batch is about 2**48). So the packing is that of exact arithmetic: it does not
depend on the BLAS build or the thread count, and the same input gives it on every rank.
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from ..placement import Placement
from ..topology import Topology
from .inputs import check_assignment, check_budget, check_sequence_loads, check_sequence_tokens
from .objective import DEFAULT_GPU_WEIGHT, Packing, packing_objective, sum_by_micro_batch
from .tokens import pack_tokens

__all__ = ["pack"]


class _Greedy(NamedTuple):
    micro_batch_of: torch.Tensor  # [Z] int64
    loads_MLE: torch.Tensor  # [M, L, E] int64 micro-batch sums
    scored: int  # sequences placed by routes
    start_loads_MLE: torch.Tensor | None  # [M, L, E] int64 sums of the start packing, when given


#: sequences scored by one matrix product in the greedy (the in-block products cost b / M of it)
_BLOCK = 8


def pack(sequence_loads: Any, sequence_tokens: Any, num_micro_batches: int, tokens_per_micro_batch: int,
         placement: Placement, topology: Topology, *, start: Any = None, gpu_weight: float = DEFAULT_GPU_WEIGHT,
         scored_sequences: int | None = None, time_limit_s: float | None = None) -> Packing:
    """Assign a step's sequences to ``num_micro_batches`` micro-batches by their routes.

    Args:
        sequence_loads: ``[Z, L, E]`` integer token copies of every sequence per layer and expert
            (int32 is kept as is: no copy of the step's loads is made).
        sequence_tokens: ``[Z]`` tokens of every sequence.
        num_micro_batches: M.
        tokens_per_micro_batch: token budget of one micro-batch; no micro-batch exceeds it.
        placement: the home placement the step runs on (``F`` is scored under it).
        topology: nodes, GPUs and experts.
        start: ``[Z]`` a packing to beat (the rollout order): returned unchanged when the
            route-aware packing does not lower ``F`` (``method="start"``) or finds no room.
        gpu_weight: weight of the busiest-GPU term of ``F`` (finite, >= 0).
        scored_sequences: at most this many sequences (the longest) are placed by their routes,
            the rest by tokens (int >= 0; None: all). Bounds the work, deterministically.
        time_limit_s: once this many seconds have passed, the sequences not yet placed go by
            tokens (None: no limit). When it triggers, the packing depends on the machine's speed.

    Returns:
        a :class:`~relibra.packing.objective.Packing`; ``info`` holds ``seconds``,
        ``scored`` (sequences placed by routes), ``fallback`` (None, or ``"start"`` /
        ``"tokens"`` when the greedy found no room) and, with ``start``, ``start_objective``.

    Raises:
        ValueError naming the fault: a shape that disagrees (sequences, layers, experts), a
        negative or non-integer load or token count, a sequence longer than the budget, more
        tokens than ``M`` budgets, a bad ``start`` or option; or that no packing was found,
        when the greedy runs out of room and there is no start and token packing fails too.
    """
    began = time.perf_counter()
    M, budget = check_budget(num_micro_batches, tokens_per_micro_batch)
    tokens = check_sequence_tokens(sequence_tokens, M, budget)
    loads = check_sequence_loads(sequence_loads, tokens.numel(), placement, topology)
    placement.validate(topology)
    start_assign = None if start is None else check_assignment(start, tokens, M, budget, "start")
    _check_options(gpu_weight, scored_sequences, time_limit_s)
    Z, L, E = loads.shape
    deadline = None if time_limit_s is None else began + time_limit_s
    limit = Z if scored_sequences is None else min(scored_sequences, Z)
    # float32 holds every micro-batch sum exactly when no column of the step reaches 2**24
    exact32 = Z == 0 or int(loads.max()) * Z < 2**24
    greedy = _spread_greedy(loads, tokens, M, budget, limit, deadline, exact32, start_assign)
    info: dict[str, Any] = {"fallback": None, "scored": 0 if greedy is None else greedy.scored}
    if greedy is None:
        if start_assign is not None:
            info["fallback"], assign = "start", start_assign
        else:
            try:
                assign = pack_tokens(tokens, M, budget)
            except ValueError as exc:
                raise ValueError(f"no packing of the {Z} sequences ({int(tokens.sum())} tokens) into {M} micro-batches "
                                 f"of {budget} tokens found: the route-aware greedy ran out of room and {exc}; "
                                 "pass a start packing that fits") from None
            info["fallback"] = "tokens"
        packed = sum_by_micro_batch(loads, assign, M)
    else:
        assign, packed = greedy.micro_batch_of, greedy.loads_MLE
    objective = packing_objective(packed, placement, topology, gpu_weight)
    method = "routes" if info["fallback"] is None else info["fallback"]
    if start_assign is not None:  # the greedy summed the start's loads, unless it fell back to the start
        start_loads = packed if method == "start" else greedy.start_loads_MLE
        info["start_objective"] = start_objective = packing_objective(start_loads, placement, topology, gpu_weight)
        if start_objective <= objective:
            assign, packed, objective, method = start_assign, start_loads, start_objective, "start"
    per_micro_batch = torch.zeros(M, dtype=torch.int64).index_add_(0, assign, tokens)
    info["seconds"] = time.perf_counter() - began
    return Packing(assign, packed, per_micro_batch, objective, method, info)


def _check_options(gpu_weight: Any, scored_sequences: Any, time_limit_s: Any) -> None:
    if isinstance(gpu_weight, bool) or not isinstance(gpu_weight, (int, float)) or not math.isfinite(gpu_weight) \
            or gpu_weight < 0:
        raise ValueError(f"pack option gpu_weight must be a finite number >= 0, got {gpu_weight!r}")
    if scored_sequences is not None and (isinstance(scored_sequences, bool) or not isinstance(scored_sequences, int)
                                         or scored_sequences < 0):
        raise ValueError(f"pack option scored_sequences must be None or an int >= 0, got {scored_sequences!r}")
    if time_limit_s is not None and (isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float))
                                     or not time_limit_s > 0):
        raise ValueError(f"pack option time_limit_s must be None or a number > 0, got {time_limit_s!r}")


def _spread_greedy(x_ZLE: torch.Tensor, tokens: torch.Tensor, M: int, budget: int, limit: int,
                   deadline: float | None, exact32: bool, start_Z: torch.Tensor | None) -> _Greedy | None:
    """Phase 1 (module docstring), or None when a sequence finds no micro-batch with room.

    With ``exact32`` (every micro-batch sum fits float32's 24-bit mantissa) the block products
    run in float32, one layer at a time, summed over layers in float64: the sums stay exact, and
    a layer's product of ``E`` non-negative terms is within a relative ``(E + 1) * 2**-24`` of
    the truth whatever the summation order. Every choice that this error could flip is rescored
    exactly in float64, so the result is that of exact arithmetic. Otherwise all in float64.
    ``start_Z`` (a start packing) has its micro-batch sums taken in the same pass.
    """
    Z, L, E = x_ZLE.shape
    work = torch.float32 if exact32 else torch.float64
    slack = 1.01 * (E + 1) * 2.0**-24 if exact32 else 0.0
    order = torch.argsort(-tokens, stable=True)
    sums = torch.zeros(M, L, E, dtype=work)
    start_sums = None if start_Z is None else torch.zeros(M, L, E, dtype=work)
    used = [0] * M  # per micro-batch; plain lists: M is small and the choice runs once per sequence
    assign = np.full(Z, -1, dtype=np.int64)
    length = tokens.tolist()
    block_in, block = torch.empty(_BLOCK, L, E, dtype=x_ZLE.dtype), torch.empty(_BLOCK, L, E, dtype=work)
    scored = 0
    for lo in range(0, Z, _BLOCK):
        idx = order[lo:lo + _BLOCK]
        xb = block[:idx.numel()].copy_(torch.index_select(x_ZLE, 0, idx, out=block_in[:idx.numel()]))
        by_routes = scored < limit and (deadline is None or time.perf_counter() < deadline)
        if by_routes:
            x_LbE = xb.transpose(0, 1)
            # [b][M] products with the sums before the block, [b][b] within the block
            score = torch.bmm(x_LbE, sums.permute(1, 2, 0)).sum(0, dtype=torch.float64).tolist()
            gram = torch.bmm(x_LbE, x_LbE.transpose(1, 2)).sum(0, dtype=torch.float64).tolist()
        picked: list[int] = []
        for k, i in enumerate(idx.tolist()):
            cap = budget - length[i]
            room = [m for m in range(M) if used[m] <= cap]
            if not room:
                return None
            if by_routes and scored < limit:
                s = score[k]
                for k2, m2 in enumerate(picked):
                    s[m2] += gram[k][k2]
                best = min(s[m] for m in room)
                if best > 0 and slack:
                    near = [m for m in room if s[m] * (1 - slack) <= best * (1 + slack)]
                    if len(near) > 1:  # rescore exactly: float64 sums of integer products
                        for m, exact in zip(near, _exact_scores(xb, k, sums, picked, near)):
                            s[m] = exact
                        best = min(s[m] for m in near)
                room = [m for m in room if s[m] == best]
                scored += 1
            m = min(room, key=lambda m: (used[m], m))  # by tokens (or a tie): the emptiest, then the first
            picked.append(m)
            used[m] += length[i]
            assign[i] = m
        sums.index_add_(0, torch.tensor(picked, dtype=torch.int64), xb)
        if start_sums is not None:
            start_sums.index_add_(0, start_Z[idx], xb)
    to_loads = (lambda t: None if t is None else t.to(torch.int64))  # noqa: E731 - exact integer sums
    return _Greedy(torch.from_numpy(assign), to_loads(sums), scored, to_loads(start_sums))


def _exact_scores(xb: torch.Tensor, k: int, sums: torch.Tensor, picked: list[int], near: list[int]) -> list[float]:
    """Exact products of block row ``k`` with the micro-batches ``near``: their sums plus the
    rows of the block already picked into them."""
    x = xb[k].flatten().to(torch.float64)
    out = (sums[near].flatten(1).to(torch.float64) @ x).tolist()
    for k2, m2 in enumerate(picked):
        if m2 in near:
            out[near.index(m2)] += float(torch.dot(x, xb[k2].flatten().to(torch.float64)))
    return out
