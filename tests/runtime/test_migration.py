"""Reorder migration: plan_moves (pure) and migrate_experts on gloo, world 4 = 2 nodes x 2 GPUs.

Every rank knows the full logical tensors (all_gathered before a migration, or a single-process
reference run), so each rank checks its own rows against the rows the new placement asks for.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from relibra import Placement, Topology
from relibra.runtime import migration_stages as migration
from relibra.runtime.checksums import hash_weights, piece_checksum
from relibra.runtime.migration import MigrationError, Move, migrate_experts, plan_moves
from relibra.testing import run_world

TOPO = Topology(num_nodes=2, gpus_per_node=2, num_experts=8)   # G=4, H=2
WORLD, H, E, L = 4, 2, 8, 2
SHAPES = [(6, 4), (4, 3)]          # gate_up_proj [E, 6, 4], down_proj [E, 4, 3]
# layer 1: GPU0 swaps its two experts (local), GPU1 gets 4 from GPU2 (cross node), GPU2 gets 2
# from GPU1 (cross node) and 6 from GPU3 (same node), GPU3 gets 5 from GPU2 (same node).
LAYER1_NEW = [1, 0, 4, 3, 2, 6, 5, 7]


def _placements(seed: int = 0) -> tuple[Placement, Placement, Placement]:
    g = torch.Generator().manual_seed(seed)
    old = torch.stack([torch.randperm(E, generator=g), torch.arange(E)])
    new = torch.stack([torch.randperm(E, generator=g), torch.tensor(LAYER1_NEW)])
    third = torch.stack([torch.randperm(E, generator=g) for _ in range(L)])
    return Placement(old), Placement(new), Placement(third)


# ------------------------------------------------------------------------------ pure tests
def test_plan_moves_kinds_and_determinism():
    old, new, _ = _placements()
    moves = plan_moves(old, new, TOPO, 1)
    assert moves == plan_moves(old, new, TOPO, 1)
    assert moves == [Move(0, 0, 0, 0, 1), Move(1, 0, 1, 0, 0), Move(2, 1, 0, 2, 0),
                     Move(4, 2, 0, 1, 0), Move(5, 2, 1, 3, 0), Move(6, 3, 0, 2, 1)]
    assert [m.is_transfer for m in moves] == [False, False, True, True, True, True]
    node = TOPO.node_of_gpu
    kinds = {("local" if not m.is_transfer else "intra" if node(m.src_rank) == node(m.dst_rank) else "inter")
             for m in moves}
    assert kinds == {"local", "intra", "inter"}
    assert plan_moves(old, old, TOPO, 0) == []


def test_plan_moves_rejects_bad_input():
    old, new, _ = _placements()
    with pytest.raises(ValueError, match="layer 2 out of range"):
        plan_moves(old, new, TOPO, 2)
    bad = Placement(torch.zeros(L, E, dtype=torch.int64))
    with pytest.raises(ValueError, match="placement"):
        plan_moves(old, bad, TOPO, 0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), pos=st.integers(0, 10**6), bit=st.integers(0, 7),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_checksum_catches_any_single_bit_flip(n, pos, bit, dtype):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    raw = x.view(torch.uint8).clone()
    w = hash_weights(raw.numel(), raw.device)
    before = piece_checksum(raw, dtype, w)
    raw[pos % raw.numel()] ^= 1 << bit
    after = piece_checksum(raw, dtype, w)
    assert before[0] != after[0]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), offset=st.integers(0, 3), pos=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_checksum_of_any_length_and_alignment(n, offset, pos, bit):
    """Words plus the last ``n % 4`` bytes; an unaligned slice hashes as its aligned copy."""
    buf = torch.randint(0, 256, (n + offset,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    raw = buf[offset:]
    w = hash_weights(n, raw.device)
    before = piece_checksum(raw, torch.uint8, w)
    assert torch.equal(before, piece_checksum(raw.clone(), torch.uint8, w))
    raw[pos % n] ^= 1 << bit
    assert piece_checksum(raw, torch.uint8, w)[0] != before[0]


# ------------------------------------------------------------------------------ the model
def _logical(seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(E, *s, generator=g) for s in SHAPES] for _ in range(L)]


def _loss(params, coef, ids_by_layer) -> torch.Tensor:
    """Separable per expert row, so a rank's gradient rows need no communication."""
    total = torch.zeros(())
    for l, ps in enumerate(params):
        for i, p in enumerate(ps):
            w = p.to_local() if hasattr(p, "to_local") else p
            c = coef[l][i][ids_by_layer[l]]
            total = total + (w * c).sum() + 0.5 * (w * w * c.abs()).sum()
    return total


def _local_ids(placement: Placement, rank: int, h: int = H) -> list[torch.Tensor]:
    return [placement.home_experts[l, rank * h:(rank + 1) * h] for l in range(L)]


def _make(rank: int, placement: Placement, ep_mesh=None):
    """This rank's rows of the logical weights; DTensor Shard(0) over ``ep_mesh`` if given."""
    full = _logical(1)
    ids = _local_ids(placement, rank)
    if ep_mesh is not None:
        from torch.distributed.tensor import DTensor, Shard
        mesh = ep_mesh
        params = [[torch.nn.Parameter(DTensor.from_local(full[l][i][ids[l]].clone(), mesh, [Shard(0)]))
                   for i in range(len(SHAPES))] for l in range(L)]
    else:
        params = [[torch.nn.Parameter(full[l][i][ids[l]].clone()) for i in range(len(SHAPES))] for l in range(L)]
    opt = torch.optim.AdamW([p for ps in params for p in ps], lr=0.1, weight_decay=0.01)
    return params, opt


def _train_then_grad(params, opt, placement, rank):
    """One AdamW step, then a fresh gradient (so rows, grads and state all differ by expert)."""
    _loss(params, _logical(2), _local_ids(placement, rank)).backward()
    opt.step()
    opt.zero_grad()
    _loss(params, _logical(3), _local_ids(placement, rank)).backward()


def _pieces(params, opt):
    """Local tensors per (layer, param): data, grad, exp_avg, exp_avg_sq."""
    def loc(t):
        return t.to_local() if hasattr(t, "to_local") else t
    return [[(loc(p).detach(), loc(p.grad), loc(opt.state[p]["exp_avg"]), loc(opt.state[p]["exp_avg_sq"]))
             for p in ps] for ps in params]


def _gather_logical(local_pieces, placement: Placement, group=None, size: int = WORLD):
    """Full logical tensors [E, ...] of every piece, from the rows of every rank of ``group`` (exact)."""
    out = []
    for l, per_param in enumerate(local_pieces):
        row = []
        for kinds in per_param:
            fulls = []
            for t in kinds:
                parts = [torch.empty_like(t) for _ in range(size)]
                dist.all_gather(parts, t.contiguous(), group=group)
                full = torch.empty(E, *t.shape[1:], dtype=t.dtype)
                full[placement.home_experts[l]] = torch.cat(parts)
                fulls.append(full)
            row.append(fulls)
        out.append(row)
    return out


def _assert_rows(params, opt, logical, placement, rank, h: int = H):
    ids = _local_ids(placement, rank, h)
    for l, per_param in enumerate(_pieces(params, opt)):
        for i, kinds in enumerate(per_param):
            for k, t in enumerate(kinds):
                assert torch.equal(t, logical[l][i][k][ids[l]]), (rank, l, i, k)


def _assert_clean_migration(params, opt, old, new, rank, group=None, topology=TOPO, **kwargs):
    """After a failed attempt the group is still in step: the same migration now succeeds and
    every row, grad and moment follows ``new``."""
    size, h = topology.num_gpus, topology.home_slots_per_gpu
    logical = _gather_logical(_pieces(params, opt), old, group, size)
    migrate_experts(params, opt, old, new, topology, group=group, **kwargs)
    _assert_rows(params, opt, logical, new, rank if group is None else dist.get_rank(group), h)


def _snapshot(params, opt):
    return [[[t.clone() for t in kinds] for kinds in per_param] for per_param in _pieces(params, opt)]


def _assert_unchanged(params, opt, snap):
    for now, before in zip(_pieces(params, opt), snap):
        for kn, kb in zip(now, before):
            for a, b in zip(kn, kb):
                assert torch.equal(a, b)


def _same_everywhere(msg: str) -> None:
    buf = torch.zeros(512, dtype=torch.uint8)
    raw = msg.encode()[:512]
    buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    parts = [torch.empty_like(buf) for _ in range(WORLD)]
    dist.all_gather(parts, buf)
    assert all(torch.equal(p, parts[0]) for p in parts), "ranks raised different messages"


# ------------------------------------------------------------------------------ workers
def _worker_exact(rank: int, mesh) -> None:
    old, new, third = _placements()
    for ep_mesh in (None, mesh._flatten("ep")):
        dtensor = ep_mesh is not None
        params, opt = _make(rank, old, ep_mesh)
        _train_then_grad(params, opt, old, rank)
        logical = _gather_logical(_pieces(params, opt), old)
        steps = [float(opt.state[p]["step"]) for ps in params for p in ps]
        group = None if ep_mesh is None else ep_mesh.get_group()   # a non-default group too
        report = migrate_experts(params, opt, old, new, TOPO, group=group)
        assert report.experts_moved == sum(m.is_transfer for l in range(L) for m in plan_moves(old, new, TOPO, l))
        assert report.experts_moved > 0 and report.local_reorders > 0
        assert report.bytes_sent > 0 and report.bytes_received > 0
        _assert_rows(params, opt, logical, new, rank)
        assert [float(opt.state[p]["step"]) for ps in params for p in ps] == steps
        # the optimizer still owns the very same parameters, and its next step is the
        # reference (single-process, logical order) step re-indexed by the new placement
        opt.step()
        ref = [[torch.nn.Parameter(t.clone()) for t in ts] for ts in _logical(1)]
        ref_opt = torch.optim.AdamW([p for ps in ref for p in ps], lr=0.1, weight_decay=0.01)
        all_ids = [torch.arange(E)] * L
        _loss(ref, _logical(2), all_ids).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        _loss(ref, _logical(3), all_ids).backward()
        ref_opt.step()
        ids = _local_ids(new, rank)
        for l in range(L):
            for i, p in enumerate(params[l]):
                got = p.to_local() if dtensor else p
                torch.testing.assert_close(got.detach(), ref[l][i].detach()[ids[l]], rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(
                    _pieces(params, opt)[l][i][3], ref_opt.state[ref[l][i]]["exp_avg_sq"][ids[l]], rtol=1e-6, atol=1e-9
                )
        # a second migration (to a third placement) and the identity one
        logical = _gather_logical(_pieces(params, opt), new)
        migrate_experts(params, opt, new, third, TOPO, group=group)
        _assert_rows(params, opt, logical, third, rank)
        empty = migrate_experts(params, opt, third, third, TOPO, group=group)
        assert empty.experts_moved == 0 and empty.bytes_sent == 0
        _assert_rows(params, opt, logical, third, rank)


def _worker_corrupt(rank: int, mesh) -> None:
    old, new, _ = _placements()
    params, opt = _make(rank, old)
    _train_then_grad(params, opt, old, rank)
    snap = _snapshot(params, opt)

    def flip(r, received):
        if r == 1:
            buf = received[2]  # rank 1 receives expert 4 of layer 1 from rank 2
            buf[buf.numel() // 2] ^= 0x10

    with pytest.MonkeyPatch.context() as patch, \
            pytest.raises(MigrationError, match="sent by rank 2 arrived corrupted on rank 1") as info:
        patch.setattr(migration, "_received_hook", flip)
        migrate_experts(params, opt, old, new, TOPO)
    assert "kept its old experts" in str(info.value)
    _same_everywhere(str(info.value))
    _assert_unchanged(params, opt, snap)
    # the group is still in step: the same migration without corruption succeeds
    _assert_clean_migration(params, opt, old, new, rank)


def _worker_bad_input(rank: int, mesh) -> None:
    old, new, _ = _placements()
    params, opt = _make(rank, old)
    _train_then_grad(params, opt, old, rank)
    snap = _snapshot(params, opt)
    cases = []
    # rank 2 hands a tensor with a wrong leading dim
    extra = torch.zeros(H + 1, *SHAPES[0])
    bad_rows = [list(ps) for ps in params]
    if rank == 2:
        bad_rows[0][0] = extra
    cases.append((bad_rows, opt, new, r"rank 2: layer 0 param 0 has local shape \(3, 6, 4\)"))
    # rank 3 holds down_proj in float64
    bad_dtype = [list(ps) for ps in params]
    if rank == 3:
        bad_dtype[1][1] = torch.zeros(H, *SHAPES[1], dtype=torch.float64)
    cases.append(
        (bad_dtype, None, new, r"ranks disagree before any transfer: .*rank 3 has 'layer 1 param 1: torch.float64")
    )
    # rank 0 has another new placement
    other = Placement(new.home_experts.flip(1).contiguous()) if rank == 0 else new
    cases.append((params, opt, other, r"ranks disagree before any transfer: rank 0 has 'new placement"))
    # wrong number of layers
    cases.append((params[:1], opt, new, r"rank 0: tensors_by_layer has 1 layers, the placements have 2"))
    for tensors, optim, target, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            migrate_experts(tensors, optim, old, target, TOPO)
        _same_everywhere(str(info.value))
        _assert_unchanged(params, opt, snap)
    _assert_clean_migration(params, opt, old, new, rank)


# ------------------------------------------------------------------------------ tests
@pytest.mark.distributed
def test_migration_moves_rows_grads_and_adamw_state_exactly():
    run_world(_worker_exact, world_size=WORLD, nodes=2, timeout=90)


@pytest.mark.distributed
def test_corrupted_transfer_fails_on_every_rank_and_changes_nothing():
    run_world(_worker_corrupt, world_size=WORLD, nodes=2, timeout=90)


@pytest.mark.distributed
def test_bad_input_fails_on_every_rank_before_any_transfer():
    run_world(_worker_bad_input, world_size=WORLD, nodes=2, timeout=90)


def _worker_pack_fails(rank: int, mesh) -> None:
    old, new, _ = _placements()
    params, opt = _make(rank, old)
    _train_then_grad(params, opt, old, rank)
    snap = _snapshot(params, opt)

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory while packing")

    with pytest.MonkeyPatch.context() as patch:
        if rank == 2:  # rank 2 sends in layer 1: its packing raises before it could post anything
            patch.setattr(migration, "checksums", boom)
        with pytest.raises(MigrationError, match="packing failed on rank 2: RuntimeError: out of memory") as info:
            migrate_experts(params, opt, old, new, TOPO)
    assert "before any transfer" in str(info.value)
    _same_everywhere(str(info.value))
    _assert_unchanged(params, opt, snap)
    _assert_clean_migration(params, opt, old, new, rank)


@pytest.mark.distributed
def test_a_rank_failing_to_pack_fails_every_rank_without_hang_or_change():
    run_world(_worker_pack_fails, world_size=WORLD, nodes=2, timeout=60)


# ------------------------------------------------------------------ expert-data-parallel replicas
TOPO_EP2 = Topology(num_nodes=1, gpus_per_node=2, num_experts=E)  # one EP group: 2 ranks, H = 4


def _worker_edp_verdict(rank: int, mesh) -> None:
    """World 4 as edp 2 x ep 2: ranks {0, 1} and {2, 3} are two expert-parallel groups holding
    other shards (here: other values) of the same experts; {0, 2} and {1, 3} are the replicas.
    A corrupted transfer inside group {0, 1} only must abort the migration on all four ranks."""
    ranks = {"ep0": [0, 1], "ep1": [2, 3], "edp0": [0, 2], "edp1": [1, 3]}
    groups = {k: dist.new_group(v) for k, v in ranks.items()}  # every rank creates every group
    ep, edp = groups["ep0" if rank < 2 else "ep1"], groups["edp0" if rank % 2 == 0 else "edp1"]
    g = torch.Generator().manual_seed(5)
    old, new = (Placement(torch.stack([torch.randperm(E, generator=g) for _ in range(L)])) for _ in range(2))
    full = _logical(10 + rank // 2)  # the two EP groups hold different shards
    ids = _local_ids(old, rank % 2, TOPO_EP2.home_slots_per_gpu)
    params = [[torch.nn.Parameter(full[l][i][ids[l]].clone()) for i in range(len(SHAPES))] for l in range(L)]
    opt = torch.optim.AdamW([p for ps in params for p in ps], lr=0.1)
    sum((p * p).sum() for ps in params for p in ps).backward()
    opt.step()  # rows, grads and AdamW moments all differ by expert
    snap = _snapshot(params, opt)

    def flip(r, received):
        if rank == 1:  # global rank 1 only: group {2, 3} sees clean transfers
            for buf in received.values():
                buf[0] ^= 0x01

    with pytest.MonkeyPatch.context() as patch, \
            pytest.raises(MigrationError, match="arrived corrupted on rank 1") as info:
        patch.setattr(migration, "_received_hook", flip)
        migrate_experts(params, opt, old, new, TOPO_EP2, group=ep, agree_group=edp)
    if rank in (2, 3):  # their own transfers were clean: they heard it from their replica
        assert "raised on expert-data-parallel replica" in str(info.value)
    _assert_unchanged(params, opt, snap)
    # without corruption every group commits: rows, grads and moments follow the new placement
    _assert_clean_migration(params, opt, old, new, rank, group=ep, topology=TOPO_EP2, agree_group=edp)


@pytest.mark.distributed
def test_migration_failure_in_one_expert_parallel_group_aborts_every_replica():
    run_world(_worker_edp_verdict, world_size=WORLD, nodes=2, timeout=90)
