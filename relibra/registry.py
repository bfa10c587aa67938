"""The policy registry: built-ins (:mod:`relibra.policies`), user registrations and entry points.

A name maps to a factory (a class or function returning an object with ``plan(loads, topology)``).
The runtime and the config resolve policy names here; they never import a planner.
"""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from typing import Any, Callable

__all__ = ["register_policy", "get_policy", "available_policies"]

_REGISTRY: dict[str, Callable[..., Any]] = {}
_ENTRY_POINT_GROUP = "relibra.policies"
_entry_points_loaded = False


def register_policy(name: str) -> Callable:
    """Register a policy factory (a class or a function returning a policy) under ``name``.

    Use as a decorator, ``@register_policy("mine")``, or call it,
    ``register_policy("mine")(MyPolicy)``. Registering a taken name raises ValueError.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name must be a non-empty string, got {name!r}")

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(factory):
            raise TypeError(f"policy {name!r} must be a class or callable, got {type(factory).__name__}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"policy {name!r} is already registered ({existing!r})")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=_ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()


def available_policies() -> list[str]:
    """Names of every registered policy, entry points included."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_policy(name: str, **options: Any) -> Any:
    """Build a fresh policy object: ``get_policy("eplb", source="oracle")``.

    Raises ValueError for an unknown name (listing the known ones) and TypeError naming the
    option a policy does not take.
    """
    _load_entry_points()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        signature = None
    if signature is not None and not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        unknown = sorted(set(options) - set(signature.parameters))
        if unknown:
            raise TypeError(
                f"policy {name!r} does not take option(s) {unknown}; it takes {sorted(signature.parameters)}"
            )
    policy = factory(**options)
    if not callable(getattr(policy, "plan", None)):
        raise TypeError(f"policy {name!r} built {type(policy).__name__}, which has no plan(loads, topology) method")
    return policy
