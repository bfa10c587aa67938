"""Trace files: exact loads of recorded (or generated) RL steps, without pickle.

A trace is an ``.npz`` holding

    loads   int64 ``[steps, micro_batches, layers, experts]`` (token copies per expert)
    top_k   int64 scalar (experts per token)
    meta    optional 0-d unicode array with a JSON object (model, source, command, ...)

Written by :func:`save_trace` (LZMA-compressed zip members, a plain ``np.load``-able .npz), read by
:func:`load_trace` with ``np.load(allow_pickle=False)``;
``relibra bench --trace FILE`` and the simulator read this contract.
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

__all__ = ["Trace", "save_trace", "load_trace"]

try:  # CPython builds without liblzma fall back to deflate
    import lzma  # noqa: F401

    _HAS_LZMA = True
except ImportError:  # pragma: no cover
    _HAS_LZMA = False


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


def load_trace(path: str | os.PathLike) -> Trace:
    """Read and validate a trace file; every fault raises ValueError naming the file."""
    where = f"trace file {os.fspath(path)!r}"
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        raise ValueError(f"{where} is not an .npz (zip) archive; write traces with relibra.routing.save_trace")
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{where} is not a readable .npz: {exc}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{where} is a single .npy array, not an .npz with 'loads' and 'top_k'")
    with npz:
        keys = set(npz.files)
        missing = {"loads", "top_k"} - keys
        if missing:
            raise ValueError(f"{where} lacks key(s) {sorted(missing)}; it holds {sorted(keys)}")
        unknown = keys - {"loads", "top_k", "meta"}
        if unknown:
            raise ValueError(f"{where} holds unknown key(s) {sorted(unknown)}")
        try:
            loads_np = npz["loads"]
            top_k_np = npz["top_k"]
            meta_np = npz["meta"] if "meta" in keys else None
        except ValueError as exc:  # object arrays need pickle, which is refused
            raise ValueError(f"{where} holds an object array, which would need pickle (refused): {exc}") from None
    if loads_np.dtype.kind not in "iu":
        raise ValueError(f"{where}: 'loads' must be an integer array, got dtype {loads_np.dtype}")
    try:
        loads = as_loads(torch.from_numpy(loads_np.astype(np.int64)), name="'loads'", ndim=4)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc} (expected [steps, micro_batches, layers, experts])") from None
    if top_k_np.shape != () or top_k_np.dtype.kind not in "iu":
        raise ValueError(f"{where}: 'top_k' must be an integer scalar, "
                         f"got dtype {top_k_np.dtype} shape {top_k_np.shape}")
    top_k = _check_top_k(int(top_k_np), where)
    meta: dict[str, Any] = {}
    if meta_np is not None:
        if meta_np.shape != () or meta_np.dtype.kind != "U":
            raise ValueError(f"{where}: 'meta' must be a JSON string, got dtype {meta_np.dtype} shape {meta_np.shape}")
        try:
            meta = json.loads(str(meta_np))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: 'meta' is not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: 'meta' must encode a JSON object, got {type(meta).__name__}")
    return Trace(loads=loads, top_k=top_k, meta=meta)
