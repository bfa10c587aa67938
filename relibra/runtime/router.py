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

from typing import Literal

import torch
import torch.nn as nn

from ..routing.routes import route_fault

__all__ = ["Router", "check_routes", "routes_fault"]


def routes_fault(routes_TK, num_tokens: int, top_k: int, num_experts: int, name: str = "routes",
                 device: torch.device | str | None = None) -> str:
    """Why ``routes_TK`` are not replayed routes ``[T, K]`` for these tokens, or "" if they are.

    The text names ``name`` and the wrong type, device (when ``device`` is given, e.g. the
    tokens' device), dtype, shape or expert id (:func:`relibra.routing.route_fault`).
    """
    if isinstance(routes_TK, torch.Tensor) and device is not None and routes_TK.device != torch.device(device):
        return (f"{name} is on {routes_TK.device}, but the tokens are on {torch.device(device)}; "
                f"move {name} to the tokens' device")
    return route_fault(routes_TK, (num_tokens, top_k), num_experts, name)


def check_routes(routes_TK: torch.Tensor, num_tokens: int, top_k: int, num_experts: int,
                 name: str = "routes", device: torch.device | str | None = None) -> torch.Tensor:
    """Validate replayed routes ``[T, K]`` (ids in ``-1..E-1``); return them as int64.

    Raises ValueError with :func:`routes_fault`'s text.
    """
    fault = routes_fault(routes_TK, num_tokens, top_k, num_experts, name, device)
    if fault:
        raise ValueError(fault)
    return routes_TK.to(torch.int64)


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
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if num_expert_groups < 1 or num_experts % num_expert_groups:
            raise ValueError(f"num_expert_groups={num_expert_groups} must divide num_experts={num_experts}")
        topk_groups = num_expert_groups if topk_groups is None else topk_groups
        if not 1 <= topk_groups <= num_expert_groups:
            raise ValueError(f"topk_groups must be in [1, {num_expert_groups}], got {topk_groups}")
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.norm_topk_prob, self.route_scale = score_func, norm_topk_prob, route_scale
        self.num_expert_groups, self.topk_groups = num_expert_groups, topk_groups
        self.weight = nn.Parameter(torch.empty(num_experts, dim, dtype=dtype, device=device))
        # identity on the [T, E] logits: a forward hook here reads them without recomputing them
        # (relibra.integrations.router_logits hands them to transformers' aux loss)
        self.logits_tap = nn.Identity()
        nn.init.normal_(self.weight, std=dim ** -0.5)
        if score_correction_bias:
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
