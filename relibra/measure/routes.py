"""Replayed routes for ``relibra measure``: uniform, or skewed onto the first GPU's experts.

Legend: T tokens on one rank, L MoE layers, K top-k, E experts, G ranks, H = E / G home
experts per rank, M micro-batches.

``skew`` S in [0, 1) is the share of tokens whose K choices are exactly the K *hot* experts of
their (step, micro-batch, layer); every other token picks K distinct experts uniformly. The hot
experts are homed on GPU 0 under the contiguous placement (experts ``0 .. H-1``) and change from
one micro-batch to the next (disjoint K-sets from a seeded permutation of those H experts, a new
permutation each layer, round of micro-batches and *period* of ``hot_steps`` steps: 1 draws new
hot experts every step, 0 keeps the first step's for good), the way GRPO micro-batches holding
few prompts have few, strong, moving hot spots. Under ``static`` GPU 0 then computes
``S + (1 - S) / G`` of the copies: planned imbalance (busiest / mean GPU) ``1 + (G - 1) S``,
1.7 at the default S = 0.7 on 2 GPUs. Every rank draws its own tokens; the hot experts are the
same on all ranks. Deterministic in ``(seed, step, micro_batch, rank)``.
"""

from __future__ import annotations

import torch

__all__ = ["hot_experts", "step_routes", "static_imbalance"]


def _generator(*key: int) -> torch.Generator:
    seed = 0
    for k in key:  # a fixed mix (Python's hash of tuples is salted per process for str, not int,
        seed = (seed * 1_000_003 + int(k) + 1) % (2 ** 61 - 1)  # but keep it explicit)
    return torch.Generator().manual_seed(seed)


def hot_experts(seed: int, step: int, micro_batch: int, layer: int, experts: int, gpus: int,
                top_k: int, hot_steps: int = 1) -> torch.Tensor:
    """``[K]`` hot experts of one (step, micro-batch, layer): a K-subset of GPU 0's experts.

    Consecutive micro-batches get disjoint subsets until GPU 0's ``H`` experts are used up; the
    subsets are drawn anew every ``hot_steps`` steps (0: never).
    """
    H = experts // gpus
    per_round = H // top_k
    round_, slot = divmod(micro_batch, per_round)
    period = step // hot_steps if hot_steps else 0
    perm = torch.randperm(H, generator=_generator(seed, 1, period, layer, round_))
    return perm[slot * top_k:(slot + 1) * top_k]


def step_routes(seed: int, step: int, rank: int, micro_batches: int, tokens: int, layers: int,
                experts: int, top_k: int, gpus: int, skew: float, hot_steps: int = 1) -> list[torch.Tensor]:
    """This rank's replayed routes of one step: ``M`` int64 tensors ``[T, L, K]``."""
    out = []
    for m in range(micro_batches):
        g = _generator(seed, 2, step, m, rank)
        ids_TLK = torch.rand(tokens, layers, experts, generator=g).topk(top_k, dim=-1).indices
        if skew > 0:
            skewed_TL = torch.rand(tokens, layers, generator=g) < skew
            for l in range(layers):
                hot_K = hot_experts(seed, step, m, l, experts, gpus, top_k, hot_steps)
                order_TK = torch.rand(tokens, top_k, generator=g).argsort(-1)  # hot ids in random order
                rows = skewed_TL[:, l]
                ids_TLK[rows, l] = hot_K[order_TK[rows]]
        out.append(ids_TLK.to(torch.int64))
    return out


def static_imbalance(skew: float, gpus: int) -> float:
    """Expected planned imbalance of ``static`` on these routes: ``1 + (G - 1) * skew``."""
    return 1.0 + (gpus - 1) * skew
