"""The per-sequence part of a format-2 trace file, and the checks that tie it to ``loads``.

Legend: see CONTRIBUTING.md (Y steps of the trace, Z sequence rows of a step, M micro-batches,
L MoE layers, E logical experts).

A format-2 trace adds to format 1's ``loads [Y, M, L, E]`` and ``top_k``:

    sequence_loads          int    [Y, Z, L, E]  token copies of every sequence (zero rows pad a step)
    sequence_tokens         int64  [Y, Z]        tokens of every sequence, 0 for a padding row
    sequence_prompt         int64  [Y, Z]        prompt group of every sequence, -1 for a padding row
    micro_batch_of          int64  [Y, Z]        the rollout-order packing into the M micro-batches,
                                                 -1 for a padding row (not in the step)
    tokens_per_micro_batch  int64  scalar        the token budget of one micro-batch

and ``loads`` stays ``sequence_loads`` summed by ``micro_batch_of``, so format-1 readers read a
format-2 file as they always did. A row is padding exactly when its ``sequence_tokens`` is 0.
:func:`check_sequences` refuses a file whose keys disagree, naming the key: shapes that differ,
a padding row with a prompt id, a micro-batch or loads; a sequence outside ``[0, M)``; a
micro-batch over the budget; loads that are not the sum of their sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = ["SEQUENCE_KEYS", "TraceSequences", "check_sequences"]

#: the keys of a format-2 trace beyond format 1's (all or none of them)
SEQUENCE_KEYS = ("sequence_loads", "sequence_tokens", "sequence_prompt", "micro_batch_of", "tokens_per_micro_batch")

#: per-sequence loads are kept as int32: a sequence never routes 2**31 copies to one expert
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class TraceSequences:
    """The per-sequence steps of a trace, padded to ``Z`` rows (see the module docstring).

    Attributes:
        loads: ``[Y, Z, L, E]`` int32 token copies of every sequence per layer and expert.
        tokens: ``[Y, Z]`` int64 tokens of every sequence (0: padding row).
        prompt: ``[Y, Z]`` int64 prompt group (-1: padding row).
        micro_batch_of: ``[Y, Z]`` int64 rollout-order micro-batch (-1: padding row).
        tokens_per_micro_batch: the token budget of a micro-batch.
    """

    loads: torch.Tensor
    tokens: torch.Tensor
    prompt: torch.Tensor
    micro_batch_of: torch.Tensor
    tokens_per_micro_batch: int

    def step(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step ``s`` without its padding rows: ``(loads [Z_s, L, E], tokens [Z_s], prompt [Z_s],
        micro_batch_of [Z_s])`` (views where the rows are contiguous, copies otherwise)."""
        rows = torch.nonzero(self.tokens[s] > 0).flatten()
        if rows.numel() == self.tokens.shape[1] or bool((rows == torch.arange(rows.numel())).all()):
            n = rows.numel()  # padding only at the end (as written here): views
            return self.loads[s, :n], self.tokens[s, :n], self.prompt[s, :n], self.micro_batch_of[s, :n]
        return self.loads[s, rows], self.tokens[s, rows], self.prompt[s, rows], self.micro_batch_of[s, rows]

    @classmethod
    def stack(cls, steps: Sequence[tuple[Any, Any, Any, Any]], tokens_per_micro_batch: int) -> "TraceSequences":
        """Pad per-step ``(loads [Z_s, L, E], tokens [Z_s], prompt [Z_s], micro_batch_of [Z_s])``
        to the longest step with padding rows at the end (not checked here: see
        :func:`check_sequences`)."""
        if not steps:
            raise ValueError("TraceSequences.stack: no step given")
        arrays = [[np.asarray(a) for a in step] for step in steps]
        Z = max(a[1].shape[0] for a in arrays)
        L, E = arrays[0][0].shape[1:]
        loads = np.zeros((len(arrays), Z, L, E), dtype=np.int32)
        tokens = np.zeros((len(arrays), Z), dtype=np.int64)
        prompt = np.full((len(arrays), Z), -1, dtype=np.int64)
        micro_batch_of = np.full((len(arrays), Z), -1, dtype=np.int64)
        for s, (seq_loads, seq_tokens, seq_prompt, seq_mb) in enumerate(arrays):
            n = seq_tokens.shape[0]
            if seq_loads.shape != (n, L, E):
                raise ValueError(f"TraceSequences.stack: step {s} has loads of shape {seq_loads.shape}, "
                                 f"expected {(n, L, E)}")
            if seq_loads.size and (int(seq_loads.min()) < 0 or int(seq_loads.max()) > _INT32_MAX):
                raise ValueError(f"TraceSequences.stack: step {s} has loads outside [0, 2**31)")
            loads[s, :n], tokens[s, :n] = seq_loads, seq_tokens
            prompt[s, :n], micro_batch_of[s, :n] = seq_prompt, seq_mb
        return cls(torch.from_numpy(loads), torch.from_numpy(tokens), torch.from_numpy(prompt),
                   torch.from_numpy(micro_batch_of), int(tokens_per_micro_batch))

    def arrays(self) -> dict[str, np.ndarray]:
        """The file's keys (int32 loads, int64 vectors and budget) as NumPy arrays."""
        return {"sequence_loads": self.loads.numpy(), "sequence_tokens": self.tokens.numpy(),
                "sequence_prompt": self.prompt.numpy(), "micro_batch_of": self.micro_batch_of.numpy(),
                "tokens_per_micro_batch": np.asarray(self.tokens_per_micro_batch, dtype=np.int64)}


def _fault(where: str, key: str, text: str) -> ValueError:
    return ValueError(f"{where}, key {key!r}: {text}")


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _budget(value: Any, where: str) -> int:
    value = np.asarray(value)
    if value.ndim != 0 or value.dtype.kind not in "iu" or int(value) < 1:
        raise _fault(where, "tokens_per_micro_batch", f"must be a positive integer scalar, got {value!r}")
    return int(value)


def _sequence_loads(value: Any, loads_shape: tuple[int, ...], where: str) -> np.ndarray:
    """``sequence_loads`` as native int32 ``[Y, Z, L, E]``, its shape checked against ``loads``."""
    x = np.asarray(value)
    if x.ndim != 4 or x.dtype.kind not in "iu":
        raise _fault(where, "sequence_loads", f"must be integers of 4 dimensions [steps, sequences, layers, "
                                              f"experts], got {x.dtype} of shape {x.shape}")
    Y, _, L, E = loads_shape
    if (x.shape[0], x.shape[2], x.shape[3]) != (Y, L, E):
        raise _fault(where, "sequence_loads", f"has shape {x.shape}, but loads has {loads_shape}: steps, layers "
                                              "and experts must agree")
    if x.size:
        if x.dtype.kind == "i" and int(x.min()) < 0:
            index = _first(x < 0)
            raise _fault(where, "sequence_loads", f"negative load {int(x[index])} at index {index}")
        if int(x.max()) > _INT32_MAX:
            index = _first(x > _INT32_MAX)
            raise _fault(where, "sequence_loads", f"load {int(x[index])} at index {index} is 2**31 or more "
                                                  "(one sequence's copies of one expert)")
    return np.asarray(x, dtype=np.int32)


def check_sequences(loads_YMLE: torch.Tensor, arrays: Mapping[str, Any], where: str) -> TraceSequences:
    """The format-2 keys of ``arrays`` checked against each other and against ``loads_YMLE``.

    Args:
        loads_YMLE: the file's checked int64 ``loads``.
        arrays: the :data:`SEQUENCE_KEYS` (NumPy arrays or tensors).
        where: how messages name the file (``"trace file 'x.npz'"``).

    Raises ValueError ``"{where}, key 'KEY': ..."`` for the first disagreement (module docstring).
    """
    missing = [k for k in SEQUENCE_KEYS if k not in arrays]
    if missing:
        present = [k for k in SEQUENCE_KEYS if k in arrays]
        raise ValueError(f"{where} holds {present} but lacks key(s) {missing}: a per-sequence (format 2) trace "
                         f"holds all of {list(SEQUENCE_KEYS)}")
    budget = _budget(arrays["tokens_per_micro_batch"], where)
    Y, M, L, E = loads_YMLE.shape
    seq_loads = _sequence_loads(arrays["sequence_loads"], tuple(loads_YMLE.shape), where)
    Z = seq_loads.shape[1]
    vectors = {}
    for key in ("sequence_tokens", "sequence_prompt", "micro_batch_of"):
        v = np.asarray(arrays[key])
        if v.shape != (Y, Z) or v.dtype.kind not in "iu":
            raise _fault(where, key, f"must be integers of shape [steps, sequences] = {[Y, Z]} like "
                                     f"sequence_loads' first two dimensions, got {v.dtype} of shape {v.shape}")
        vectors[key] = np.asarray(v, dtype=np.int64)
    tokens, prompt, mb = vectors["sequence_tokens"], vectors["sequence_prompt"], vectors["micro_batch_of"]
    if tokens.size and int(tokens.min()) < 0:
        s, z = _first(tokens < 0)
        raise _fault(where, "sequence_tokens", f"step {s}, sequence {z} has {int(tokens[s, z])} tokens")
    pad = tokens == 0
    for key, v, low in (("sequence_prompt", prompt, 0), ("micro_batch_of", mb, 0)):
        bad = pad & (v != -1)
        if bad.any():
            s, z = _first(bad)
            raise _fault(where, key, f"step {s}, row {z} is padding (0 tokens) but has {key} {int(v[s, z])}; "
                                     "padding rows hold -1")
        bad = ~pad & ((v < low) | ((v >= M) if key == "micro_batch_of" else False))
        if bad.any():
            s, z = _first(bad)
            span = f"[0, {M})" if key == "micro_batch_of" else ">= 0"
            raise _fault(where, key, f"step {s}, sequence {z} ({int(tokens[s, z])} tokens) has {key} "
                                     f"{int(v[s, z])}, outside {span}")
    padding_rows = seq_loads[pad]  # [rows, L, E]: only the padding rows are copied
    if padding_rows.any():
        row, l, e = _first(padding_rows != 0)
        s, z = (int(i) for i in np.argwhere(pad)[row])
        raise _fault(where, "sequence_loads", f"step {s}, row {z} is padding (0 tokens) but routes "
                                              f"{int(padding_rows[row, l, e])} copies to expert {e} of layer {l}")
    held = np.zeros((Y, M), dtype=np.int64)
    steps = np.repeat(np.arange(Y), Z)
    np.add.at(held, (steps[~pad.reshape(-1)], mb[~pad]), tokens[~pad])
    if (held > budget).any():
        s, m = _first(held > budget)
        raise _fault(where, "micro_batch_of", f"step {s}, micro-batch {m} holds {int(held[s, m])} tokens, more "
                                              f"than tokens_per_micro_batch={budget}")
    _check_sums(loads_YMLE, seq_loads, mb, where)
    return TraceSequences(torch.from_numpy(seq_loads), torch.from_numpy(tokens), torch.from_numpy(prompt),
                          torch.from_numpy(mb), budget)


def _check_sums(loads_YMLE: torch.Tensor, seq_loads_YZLE: np.ndarray, mb_YZ: np.ndarray, where: str) -> None:
    """``loads`` must be ``sequence_loads`` summed by ``micro_batch_of`` (one gather per micro-batch)."""
    Y, M, L, E = loads_YMLE.shape
    loads = loads_YMLE.numpy()
    for s in range(Y):
        flat = seq_loads_YZLE[s].reshape(-1, L * E)
        for m in range(M):
            total = flat[np.flatnonzero(mb_YZ[s] == m)].sum(0, dtype=np.int64).reshape(L, E)
            if not np.array_equal(total, loads[s, m]):
                l, e = _first(total != loads[s, m])
                raise _fault(where, "loads", f"step {s}, micro-batch {m}, layer {l}, expert {e} holds "
                                             f"{int(loads[s, m, l, e])} token copies, but the sequences micro_batch_of "
                                             f"puts there hold {int(total[l, e])}: loads must be sequence_loads "
                                             "summed by micro_batch_of")
