"""relibra: routing-replay-guided expert load balancing for RL training of MoE models.

The core import is light: torch, numpy and omegaconf only (no transformers, no triton).
"""

from .plan import Placement, Plan, ReplicaPlan
from .policies import BalancingPolicy, available_policies, get_policy, register_policy
from .topology import Topology
from .layer import ReLibraMoE
from .balancer import Balancer
from .config import RelibraConfig, load_config
from .routing import (
    RouteStore,
    Trace,
    load_trace,
    loads_from_routes,
    micro_batch_loads,
    micro_batch_rank_loads,
    routes_for_micro_batch,
    save_trace,
)

__version__ = "0.1.0"

__all__ = [
    "Balancer",
    "ReLibraMoE",
    "BalancingPolicy",
    "Placement",
    "Plan",
    "ReplicaPlan",
    "Topology",
    "available_policies",
    "get_policy",
    "register_policy",
    "RelibraConfig",
    "RouteStore",
    "Trace",
    "load_config",
    "load_trace",
    "loads_from_routes",
    "micro_batch_loads",
    "micro_batch_rank_loads",
    "routes_for_micro_batch",
    "save_trace",
    "__version__",
]
