"""Intra-node replication as independent per-node problems: building them, and their results as a plan.

Legend (see :mod:`relibra.topology`):

    M  micro-batches     L  layers      N  nodes      Gn  GPUs per node
    H  home slots per GPU               S  spare slots per GPU
    B  independent problems = M * L * N                Sn  spare slots per node = Gn * S

One problem is one node of one layer of one micro-batch. Its state:

    hshare  tokens the home copy of each home expert keeps (local home slot ``g*H + j`` on
            local GPU ``g``)
    rep     home slot copied into each spare slot, -1 empty (spare slot ``k`` sits on local
            GPU ``k // S``)
    x       tokens the replica in each spare slot computes

The solvers work on problem-last NumPy arrays (``hshare [Gn*H, B]``, ``rep`` and ``x [Sn, B]``):
a node has only a few GPUs, so reductions over them become elementwise passes over ``B``, and
NumPy's per-call cost on these small arrays is a fraction of torch's. The phases:

1. :func:`~relibra.policies.replica_greedy.best_of_greedy`: greedy rules choose the replicas;
2. :func:`~relibra.policies.replica_greedy.best_level`: the exact optimal busiest-GPU load for
   them, then :func:`~relibra.policies.replica_split.forest_split` (one spare slot per GPU) or
   :func:`~relibra.policies.replica_split.resplit` and
   :func:`~relibra.policies.replica_split.optimal_split`: the exact min-max integer token split.

This module turns a step's loads into problems (:func:`node_problems`), converts between the
problem-first torch layout and the problem-last NumPy one (:func:`problem_last`,
:func:`problem_first`) and turns results into plan tensors (:func:`assemble`, or rows of some
node problems: :func:`node_rows`).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["node_problems", "problem_last", "problem_first", "assemble", "node_rows"]


def node_problems(loads_MLE: torch.Tensor, home_experts_LE: torch.Tensor, num_nodes: int,
                  gpus_per_node: int) -> torch.Tensor:
    """Home-slot loads as per-node problems.

    Args:
        loads_MLE: ``[M, L, E]`` int64 loads.
        home_experts_LE: ``[L, G*H]`` placement (home slot -> logical expert).
    Returns:
        ``hshare [M*L*N, Gn, H]`` int64: the load of every home expert, by node problem.
    """
    M, L, E = loads_MLE.shape
    H = E // (num_nodes * gpus_per_node)
    idx = home_experts_LE.expand(M, L, -1)
    return loads_MLE.gather(2, idx).reshape(M * L * num_nodes, gpus_per_node, H).clone()


def problem_last(t_BX: torch.Tensor) -> np.ndarray:
    """``[B, X]`` tensor -> ``[X, B]`` contiguous NumPy array (problem-last)."""
    return np.ascontiguousarray(t_BX.numpy().T)


def problem_first(a_XB: np.ndarray) -> torch.Tensor:
    """``[X, B]`` NumPy array -> ``[B, X]`` contiguous tensor (problem-first)."""
    return torch.from_numpy(np.ascontiguousarray(a_XB.T))


def assemble(
    hshare: np.ndarray,
    rep: np.ndarray,
    x: np.ndarray,
    home_experts_LE: torch.Tensor,
    M: int,
    L: int,
    N: int,
    Gn: int,
    S: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-node results of every problem (problem-last ``hshare [Gn*H, B]``, ``rep [Sn, B]``, ``x [Sn, B]``)
    -> plan tensors ``spare_experts [M, L, G*S]`` (logical expert, -1 empty) and ``slot_tokens [M, L, P]``.

    Replicas left with no tokens are dropped (their spare slots stay empty).
    """
    spare, tokens = node_rows(hshare, rep, x, home_experts_LE, np.arange(hshare.shape[1]), L, N, Gn, S)
    return torch.from_numpy(spare).view(M, L, -1), torch.from_numpy(tokens).view(M, L, -1)


def node_rows(hshare: np.ndarray, rep: np.ndarray, x: np.ndarray, home_experts_LE: torch.Tensor,
              node_problem: np.ndarray, L: int, N: int, Gn: int, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Results of the node problems ``node_problem [B']`` (ids ``b``; problem-last ``hshare [Gn*H, B']``,
    ``rep``, ``x [Sn, B']``) -> their rows of the plan: ``spare [B', Sn]`` (logical expert, -1 empty)
    and ``tokens [B', Gn*(H+S)]``. Replicas left with no tokens are dropped."""
    GH, B = hshare.shape
    H = GH // Gn
    rep = np.where(x > 0, rep, -1)
    first = ((node_problem // N) % L) * (N * GH) + (node_problem % N) * GH  # flat index of the node's slot 0
    logical = home_experts_LE.numpy().reshape(-1).take(first + np.maximum(rep, 0))
    spare = np.ascontiguousarray(np.where(rep >= 0, logical, -1).T)
    tokens = np.concatenate([hshare.reshape(Gn, H, B), x.reshape(Gn, S, B)], 1)  # [Gn, H + S, B]
    return spare, np.ascontiguousarray(tokens.transpose(2, 0, 1)).reshape(B, Gn * (H + S))
