"""Recorded routes in, exact loads out (rollout routing replay, R3).

Legend:

    T  tokens (of one sequence, or of a micro-batch)    K  top_k (expert copies per token)
    Lg global layers of the model (dense ones included) L  MoE layers
    E  logical experts per MoE layer                    M  micro-batches
    R  source ranks (data-parallel / expert-parallel ranks that hold the tokens)
    B  sequences (batch)

A *route array* of one sequence is an integer array ``routes_TLgK`` ``[T, Lg, K]``: the
expert ids every token picked in every layer, indexed by **global** layer id as vLLM and
SGLang return it (dense layers come back as rows of zeros or -1 and are ignored). ``-1``
marks padding (a token or slot with no route) and is dropped from every count.

The pipeline::

    per-sequence routes [T_i, Lg, K]  --(moe_layers / first_k_dense)-->  [T_i, L, K]
        --(micro_batches: sizes or index lists)-->  loads_MLE [M, L, E] int64 (bincount)
        --(ranks: source rank of each sequence)-->  loads_MLRE [M, L, R, E]

``routes_for_micro_batch`` concatenates one micro-batch's sequences into the ``[T, L, K]``
int64 routes tensor the Balancer and the layer consume; ``loads_from_routes`` counts it.

Engine adapters (vLLM, SGLang, verl, Megatron, base64 buffers, the ``len - 1`` alignment,
``RouteStore``) live in :mod:`relibra.routing_formats`; trace files in :mod:`relibra.trace_io`.
Both are re-exported here.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "as_routes",
    "moe_layer_ids",
    "select_moe_layers",
    "micro_batch_groups",
    "loads_from_routes",
    "micro_batch_loads",
    "micro_batch_rank_loads",
    "routes_for_micro_batch",
    "route_fault",
    "PAD",
]

PAD = -1  #: the padding expert id; dropped from every count


# --------------------------------------------------------------------------- validation
_COMPACT = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _to_int64(routes: Any, name: str, keep_dtype: bool = False) -> tuple[torch.Tensor, str]:
    """Convert to an int64 CPU tensor, refusing floats, bools and ragged input.

    With ``keep_dtype`` a signed integer / uint8 tensor keeps its dtype (saves a full copy;
    the counting kernels promote to int64 on the fly). Returns the tensor and the name of
    the original dtype (for the uint8 check).
    """
    if isinstance(routes, torch.Tensor):
        dtype = routes.dtype
        if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
            raise ValueError(f"{name} must hold integer expert ids, got dtype {dtype}")
        target = dtype if keep_dtype and dtype in _COMPACT else torch.int64
        return routes.detach().to(device="cpu", dtype=target), str(dtype).replace("torch.", "")
    try:
        array = np.asarray(routes)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"{name} cannot be read as a rectangular array: {exc}") from None
    if array.dtype == object:
        raise ValueError(f"{name} is ragged or holds objects (dtype object); expected an integer array")
    if array.dtype.kind not in "iu":
        if array.size == 0 and array.dtype.kind == "f":  # np.asarray([]) is float64
            array = array.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer expert ids, got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.dtype.itemsize == 8 and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds uint64 values beyond int64")
    if keep_dtype and array.dtype in (np.int64, np.int32, np.int16, np.int8, np.uint8):
        return torch.from_numpy(np.ascontiguousarray(array)), str(array.dtype)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)), str(array.dtype)


def _check_ids(routes: torch.Tensor, num_experts: int, name: str, layer_ids: Sequence[int] | None = None) -> None:
    """Raise naming the first id outside ``[-1, num_experts)``: its token, layer and value."""
    if routes.numel() == 0:
        return
    low, high = torch.aminmax(routes)
    if int(low) < PAD or int(high) >= num_experts:  # slow path only to name the culprit
        bad = (routes < PAD) | (routes >= num_experts)
        idx = [int(i) for i in bad.nonzero()[0]]
        value = int(routes[tuple(idx)])
        where = f"token {idx[0]}"
        if routes.dim() >= 3:
            layer = idx[1] if layer_ids is None else layer_ids[idx[1]]
            where += f", layer {layer}, slot {idx[2]}"
        raise ValueError(
            f"{name}: expert id {value} at {where} is out of range [0, {num_experts}) (-1 is padding)"
        )


def route_fault(routes: Any, shape: tuple[int | None, ...], num_experts: int, name: str = "routes") -> str:
    """Why ``routes`` are not a tensor of expert ids, or "" if they are.

    ``shape``: the expected sizes, ``None`` where any size goes (e.g. ``(None, L, K)`` for
    ``[tokens, moe layers, top_k]``). Ids must lie in ``-1..num_experts-1`` (-1 is padding).
    Returns the text, naming ``name``, the dtype, the shape or the first bad id with its index,
    so that distributed callers can agree on it before raising.
    """
    dims = "[" + ", ".join("T" if n is None else str(n) for n in shape) + "]"
    if not isinstance(routes, torch.Tensor):
        return f"{name} must be a tensor {dims}, got {type(routes).__name__}"
    if routes.is_floating_point() or routes.is_complex() or routes.dtype == torch.bool:
        return f"{name} must hold integer expert ids, got dtype {routes.dtype}"
    if routes.dim() != len(shape) or any(n is not None and int(d) != n for d, n in zip(routes.shape, shape)):
        return f"{name} must have shape {dims}, got {tuple(routes.shape)}"
    if routes.numel():
        ids = routes if routes.is_signed() else routes.to(torch.int64)  # uint8 (verl): -1 would wrap
        bad = (ids < PAD) | (ids >= num_experts)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            return (f"{name}[{', '.join(map(str, idx))}] = {int(ids[idx])} is not an expert id in "
                    f"[0, {num_experts}) (or -1 for padding)")
    return ""


def _check_num_experts(num_experts: int) -> None:
    if not isinstance(num_experts, (int, np.integer)) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")


def as_routes(routes: Any, num_experts: int, name: str = "routes", ndim: int = 3) -> torch.Tensor:
    """Validate one route array and return it as int64 (shape unchanged, ``[T, Lg, K]`` by default).

    Accepts torch tensors, numpy arrays and nested lists of any integer dtype. Raises
    ValueError for float/bool dtypes, a wrong rank, uint8 ids with more than 256 experts, and
    ids outside ``[-1, num_experts)`` (naming the token, layer, slot and id).
    """
    _check_num_experts(num_experts)
    tensor, dtype = _to_int64(routes, name)
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if dtype == "uint8" and num_experts > 256:
        raise ValueError(f"{name} is uint8, which cannot hold expert ids of {num_experts} experts (at most 256)")
    _check_ids(tensor, num_experts, name)
    return tensor


# --------------------------------------------------------------------------- layers
def moe_layer_ids(
    num_layers: int, moe_layers: Sequence[int] | None = None, first_k_dense: int | None = None
) -> list[int]:
    """Global ids of the MoE layers among ``num_layers`` global layers.

    ``moe_layers`` lists them explicitly (unique, ascending, in range); ``first_k_dense``
    says the first k layers are dense (DeepSeek-V3: 3); neither means every layer is MoE.
    """
    if moe_layers is not None and first_k_dense is not None:
        raise ValueError("give moe_layers or first_k_dense, not both")
    if first_k_dense is not None:
        if not isinstance(first_k_dense, (int, np.integer)) or isinstance(first_k_dense, bool) or not 0 <= first_k_dense < num_layers:
            raise ValueError(f"first_k_dense={first_k_dense!r} must be an int in [0, {num_layers}) for {num_layers} layers")
        return list(range(int(first_k_dense), num_layers))
    if moe_layers is None:
        return list(range(num_layers))
    ids = [int(i) for i in moe_layers]
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
    tensor, dtype = _to_int64(routes_TLgK, name, keep_dtype)
    if tensor.dim() != 3:
        raise ValueError(f"{name} must be [tokens, layers, top_k], got shape {tuple(tensor.shape)}")
    if dtype == "uint8" and num_experts > 256:
        raise ValueError(f"{name} is uint8, which cannot hold expert ids of {num_experts} experts (at most 256)")
    ids = moe_layer_ids(tensor.shape[1], moe_layers, first_k_dense)
    if ids == list(range(ids[0], ids[-1] + 1)):
        tensor = tensor[:, ids[0] : ids[-1] + 1]  # a view: no copy for first_k_dense
    else:
        tensor = tensor[:, ids]
    _check_ids(tensor, num_experts, name, ids)
    return tensor


def _sequences(
    sequences: Any, num_experts: int, moe_layers: Sequence[int] | None, first_k_dense: int | None
) -> list[torch.Tensor]:
    """Validate a list of per-sequence route arrays ``[T_i, L, K]`` (MoE layers; integer dtype
    kept when compact); all must share (L, K)."""
    if isinstance(sequences, (torch.Tensor, np.ndarray)):
        raise ValueError(
            "sequences must be a list of per-sequence [len, layers, top_k] arrays; for a padded "
            "[batch, seq, layers, top_k] array use relibra.routing_formats.verl_sequences(routes, mask)"
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


# --------------------------------------------------------------------------- micro-batches
def micro_batch_groups(num_sequences: int, micro_batches: Sequence[int] | Sequence[Sequence[int]] | None) -> list[list[int]]:
    """Sequence indices of each micro-batch.

    ``micro_batches`` is ``None`` (one micro-batch of everything), a list of sizes (consecutive
    sequences; they must add up to ``num_sequences``) or a list of index lists (any order, no
    sequence twice; sequences in no list are left out).
    """
    if micro_batches is None:
        return [list(range(num_sequences))]
    groups = list(micro_batches)
    if not groups:
        raise ValueError("micro_batches is empty")
    if all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in groups):
        sizes = [int(g) for g in groups]
        if any(s < 0 for s in sizes):
            raise ValueError(f"micro_batches sizes must be >= 0, got {sizes}")
        if sum(sizes) != num_sequences:
            raise ValueError(f"micro_batches sizes {sizes} add up to {sum(sizes)}, but there are {num_sequences} sequences")
        starts = np.cumsum([0] + sizes)
        return [list(range(int(a), int(b))) for a, b in zip(starts[:-1], starts[1:])]
    seen: dict[int, int] = {}
    out = []
    for m, group in enumerate(groups):
        if isinstance(group, (int, np.integer)):
            raise ValueError("micro_batches mixes sizes and index lists; give one or the other")
        idx = [int(i) for i in group]
        for i in idx:
            if not 0 <= i < num_sequences:
                raise ValueError(f"micro-batch {m} holds sequence {i}, out of range [0, {num_sequences})")
            if i in seen:
                raise ValueError(f"sequence {i} is in micro-batch {seen[i]} and micro-batch {m}")
            seen[i] = m
        out.append(idx)
    return out


# --------------------------------------------------------------------------- loads
def loads_from_routes(routes_TLK: Any, num_experts: int) -> torch.Tensor:
    """Exact loads ``[L, E]`` int64 of one routes tensor ``[T, L, K]`` (-1 entries ignored)."""
    routes = as_routes(routes_TLK, num_experts, name="routes_TLK")
    return _bincount_loads([routes], [[0]], num_experts, None, 1)[0, :, 0]


def _bincount_loads(
    seqs: list[torch.Tensor], groups: list[list[int]], num_experts: int, rank_of_seq: list[int] | None, num_ranks: int
) -> torch.Tensor:
    """Counts ``[M, L, R, E]``: one bincount per micro-batch (memory bounded by one micro-batch).

    Ids must already be checked to lie in ``[-1, E)``.
    """
    num_layers = seqs[0].shape[1]
    out = torch.zeros(len(groups), num_layers, num_ranks, num_experts, dtype=torch.int64)
    layer = torch.arange(num_layers).view(1, num_layers, 1)
    for m, group in enumerate(groups):
        if not group:
            continue
        routes = torch.cat([seqs[i] for i in group])  # [T, L, K]
        if rank_of_seq is None:
            r_tok = torch.zeros(1, 1, 1, dtype=torch.int64)
        else:
            lengths = torch.tensor([seqs[i].shape[0] for i in group])
            r_tok = torch.repeat_interleave(torch.tensor([rank_of_seq[i] for i in group]), lengths).view(-1, 1, 1)
        # bin (l, r, e + 1) of E + 1 bins per (layer, rank): padding (-1) lands in bin 0, dropped
        index = routes + ((layer * num_ranks + r_tok) * (num_experts + 1) + 1)  # [T, L, K]
        counts = torch.bincount(index.view(-1), minlength=num_layers * num_ranks * (num_experts + 1))
        out[m] = counts.view(num_layers, num_ranks, num_experts + 1)[..., 1:]
    return out


def micro_batch_loads(
    sequences: Sequence[Any],
    num_experts: int,
    *,
    micro_batches: Sequence[int] | Sequence[Sequence[int]] | None = None,
    moe_layers: Sequence[int] | None = None,
    first_k_dense: int | None = None,
) -> torch.Tensor:
    """Exact loads ``[M, L, E]`` int64 of per-sequence routes grouped into micro-batches.

    Args:
        sequences: per-sequence route arrays ``[T_i, Lg, K]`` by global layer id (torch,
            numpy or lists; any integer dtype; -1 padding).
        num_experts: E, logical experts per MoE layer.
        micro_batches: sizes or index lists, see :func:`micro_batch_groups`.
        moe_layers / first_k_dense: which global layers are MoE, see :func:`moe_layer_ids`.
    """
    seqs = _sequences(sequences, num_experts, moe_layers, first_k_dense)
    groups = micro_batch_groups(len(seqs), micro_batches)
    return _bincount_loads(seqs, groups, num_experts, None, 1)[:, :, 0]


def micro_batch_rank_loads(
    sequences: Sequence[Any],
    num_experts: int,
    ranks: Sequence[int],
    num_ranks: int,
    *,
    micro_batches: Sequence[int] | Sequence[Sequence[int]] | None = None,
    moe_layers: Sequence[int] | None = None,
    first_k_dense: int | None = None,
) -> torch.Tensor:
    """Exact loads per source rank ``[M, L, R, E]`` int64; ``ranks[i]`` holds sequence ``i``.

    Summing over dimension 2 gives :func:`micro_batch_loads`.
    """
    seqs = _sequences(sequences, num_experts, moe_layers, first_k_dense)
    if not isinstance(num_ranks, (int, np.integer)) or isinstance(num_ranks, bool) or num_ranks < 1:
        raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
    rank_list = [int(r) for r in (ranks.tolist() if hasattr(ranks, "tolist") else ranks)]
    if len(rank_list) != len(seqs):
        raise ValueError(f"ranks has {len(rank_list)} entries but there are {len(seqs)} sequences")
    for i, r in enumerate(rank_list):
        if not 0 <= r < num_ranks:
            raise ValueError(f"ranks[{i}] = {r} is out of range [0, {num_ranks})")
    groups = micro_batch_groups(len(seqs), micro_batches)
    return _bincount_loads(seqs, groups, num_experts, rank_list, int(num_ranks))


def routes_for_micro_batch(
    sequences: Sequence[Any],
    num_experts: int,
    indices: Sequence[int] | None = None,
    *,
    moe_layers: Sequence[int] | None = None,
    first_k_dense: int | None = None,
    drop_padding: bool = True,
) -> torch.Tensor:
    """One micro-batch's routes as the ``[T, L, K]`` int64 tensor the Balancer consumes.

    The chosen sequences (``indices``, default all, in the given order) are concatenated
    along tokens, keeping MoE layers only. With ``drop_padding`` a token whose every entry
    is -1 (a padding token) is removed; partial -1 entries stay (they are ignored by loads).
    ``loads_from_routes(result, E)`` equals the micro-batch's row of :func:`micro_batch_loads`.
    """
    seqs = _sequences(sequences, num_experts, moe_layers, first_k_dense)
    if indices is None:
        indices = range(len(seqs))
    idx = micro_batch_groups(len(seqs), [list(indices)])[0]
    if not idx:
        return torch.zeros((0,) + tuple(seqs[0].shape[1:]), dtype=torch.int64)
    routes = torch.cat([seqs[i] for i in idx]).to(torch.int64)
    if drop_padding and routes.numel():
        routes = routes[(routes != PAD).flatten(1).any(dim=1)]
    return routes


# Re-exports of the adapters and trace files, resolved lazily (they import this module).
_REEXPORTS = {
    **{n: "routing_formats" for n in (
        "RouteStore", "align_routes", "decode_routed_experts", "from_megatron", "from_sglang",
        "from_verl", "from_vllm", "to_megatron", "token_key", "verl_sequences",
    )},
    **{n: "trace_io" for n in ("Trace", "load_trace", "save_trace")},
}
__all__ += sorted(_REEXPORTS)


def __getattr__(name: str) -> Any:
    module = _REEXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __package__), name)
