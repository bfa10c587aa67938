"""Checksums of expert rows packed into byte buffers, so a migration can verify what arrived.

Each piece (one row of one per-expert tensor, ``nbytes`` raw bytes of ``dtype``) gets two
int64 numbers: an exact position-weighted sum of its 32-bit words (and of its last bytes when
``nbytes`` is not a multiple of 4), which catches any single flipped bit and reorderings the
plain sum misses, and the bits of the float64 sum of its values (a cross-check in the units of
the data). Words, not bytes: widening every byte to int64 cost 7-8 ns a byte on one CPU core,
words about 0.6 ns (the checksums are most of a migration's handling cost,
``migration_s_per_byte``). The sender computes them on what it packed, the receiver on what
arrived; :func:`first_mismatch` compares the two.

    hash_weights(n, device)                  -> [min(n, block)] int64 word (and byte) weights
    piece_checksum(raw_u8, dtype, weights)   -> [2] int64
    checksums(buf_u8, spans, weights)        -> [len(spans), 2] int64; spans: (offset, nbytes, dtype)
    first_mismatch(sent [n, 2], got [n, 2])  -> index of the first differing piece, -1 if none
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["hash_weights", "piece_checksum", "checksums", "first_mismatch"]

_HASH_PERIOD = 65521        # weights of the byte hash repeat with this period (a prime)
_HASH_BLOCK = _HASH_PERIOD * 64


def hash_weights(n: int, device: torch.device) -> torch.Tensor:
    """Weights ``[min(n, block)]`` int64 in ``[1, 65521]`` for pieces of up to ``n`` bytes (a
    piece's words take the first ``n // 4``)."""
    idx = torch.arange(min(n, _HASH_BLOCK), dtype=torch.int64, device=device)
    return (idx * 40503 + 1) % _HASH_PERIOD + 1


def _weighted_sum(values: torch.Tensor, weights: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``h`` plus ``sum(values[i] * weights[i % block])`` in int64 (wrapping: a single changed
    value changes it by ``delta * weight``, never a multiple of 2**64)."""
    for s in range(0, values.numel(), _HASH_BLOCK):
        block = values[s: s + _HASH_BLOCK].to(torch.int64)
        h = h + (block * weights[: block.numel()]).sum()
    return h


def piece_checksum(raw_u8: torch.Tensor, dtype: torch.dtype, weights: torch.Tensor) -> torch.Tensor:
    """``[2]`` int64: position-weighted sum of the 32-bit words and last bytes (exact), and the
    float64 sum's bits."""
    if raw_u8.storage_offset() % 4:  # a word view needs 4-byte alignment (packed pieces are 16-aligned)
        raw_u8 = raw_u8.clone()
    n = raw_u8.numel()
    whole = n - n % 4
    h = _weighted_sum(raw_u8[:whole].view(torch.int32), weights, torch.zeros((), dtype=torch.int64,
                                                                             device=raw_u8.device))
    h = _weighted_sum(raw_u8[whole:], weights[-(n % 4):] if n % 4 else weights[:0], h)  # the last bytes
    values = raw_u8.view(dtype)
    if values.is_complex():
        values = torch.view_as_real(values)
    f = values.to(torch.float64).sum().reshape(1).view(torch.int64)[0]
    return torch.stack([h, f])


def checksums(buf: torch.Tensor, spans: Sequence[tuple[int, int, torch.dtype]], weights: torch.Tensor) -> torch.Tensor:
    """``[len(spans), 2]`` checksums of the pieces ``(offset, nbytes, dtype)`` packed in ``buf``."""
    if not spans:
        return torch.zeros(0, 2, dtype=torch.int64, device=buf.device)
    return torch.stack([piece_checksum(buf[o: o + n], dtype, weights) for o, n, dtype in spans])


def first_mismatch(sent: torch.Tensor, got: torch.Tensor) -> int:
    """Index of the first piece whose checksums differ, -1 if none."""
    if sent.shape != got.shape:
        return 0
    hash_bad = sent[:, 0] != got[:, 0]
    fs, fg = sent[:, 1].view(torch.float64), got[:, 1].view(torch.float64)
    float_bad = ~torch.isclose(fs, fg, rtol=1e-9, atol=1e-12, equal_nan=True)
    bad = (hash_bad | float_bad).nonzero()
    return int(bad[0]) if bad.numel() else -1
