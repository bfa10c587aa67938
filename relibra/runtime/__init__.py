"""The runtime: makes a plan true on real ranks.

- :mod:`.router`: the MoE router (live top-k or replayed routes);
- :mod:`.layer`: :class:`ReLibraMoE`, experts as DTensors on a DeviceMesh;
- :mod:`.dispatch`: token copies -> physical slots -> all-to-all -> grouped GEMM -> back;
- :mod:`.layout`: every size of a replayed micro-batch's dispatch, computed on the host first;
- :mod:`.replicas`: replica transfers (weights to spare slots, gradients home);
- :mod:`.replica_cache`: a replica kept in its slot across micro-batches: fetched once, its
  gradient home once;
- :mod:`.migration`: moves home experts (weights, gradients, optimizer state) transactionally;
- :mod:`.checkpoint`: checkpoints of model, optimizer and Balancer in logical expert order, plain
  or DCP, that load into any placement and world (its checks in :mod:`.checkpoint_checks`);
- :mod:`.balancer`: :class:`Balancer`, the training-loop face (plan per step, migrate,
  replicas per micro-batch); the planning half in :mod:`.step_planning` (the step's passes in
  :mod:`.schedule`, the plan broadcast in :mod:`.plan_share`), its metrics in :mod:`.metrics`;
- :mod:`.fsdp`: FSDP2 composition (expert data parallel x expert parallel);
- :mod:`.comm`: small control-plane collectives (errors agreed across ranks).

The runtime is handed a policy (an object, or a name it resolves in :mod:`relibra.registry`); it
never imports a planner.
"""

from .balancer import Balancer
from .layer import ReLibraMoE

__all__ = ["Balancer", "ReLibraMoE"]
