"""Rollout routing replay (R3) adapters: routes as inference engines and trainers hand them out.

Legend (see :mod:`relibra.routing`): T tokens, Lg global layers, L MoE layers, K top_k,
B sequences, S padded sequence length.

- vLLM (``enable_return_routed_experts``) and SGLang (``--enable-return-routed-experts``)
  give int32 ``[T, Lg, K]`` per sequence, by global layer id; over HTTP as a base64 buffer
  of the flat array: :func:`decode_routed_experts`, :func:`from_vllm`, :func:`from_sglang`.
- verl keeps ``batch["routed_experts"]`` ``[B, S, Lg, K]`` (uint8) beside an attention mask:
  :func:`verl_sequences`, :func:`from_verl`.
- Megatron-Core's ``RouterReplay.set_replay_data`` takes a list of ``[T, K]`` per layer:
  :func:`from_megatron`, :func:`to_megatron`.
- The engine never feeds back the last sampled token, so a sequence of ``n`` tokens has
  routes for its first ``n - 1`` positions: :func:`align_routes`.
- :class:`RouteStore` keeps routes by sequence id or token-content hash so they find their
  tokens again after padding, shuffling and micro-batch splitting.

Every function returns int64 torch tensors; ``-1`` marks a position without a route.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch

from .routes import PAD, as_routes, select_moe_layers, to_int64

__all__ = [
    "decode_routed_experts",
    "from_vllm",
    "from_sglang",
    "verl_sequences",
    "from_verl",
    "from_megatron",
    "to_megatron",
    "align_routes",
    "token_key",
    "RouteStore",
]


def _as_mask(mask: Any, name: str) -> torch.Tensor:
    """A bool CPU tensor from a bool / 0-1 integer or float mask; other values raise."""
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).cpu()
    if mask.dtype != torch.bool:
        if mask.is_complex() or (mask.numel() and not bool(((mask == 0) | (mask == 1)).all())):
            raise ValueError(f"{name} must hold only 0/1 (or bool)")
        mask = mask != 0
    return mask


# --------------------------------------------------------------------------- engines
def decode_routed_experts(
    data: Any,
    *,
    num_layers: int | None = None,
    top_k: int | None = None,
    dtype: str | np.dtype = "int32",
    raw: bool = False,
    num_experts: int | None = None,
    name: str = "routed_experts",
) -> torch.Tensor:
    """One sequence's routes, from an array or an HTTP buffer, as int64 ``[T, Lg, K]``.

    Args:
        data: a ``[T, Lg, K]`` array (torch, numpy, nested lists), a flat array, or a buffer:
            ``str``/``bytes`` are base64 text (as vLLM and SGLang send over HTTP) unless
            ``raw=True``, when ``bytes`` are the array's raw memory.
        num_layers, top_k: Lg and K, needed to reshape flat arrays and buffers.
        dtype: element type of a buffer (engines send int32).
        num_experts: when given, ids outside ``[-1, num_experts)`` raise here.
    """
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        if raw and not isinstance(data, str):
            buffer = bytes(data)
        else:
            try:
                buffer = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"{name} is not valid base64: {exc}") from None
        dt = np.dtype(dtype)
        if dt.kind not in "iu":
            raise ValueError(f"{name}: buffer dtype must be an integer type, got {dt}")
        if len(buffer) % dt.itemsize:
            raise ValueError(
                f"{name}: buffer of {len(buffer)} bytes is not a whole number of {dt} ({dt.itemsize} bytes)"
            )
        data = np.frombuffer(buffer, dtype=dt)
    tensor, _ = to_int64(data, name)
    if tensor.dim() == 1 or (num_layers is not None and top_k is not None and tensor.dim() != 3):
        if num_layers is None or top_k is None:
            raise ValueError(f"{name} is flat ({tensor.numel()} ids); give num_layers and top_k to reshape it")
        if num_layers < 1 or top_k < 1 or tensor.numel() % (num_layers * top_k):
            raise ValueError(
                f"{name} holds {tensor.numel()} ids, not a multiple of num_layers * top_k = {num_layers} * {top_k}"
            )
        tensor = tensor.reshape(-1, num_layers, top_k)
    if tensor.dim() != 3:
        raise ValueError(f"{name} must be [tokens, layers, top_k], got shape {tuple(tensor.shape)}")
    for axis, want, what in ((1, num_layers, "num_layers"), (2, top_k, "top_k")):
        if want is not None and tensor.shape[axis] != want:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {what}={want}")
    if num_experts is not None:
        as_routes(tensor, num_experts, name=name)
    return tensor


#: what :func:`decode_routed_experts` reads as routes (arrays, nested lists, buffers)
_ROUTE_DATA = (torch.Tensor, np.ndarray, list, tuple, str, bytes, bytearray, memoryview)


def _field(obj: Any, key: str, hint: str, name: str) -> Any:
    if isinstance(obj, Mapping):
        value = obj.get(key)
    else:
        value = getattr(obj, key, None)
    if value is None:
        raise ValueError(f"{name} has no {key!r}; {hint}")
    return value


def from_vllm(output: Any, **kwargs: Any) -> torch.Tensor:
    """Routes ``[T, Lg, K]`` from a vLLM output (``.routed_experts``), its JSON dict, or the data.

    Keyword arguments go to :func:`decode_routed_experts` (``num_layers``, ``top_k``, ...).
    """
    hint = "start vLLM with enable_return_routed_experts=True"
    if isinstance(output, Mapping) or hasattr(output, "routed_experts"):
        output = _field(output, "routed_experts", hint, "vLLM output")
    elif not isinstance(output, _ROUTE_DATA):  # an output object without the field, not route data
        where = " (a request output: pass one of its .outputs)" if hasattr(output, "outputs") else ""
        raise ValueError(f"vLLM output of type {type(output).__name__} has no attribute 'routed_experts'{where}; "
                         f"{hint}, or pass the routes array itself")
    return decode_routed_experts(output, name="vLLM routed_experts", **kwargs)


def from_sglang(response: Any, **kwargs: Any) -> torch.Tensor:
    """Routes ``[T, Lg, K]`` from an SGLang response (``meta_info["routed_experts"]``) or meta_info."""
    hint = "launch SGLang with --enable-return-routed-experts and request return_routed_experts=True"
    if isinstance(response, Mapping) and "meta_info" in response:
        response = response["meta_info"]
    if isinstance(response, Mapping):
        response = _field(response, "routed_experts", hint, "SGLang meta_info")
    return decode_routed_experts(response, name="SGLang routed_experts", **kwargs)


def verl_sequences(routed_experts_BSLK: Any, mask_BS: Any = None) -> list[torch.Tensor]:
    """Split verl's padded ``[B, S, Lg, K]`` routes into per-sequence ``[T_b, Lg, K]`` tensors.

    The compact dtype is kept (verl's uint8 stays uint8, 8x smaller than int64; the loads
    functions promote on the fly and refuse uint8 for more than 256 experts).

    ``mask_BS`` (attention mask; bool or 0/1) keeps the real tokens of each row, whatever the
    padding side. A narrower mask ``[B, S']`` (verl's ``response_mask``) covers the last S'
    positions. Without a mask every position counts.
    """
    routes, _ = to_int64(routed_experts_BSLK, "routed_experts", keep_dtype=True)
    if routes.dim() != 4:
        raise ValueError(f"verl routed_experts must be [batch, seq, layers, top_k], got shape {tuple(routes.shape)}")
    if mask_BS is None:
        return list(routes.unbind(0))
    mask = _as_mask(mask_BS, "mask")
    if mask.dim() != 2 or mask.shape[0] != routes.shape[0] or mask.shape[1] > routes.shape[1]:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected [batch, seq] = {tuple(routes.shape[:2])} "
            "(or [batch, last positions] for a response mask)"
        )
    if mask.shape[1] < routes.shape[1]:
        routes = routes[:, routes.shape[1] - mask.shape[1] :]
    return [routes[b][mask[b]] for b in range(routes.shape[0])]


def from_verl(batch: Any, mask_key: str | None = "attention_mask", key: str = "routed_experts") -> list[torch.Tensor]:
    """Per-sequence routes from a verl batch (``DataProto.batch`` / dict): ``batch[key]`` masked by
    ``batch[mask_key]``."""
    try:
        routes = batch[key]
    except KeyError:
        raise ValueError(f"verl batch has no {key!r}; enable routing replay (R3) in the rollout") from None
    mask = None
    if mask_key is not None:
        try:
            mask = batch[mask_key]
        except KeyError:
            raise ValueError(
                f"verl batch has no mask {mask_key!r}; pass mask_key=None to count every position"
            ) from None
    return verl_sequences(routes, mask)


def from_megatron(per_layer_TK: Sequence[Any]) -> torch.Tensor:
    """Megatron-Core replay data (one ``[T, K]`` per MoE layer) -> ``[T, L, K]`` int64."""
    layers = []
    for i, routes in enumerate(per_layer_TK):
        tensor, _ = to_int64(routes, f"layer {i}")
        if tensor.dim() != 2:
            raise ValueError(f"layer {i} routes must be [tokens, top_k], got shape {tuple(tensor.shape)}")
        if layers and tensor.shape != layers[0].shape:
            raise ValueError(
                f"layer {i} has routes of shape {tuple(tensor.shape)} but layer 0 has {tuple(layers[0].shape)}"
            )
        layers.append(tensor)
    if not layers:
        raise ValueError("Megatron replay data holds no layers")
    return torch.stack(layers, dim=1)


def to_megatron(routes_TLK: Any) -> list[torch.Tensor]:
    """``[T, L, K]`` -> one contiguous ``[T, K]`` int64 per layer, for ``RouterReplay.set_replay_data``."""
    routes, _ = to_int64(routes_TLK, "routes_TLK")
    if routes.dim() != 3:
        raise ValueError(f"routes_TLK must be [tokens, layers, top_k], got shape {tuple(routes.shape)}")
    return [routes[:, layer].contiguous() for layer in range(routes.shape[1])]


# --------------------------------------------------------------------------- alignment
def align_routes(routes_TLK: Any, num_tokens: int, *, pad_last: bool = False) -> torch.Tensor:
    """Align an engine's routes with a sequence of ``num_tokens`` tokens (prompt + response).

    The engine never feeds back the last sampled token, so only the first ``num_tokens - 1``
    positions have routes. Rows beyond them (some engines return one more) are dropped;
    fewer rows raise. With ``pad_last`` a row of -1 is appended so the result is
    ``[num_tokens, L, K]``, aligned with the training input (the last position has no
    recorded route: route it live, its loads are not counted).
    """
    routes, _ = to_int64(routes_TLK, "routes")
    if routes.dim() != 3:
        raise ValueError(f"routes must be [tokens, layers, top_k], got shape {tuple(routes.shape)}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    need = num_tokens - 1
    if routes.shape[0] < need:
        raise ValueError(f"routes cover {routes.shape[0]} positions but a sequence of {num_tokens} tokens needs {need}")
    routes = routes[:need]
    if pad_last:
        routes = torch.cat([routes, torch.full((1,) + tuple(routes.shape[1:]), PAD, dtype=torch.int64)])
    return routes


def token_key(token_ids: Any) -> str:
    """Content hash of a sequence's token ids (1-D integers): a stable key across processes."""
    ids, _ = to_int64(token_ids, "token_ids")
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(ids.shape)}")
    return hashlib.blake2b(ids.numpy().tobytes(), digest_size=16).hexdigest()


# --------------------------------------------------------------------------- store
class RouteStore:
    """Routes of the step's sequences, keyed by sequence id or token-content hash.

    Routes are kept for MoE layers only, compactly (int16 up to 32767 experts). A stored
    sequence has ``n`` or ``n - 1`` route rows for its ``n`` tokens (the ``len - 1`` rule);
    when gathered into a batch the missing last row reads -1.

    Example::

        store = RouteStore(num_experts=64, first_k_dense=1)
        for out in rollouts:                                  # vLLM outputs
            store.put_tokens(prompt_ids + out.token_ids, from_vllm(out))
        # ... later, after shuffling and splitting into micro-batches:
        routes_BSLK = store.gather_tokens(input_ids_BS, attention_mask_BS)
    """

    def __init__(self, num_experts: int, *, moe_layers: Sequence[int] | None = None, first_k_dense: int | None = None):
        as_routes(torch.zeros(0, 1, 1, dtype=torch.int64), num_experts)  # validates num_experts
        self.num_experts = int(num_experts)
        self.moe_layers = None if moe_layers is None else list(moe_layers)
        self.first_k_dense = first_k_dense
        self._dtype = torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32
        self._routes: dict[Hashable, torch.Tensor] = {}
        self._shape_LK: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._routes

    def clear(self) -> None:
        """Forget every sequence (call once a step)."""
        self._routes.clear()

    def put(self, key: Hashable, routes_TLgK: Any, num_tokens: int | None = None) -> None:
        """Store one sequence's routes (global layers ``[T, Lg, K]``); ``num_tokens`` applies :func:`align_routes`."""
        routes = select_moe_layers(
            routes_TLgK,
            self.num_experts,
            moe_layers=self.moe_layers,
            first_k_dense=self.first_k_dense,
            name=f"routes of {key!r}",
        )
        if self._shape_LK is not None and tuple(routes.shape[1:]) != self._shape_LK:
            raise ValueError(
                f"routes of {key!r} have (MoE layers, top_k) = {tuple(routes.shape[1:])}, "
                f"the store holds {self._shape_LK}"
            )
        self._shape_LK = tuple(routes.shape[1:])
        if num_tokens is not None:
            routes = align_routes(routes, num_tokens)
        self._routes[key] = routes.to(self._dtype)

    def put_tokens(self, token_ids: Any, routes_TLgK: Any) -> str:
        """Store under the content hash of ``token_ids`` (prompt + response), aligned to ``len - 1``; return the key."""
        key = token_key(token_ids)
        self.put(key, routes_TLgK, num_tokens=len(token_ids))
        return key

    def get(self, key: Hashable) -> torch.Tensor:
        """One sequence's stored routes ``[T, L, K]`` int64."""
        try:
            return self._routes[key].to(torch.int64)
        except KeyError:
            raise ValueError(f"no routes stored for sequence {key!r} ({len(self)} stored)") from None

    def flat(self, keys: Sequence[Hashable]) -> torch.Tensor:
        """The sequences' routes concatenated ``[sum T, L, K]`` (a packed micro-batch)."""
        if not keys:
            raise ValueError("no keys given")
        return torch.cat([self.get(k) for k in keys])

    def _fill(self, keys: Sequence[Hashable], mask: torch.Tensor) -> torch.Tensor:
        batch, seq_len = mask.shape
        if self._shape_LK is None:
            raise ValueError("the RouteStore is empty")
        out = torch.full((batch, seq_len) + self._shape_LK, PAD, dtype=torch.int64)
        for b, key in enumerate(keys):
            try:
                routes = self.get(key)
            except ValueError as exc:
                raise ValueError(f"batch row {b}: {exc}") from None
            pos = mask[b].nonzero().flatten()
            n = pos.numel()
            if routes.shape[0] not in (n, n - 1):
                raise ValueError(
                    f"sequence {key!r} has routes for {routes.shape[0]} tokens but batch row {b} holds {n} tokens "
                    f"(expected {n} or {n - 1})"
                )
            out[b, pos[: routes.shape[0]]] = routes
        return out

    def gather(
        self,
        keys: Sequence[Hashable],
        *,
        attention_mask: Any = None,
        seq_len: int | None = None,
        padding_side: str = "right",
    ) -> torch.Tensor:
        """Routes of a padded batch ``[B, S, L, K]`` int64 (-1 at padding and unrouted positions).

        With ``attention_mask`` ``[B, S]`` each row's routes go to its unmasked positions (any
        padding side). Without it, rows are padded to ``seq_len`` (default: longest) on
        ``padding_side`` ("right" or "left").
        """
        keys = list(keys)
        if attention_mask is not None:
            mask = _as_mask(attention_mask, "attention_mask")
            if mask.dim() != 2 or mask.shape[0] != len(keys):
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected [{len(keys)}, seq]")
            return self._fill(keys, mask)
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        lengths = [self.get(k).shape[0] for k in keys]
        width = max(lengths, default=0) if seq_len is None else seq_len
        if lengths and max(lengths) > width:
            raise ValueError(
                f"seq_len={width} is shorter than sequence {keys[int(np.argmax(lengths))]!r} ({max(lengths)} tokens)"
            )
        pos = torch.arange(width).view(1, -1)
        n = torch.tensor(lengths).view(-1, 1)
        mask = pos < n if padding_side == "right" else pos >= width - n
        return self._fill(keys, mask)

    def gather_tokens(self, input_ids_BS: Any, attention_mask_BS: Any) -> torch.Tensor:
        """Routes ``[B, S, L, K]`` of a padded batch found by the content of each row's real tokens."""
        ids = torch.as_tensor(input_ids_BS).cpu()
        mask = _as_mask(attention_mask_BS, "attention_mask")
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise ValueError(
                f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must both be [batch, seq]"
            )
        keys = [token_key(ids[b][mask[b]]) for b in range(ids.shape[0])]
        return self._fill(keys, mask)
