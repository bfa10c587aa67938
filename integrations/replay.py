"""Rollout routing replay (R3) inside a transformers model: record at generation, replay in training.

Legend: B sequences, S positions, T = B*S tokens, L MoE layers, K top_k, D model dim.

Recording (:class:`RouteRecorder`) hooks every MoE block's gate (transformers routers return
``(logits, weights, ids)``, ReLibraMoE's router ``(ids, weights)``) and the block itself (for
``[B, S]``). Each forward call of a ``generate`` loop covers the next positions (prefill: the
prompt; each decode step: one token), so the calls are concatenated along positions into
``routes_BSLK`` for the ``S_full - 1`` positions the model was fed: the last sampled token is
never fed back, the ``len - 1`` rule of vLLM/SGLang. A call over as many or more positions than
recorded so far (generation without a KV cache) starts again from position 0.

Replay (:func:`replay_routes`) feeds ``routes_TLK`` (or ``[B, S, L, K]``) to each ReLibraMoE's
``forward(x, routes=...)`` through forward pre-hooks: the layer computes with the replayed ids
and the live router scores gathered at them. With a :class:`relibra.Balancer`, give the same
routes to ``balancer.plan_step`` and replay each micro-batch inside ``balancer.micro_batch(m)``
(see :func:`replay_micro_batch`).

The generic R3 pieces (engine formats, ``len - 1`` alignment, :class:`relibra.routing.RouteStore`
that finds routes again after padding and shuffling) live in :mod:`relibra.routing`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

__all__ = ["RouteRecorder", "moe_layers", "replay_routes", "store_generation"]


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every MoE block with a recordable gate, in module order.

    Swapped blocks (ReLibraMoE) and known transformers families both count.
    """
    from .transformers import find_moe_blocks

    out = []
    try:
        from relibra.runtime.layer import ReLibraMoE  # noqa: WPS433
    except ImportError:  # the layer may not be importable in a light install
        ReLibraMoE = ()  # type: ignore[assignment]
    hf = {id(m) for _, m, _ in find_moe_blocks(model)}
    for name, module in model.named_modules():
        if (ReLibraMoE and isinstance(module, ReLibraMoE)) or id(module) in hf:
            out.append((name, module))
    return out


def _ids_of(output: Any) -> torch.Tensor:
    """The ``[T, K]`` expert ids in a gate's output (HF: 3-tuple, ReLibraMoE router: 2-tuple)."""
    if isinstance(output, tuple) and len(output) == 3:
        return output[2]
    if isinstance(output, tuple) and len(output) == 2:
        return output[0]
    raise ValueError(f"cannot read expert ids from a gate output of type {type(output).__name__}")


class RouteRecorder:
    """Record the routes of every MoE layer during generation.

    Usage::

        with RouteRecorder(model) as rec:
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=8)
        routes_BSLK = rec.routes()            # [B, out.shape[1] - 1, L, K] int64
        per_seq = rec.sequences(out, full_mask)  # list of [n_b - 1, L, K], pads removed
    """

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("RouteRecorder: the model has no MoE block with a gate to hook")
        self._handles: list[Any] = []
        self._shape: list[tuple[int, int] | None] = [None] * len(self.layers)
        self._calls: list[list[torch.Tensor]] = [[] for _ in self.layers]  # per layer, [B, s, K] per call

    # -------------------------------------------------------------- hooks
    def _pre(self, idx: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            self._shape[idx] = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
        return hook

    def _post(self, idx: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            ids = _ids_of(output).detach().to("cpu", torch.int64)
            B, S = self._shape[idx] or (1, ids.shape[0])
            if ids.shape[0] != B * S:
                raise ValueError(f"RouteRecorder: layer {self.layers[idx][0]} routed {ids.shape[0]} tokens, "
                                 f"expected {B}x{S}")
            ids_BSK = ids.view(B, S, -1)
            calls = self._calls[idx]
            recorded = sum(c.shape[1] for c in calls)
            if calls and (S >= recorded + 1 or calls[0].shape[0] != B):
                calls.clear()  # a fresh full pass (no KV cache, or a new batch): start again
            calls.append(ids_BSK)
        return hook

    def start(self) -> "RouteRecorder":
        if self._handles:
            raise ValueError("RouteRecorder is already recording")
        self.clear()
        for i, (_, block) in enumerate(self.layers):
            self._handles.append(block.register_forward_pre_hook(self._pre(i)))
            self._handles.append(block.gate.register_forward_hook(self._post(i)))
        return self

    def stop(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self._calls = [[] for _ in self.layers]

    def __enter__(self) -> "RouteRecorder":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -------------------------------------------------------------- results
    @property
    def prefill_positions(self) -> int:
        """Positions of the first recorded forward call (the padded prompt width of a generate)."""
        if not self._calls[0]:
            raise ValueError("RouteRecorder recorded nothing")
        return int(self._calls[0][0].shape[1])

    def routes(self) -> torch.Tensor:
        """``routes_BSLK`` int64 of the positions fed to the model so far."""
        if not self._calls[0]:
            raise ValueError("RouteRecorder recorded nothing (was the model run inside the recorder?)")
        per_layer = [torch.cat(c, dim=1) for c in self._calls]
        shapes = {tuple(t.shape) for t in per_layer}
        if len(shapes) != 1:
            raise ValueError(f"RouteRecorder: layers recorded different shapes {sorted(shapes)}")
        return torch.stack(per_layer, dim=2)

    def sequences(self, sequences_BS: torch.Tensor,
                  attention_mask_BS: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-sequence routes ``[n_b - 1, L, K]`` of generated ``sequences_BS`` (prompt + response).

        ``attention_mask_BS`` marks the real tokens of the full sequences (prompt mask
        concatenated with the response's non-padding mask); padding rows are dropped and each
        sequence keeps the routes of its first ``n_b - 1`` real tokens.
        """
        routes = self.routes()
        B, S = sequences_BS.shape
        if routes.shape[0] != B or routes.shape[1] < S - 1:
            raise ValueError(
                f"recorded routes {tuple(routes.shape[:2])} do not cover sequences of shape {(B, S)} (need [B, S - 1])"
            )
        mask = torch.ones(B, S, dtype=torch.bool) if attention_mask_BS is None else attention_mask_BS.cpu().bool()
        if tuple(mask.shape) != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected {(B, S)}")
        out = []
        for b in range(B):
            pos = mask[b].nonzero().flatten()
            out.append(routes[b, pos[:-1]].clone())
        return out


def store_generation(
    store, recorder: RouteRecorder, sequences_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None = None
) -> list[str]:
    """Put every generated sequence's routes into a :class:`relibra.routing.RouteStore` by token content."""
    B, S = sequences_BS.shape
    mask = torch.ones(B, S, dtype=torch.bool) if attention_mask_BS is None else attention_mask_BS.cpu().bool()
    keys = []
    for b, routes in enumerate(recorder.sequences(sequences_BS, mask)):
        keys.append(store.put_tokens(sequences_BS[b].cpu()[mask[b]], routes))
    return keys


def _layer_routes(routes: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
    """Split ``[T, L, K]`` or ``[B, S, L, K]`` routes into ``L`` tensors ``[T, K]`` int64."""
    if not isinstance(routes, torch.Tensor) or routes.is_floating_point() or routes.dtype == torch.bool:
        raise ValueError(
            f"routes must be an integer tensor [T, L, K] or [B, S, L, K], got {getattr(routes, 'dtype', type(routes))}"
        )
    if routes.dim() == 4:
        routes = routes.reshape(-1, routes.shape[2], routes.shape[3])
    if routes.dim() != 3 or routes.shape[1] != num_layers:
        raise ValueError(
            f"routes must be [T, {num_layers}, K] (one row per MoE layer), got shape {tuple(routes.shape)}"
        )
    return [routes[:, l].to(torch.int64).contiguous() for l in range(num_layers)]


@contextlib.contextmanager
def replay_routes(model: nn.Module, routes: torch.Tensor) -> Iterator[None]:
    """Inside the block, every ReLibraMoE of ``model`` computes with the replayed ``routes``.

    ``routes`` is ``[T, L, K]`` (tokens in the flattened order of the model input) or
    ``[B, S, L, K]``; -1 marks a token copy without a route (padding). Forward pre-hooks pass
    ``routes=`` to each layer, so the HF decoder code needs no change.
    """
    from relibra.runtime.layer import ReLibraMoE

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ReLibraMoE)]
    if not layers:
        raise ValueError("replay_routes: the model has no ReLibraMoE (call swap_moe_blocks first)")
    per_layer = _layer_routes(routes, len(layers))
    handles = []

    def make(r_TK: torch.Tensor, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            x = args[0] if args else kwargs["x"]
            T = x.numel() // x.shape[-1]
            if r_TK.shape[0] != T:
                raise ValueError(f"replay_routes: layer {name} got {T} tokens but routes hold {r_TK.shape[0]}")
            kwargs = dict(kwargs)
            kwargs["routes"] = r_TK.to(x.device)
            return args, kwargs

        return hook

    try:
        for (name, layer), r in zip(layers, per_layer):
            handles.append(layer.register_forward_pre_hook(make(r, name), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def replay_micro_batch(balancer, m: int, model: nn.Module, routes: torch.Tensor | None = None):
    """Context for micro-batch ``m``: the Balancer's replica plan, plus ``routes`` replayed if given.

    When the Balancer installs the routes given to ``plan_step`` itself, pass ``routes=None``.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(balancer.micro_batch(m))
    if routes is not None:
        stack.enter_context(replay_routes(model, routes))
    return stack


__all__ += ["replay_micro_batch"]
