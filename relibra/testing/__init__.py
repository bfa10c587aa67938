"""Test helpers shipped with relibra, for its own tests and for policy authors.

- :func:`run_world`: spawn a small gloo world, run a function on every rank, collect results.
- :func:`check_policy`: the invariants every balancing policy must hold, as hypothesis tests
  (:mod:`relibra.testing.conformance`); :func:`check_plan` checks one plan.
- :mod:`relibra.testing.strategies`: hypothesis strategies of topologies, loads and routes.

hypothesis is needed only by ``check_policy`` (imported when it runs) and by the strategies
module (not imported here): ``pip install "relibra[testing]"``.
"""

from .conformance import INVARIANTS, REPLICA_CONTRACTS, PolicyCheckError, check_plan, check_policy
from .world import WorldError, free_port, run_world

__all__ = ["INVARIANTS", "REPLICA_CONTRACTS", "PolicyCheckError", "WorldError", "check_plan", "check_policy",
           "free_port", "run_world"]
