"""Host-side layouts of replayed micro-batches (relibra.runtime.layout) against what the dispatch
kernels do: split sizes per source and destination rank, row orders, grouped-GEMM offsets.

Legend: L layers, G ranks, E experts, SL local slots per rank, P physical slots, K top-k.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relibra import get_policy, kernels
from relibra.routing.loads import count_loads
from relibra.runtime.layout import replay_layouts, slot_order, slot_tables, split_counts
from relibra.topology import Topology

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_slot_order_regroups_received_blocks_by_slot(L, G, SL, seed):
    gen = torch.Generator().manual_seed(seed)
    recv_LGS = torch.randint(0, 4, (L, G, SL), generator=gen)
    to_slot, from_slot = slot_order(recv_LGS)
    for l in range(L):
        # the received buffer holds blocks (source g, slot s) in that order; tag each row with them
        tags = [(g, s, i) for g in range(G) for s in range(SL) for i in range(int(recv_LGS[l, g, s]))]
        by_slot = sorted(tags, key=lambda t: (t[1], t[0], t[2]))
        assert [tags[j] for j in to_slot[l].tolist()] == by_slot
        assert torch.equal(to_slot[l][from_slot[l]], torch.arange(len(tags)))


def _step(seed: int, policy: str, L: int = 3):
    """A 2 nodes x 2 GPUs topology (E = 8, one spare slot), every rank's routes [T, L, K] of one
    micro-batch, and the policy's plan for them."""
    t = Topology(2, 2, 8, spare_slots_per_gpu=1)
    gen = torch.Generator().manual_seed(seed)
    routes = []
    for _ in range(t.num_gpus):
        T = int(torch.randint(0, 9, (), generator=gen))
        hot = torch.randint(0, 8, (L,), generator=gen)
        ids = torch.randint(0, 8, (T, L, 2), generator=gen)
        ids[:, :, 0] = torch.where(torch.rand(T, L, generator=gen) < 0.6, hot, ids[:, :, 0])
        ids[:, :, 1] = torch.where(ids[:, :, 1] == ids[:, :, 0], -1, ids[:, :, 1])
        routes.append(ids)
    loads_GLE = torch.stack([count_loads([r], 8)[0] for r in routes])
    plan = get_policy(policy).plan(loads_GLE.sum(0)[None], t)
    return t, routes, loads_GLE, plan


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from(["replicate", "hybrid", "eplb", "static"]))
def test_replay_layouts_are_what_the_kernels_send_and_receive(seed, policy):
    t, routes, loads_GLE, plan = _step(seed, policy)
    G, SL, L = t.num_gpus, t.slots_per_gpu, plan.placement.home_experts.shape[0]
    tables = slot_tables(plan.placement.home_experts, plan.spare_experts[0], plan.slot_tokens[0], t)
    source_LGE = loads_GLE.permute(1, 0, 2)
    counts_LGP = split_counts(tables, source_LGE, SL)
    offsets_GLE = source_LGE.cumsum(1).permute(1, 0, 2) - loads_GLE
    # what each rank's kernels assign: token copies per (layer, source rank, physical slot)
    sent_LGP = torch.zeros(L, G, G * SL, dtype=torch.int64)
    for g in range(G):
        for l in range(L):
            dest = kernels.assign_copies(routes[g][:, l].contiguous(), tables[l].copy_slots_EX,
                                         tables[l].copy_ends_EX, offsets_GLE[g, l])
            sent_LGP[l, g] = torch.bincount(dest[dest >= 0], minlength=G * SL)
    assert torch.equal(counts_LGP, sent_LGP)
    for q in range(G):
        _, layouts = replay_layouts(tables, source_LGE, t, q, "cpu")
        for l, lay in enumerate(layouts):
            sent = sent_LGP[l, q].view(G, SL)
            recv = sent_LGP[l, :, q * SL:(q + 1) * SL]
            assert lay.send_splits == tuple(sent.sum(1).tolist())
            assert lay.recv_splits == tuple(recv.sum(1).tolist())
            assert lay.slot_counts == tuple(recv.sum(0).tolist())
            H = t.home_slots_per_gpu
            assert lay.home_offsets.tolist() == recv.sum(0)[:H].cumsum(0).tolist()
            assert lay.spare_offsets.tolist() == recv.sum(0)[H:].cumsum(0).tolist()
            assert lay.to_slot_order.numel() == sum(lay.recv_splits)


def test_slot_tables_batch_matches_one_layer_at_a_time():
    from relibra.runtime.layout import slot_table

    t, _, _, plan = _step(7, "replicate")
    tables = slot_tables(plan.placement.home_experts, plan.spare_experts[0], plan.slot_tokens[0], t)
    assert any(table.has_replicas for table in tables), "no replica in the plan: the batch is untested"
    for l, table in enumerate(tables):
        one = slot_table(plan.placement.home_experts[l], t, plan.spare_experts[0, l], plan.slot_tokens[0, l])
        assert torch.equal(table.copy_slots_EX, one.copy_slots_EX)
        assert torch.equal(table.copy_ends_EX, one.copy_ends_EX)
        assert table.has_replicas == one.has_replicas
