"""ReLibraMoE plus an ungated shared MLP kept as the original module (DeepSeek-V3, torchtitan).

Legend: T tokens, D model dim.
"""

from __future__ import annotations

import torch

from relibra.runtime.layer import ReLibraMoE

__all__ = ["SharedExpertsMoE"]


class SharedExpertsMoE(ReLibraMoE):
    """ReLibraMoE whose output adds ``self.shared_experts(x)``, an ungated MLP set after construction.

    The swap assigns the model's own shared MLP module to ``shared_experts``, so its parameter
    names (``shared_experts.*``) and weights stay as they were.
    """

    shared_experts: torch.nn.Module

    def forward(self, x: torch.Tensor, routes: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, routes) + self.shared_experts(x)
