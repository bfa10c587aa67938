"""The intra-node solver: replicas and the exact min-max token split of independent node problems.

Legend and layout: :mod:`relibra.policies.replica_problems`. Every problem is solved on its own
(the result of a problem never depends on the others solved with it), in passes of
:data:`PROBLEMS_PER_PASS` problems.

Replica choice: :mod:`relibra.policies.replica_greedy` (greedy rules, the best kept per problem
by its exact optimal level). Split: :mod:`relibra.policies.replica_split`; with one spare slot
per GPU the two-sweep forest split, about ``2 * (depth + 1)`` rounds, and augmenting rounds
only for the rare node with two replica cycles; otherwise augmenting rounds aimed at the known
level. Every round is a fixed number of NumPy operations over a pass, so the cost is mostly
per-operation overhead (``python benchmarks/planners.py`` measures it).
"""

from __future__ import annotations

import numpy as np
import torch

from .replica_greedy import best_of_greedy
from .replica_problems import problem_first, problem_last
from .replica_split import forest_split, optimal_split, resplit, slot_sums

__all__ = ["solve_node_problems", "PROBLEMS_PER_PASS"]

#: (micro-batch, layer, node) problems solved per pass: one micro-batch of the DeepSeek-V3 shape
#: is 464; much larger passes fall out of the cache (best_level builds ``[2**Gn, 2 * problems]``)
PROBLEMS_PER_PASS = 2048


def solve_node_problems(hshare_BGH: torch.Tensor, S: int, variants: tuple[tuple[bool, ...], ...],
                        greedy_split: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Replicas and exact split of the node problems ``hshare_BGH [B, Gn, H]``, in passes of
    :data:`PROBLEMS_PER_PASS`: problem-last ``hshare [Gn*H, B]``, ``rep``, ``x [Gn*S, B]`` and the
    augmenting rounds.

    ``greedy_split``: where the greedy rule's own split already reaches the optimal level, keep
    it instead of computing the split that moves fewest tokens (same busiest GPU, less time; the
    cross-node planner uses it for the nodes it solves again). With more than one spare slot
    per GPU, and on nodes of more than 10 GPUs, this is always done: there the greedy moves
    replayed at the optimal level (:func:`~relibra.policies.replica_split.resplit`) reach it on
    few nodes, and the augmenting rounds (over ``Gn**2`` edges) cost many times the rest of the
    planner. On wide nodes the optimum is not enumerated; a split at ``ceil(node load / Gn)``
    is at it.
    """
    chunks = [_solve(h_c, S, variants, greedy_split) for h_c in hshare_BGH.split(PROBLEMS_PER_PASS)]
    if len(chunks) == 1:
        return chunks[0]
    h, rep, x = (np.concatenate([c[i] for c in chunks], 1) for i in range(3))
    return h, rep, x, sum(c[3] for c in chunks)


def _solve(hshare: torch.Tensor, S: int, variants: tuple[tuple[bool, ...], ...], greedy_split: bool = False
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Replicas and exact split of ``hshare [B, Gn, H]`` problems (``greedy_split``: see
    :func:`solve_node_problems`).

    Returns problem-last NumPy arrays ``hshare [Gn*H, B]`` (tokens each home copy keeps), ``rep
    [Sn, B]``, ``x [Sn, B]`` and the number of augmenting rounds.
    """
    B, Gn, H = hshare.shape
    w = problem_last(hshare.reshape(B, Gn * H))
    rep, x, made, level, chain = best_of_greedy(w, Gn, S, variants)
    if greedy_split or S > 1 or level is None:
        # the optimum where best_level does not enumerate (wide nodes) is unknown, but a split at
        # ceil(node load / Gn) is at it
        optimum = level if level is not None else -(-w.sum(0) // Gn)
        kept = w - slot_sums(x, rep, Gn * H)
        rest = np.flatnonzero((kept.reshape(Gn, H, B).sum(1) + x.reshape(Gn, S, B).sum(1)).max(0) > optimum)
        if rest.size == 0:
            return kept, rep, x, 0
        h_r, x_r, rounds = _exact_split(hshare[torch.from_numpy(rest)], w[:, rest], rep[:, rest], x[:, rest],
                                        made[:, rest], None if level is None else level[rest], chain[rest], S)
        kept[:, rest], x[:, rest] = h_r, x_r
        return kept, rep, x, rounds
    h, x, rounds = _exact_split(hshare, w, rep, x, made, level, chain, S)
    return h, rep, x, rounds


def _exact_split(hshare: torch.Tensor, w: np.ndarray, rep: np.ndarray, x: np.ndarray, made: np.ndarray,
                 level: np.ndarray | None, chain: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The min-max split that moves fewest tokens for the greedy's replicas (``hshare [B, Gn, H]``,
    ``w`` its problem-last copy, the rest from :func:`~relibra.policies.replica_greedy.best_of_greedy`):
    problem-last ``hshare [Gn*H, B]``, ``x [Sn, B]`` and the augmenting rounds."""
    B, Gn, H = hshare.shape
    if level is not None and S == 1:  # exact split in two sweeps over the replica forest
        h, x, ok = forest_split(w, rep, level)
        bad = np.flatnonzero(~ok)
        if bad.size:  # two replica cycles in one node: replay and augment these problems
            bad_t = torch.from_numpy(bad)
            rep_b, level_b = problem_first(rep[:, bad]), torch.from_numpy(level[bad])
            h_b, x_b = resplit(hshare[bad_t], rep_b, problem_first(made[:, bad]), level_b, S,
                               torch.from_numpy(chain[bad]))
            optimal_split(h_b, rep_b, x_b, S, level_B=level_b)
            h[:, bad], x[:, bad] = problem_last(h_b.reshape(bad.size, Gn * H)), problem_last(x_b)
        return h, x, int(bad.size)
    rep_t, x_t, made_t, chain_t = problem_first(rep), problem_first(x), problem_first(made), torch.from_numpy(chain)
    level_t = None if level is None else torch.from_numpy(level)
    if level_t is not None:  # start the exact split from the greedy moves replayed at the optimum
        hshare, x_t = resplit(hshare, rep_t, made_t, level_t, S, chain_t)
    else:  # wide nodes: the first rule's own split, made exact by the augmenting rounds
        hshare = hshare - _scatter_x(hshare, rep_t, x_t)
    rounds = optimal_split(hshare, rep_t, x_t, S, level_B=level_t)
    return problem_last(hshare.reshape(B, Gn * H)), problem_last(x_t), rounds


def _scatter_x(hshare_BGH: torch.Tensor, rep_BSn: torch.Tensor, x_BSn: torch.Tensor) -> torch.Tensor:
    """``[B, Gn, H]`` tokens each home slot gave to its replicas."""
    B, Gn, H = hshare_BGH.shape
    out = torch.zeros(B, Gn * H + 1, dtype=torch.int64)
    out.scatter_add_(1, torch.where(rep_BSn >= 0, rep_BSn, Gn * H), x_BSn)
    return out[:, :-1].view(B, Gn, H)
