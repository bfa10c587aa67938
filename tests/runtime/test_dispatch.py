"""Single-process tests of the dispatch pieces: slot tables, dispatch/combine, grouped GEMM,
replica routes (pure host layouts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from relibra.runtime.dispatch import combine, dispatch, expert_mlp
from relibra.runtime.layout import slot_table, split_counts
from relibra.runtime.replicas import replica_route
from relibra.topology import Topology


def test_slot_table_follows_plan_split():
    t = Topology(2, 2, 8, spare_slots_per_gpu=1)  # H=2, S=1, P=12
    home = torch.arange(8)
    spare = torch.tensor([-1, 0, 3, -1])  # GPU1 replicates 0, GPU2 replicates 3
    tokens = torch.zeros(12, dtype=torch.int64)
    tokens[0], tokens[5] = 4, 6            # expert 0: home slot 0 gets 4, replica slot 5 gets 6
    tokens[4], tokens[8] = 1, 2            # expert 3 home is GPU1 slot 1 -> physical 4; replica slot 8
    table = slot_table(home, t, spare, tokens)
    assert table.has_replicas
    assert table.copy_slots_EX[0].tolist() == [0, 5]
    assert table.copy_ends_EX[0].tolist() == [4, 10]
    assert table.copy_slots_EX[3].tolist() == [4, 8]
    assert table.copy_slots_EX[1].tolist() == [1, -1]
    plain = slot_table(home, t)
    assert not plain.has_replicas and plain.copy_slots_EX.shape == (8, 1)


def test_dispatch_combine_single_process_equals_loop():
    torch.manual_seed(0)
    E, D, I, T, K = 6, 8, 4, 9, 2
    x = torch.randn(T, D, requires_grad=True)
    ids = torch.randint(0, E, (T, K))
    ids[2, 1] = -1
    w = torch.rand(T, K, requires_grad=True)
    gu = torch.randn(E, 2 * I, D, requires_grad=True)
    dn = torch.randn(E, D, I, requires_grad=True)
    t = Topology(1, 1, E)
    table = slot_table(torch.arange(E), t)
    xl, meta = dispatch(x, ids, table, torch.zeros(E, dtype=torch.int64), 1, E)
    assert sum(meta.slot_counts) == int((ids >= 0).sum())
    out = combine(expert_mlp(xl, gu, dn, meta.slot_counts), meta, w)
    ref = torch.zeros(T, D)
    for i in range(T):
        for k in range(K):
            e = int(ids[i, k])
            if e >= 0:
                h = gu[e] @ x[i]
                ref = ref.index_add(0, torch.tensor([i]), (w[i, k] * (dn[e] @ (F.silu(h[:I]) * h[I:])))[None])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(T, D)
    grads = torch.autograd.grad(out, (x, w, gu, dn), g)
    ref_grads = torch.autograd.grad(ref, (x, w, gu, dn), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D,I", [(8, 4), (8, 6), (12, 5)])
def test_expert_mlp_grouped_equals_loop_with_empty_groups(D, I):
    torch.manual_seed(1)
    counts = (3, 0, 5, 0)
    x = torch.randn(sum(counts), D)
    gu, dn = torch.randn(4, 2 * I, D), torch.randn(4, D, I)
    y = expert_mlp(x, gu, dn, counts)
    start, outs = 0, []
    for s, c in enumerate(counts):
        h = x[start:start + c] @ gu[s].T
        outs.append((F.silu(h[:, :I]) * h[:, I:]) @ dn[s].T)
        start += c
    torch.testing.assert_close(y, torch.cat(outs), atol=1e-5, rtol=1e-5)


def test_replica_route_layout_is_consistent_between_sender_and_receiver():
    t = Topology(2, 2, 8, spare_slots_per_gpu=2)  # H=2, S=2
    home = torch.tensor([1, 0, 3, 2, 4, 5, 6, 7])  # GPU0 homes 1,0; GPU1 homes 3,2
    spare = torch.tensor([2, -1, 0, 1, 6, -1, -1, 5])  # GPU0: 2 | GPU1: 0,1 | GPU2: 6 | GPU3: 5
    routes = {r: replica_route(home, spare, t, r, intra_node=True) for r in range(4)}
    # GPU0 sends experts 0 (its slot 1) and 1 (slot 0) to GPU1, in GPU1's spare-slot order
    assert routes[0].send_splits == [0, 2] and routes[0].send_rows == [1, 0]
    assert routes[1].recv_splits == [2, 0] and routes[1].recv_slots == [0, 1]
    assert routes[1].send_rows == [1] and routes[0].recv_slots == [0]  # expert 2 = GPU1 slot 1
    assert routes[2].group_ranks == [2, 3]
    for r in range(4):  # what r sends to q is what q receives from r
        for qi, q in enumerate(routes[r].group_ranks):
            assert routes[r].send_splits[qi] == routes[q].recv_splits[routes[q].group_ranks.index(r)]
    cross = torch.tensor([4, -1, -1, -1, -1, -1, -1, -1])  # expert 4 (GPU2, node 1) on GPU0
    with pytest.raises(ValueError, match="outside the group"):
        replica_route(home, cross, t, 0, intra_node=True)
    assert replica_route(home, cross, t, 0, intra_node=False).recv_splits == [0, 0, 1, 0]


def test_split_counts_match_assign_copies_per_source_rank():
    """The host-side counts that replace the counts exchange equal what the kernel assigns."""
    from relibra import kernels

    torch.manual_seed(4)
    t = Topology(2, 2, 8, spare_slots_per_gpu=1)
    G, E, SL = 4, 8, t.slots_per_gpu
    routes = [torch.randint(0, E, (n, 2)) for n in (5, 0, 7, 3)]
    loads_GE = torch.stack([torch.bincount(r.reshape(-1), minlength=E) for r in routes])
    home = torch.arange(E)
    spare = torch.tensor([3, 0, 6, 5])  # replicas inside their home node
    from relibra.plan import Placement, Plan

    plan = Plan.with_spares(Placement(home[None]), spare[None, None], loads_GE.sum(0)[None, None], t)
    plan.validate(t, loads_GE.sum(0)[None, None])
    table = slot_table(home, t, spare, plan.slot_tokens[0, 0])
    (counts,) = split_counts([table], loads_GE[None], SL)
    off = loads_GE.cumsum(0) - loads_GE
    for s, r in enumerate(routes):
        dest = kernels.assign_copies(r, table.copy_slots_EX, table.copy_ends_EX, off[s])
        assert torch.equal(torch.bincount(dest.reshape(-1), minlength=G * SL), counts[s])
    assert counts.sum() == sum(r.numel() for r in routes)


def _loop_mlp(x, gu, dn, counts):
    I = dn.shape[2]
    start, outs = 0, []
    for s, c in enumerate(counts):
        h = x[start:start + c] @ gu[s].T
        outs.append((F.silu(h[:, :I]) * h[:, I:]) @ dn[s].T)
        start += c
    return torch.cat(outs)


@pytest.mark.parametrize("D,I,dtype,grouped", [
    (8, 8, torch.float32, True),      # rows of 32 bytes: one grouped GEMM per linear
    (8, 8, torch.bfloat16, True),     # 16 bytes
    (8, 4, torch.bfloat16, True),     # gate_up grouped; down reads rows of I = 4 bf16 = 8 bytes: the loop
    (8, 6, torch.float32, True),      # gate_up (out 2I = 12 floats, 48 bytes) grouped; down (in 24 bytes) loops
    (6, 8, torch.float32, False),     # x rows of 24 bytes
    (8, 8, torch.float64, False),     # a dtype _grouped_mm does not take
])
def test_grouped_gemm_is_chosen_by_capability_and_matches_the_loop(monkeypatch, D, I, dtype, grouped):
    from relibra.runtime import dispatch as dispatch_module

    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    torch.manual_seed(2)
    counts = (3, 0, 5)
    x = torch.randn(sum(counts), D, dtype=dtype, requires_grad=True)
    gu = torch.randn(3, 2 * I, D, dtype=dtype, requires_grad=True)
    dn = torch.randn(3, D, I, dtype=dtype, requires_grad=True)
    y = expert_mlp(x, gu, dn, counts)
    want = _loop_mlp(x, gu, dn, counts)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, want, **tol)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, gu, dn), g), torch.autograd.grad(want, (x, gu, dn), g)):
        torch.testing.assert_close(a, b, **tol)
    h = torch.zeros(sum(counts), I, dtype=dtype)  # what the down projection reads
    expected = [dispatch_module.grouped_mm_capable(x, gu), dispatch_module.grouped_mm_capable(h, dn)]
    assert expected[0] == grouped
    assert len(calls) == sum(expected), (calls, expected)


def test_grouped_gemm_errors_propagate_instead_of_a_silent_loop(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch, "_grouped_mm", broken)
    x, gu, dn = torch.randn(4, 8), torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    with pytest.raises(RuntimeError, match="out of memory"):
        expert_mlp(x, gu, dn, (1, 3))


def test_grouped_gemm_capability_reads_metadata_only(monkeypatch):
    from relibra.runtime.dispatch import grouped_mm_capable

    w = torch.randn(2, 8, 8)
    assert grouped_mm_capable(torch.randn(4, 8), w)
    assert grouped_mm_capable(torch.randn(4, 16)[:, :8], w)  # strided rows, 64 bytes apart: fine
    assert not grouped_mm_capable(torch.randn(4, 9)[:, :8], w)  # rows 36 bytes apart
    assert not grouped_mm_capable(torch.randn(4, 8).double(), w.double())
    assert not grouped_mm_capable(torch.randn(4, 8), w.bfloat16())  # mixed dtypes
    assert not grouped_mm_capable(torch.randn(4, 8), torch.randn(2, 8, 9)[:, :, :8])  # w rows 36 bytes apart
    assert not grouped_mm_capable(torch.randn(4, 8), torch.randn(2, 6, 8))  # outputs of 6 floats: 24-byte rows
    assert grouped_mm_capable(torch.randn(4, 8).bfloat16(), w.bfloat16())
    assert not grouped_mm_capable(torch.randn(4, 4).bfloat16(), torch.randn(2, 8, 4).bfloat16())  # 8-byte rows
    monkeypatch.delattr(torch, "_grouped_mm")
    assert not grouped_mm_capable(torch.randn(4, 8), w)
