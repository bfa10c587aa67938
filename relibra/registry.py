"""The policy registry: built-ins (:mod:`relibra.policies`), user registrations and entry points.

A name maps to a factory (a class or function returning an object with ``plan(loads, topology)``).
The runtime and the config resolve policy names here; they never import a planner.

Plugins (``relibra.policies`` entry points) load on the first lookup, each on its own. One that
fails to load (its module raises on import, or it names no callable) is reported once, with a
warning that names the entry point and the error. It is left out of
:func:`available_policies`, and only ``get_policy`` of its own name raises (a ValueError with
the original error as its cause). Built-ins and the other plugins keep working, and every later
call sees the same set.
"""

from __future__ import annotations

import inspect
import warnings
from importlib.metadata import entry_points
from typing import Any, Callable

__all__ = ["register_policy", "get_policy", "available_policies"]

_REGISTRY: dict[str, Callable[..., Any]] = {}
_FAILED_PLUGINS: dict[str, tuple[str, BaseException | None]] = {}  # name -> (message, original error)
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
    """Load every plugin once; a failing one is recorded and warned about, never raised here."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for ep in entry_points(group=_ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY or ep.name in _FAILED_PLUGINS:
            continue
        try:
            factory = ep.load()
        # a plugin's import may raise anything; the failure is kept, warned about and raised
        # when that policy is asked for (KeyboardInterrupt and SystemExit still propagate)
        except Exception as exc:
            _record_failed_plugin(ep, f"failed to load: {type(exc).__name__}: {exc}", exc)
            continue
        if not callable(factory):
            _record_failed_plugin(ep, f"is not a class or callable ({type(factory).__name__})", None)
            continue
        _REGISTRY[ep.name] = factory
    _entry_points_loaded = True


def _record_failed_plugin(ep: Any, fault: str, cause: BaseException | None) -> None:
    message = f"relibra policy plugin {ep.name!r} (entry point {ep.value!r}) {fault}"
    _FAILED_PLUGINS[ep.name] = (f"policy {ep.name!r} is unavailable: {message}", cause)
    warnings.warn(f"{message}; the other policies still work", RuntimeWarning, stacklevel=4)


def available_policies() -> list[str]:
    """Names of every usable policy, plugins included (not those that failed to load)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_policy(name: str, **options: Any) -> Any:
    """Build a fresh policy object: ``get_policy("eplb", source="oracle")``.

    Raises ValueError for an unknown name (listing the known ones) or a plugin that failed to
    load (naming its entry point, the original error chained as the cause), and TypeError
    naming the option a policy does not take.
    """
    _load_entry_points()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        if name in _FAILED_PLUGINS:
            message, cause = _FAILED_PLUGINS[name]
            raise ValueError(message) from cause
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
