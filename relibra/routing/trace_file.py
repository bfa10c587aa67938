"""Trace files: exact loads of recorded (or generated) RL steps, without pickle.

A trace is an ``.npz`` holding (format 1)

    loads   int64 ``[steps, micro_batches, layers, experts]`` (token copies per expert)
    top_k   int64 scalar (experts per token)
    meta    optional 0-d unicode array with a JSON object (model, source, command, ...)

and, in format 2 (per-sequence traces), every sequence's loads, tokens, prompt group and
rollout-order micro-batch, with the micro-batches' token budget, from which ``loads`` must be
the sum (:mod:`relibra.routing.trace_sequences` has the keys and the checks). A format-1 reader
reads a format-2 file's ``loads`` as before; :func:`load_trace` reads both and returns the
sequences in :attr:`Trace.sequences`.

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
from .trace_sequences import SEQUENCE_KEYS, TraceSequences, check_sequences

__all__ = ["Trace", "TraceSequences", "save_trace", "load_trace"]

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
    # format 2: all or none (check_sequences says which is missing); loads stay in their stored
    # integer dtype until checked (int32 as written: half the memory of int64)
    "sequence_loads": MemberSpec("iu", 4, "[steps, sequences, layers, experts]", required=False),
    "sequence_tokens": MemberSpec("iu", 2, "[steps, sequences]", read_as=np.dtype(np.int64), required=False),
    "sequence_prompt": MemberSpec("iu", 2, "[steps, sequences]", read_as=np.dtype(np.int64), required=False),
    "micro_batch_of": MemberSpec("iu", 2, "[steps, sequences]", read_as=np.dtype(np.int64), required=False),
    "tokens_per_micro_batch": MemberSpec("iu", 0, read_as=np.dtype(np.int64), required=False),
}


@dataclass
class Trace:
    """Loads of a run: ``loads`` int64 ``[steps, M, L, E]``, ``top_k``, free-form ``meta``, and
    for a per-sequence (format 2) trace its ``sequences`` (None in format 1)."""

    loads: torch.Tensor
    top_k: int
    meta: dict[str, Any] = field(default_factory=dict)
    sequences: TraceSequences | None = None

    @property
    def format(self) -> int:
        """1 (loads per micro-batch) or 2 (per sequence too)."""
        return 1 if self.sequences is None else 2

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


def save_trace(path: str | os.PathLike, loads: Any, top_k: int, meta: dict[str, Any] | None = None,
               sequences: TraceSequences | None = None) -> None:
    """Write ``loads`` ``[steps, M, L, E]`` (non-negative integers), ``top_k`` and JSON ``meta`` to ``path`` (.npz).

    With ``sequences`` the file is a per-sequence (format 2) trace; they are checked against
    ``loads`` as :func:`load_trace` checks them (ValueError naming the key), before anything is written.
    """
    loads = as_loads(loads, name="trace loads", ndim=4)
    top_k = _check_top_k(top_k, "save_trace")
    arrays: dict[str, np.ndarray] = {"loads": loads.numpy(), "top_k": np.asarray(top_k, dtype=np.int64)}
    if sequences is not None:
        if not isinstance(sequences, TraceSequences):
            raise ValueError(f"save_trace: sequences must be a TraceSequences, got {type(sequences).__name__}")
        arrays.update(check_sequences(loads, sequences.arrays(), "save_trace").arrays())
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
    file and, when the fault is inside a member, its key; so do a format-2 file's keys that
    disagree (:func:`relibra.routing.trace_sequences.check_sequences`).
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
    sequences = None
    if any(key in arrays for key in SEQUENCE_KEYS):
        sequences = check_sequences(loads, arrays, where)
    return Trace(loads=loads, top_k=top_k, meta=meta, sequences=sequences)
