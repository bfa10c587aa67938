"""Route arrays (rollout routing replay, R3): validation and MoE-layer selection.

Legend:

    T  tokens (of one sequence, or of a micro-batch)    K  top_k (expert copies per token)
    Lg global layers of the model (dense ones included) L  MoE layers
    E  logical experts per MoE layer

A *route array* of one sequence is an integer array ``routes_TLgK`` ``[T, Lg, K]``: the
expert ids every token picked in every layer, indexed by **global** layer id as vLLM and
SGLang return it (dense layers come back as rows of zeros or -1 and are ignored). ``-1``
(:data:`PAD`) marks padding (a token or slot with no route) and is dropped from every count.

Every rule of what valid routes are lives here, once: an integer dtype wide enough for the
expert ids (uint8, as verl ships them, holds at most 256 experts and no -1: a -1 written into
uint8 wraps to 255, and is named so), the expected shape, ids in ``[-1, E)`` and, when asked,
the device. :func:`route_fault` and :func:`step_routes_fault` return the fault as text, so that
distributed callers (the Balancer, ReLibraMoE) agree on it before raising the same error on
every rank; :func:`as_routes`, :func:`select_moe_layers` and :func:`check_sequences` raise it
for local callers.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "PAD",
    "as_routes",
    "check_sequences",
    "moe_layer_ids",
    "route_fault",
    "select_moe_layers",
    "step_routes_fault",
    "to_int64",
]

PAD = -1  #: the padding expert id; dropped from every count


_COMPACT = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
#: the most experts a narrow integer dtype can name (ids 0..capacity-1)
_ID_CAPACITY = {"uint8": 256, "int8": 128, "uint16": 2**16, "int16": 2**15}


def _dtype_fault(dtype: torch.dtype | np.dtype, name: str) -> str:
    """Why a torch or numpy ``dtype`` cannot hold expert ids (not an integer type), or ""."""
    if isinstance(dtype, torch.dtype):
        integer = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    else:
        integer = dtype.kind in "iu"
    return "" if integer else f"{name} must hold integer expert ids, got dtype {dtype}"


def _capacity_fault(dtype_name: str, num_experts: int, name: str) -> str:
    """Why ``dtype_name`` (e.g. "uint8") cannot name every one of ``num_experts`` experts, or ""."""
    capacity = _ID_CAPACITY.get(dtype_name)
    if capacity is not None and num_experts > capacity:
        return (f"{name} is {dtype_name}, which cannot hold expert ids of {num_experts} experts "
                f"(at most {capacity})")
    return ""


def _ids_fault(
    routes: torch.Tensor, num_experts: int, name: str, dtype_name: str, layer_ids: Sequence[int] | None = None
) -> str:
    """The first id outside ``[-1, num_experts)`` with its index, or "".

    ``dtype_name``: the dtype the caller was given (the tensor may have been widened already);
    a uint8 255 beyond the experts is named as what it likely is, a wrapped -1. ``layer_ids``:
    global layer ids of ``routes``' dim 1 (selected MoE layers), so the index names the
    caller's own array.
    """
    if routes.numel() == 0:
        return ""
    low, high = torch.aminmax(routes)  # Python ints: a uint8 255 stays 255, never -1
    if int(low) >= PAD and int(high) < num_experts:
        return ""
    wide = routes.to(torch.int64)  # slow path, only to name the culprit
    idx = [int(i) for i in ((wide < PAD) | (wide >= num_experts)).nonzero()[0]]
    value = int(wide[tuple(idx)])
    if layer_ids is not None:
        idx[1] = int(layer_ids[idx[1]])
    text = (f"{name}[{', '.join(map(str, idx))}] = {value} is not an expert id in [0, {num_experts}) "
            f"(or -1 for padding)")
    if dtype_name == "uint8" and value == 255:
        text += "; uint8 cannot hold the padding id -1 (it wraps to 255): use a signed dtype"
    return text


def _raise(fault: str) -> None:
    if fault:
        raise ValueError(fault)


def to_int64(routes: Any, name: str, keep_dtype: bool = False) -> tuple[torch.Tensor, str]:
    """Convert to an int64 CPU tensor, refusing floats, bools and ragged input.

    With ``keep_dtype`` a signed integer / uint8 tensor keeps its dtype (saves a full copy;
    the counting kernels promote to int64 on the fly). Returns the tensor and the name of
    the original dtype (for the capacity check).
    """
    if isinstance(routes, torch.Tensor):
        _raise(_dtype_fault(routes.dtype, name))
        target = routes.dtype if keep_dtype and routes.dtype in _COMPACT else torch.int64
        return routes.detach().to(device="cpu", dtype=target), str(routes.dtype).replace("torch.", "")
    try:
        array = np.asarray(routes)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"{name} cannot be read as a rectangular array: {exc}") from None
    if array.dtype == object:
        raise ValueError(f"{name} is ragged or holds objects (dtype object); expected an integer array")
    if array.size == 0 and array.dtype.kind == "f":  # np.asarray([]) is float64
        array = array.astype(np.int64)
    _raise(_dtype_fault(array.dtype, name))
    if array.dtype.kind == "u" and array.dtype.itemsize == 8 and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds uint64 values beyond int64")
    if keep_dtype and array.dtype in (np.int64, np.int32, np.int16, np.int8, np.uint8):
        return torch.from_numpy(np.ascontiguousarray(array)), str(array.dtype)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)), str(array.dtype)


def route_fault(
    routes: Any,
    shape: tuple[int | None, ...],
    num_experts: int,
    name: str = "routes",
    device: torch.device | str | None = None,
) -> str:
    """Why ``routes`` are not a tensor of expert ids of this shape, or "" if they are.

    ``shape``: the expected sizes, ``None`` where any size goes (e.g. ``(None, L, K)`` for
    ``[tokens, moe layers, top_k]``). ``device``: where the routes must be (e.g. the tokens'
    device); None accepts any. Ids must lie in ``-1..num_experts-1`` (-1 is padding). Returns
    the text naming ``name`` and the first fault found, in this order: type, device, dtype,
    shape, the first bad id with its index. No communication, so that distributed callers can
    agree on it before raising.
    """
    dims = "[" + ", ".join("T" if n is None else str(n) for n in shape) + "]"
    if not isinstance(routes, torch.Tensor):
        return f"{name} must be a tensor {dims}, got {type(routes).__name__}"
    if device is not None and routes.device != torch.device(device):
        return (f"{name} is on {routes.device}, but the tokens are on {torch.device(device)}; "
                f"move {name} to the tokens' device")
    dtype_name = str(routes.dtype).replace("torch.", "")
    fault = _dtype_fault(routes.dtype, name) or _capacity_fault(dtype_name, num_experts, name)
    if fault:
        return fault
    if routes.dim() != len(shape) or any(n is not None and int(d) != n for d, n in zip(routes.shape, shape)):
        return f"{name} must have shape {dims}, got {tuple(routes.shape)}"
    return _ids_fault(routes, num_experts, name, dtype_name)


def step_routes_fault(routes_M: Any, num_layers: int, top_k: int, num_experts: int) -> str:
    """Why ``routes_M`` are not one step's routes on one rank, or "" if they are.

    A step's routes are a non-empty list (or tuple) of M tensors ``[T_m, L, K]``, one per
    micro-batch (``T_m`` may be 0), each passing :func:`route_fault`.
    """
    want = f"[T_m, {num_layers}, {top_k}]"
    if not isinstance(routes_M, (list, tuple)):
        return f"routes must be a list of int tensors {want}, one per micro-batch, got {type(routes_M).__name__}"
    if not routes_M:
        return f"routes must be a non-empty list of int tensors {want}, one per micro-batch, got an empty list"
    for m, routes in enumerate(routes_M):
        fault = route_fault(routes, (None, num_layers, top_k), num_experts, f"routes[{m}]")
        if fault:
            return fault
    return ""


def _check_num_experts(num_experts: int) -> None:
    if not isinstance(num_experts, (int, np.integer)) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")


def as_routes(routes: Any, num_experts: int, name: str = "routes", ndim: int = 3) -> torch.Tensor:
    """Validate one route array and return it as int64 (shape unchanged, ``[T, Lg, K]`` by default).

    Accepts torch tensors, numpy arrays and nested lists of any integer dtype. Raises
    ValueError for float/bool dtypes, a wrong rank, a dtype too narrow for the experts (uint8
    beyond 256) and ids outside ``[-1, num_experts)`` (naming the index and the id).
    """
    _check_num_experts(num_experts)
    tensor, dtype = to_int64(routes, name)
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    _raise(_capacity_fault(dtype, num_experts, name) or _ids_fault(tensor, num_experts, name, dtype))
    return tensor


# --------------------------------------------------------------------------- layers
def moe_layer_ids(
    num_layers: int, moe_layers: Sequence[int] | None = None, first_k_dense: int | None = None
) -> list[int]:
    """Global ids of the MoE layers among ``num_layers`` global layers.

    ``moe_layers`` lists them explicitly (integers, unique, ascending, in range: ``0.5`` or
    ``True`` is refused, never read as layer 0 or 1); ``first_k_dense`` says the first k layers
    are dense (DeepSeek-V3: 3); neither means every layer is MoE.
    """
    if moe_layers is not None and first_k_dense is not None:
        raise ValueError("give moe_layers or first_k_dense, not both")
    if first_k_dense is not None:
        is_int = isinstance(first_k_dense, (int, np.integer)) and not isinstance(first_k_dense, bool)
        if not is_int or not 0 <= first_k_dense < num_layers:
            raise ValueError(
                f"first_k_dense={first_k_dense!r} must be an int in [0, {num_layers}) for {num_layers} layers"
            )
        return list(range(int(first_k_dense), num_layers))
    if moe_layers is None:
        return list(range(num_layers))
    if isinstance(moe_layers, (str, bytes)) or not isinstance(moe_layers, Iterable):
        raise ValueError(f"moe_layers must be a sequence of integer layer ids, got {moe_layers!r}")
    ids = []
    for layer in moe_layers:
        index = None
        if not isinstance(layer, (bool, np.bool_)):
            try:  # int, numpy and 0-d torch integers; float and str raise
                index = operator.index(layer)
            except TypeError:
                pass
        if index is None:
            raise ValueError(f"moe_layers must hold integer layer ids, got {layer!r} ({type(layer).__name__})")
        ids.append(index)
    if not ids:
        raise ValueError("moe_layers is empty")
    for i in ids:
        if not 0 <= i < num_layers:
            raise ValueError(f"moe_layers holds layer {i}, out of range [0, {num_layers}) of the routes' layers")
    if len(set(ids)) != len(ids) or ids != sorted(ids):
        raise ValueError(f"moe_layers must be unique and ascending, got {ids}")
    return ids


def select_moe_layers(
    routes_TLgK: Any,
    num_experts: int,
    *,
    moe_layers: Sequence[int] | None = None,
    first_k_dense: int | None = None,
    name: str = "routes",
) -> torch.Tensor:
    """One sequence's routes by global layer ``[T, Lg, K]`` -> MoE layers only ``[T, L, K]`` int64.

    Ids of dense layers are not checked (engines fill them with 0 or -1); ids of MoE layers
    must lie in ``[-1, num_experts)``.
    """
    return _select(routes_TLgK, num_experts, moe_layers, first_k_dense, name, keep_dtype=False)


def _select(
    routes_TLgK: Any, num_experts: int, moe_layers: Any, first_k_dense: Any, name: str, keep_dtype: bool
) -> torch.Tensor:
    _check_num_experts(num_experts)
    tensor, dtype = to_int64(routes_TLgK, name, keep_dtype)
    if tensor.dim() != 3:
        raise ValueError(f"{name} must be [tokens, layers, top_k], got shape {tuple(tensor.shape)}")
    _raise(_capacity_fault(dtype, num_experts, name))
    ids = moe_layer_ids(tensor.shape[1], moe_layers, first_k_dense)
    if ids == list(range(ids[0], ids[-1] + 1)):
        tensor = tensor[:, ids[0] : ids[-1] + 1]  # a view: no copy for first_k_dense
    else:
        tensor = tensor[:, ids]
    _raise(_ids_fault(tensor, num_experts, name, dtype, ids))
    return tensor


def check_sequences(
    sequences: Any, num_experts: int, moe_layers: Sequence[int] | None, first_k_dense: int | None
) -> list[torch.Tensor]:
    """Validate a list of per-sequence route arrays ``[T_i, L, K]`` (MoE layers; integer dtype
    kept when compact); all must share (L, K)."""
    if isinstance(sequences, (torch.Tensor, np.ndarray)):
        raise ValueError(
            "sequences must be a list of per-sequence [len, layers, top_k] arrays; for a padded "
            "[batch, seq, layers, top_k] array use relibra.routing.verl_sequences(routes, mask)"
        )
    out: list[torch.Tensor] = []
    for i, seq in enumerate(sequences):
        routes = _select(seq, num_experts, moe_layers, first_k_dense, f"sequence {i}", keep_dtype=True)
        if out and routes.shape[1:] != out[0].shape[1:]:
            raise ValueError(
                f"sequence {i} has routes of shape {tuple(routes.shape)} (MoE layers, top_k = "
                f"{tuple(routes.shape[1:])}) but sequence 0 has {tuple(out[0].shape[1:])}"
            )
        out.append(routes)
    if not out:
        raise ValueError("no sequences given")
    return out
