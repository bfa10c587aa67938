"""The optimizer-state half of a deferred migration: posted with the weights, finished before the step.

Legend: L MoE layers, H home slots per rank, G ranks of the expert-parallel group.

A reorder moves every moved expert's weights, gradients and optimizer state. Under
mixed-precision AdamW the state is most of the bytes (fp32 master copy and two moments: 12 to 14
of 16 bytes a parameter), and nothing needs it until ``optimizer.step()``. So
:func:`relibra.runtime.migration.migrate_experts` with ``defer_state=True`` moves the weights and
gradients at once and hands the state to a :class:`StateMove`:

- ``post``: the state rows were packed (with checksums) and agreed with the weights; their
  transfers are posted over a process group of their own (:func:`state_link`: on NCCL its own
  communicator and stream, so the forward and backward all-to-alls do not queue behind them)
  and left in flight. The optimizer's state tensors are untouched: their rows still follow the
  old placement.
- ``finish`` (collective, before the next ``optimizer.step()``): wait, verify every received
  checksum, agree the verdict (and over ``agree_group``), then write the state rows in the new
  placement's order in place. If any rank's transfer failed or arrived corrupted, no state row
  changed anywhere; the weights and gradients move back to the old placement
  (:func:`~relibra.runtime.migration.migrate_experts` the other way) and :class:`MigrationError`
  says so on every rank: the old placement is whole again, and the caller switches back to it.

Between ``post`` and ``finish`` the state's rows follow the old placement and the weights' the
new one: whoever reads the optimizer state (a checkpoint) must call ``finish`` first
(:class:`relibra.Balancer` does it from optimizer hooks and its own checkpoint paths).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..plan import Placement
from ..topology import Topology
from .migration_stages import Exchange, MigrationError, Move, agree_verdict, post, stage_and_commit, wait_and_verify
from .pieces import Piece

__all__ = ["StateMove", "state_link", "hold_optimizer"]

_LINKS: dict = {}  # expert-parallel group -> the process group its deferred state travels on


def state_link(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The process group (same ranks and backend as ``group``, made once per group) that
    deferred optimizer state travels on. Collective over ``group`` the first time."""
    key = group if group is not None else dist.distributed_c10d._get_default_group()
    link = _LINKS.get(key)
    if link is None:
        ranks = dist.get_process_group_ranks(key)
        link = dist.new_group(ranks, backend=dist.get_backend(key), use_local_synchronization=True)
        _LINKS[key] = link
    return link


class StateMove:
    """A migration's optimizer state in flight (module doc). Made by :meth:`post`."""

    def __init__(self, exchange: Exchange, works: list, error: str, pieces_by_layer: list[list[Piece]],
                 moves: tuple[tuple[Move, ...], ...], old: Placement, new: Placement, topology: Topology,
                 tensors_by_layer: Sequence[Sequence[torch.Tensor]], group, agree_group, n_transfers: int) -> None:
        self._exchange, self._works, self._error = exchange, works, error
        self._pieces, self._moves = pieces_by_layer, moves
        self.old, self.new, self.topology = old, new, topology
        self._tensors, self._group, self._agree_group = tensors_by_layer, group, agree_group
        self._n_transfers = n_transfers
        self.finished = False
        self.bytes_in_flight = exchange.bytes_sent + exchange.bytes_received
        self.weights_on = new  # the placement the weights and gradients follow (``old`` after a move back)

    @classmethod
    def post(cls, exchange: Exchange, pieces_by_layer: list[list[Piece]], moves, old: Placement, new: Placement,
             topology: Topology, tensors_by_layer, group, agree_group, n_transfers: int) -> "StateMove":
        """Post the packed state transfers of ``exchange`` (stage 4a) and return the move in flight."""
        works, error = post(exchange, dist.get_rank(group))
        return cls(exchange, works, error, pieces_by_layer, moves, old, new, topology, tensors_by_layer, group,
                   agree_group, n_transfers)

    def finish(self) -> float:
        """Wait, verify and commit the state rows (collective; module doc). Returns the seconds
        this rank waited for the transfers. Calling it again does nothing (returns 0).

        Raises:
            MigrationError: on every rank, when a state transfer failed or arrived corrupted: no
                state row changed, and the weights and gradients are back on ``old``.
        """
        if self.finished:
            return 0.0
        self.finished = True
        rank = dist.get_rank(self._group)
        t0 = time.perf_counter()
        error = self._error or wait_and_verify(self._exchange, self._works, rank)
        waited = time.perf_counter() - t0
        try:
            agree_verdict(error, self._n_transfers, self._group, self._agree_group,
                          what="the optimizer state's half of the migration failed, no state row changed")
        except MigrationError as failure:
            self._move_weights_back(str(failure))
        stage_and_commit(self._pieces, self._moves, self._exchange.received, self.old, self.new, self.topology, rank)
        self._exchange = None  # the staging buffers go
        return waited

    def _move_weights_back(self, failure: str) -> None:
        """The state stayed on ``old``: put the weights and gradients back there, then raise."""
        from .migration import migrate_experts

        try:
            migrate_experts(self._tensors, None, self.new, self.old, self.topology, self._group,
                            agree_group=self._agree_group)
            self.weights_on = self.old
        except MigrationError as again:
            raise MigrationError(
                f"{failure}; moving the weights and gradients back failed too ({again}): the weights and "
                f"gradients follow the new placement and the optimizer state the old one, both intact") from None
        raise MigrationError(f"{failure}; the weights and gradients moved back, every rank is on the old "
                             f"placement again")


def hold_optimizer(optimizer, pending: Callable[[], bool], finish: Callable[[], None]) -> bool:
    """Hook ``optimizer`` so that deferred state is never read half moved. Returns False (and
    hooks nothing) when it is not a ``torch.optim.Optimizer`` with step and state-dict hooks (then
    do not defer). A wrapper that holds the torch optimizer as ``.optimizer`` (accelerate's) has
    the one inside hooked, whose ``step`` the wrapper's calls.

    - ``optimizer.step()`` first calls ``finish()`` (collective; every rank steps);
    - ``optimizer.state_dict()`` and ``optimizer.load_state_dict()`` raise RuntimeError while
      ``pending()``: they may run on one rank only, so they must not start a collective; the
      error says to finish first (``Balancer.complete_migration()`` on every rank).
    """
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # a wrapper (accelerate's AcceleratedOptimizer) steps the torch one inside
    names = ("register_step_pre_hook", "register_state_dict_pre_hook", "register_load_state_dict_pre_hook")
    if not isinstance(optimizer, torch.optim.Optimizer) or not all(callable(getattr(optimizer, n, None))
                                                                  for n in names):
        return False

    def before_step(opt, args, kwargs):
        finish()

    def refuse(what: str):
        def hook(opt, *rest):
            if pending():
                raise RuntimeError(
                    f"optimizer.{what}() while the optimizer state of the last expert move is still in flight "
                    f"(its rows do not follow the experts yet): call balancer.complete_migration() on every rank "
                    f"first, or run optimizer.step()")
        return hook

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_state_dict_pre_hook(refuse("state_dict"), prepend=True)
    optimizer.register_load_state_dict_pre_hook(refuse("load_state_dict"), prepend=True)
    return True
