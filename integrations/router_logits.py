"""Router logits of swapped MoE blocks, handed to transformers' output recording (the aux loss).

Legend: T tokens of the forward call, D model dim, E experts.

transformers 5.x collects ``output_router_logits=True`` with output recorders: a model class
declares ``can_record_outputs = {"router_logits": OutputRecorder(Qwen3MoeTopKRouter, index=0)}``
and, when a forward asks for router logits, a forward hook on every module of that router class
appends element ``index`` of its output (the logits ``[T, E]``) to the active collector. The
causal-LM head then computes the load-balancing (aux) loss from that tuple.

After :func:`relibra.integrations.transformers.swap_moe_blocks` the gate is relibra's
:class:`relibra.runtime.router.Router` (it returns ``(ids, weights)``), so transformers' hooks
find nothing and the aux loss fails. :func:`record_router_logits` puts a forward hook on each
swapped gate's ``logits_tap`` (an identity on the router's own ``[T, E]`` logits) that, only
while transformers collects that key, appends those logits (in float32 for DeepSeek-V3, as its
router computes them). So the aux loss and its gradients are those of the unswapped model, also
while routes are replayed (replay changes the chosen experts, never the router's scores), with
no extra compute and nothing extra saved for backward (activation checkpointing recomputes the
same tensors).
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

__all__ = ["router_output_keys", "record_router_logits"]

#: families whose router computes its logits in float32 whatever the model dtype
_FLOAT32_LOGITS = {"deepseek_v3"}


def _collector() -> Callable[[], Any]:
    """transformers' getter of the active output collector (a dict key -> list, or None).

    Raises ValueError when this transformers has no output recording (``output_router_logits``
    would silently miss the swapped layers).
    """
    try:
        from transformers.utils import output_capturing
    except ImportError as exc:
        raise ValueError(f"transformers without output recording ({exc}): cannot hand the swapped layers' "
                         "router logits to output_router_logits; use transformers 5.x") from None
    active = getattr(output_capturing, "_active_collector", None)
    if active is None or not callable(getattr(active, "get", None)):
        import transformers

        raise ValueError(f"transformers {transformers.__version__} records outputs differently than 5.x "
                         "(no output_capturing._active_collector): the swapped layers' router logits would be "
                         "missing from output_router_logits and the aux loss")
    return active.get


def _specs(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def router_output_keys(model: nn.Module, block_name: str, gate: nn.Module) -> dict[str, int]:
    """``{key: index}`` of the outputs transformers records from ``gate`` (block ``block_name``).

    Read from ``can_record_outputs`` of the nearest enclosing transformers model (the one whose
    recorder hooks would reach the block), matching the gate's class (and ``layer_name`` when a
    recorder names one), e.g. ``{"router_logits": 0}``.
    """
    owner, owner_name = None, ""
    for name, module in model.named_modules():
        inside = not name or block_name == name or block_name.startswith(name + ".")
        if inside and isinstance(getattr(module, "can_record_outputs", None), dict) and len(name) >= len(owner_name):
            owner, owner_name = module, name
    if owner is None:
        return {}
    out: dict[str, int] = {}
    gate_path = f"{block_name}.gate"
    for key, value in owner.can_record_outputs.items():
        for spec in _specs(value):
            target = getattr(spec, "target_class", spec)
            layer = getattr(spec, "layer_name", None)
            if not isinstance(target, type) or not isinstance(gate, target):
                continue
            if layer is not None and f".{layer.strip('.')}." not in f".{gate_path}.":
                continue
            out[key] = int(getattr(spec, "index", 0))
    return out


def record_router_logits(model: nn.Module, swapped: list[tuple[str, nn.Module, nn.Module, str]]) -> None:
    """Make every swapped gate hand transformers what its original gate recorded.

    Args:
        model: the model the blocks were swapped in (its ``can_record_outputs`` say what to record).
        swapped: ``(block name, old block, new ReLibraMoE, family)`` per swapped block.
    Raises:
        ValueError naming the block when the original gate's recorded output is not its logits
        (index 0 of ``(logits, weights, ids)``): relibra cannot reproduce another element.
    """
    plans = []
    for name, old, new, family in swapped:
        keys = router_output_keys(model, name, old.gate)
        for key, index in keys.items():
            if index != 0:
                raise ValueError(f"{name}: transformers records output {index} of {type(old.gate).__name__} as "
                                 f"{key!r}; relibra's gate can hand it only the router logits (output 0)")
        if keys:
            plans.append((new.gate.logits_tap, sorted(keys), family in _FLOAT32_LOGITS))
    if not plans:
        return
    active = _collector()
    for tap, keys, float32 in plans:
        tap.register_forward_hook(_logits_hook(active, keys, float32))


def _logits_hook(active: Callable[[], Any], keys: list[str], float32: bool):
    def hook(module: nn.Module, args: tuple, logits_TE: Any) -> None:
        collected = active()
        if not collected:
            return
        for key in keys:
            if key in collected:
                collected[key].append(logits_TE.float() if float32 else logits_TE)

    return hook
