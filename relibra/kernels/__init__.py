"""Dispatch ops of the ReLibra MoE layer: permute, unpermute, assign_copies.

Each op has a torch reference (:mod:`relibra.kernels.reference`, always importable) and a
Triton version (:mod:`relibra.kernels.triton`, imported lazily the first time it is used).

Backend choice (``backend=`` argument of every op):

- ``None``: the environment variable ``RELIBRA_KERNEL_BACKEND`` (``triton`` / ``reference``)
  if set, else Triton for CUDA tensors (when triton is installed) and the reference elsewhere;
- ``"triton"`` / ``"reference"``: forced (``"torch"`` and ``"auto"``, the names of
  :mod:`relibra.config`, mean ``"reference"`` and ``None``). Triton on CPU tensors needs ``TRITON_INTERPRET=1``
  set before triton is first imported.

See :mod:`relibra.kernels.reference` for the shape legend and the token layout.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import reference

__all__ = ["permute", "unpermute", "assign_copies", "resolve_backend", "BACKENDS", "ENV_VAR"]

BACKENDS = ("triton", "reference")
ENV_VAR = "RELIBRA_KERNEL_BACKEND"
_ALIASES = {"torch": "reference", "auto": None}  # the names relibra.config uses


def _normalise(name: str | None) -> str | None:
    return _ALIASES.get(name, name) if name is not None else None


def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """The backend an op runs with for ``tensor`` (see the module doc); ValueError if unknown."""
    backend = _normalise(backend)
    if backend is None:
        backend = _normalise(os.environ.get(ENV_VAR, "").strip().lower() or None)
        if backend is None:
            return "triton" if tensor.is_cuda and _have_triton() else "reference"
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR}={backend!r} is not one of {BACKENDS}")
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend


def _triton():
    from . import triton as triton_ops  # lazy: imports triton

    return triton_ops


def permute(x_TD: torch.Tensor, dest_TK: torch.Tensor, num_groups: int, align: int = 1,
            backend: str | None = None, num_rows: int | None = None, check_values: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group token copies by destination: ``(x_perm_RD, row_index_TK, group_offsets)``.

    ``x_TD [T, D]`` float, ``dest_TK [T, K]`` int64 in ``-1..num_groups-1`` (-1 drops the copy).
    Copies are ordered by group, stably by token then k; each group is padded with zero rows to
    a multiple of ``align``; ``row_index_TK [T, K]`` int64 (-1 if dropped); ``group_offsets
    [num_groups + 1]`` int64. Differentiable w.r.t. x (backward: gather-sum by row_index).

    ``num_rows``: the buffer's row count R (``group_offsets[-1]``) when the caller knows it, so
    nothing is read back on the host; ``check_values=False`` skips the CPU-only scan of
    ``dest_TK``'s values (for callers that built them).
    """
    if resolve_backend(backend, x_TD) == "triton":
        return _triton().permute(x_TD, dest_TK, num_groups, align, num_rows, check_values)
    return reference.permute(x_TD, dest_TK, num_groups, align, num_rows, check_values)


def unpermute(y_perm_RD: torch.Tensor, row_index_TK: torch.Tensor, weights_TK: torch.Tensor,
              backend: str | None = None, check_values: bool = True) -> torch.Tensor:
    """``out_TD[t] = sum_k weights_TK[t, k] * y_perm_RD[row_index_TK[t, k]]`` skipping -1.

    Accumulates in float32, returns y_perm's dtype; gradients for y_perm and weights.
    ``check_values=False`` skips the CPU-only scan of ``row_index_TK``.
    """
    if resolve_backend(backend, y_perm_RD) == "triton":
        return _triton().unpermute(y_perm_RD, row_index_TK, weights_TK, check_values)
    return reference.unpermute(y_perm_RD, row_index_TK, weights_TK, check_values)


def assign_copies(topk_ids_TK: torch.Tensor, copy_slots_EX: torch.Tensor, copy_ends_EX: torch.Tensor,
                  token_offset_E: torch.Tensor, backend: str | None = None, check_values: bool = True
                  ) -> torch.Tensor:
    """Physical slot ``dest_TK [T, K]`` of every token copy under a replica plan's token split.

    See :func:`relibra.kernels.reference.assign_copies` for the exact rule; no host sync
    (``check_values=False`` also skips the CPU-only scan of ``topk_ids_TK``).
    """
    if resolve_backend(backend, topk_ids_TK) == "triton":
        return _triton().assign_copies(topk_ids_TK, copy_slots_EX, copy_ends_EX, token_offset_E, check_values)
    return reference.assign_copies(topk_ids_TK, copy_slots_EX, copy_ends_EX, token_offset_E, check_values)
