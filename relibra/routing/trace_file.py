"""Trace files: exact loads of recorded (or generated) RL steps, without pickle.

A trace is an ``.npz`` holding

    loads   int64 ``[steps, micro_batches, layers, experts]`` (token copies per expert)
    top_k   int64 scalar (experts per token)
    meta    optional 0-d unicode array with a JSON object (model, source, command, ...)

Written by :func:`save_trace` (LZMA-compressed zip members, a plain ``np.load``-able .npz). Read by
:func:`load_trace`, which treats the file as untrusted input (:mod:`relibra.routing.npz_reader`):
no pickle; every member's name and ``.npy`` header are checked before any data is decoded; the
arrays may take at most ``max_bytes`` (default: 256 x the file's size, at least 64 MiB, at most
4 GiB; ``meta`` at most 4 MiB); every member is decoded in bounded pieces and checked against its
declared size and CRC-32 before its array is allocated. Every fault raises a ValueError that
names the file and the key. ``relibra bench --trace FILE`` and the simulator read this contract.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..slots import as_loads
from .npz_reader import MemberSpec, read_npz

__all__ = ["Trace", "save_trace", "load_trace"]

try:  # CPython builds without liblzma fall back to deflate
    import lzma  # noqa: F401

    _HAS_LZMA = True
except ImportError:  # pragma: no cover
    _HAS_LZMA = False


_MAX_META_BYTES = 4 << 20  # 1 Mi characters of JSON: metadata, not data

_TRACE_KEYS = {
    "loads": MemberSpec("iu", 4, "[steps, micro_batches, layers, experts]", read_as=np.dtype(np.int64)),
    "top_k": MemberSpec("iu", 0),
    "meta": MemberSpec("U", 0, required=False, max_bytes=_MAX_META_BYTES),
}


@dataclass
class Trace:
    """Loads of a run: ``loads`` int64 ``[steps, M, L, E]``, ``top_k``, free-form ``meta``."""

    loads: torch.Tensor
    top_k: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.loads.shape[0])

    @property
    def num_micro_batches(self) -> int:
        return int(self.loads.shape[1])

    @property
    def num_layers(self) -> int:
        return int(self.loads.shape[2])

    @property
    def num_experts(self) -> int:
        return int(self.loads.shape[3])


def _check_top_k(top_k: Any, where: str) -> int:
    if isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"{where}: top_k must be a positive int, got {top_k!r}")
    return int(top_k)


def save_trace(path: str | os.PathLike, loads: Any, top_k: int, meta: dict[str, Any] | None = None) -> None:
    """Write ``loads`` ``[steps, M, L, E]`` (non-negative integers), ``top_k`` and JSON ``meta`` to ``path`` (.npz)."""
    loads = as_loads(loads, name="trace loads", ndim=4)
    top_k = _check_top_k(top_k, "save_trace")
    arrays: dict[str, np.ndarray] = {"loads": loads.numpy(), "top_k": np.asarray(top_k, dtype=np.int64)}
    if meta is not None:
        if not isinstance(meta, dict):
            raise ValueError(f"save_trace: meta must be a dict, got {type(meta).__name__}")
        try:
            text = json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"save_trace: meta is not JSON-serialisable: {exc}") from None
        arrays["meta"] = np.asarray(text, dtype=np.str_)
    # An .npz is a zip of .npy members; LZMA members (zip method 14, read by np.load through
    # zipfile) are ~30 % smaller than np.savez_compressed's deflate on load counts. Written to
    # the exact path (np.savez would append .npz to a str path).
    method = zipfile.ZIP_LZMA if _HAS_LZMA else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, array in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


def load_trace(path: str | os.PathLike, *, max_bytes: int | None = None) -> Trace:
    """Read and validate a trace file.

    ``max_bytes`` caps the arrays' size in memory. None means 256 x the file's size, at least
    64 MiB and at most 4 GiB (:func:`relibra.routing.npz_reader.default_max_bytes`). Raises
    FileNotFoundError for a missing file. Every other fault raises a ValueError that names the
    file and, when the fault is inside a member, its key.
    """
    where = f"trace file {os.fspath(path)!r}"
    arrays = read_npz(path, _TRACE_KEYS, max_bytes=max_bytes, label="trace file")
    try:
        loads = as_loads(torch.from_numpy(arrays["loads"]), name="loads", ndim=4)
    except ValueError as exc:
        raise ValueError(f"{where}, key 'loads': {exc}") from None
    top_k = _check_top_k(arrays["top_k"].item(), f"{where}, key 'top_k'")
    meta: dict[str, Any] = {}
    if "meta" in arrays:
        try:
            meta = json.loads(arrays["meta"].item())
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{where}, key 'meta': not valid JSON ({type(exc).__name__}: {exc})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{where}, key 'meta': must encode a JSON object, got {type(meta).__name__}")
    return Trace(loads=loads, top_k=top_k, meta=meta)
