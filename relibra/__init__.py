"""relibra: routing-replay-guided expert load balancing for RL training of MoE models.

The rooms, imports only downward:

- the planning core: :mod:`.topology`, :mod:`.placement`, :mod:`.plan`, :mod:`.slots`,
  :mod:`.registry` (policy names), :mod:`.config`;
- :mod:`.routing`: recorded routes -> exact loads; engine formats; trace files;
- :mod:`.policies`: the built-in balancing policies (importing relibra registers them);
- :mod:`.sim`: cost model, trace generator and step simulator (``relibra bench``);
- :mod:`.runtime`: the MoE layer, dispatch, replicas, migration and the Balancer;
- :mod:`.kernels`: permute / unpermute / assign_copies (torch reference and Triton).

The core import is light: torch, numpy and omegaconf only (no transformers, no triton).
"""

from . import policies
from .config import RelibraConfig, load_config
from .placement import Placement
from .plan import Plan, ReplicaPlan
from .policies import BalancingPolicy
from .registry import available_policies, get_policy, register_policy
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
from .runtime import Balancer, ReLibraMoE
from .topology import Topology

__version__ = "0.1.0"

__all__ = [
    "Balancer",
    "BalancingPolicy",
    "Placement",
    "Plan",
    "ReLibraMoE",
    "RelibraConfig",
    "ReplicaPlan",
    "RouteStore",
    "Topology",
    "Trace",
    "__version__",
    "available_policies",
    "get_policy",
    "load_config",
    "load_trace",
    "loads_from_routes",
    "micro_batch_loads",
    "micro_batch_rank_loads",
    "policies",
    "register_policy",
    "routes_for_micro_batch",
    "save_trace",
]
