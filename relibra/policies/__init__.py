"""Balancing policies and their registry.

Built-ins: ``static``, ``eplb``, ``reorder``, ``replicate``, ``hybrid``. Third-party packages
register more through the entry point group ``relibra.policies``; see CONTRIBUTING.md.
"""

from .base import BalancingPolicy, check_loads
from .registry import available_policies, get_policy, register_policy
from . import static  # noqa: F401  (registers "static")

for _module in ("eplb", "reorder", "replicate", "hybrid"):
    try:
        __import__(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:  # built-ins still being written
        if _exc.name != f"{__name__}.{_module}":
            raise

__all__ = ["BalancingPolicy", "check_loads", "available_policies", "get_policy", "register_policy"]
