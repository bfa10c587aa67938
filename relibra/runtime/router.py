"""The MoE router: scores, (group-limited) top-k choice, gate weights; replayed routes (R3).

Legend: T tokens, D model dim, E logical experts, K top-k, Gr expert groups.

    logits_TE = x_TD @ weight_ED.T
    scores_TE = softmax(logits) | sigmoid(logits)
    choice    = topk(scores + bias)   (group-limited: keep ``topk_groups`` groups by the sum of
                                        the top-2 of (scores + bias) in each group, DeepSeek-V3)
    weights   = scores gathered at the chosen (or replayed) ids, no bias; normalised to sum 1
                if ``norm_topk_prob``; times ``route_scale``.

Replayed ids may hold -1 (padding of some R3 producers): that copy is dropped (weight 0).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Literal

import torch
import torch.nn as nn

__all__ = ["Router", "check_int_argument"]


def check_int_argument(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int if it is one in ``[minimum, maximum]``; else ValueError naming ``name``."""
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {bound}, got {value}")
    return int(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


class Router(nn.Module):
    """Linear router with the weight/buffer names of transformers 5.x MoE gates.

    Parameters: ``weight [E, D]``; buffer ``e_score_correction_bias [E]`` when
    ``score_correction_bias``. Replicated on every rank.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, *,
                 score_func: Literal["softmax", "sigmoid"] = "softmax", norm_topk_prob: bool = True,
                 route_scale: float = 1.0, num_expert_groups: int = 1, topk_groups: int | None = None,
                 score_correction_bias: bool = False, dtype=None, device=None) -> None:
        super().__init__()
        dim = check_int_argument("dim", dim)
        num_experts = check_int_argument("num_experts", num_experts)
        top_k = check_int_argument("top_k", top_k, 1, num_experts)
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        if not isinstance(route_scale, Real) or isinstance(route_scale, bool) \
                or not math.isfinite(route_scale) or route_scale <= 0:
            raise ValueError(f"route_scale must be a finite number > 0, got {route_scale!r}")
        num_expert_groups = check_int_argument("num_expert_groups", num_expert_groups, 1, num_experts)
        if num_experts % num_expert_groups:
            raise ValueError(f"num_expert_groups={num_expert_groups} must divide num_experts={num_experts}")
        topk_groups = num_expert_groups if topk_groups is None else topk_groups
        topk_groups = check_int_argument("topk_groups", topk_groups, 1, num_expert_groups)
        if top_k > topk_groups * (num_experts // num_expert_groups):
            raise ValueError(f"top_k={top_k} experts cannot be chosen from topk_groups={topk_groups} groups of "
                             f"{num_experts // num_expert_groups} experts")
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.route_scale = score_func, float(route_scale)
        self.norm_topk_prob = _check_bool("norm_topk_prob", norm_topk_prob)
        self.num_expert_groups, self.topk_groups = num_expert_groups, topk_groups
        self.weight = nn.Parameter(torch.empty(num_experts, dim, dtype=dtype, device=device))
        # identity on the [T, E] logits: a forward hook here reads them without recomputing them
        # (relibra.integrations.router_logits hands them to transformers' aux loss)
        self.logits_tap = nn.Identity()
        nn.init.normal_(self.weight, std=dim ** -0.5)
        if _check_bool("score_correction_bias", score_correction_bias):
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(num_experts, dtype=torch.float32, device=device))
        else:
            self.e_score_correction_bias = None

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` float32 scores (softmax or sigmoid of the logits)."""
        logits = self.logits_tap(x_TD @ self.weight.T).float()
        return logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()

    def choose(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Live top-k choice ``[T, K]`` int64 (bias and group limit apply to the choice only)."""
        s = scores_TE.detach()
        if self.e_score_correction_bias is not None:
            s = s + self.e_score_correction_bias.float()
        if self.num_expert_groups > 1 and self.topk_groups < self.num_expert_groups:
            T = s.shape[0]
            grouped = s.view(T, self.num_expert_groups, -1)
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = group_score.topk(self.topk_groups, dim=-1).indices
            mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            s = grouped.masked_fill(~mask[..., None], float("-inf")).view(T, -1)
        return s.topk(self.top_k, dim=-1).indices

    def forward(self, x_TD: torch.Tensor, routes_TK: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(topk_ids_TK int64, weights_TK float32)``; ids are ``routes_TK`` when given."""
        scores = self.scores(x_TD)
        ids = self.choose(scores) if routes_TK is None else routes_TK
        valid = ids >= 0
        w = scores.gather(1, ids.clamp(min=0)) * valid
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True).clamp(min=1e-20)
        return ids, w * self.route_scale
