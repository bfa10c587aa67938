"""The built-in balancing policies.

:data:`BUILTINS` is the one list of them: importing this package registers each under its
name (``relibra.get_policy("hybrid")``). A built-in that fails to import makes ``import
relibra`` fail; nothing here is optional. Third-party packages register more through the entry
point group ``relibra.policies`` (see :mod:`relibra.registry` and CONTRIBUTING.md).
"""

from ..registry import register_policy
from .base import BalancingPolicy, check_loads
from .eplb import EplbPolicy
from .hybrid import HybridPolicy
from .reorder import ReorderPolicy
from .replicate import ReplicatePolicy
from .static import StaticPolicy

#: name -> factory of every built-in policy
BUILTINS = {
    "static": StaticPolicy,
    "eplb": EplbPolicy,
    "reorder": ReorderPolicy,
    "replicate": ReplicatePolicy,
    "hybrid": HybridPolicy,
}

for _name, _factory in BUILTINS.items():
    register_policy(_name)(_factory)
del _name, _factory

__all__ = ["BUILTINS", "BalancingPolicy", "check_loads", "EplbPolicy", "HybridPolicy", "ReorderPolicy",
           "ReplicatePolicy", "StaticPolicy"]
