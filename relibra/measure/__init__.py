"""``relibra measure`` and ``relibra calibrate``: the real stack on real ranks, and its cost model.

- :mod:`.options`: :class:`MeasureOptions` (topology, layer sizes, routes, steps) and their checks;
- :mod:`.world`: one process per rank (gloo, pinned cores on CPU; torchrun with NCCL on GPUs);
- :mod:`.routes`: replayed routes, uniform or skewed onto moving hot experts;
- :mod:`.step`: timed training steps of a ReLibraMoE stack under every policy, interleaved;
- :mod:`.probes`: timing on every rank at once (medians) and the expert-GEMM probe;
- :mod:`.calibrate`: probes of GEMM, links, optimizer, migration and host cost -> a profile;
- :mod:`.report`: the plans the Balancer ran, priced by :mod:`relibra.sim.cost`, against the clock;
- :mod:`.run`: both commands end to end.

Nothing here is imported by ``import relibra``.
"""

from .options import DEFAULT_POLICIES, MeasureOptions
from .run import run_calibrate, run_measure

__all__ = ["DEFAULT_POLICIES", "MeasureOptions", "run_calibrate", "run_measure"]
