"""Deferred optimizer state (``migrate_experts(defer_state=True)``) on gloo, world 4 = 2 nodes x 2 GPUs.

The weights and gradients move at once, the AdamW moments travel while the ranks keep
computing and communicating, and ``finish()`` commits them: afterwards every row, gradient and
moment is bitwise what the one-shot migration gives, and so is the next optimizer step. A state
transfer that arrives corrupted leaves every rank on the old placement with nothing changed.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_migration import (
    TOPO,
    WORLD,
    _assert_rows,
    _assert_unchanged,
    _gather_logical,
    _local_ids,
    _logical,
    _loss,
    _make,
    _pieces,
    _placements,
    _same_everywhere,
    _snapshot,
    _train_then_grad,
)

from relibra.runtime import migration_stages
from relibra.runtime.migration import MigrationError, migrate_experts
from relibra.runtime.state_move import hold_optimizer
from relibra.testing import run_world


def _state_rows_follow(params, opt, logical, placement, rank) -> None:
    """The AdamW moments of every local row are those of ``placement``'s experts."""
    ids = _local_ids(placement, rank)
    for l, per_param in enumerate(_pieces(params, opt)):
        for i, kinds in enumerate(per_param):
            for k in (2, 3):
                assert torch.equal(kinds[k], logical[l][i][k][ids[l]]), (rank, l, i, k)


def _worker_deferred(rank: int, mesh) -> None:
    old, new, _ = _placements()
    deferred, opt = _make(rank, old)
    oneshot, ref_opt = _make(rank, old)
    for params, o in ((deferred, opt), (oneshot, ref_opt)):
        _train_then_grad(params, o, old, rank)
    logical = _gather_logical(_pieces(deferred, opt), old)

    report = migrate_experts(deferred, opt, old, new, TOPO, defer_state=True)
    migrate_experts(oneshot, ref_opt, old, new, TOPO)
    move = report.state_move
    assert move is not None and move.bytes_in_flight > 0
    # weights and gradients are on the new placement, the moments still on the old one
    for l, per_param in enumerate(_pieces(deferred, opt)):
        for i, kinds in enumerate(per_param):
            ids = _local_ids(new, rank)[l]
            assert torch.equal(kinds[0], logical[l][i][0][ids]) and torch.equal(kinds[1], logical[l][i][1][ids])
    _state_rows_follow(deferred, opt, logical, old, rank)
    # the step goes on while the state travels: another backward and a collective on the same group
    for params in (deferred, oneshot):
        _loss(params, _logical(4), _local_ids(new, rank)).backward()
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    assert float(total) == sum(range(WORLD))

    assert move.finish() >= 0.0
    assert move.finish() == 0.0  # finishing twice does nothing
    _state_rows_follow(deferred, opt, logical, new, rank)
    opt.step()
    ref_opt.step()
    for a, b in zip(_pieces(deferred, opt), _pieces(oneshot, ref_opt)):
        for ka, kb in zip(a, b):
            for x, y in zip(ka, kb):
                assert torch.equal(x, y)


def _worker_deferred_corrupt(rank: int, mesh) -> None:
    old, new, _ = _placements()
    params, opt = _make(rank, old)
    _train_then_grad(params, opt, old, rank)
    snap = _snapshot(params, opt)
    report = migrate_experts(params, opt, old, new, TOPO, defer_state=True)

    calls = []

    def flip(r, received):  # the state's transfers only: set after the weights moved, and once
        calls.append(r)
        if r == 1 and len(calls) == 1:
            buf = received[2]
            buf[buf.numel() // 3] ^= 0x04

    with pytest.MonkeyPatch.context() as patch, pytest.raises(MigrationError) as info:
        patch.setattr(migration_stages, "_received_hook", flip)
        report.state_move.finish()
    text = str(info.value)
    assert "optimizer state's half of the migration failed" in text and "arrived corrupted on rank 1" in text
    assert "every rank is on the old placement again" in text
    _same_everywhere(text)
    _assert_unchanged(params, opt, snap)  # rows, gradients and moments all back on the old placement
    # and the group is still in step: the same migration, deferred, now succeeds
    logical = _gather_logical(_pieces(params, opt), old)
    migrate_experts(params, opt, old, new, TOPO, defer_state=True).state_move.finish()
    _assert_rows(params, opt, logical, new, rank)


def _worker_rollback_fails_too(rank: int, mesh) -> None:
    old, new, _ = _placements()
    params, opt = _make(rank, old)
    _train_then_grad(params, opt, old, rank)
    logical = _gather_logical(_pieces(params, opt), old)
    report = migrate_experts(params, opt, old, new, TOPO, defer_state=True)

    def flip(r, received):  # every transfer to rank 1 from rank 2 arrives corrupted, the way back too
        if r == 1 and 2 in received:
            received[2][0] ^= 0x01

    with pytest.MonkeyPatch.context() as patch, pytest.raises(MigrationError) as info:
        patch.setattr(migration_stages, "_received_hook", flip)
        report.state_move.finish()
    text = str(info.value)
    assert "moving the weights and gradients back failed too" in text
    _same_everywhere(text)
    # nothing is lost: the weights follow the new placement, the moments the old one, both whole
    ids = _local_ids(new, rank)
    for l, per_param in enumerate(_pieces(params, opt)):
        for i, kinds in enumerate(per_param):
            assert torch.equal(kinds[0], logical[l][i][0][ids[l]])
    _state_rows_follow(params, opt, logical, old, rank)


def _worker_nothing_to_defer(rank: int, mesh) -> None:
    old, new, _ = _placements()
    params, opt = _make(rank, old)  # no optimizer step yet: AdamW holds no state to defer
    assert migrate_experts(params, opt, old, new, TOPO, defer_state=True).state_move is None
    assert migrate_experts(params, opt, new, new, TOPO, defer_state=True).state_move is None


@pytest.mark.distributed
def test_deferred_state_commits_bitwise_like_the_one_shot_migration():
    run_world(_worker_deferred, world_size=WORLD, nodes=2, timeout=90)


@pytest.mark.distributed
def test_corrupted_state_transfer_moves_the_weights_back_on_every_rank():
    run_world(_worker_deferred_corrupt, world_size=WORLD, nodes=2, timeout=90)


@pytest.mark.distributed
def test_a_failed_way_back_says_where_everything_is():
    run_world(_worker_rollback_fails_too, world_size=WORLD, nodes=2, timeout=90)


@pytest.mark.distributed
def test_no_state_means_nothing_deferred():
    run_world(_worker_nothing_to_defer, world_size=WORLD, nodes=2, timeout=90)


class _Wrapper(torch.optim.Optimizer):
    """A wrapper like accelerate's AcceleratedOptimizer: no Optimizer.__init__, steps the one inside."""

    def __init__(self, optimizer):  # noqa: D107 - deliberately skips Optimizer.__init__
        self.optimizer = optimizer

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_the_hooks_sit_on_the_torch_optimizer_inside_a_wrapper():
    p = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.AdamW([p], lr=0.1)
    finished, pending = [], [True]
    assert hold_optimizer(_Wrapper(inner), lambda: pending[0], lambda: finished.append(1))
    p.grad = torch.ones(3)
    _Wrapper(inner).step()
    assert finished == [1]
    with pytest.raises(RuntimeError, match="balancer.complete_migration"):
        inner.state_dict()
    pending[0] = False
    assert "state" in inner.state_dict()
    assert not hold_optimizer(object(), lambda: True, lambda: None)  # not an optimizer: nothing deferred
