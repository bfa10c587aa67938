"""relibra.integrations.verl: verl's micro-batch re-arrangement, packed by routes."""

from __future__ import annotations

import math

import pytest
import torch

from relibra.integrations.verl import rearrange_micro_batches, route_balanced_partitions
from relibra.packing import packing_objective, sum_by_micro_batch
from relibra.placement import Placement
from relibra.routing import count_loads
from relibra.testing import run_world
from relibra.topology import Topology

E, LG, K = 16, 3, 2  # layer 0 is dense (first_k_dense=1)


def grpo_batch(prompts: int = 6, group: int = 4, width: int = 24, seed: int = 0) -> dict:
    """A verl-shaped mini-batch in rollout order: each prompt's responses route alike (a few hot
    experts per prompt), left-padded rows, uint8 routes as verl ships them."""
    g = torch.Generator().manual_seed(seed)
    rows = prompts * group
    lengths = torch.randint(6, width + 1, (rows,), generator=g)
    mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]
    routes = torch.zeros(rows, width, LG, K, dtype=torch.uint8)
    hot_of_prompt = [torch.randperm(E, generator=g)[:3] for _ in range(prompts)]
    for b in range(rows):
        hot = hot_of_prompt[b // group]
        pick = torch.stack([hot[torch.randint(0, 3, (width,), generator=g)],
                            (hot[0] + 1 + torch.randint(0, E - 1, (width,), generator=g)) % E], -1)
        routes[b] = pick[:, None, :].expand(width, LG, K).to(torch.uint8)
    ids = torch.arange(rows * width).view(rows, width)
    return {"attention_mask": mask.long(), "routed_experts": routes, "input_ids": ids}


def test_same_count_and_shape_as_verl_and_spread_hot_experts():
    batch = grpo_batch()
    tokens = batch["attention_mask"].sum(1)
    max_token_len = 120
    micro, idx = rearrange_micro_batches(batch, max_token_len, num_experts=E, first_k_dense=1)
    M = min(tokens.numel(), math.ceil(int(tokens.sum()) / max_token_len))  # verl's count
    assert len(micro) == len(idx) == M
    assert sorted(i for p in idx for i in p) == list(range(tokens.numel()))
    for part, mb in zip(idx, micro):
        assert part == sorted(part) and part
        assert torch.equal(mb["input_ids"], batch["input_ids"][part])
        assert int(tokens[part].sum()) <= max_token_len
    # against the rollout order cut into M contiguous runs: the spread lowers the packing objective
    seqs = [batch["routed_experts"][b][batch["attention_mask"][b].bool()][:, 1:].long() for b in range(len(tokens))]
    loads = count_loads(seqs, E)
    topo = Topology(1, 4, E)
    place = Placement.contiguous(topo, LG - 1)
    packed = sum_by_micro_batch(loads, torch.tensor([m for m, p in enumerate(idx) for _ in p])[
        torch.argsort(torch.tensor([i for p in idx for i in p]))], M)
    rollout = sum_by_micro_batch(loads, torch.arange(len(tokens)) * M // len(tokens), M)
    assert packing_objective(packed, place, topo) < packing_objective(rollout, place, topo)
    again = rearrange_micro_batches(batch, max_token_len, num_experts=E, first_k_dense=1)[1]
    assert again == idx  # deterministic


def test_partitions_and_options():
    batch = grpo_batch(prompts=3)
    tokens = batch["attention_mask"].sum(1)
    _, idx = rearrange_micro_batches(batch, 10**6, num_experts=E, first_k_dense=1, min_num_micro_batch=3,
                                     num_batches_divided_by=2, use_dynamic_bsz_balance=False)
    assert len(idx) == 4  # at least 3, rounded up to a multiple of 2
    seqs = [batch["routed_experts"][b][batch["attention_mask"][b].bool()][:, 1:].long() for b in range(len(tokens))]
    parts = route_balanced_partitions(count_loads(seqs, E), tokens.tolist(), 4)
    assert sorted(i for p in parts for i in p) == list(range(len(tokens)))


def test_bad_batches_are_named():
    batch = grpo_batch(prompts=2)
    with pytest.raises(ValueError, match=r"has no 'routed_experts'; enable routing replay"):
        rearrange_micro_batches({"attention_mask": batch["attention_mask"]}, 100, num_experts=E)
    with pytest.raises(ValueError, match=r"sequence \d+ has \d+ tokens, more than max_token_len=5"):
        rearrange_micro_batches(batch, 5, num_experts=E, first_k_dense=1)
    with pytest.raises(ValueError, match=r"sequence 0's routes\[\d+, \d+, \d+\] = 15 is not an expert id in \[0, 15\)"):
        rearrange_micro_batches(batch, 100, num_experts=15, first_k_dense=1)
    with pytest.raises(ValueError, match=r"k_partitions must be an int in \[1, 2\]"):
        route_balanced_partitions(torch.zeros(2, 1, E), [3, 4], 3)


def _dp_worker(rank, mesh, bad_rank):
    group = mesh.get_group("gpu")
    batch = grpo_batch(prompts=2 + 2 * rank, seed=rank)  # ranks hold different amounts
    try:
        limit = 5 if rank == bad_rank else 100
        _, idx = rearrange_micro_batches(batch, limit, dp_group=group, num_experts=E, first_k_dense=1)
    except ValueError as exc:
        return ("error", str(exc))
    return ("ok", len(idx))


def test_data_parallel_ranks_agree_on_the_count_and_on_a_fault():
    counts = run_world(_dp_worker, world_size=2, nodes=1, args=(-1,), timeout=120)
    assert counts[0][0] == counts[1][0] == "ok" and counts[0][1] == counts[1][1]  # the larger rank's count
    faults = run_world(_dp_worker, world_size=2, nodes=1, args=(1,), timeout=120)
    assert all(kind == "error" and text.startswith("rank 1: ") and "more than max_token_len=5" in text
               for kind, text in faults)  # the bad rank's fault on both, nobody hangs
