"""Test helpers shipped with relibra, for its own tests and for policy authors.

- :func:`run_world`: spawn a small gloo world, run a function on every rank, collect results.
"""

from .world import WorldError, free_port, run_world

__all__ = ["WorldError", "free_port", "run_world"]
