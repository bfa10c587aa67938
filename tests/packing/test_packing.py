"""Property tests of the packers: route-aware ``pack``, the token baseline, pack + reorder.

Random steps: 1-3 nodes x 1-4 GPUs x 1-2 home slots, 1-3 layers, 0-40 sequences of 1-60
tokens in 1-6 micro-batches, budgets from tight to loose, loads uniform, grouped (prompt
groups sharing hot experts, as in GRPO), sparse or large (beyond float32's exact range).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import relibra
from relibra.packing import (
    Packing,
    pack,
    pack_tokens,
    pack_with_reorder,
    packing_objective,
    sum_by_micro_batch,
)
from relibra.plan import Placement

SETTINGS = dict(max_examples=40)


@st.composite
def steps(draw, min_sequences=0, max_sequences=40):
    nodes, gpus, homes = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 2))
    topo = relibra.Topology(num_nodes=nodes, gpus_per_node=gpus, num_experts=nodes * gpus * homes)
    E, L = topo.num_experts, draw(st.integers(1, 3))
    Z, M = draw(st.integers(min_sequences, max_sequences)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    tokens = rng.integers(1, 61, size=Z)
    longest = int(tokens.max()) if Z else 1
    budget = max(longest, -(-int(tokens.sum()) // M) + draw(st.integers(0, 40)))
    kind = draw(st.sampled_from(["uniform", "grouped", "sparse", "large"]))
    if kind == "grouped":  # groups of 4 share a skewed expert mix per layer
        mix = rng.dirichlet(np.full(E, 0.3), size=(Z // 4 + 1, L))
        loads = np.array([rng.multinomial(2 * t, mix[q // 4, l]) for q, t in enumerate(tokens) for l in range(L)],
                         dtype=np.int64).reshape(Z * L, E)
    elif kind == "sparse":
        loads = (rng.random((Z * L, E)) < 0.3) * rng.integers(1, 40, size=(Z * L, E))
    elif kind == "large":  # column sums beyond 2**24: the float64 path
        loads = rng.integers(0, 1_000_000, size=(Z * L, E))
    else:
        loads = rng.integers(0, 30, size=(Z * L, E))
    loads = torch.from_numpy(loads.reshape(Z, L, E).astype(np.int32 if kind != "large" else np.int64))
    homes_LE = [rng.permutation(np.repeat(np.arange(topo.num_gpus), homes)) for _ in range(L)]
    home_gpu = torch.from_numpy(np.stack(homes_LE))
    placement = Placement.from_home_gpu(home_gpu, topo)
    return topo, placement, loads, torch.from_numpy(tokens), M, budget


def rollout_order(tokens: torch.Tensor, M: int, budget: int) -> torch.Tensor | None:
    """Sequences in order, a new micro-batch when the budget would be exceeded (None if > M)."""
    out, m, held = [], 0, 0
    for t in tokens.tolist():
        if held + t > budget:
            m, held = m + 1, 0
        out.append(m)
        held += t
    return torch.tensor(out, dtype=torch.int64) if m < M else None


def reference_greedy(loads: torch.Tensor, tokens: torch.Tensor, M: int, budget: int) -> torch.Tensor | None:
    """The spread greedy in exact int64 arithmetic, one sequence at a time."""
    x = loads.reshape(loads.shape[0], loads.shape[1] * loads.shape[2]).to(torch.int64)
    sums = torch.zeros(M, x.shape[1], dtype=torch.int64)
    used = [0] * M
    out = torch.full((x.shape[0],), -1, dtype=torch.int64)
    for i in torch.argsort(-tokens, stable=True).tolist():
        room = [m for m in range(M) if used[m] + int(tokens[i]) <= budget]
        if not room:
            return None
        score = (sums @ x[i]).tolist()
        m = min(room, key=lambda m: (score[m], used[m], m))
        out[i] = m
        sums[m] += x[i]
        used[m] += int(tokens[i])
    return out


def pack_or_nothing(*args, **kwargs) -> Packing | None:
    """``pack``, or None where it finds no packing; then token packing must fail too."""
    try:
        return pack(*args, **kwargs)
    except ValueError as exc:
        assert "no packing of the" in str(exc)
        with pytest.raises(ValueError, match="cannot place sequence"):
            pack_tokens(args[1], args[2], args[3])
        return None


def objective_lower_bound(loads: torch.Tensor, placement: Placement, topo) -> float:
    """``F`` of the whole step as one micro-batch: no packing goes below it (sum of max >= max of sum)."""
    return packing_objective(loads.to(torch.int64).sum(0, keepdim=True), placement, topo)


# ------------------------------------------------------------------ pack
@settings(**SETTINGS)
@given(case=steps())
def test_pack_places_every_sequence_once_within_budget_and_conserves_loads(case):
    topo, placement, loads, tokens, M, budget = case
    result = pack_or_nothing(loads, tokens, M, budget, placement, topo)
    assume(result is not None)
    assert isinstance(result, Packing) and result.micro_batch_of.shape == tokens.shape
    assert result.micro_batch_of.dtype == torch.int64
    assert ((result.micro_batch_of >= 0) & (result.micro_batch_of < M)).all()
    held = torch.zeros(M, dtype=torch.int64).index_add_(0, result.micro_batch_of, tokens)
    assert torch.equal(result.tokens, held) and int(held.max()) <= budget
    expected = np.zeros((M, *loads.shape[1:]), dtype=np.int64)
    np.add.at(expected, result.micro_batch_of.numpy(), loads.numpy().astype(np.int64))
    assert torch.equal(result.loads, torch.from_numpy(expected))
    assert result.objective == packing_objective(result.loads, placement, topo)
    assert result.objective >= objective_lower_bound(loads, placement, topo) - 1e-6


@settings(**SETTINGS)
@given(case=steps())
def test_pack_is_the_exact_greedy_and_deterministic(case):
    topo, placement, loads, tokens, M, budget = case
    reference = reference_greedy(loads, tokens, M, budget)
    if reference is None:  # out of room: token packing, else an error naming the failure
        try:
            baseline = pack_tokens(tokens, M, budget)
        except ValueError:
            with pytest.raises(ValueError, match="no packing of the"):
                pack(loads, tokens, M, budget, placement, topo)
            return
    result = pack(loads, tokens, M, budget, placement, topo)
    if reference is not None:
        assert result.method == "routes" and torch.equal(result.micro_batch_of, reference)
    else:
        assert result.method == "tokens" and torch.equal(result.micro_batch_of, baseline)
    again = pack(loads.clone(), tokens.clone(), M, budget, placement, topo)
    assert torch.equal(again.micro_batch_of, result.micro_batch_of) and again.objective == result.objective


def test_pack_is_exact_on_a_grpo_step(monkeypatch):
    """At the DeepSeek-V3 shape near-ties are common (similar prompts at 512): the float32 block
    products are rescored in float64 there, and the packing is the exact greedy's."""
    from relibra.packing import routes
    from relibra.sim.traces import TraceConfig, generate_sequences

    cfg = TraceConfig(steps=1, micro_batches=4, tokens_per_micro_batch=16384, group_size=8,
                      concentration=512.0, response_len_median=256.0, prompt_len_median=64.0, seed=1)
    step = next(generate_sequences(cfg))
    topo = relibra.Topology(num_nodes=2, gpus_per_node=4, num_experts=256)
    rescored = []
    exact_scores = routes._exact_scores
    monkeypatch.setattr(routes, "_exact_scores", lambda *a: rescored.append(1) or exact_scores(*a))
    loads, tokens = torch.from_numpy(step.sequence_loads), torch.from_numpy(step.sequence_tokens)
    result = pack(loads, tokens, 4, 16384, Placement.contiguous(topo, 58), topo)
    assert torch.equal(result.micro_batch_of, reference_greedy(loads, tokens, 4, 16384))
    assert rescored


@settings(**SETTINGS)
@given(case=steps(min_sequences=1))
def test_pack_is_never_worse_than_its_start(case):
    topo, placement, loads, tokens, M, budget = case
    start = rollout_order(tokens, M, budget)
    assume(start is not None)
    start_objective = packing_objective(sum_by_micro_batch(loads, start, M), placement, topo)
    result = pack(loads, tokens, M, budget, placement, topo, start=start)
    assert result.info["start_objective"] == start_objective
    assert result.objective <= start_objective
    if result.method == "start":
        assert torch.equal(result.micro_batch_of, start)


@settings(**SETTINGS)
@given(case=steps(min_sequences=1), scored=st.integers(0, 10))
def test_scored_sequences_bounds_the_route_placed_sequences(case, scored):
    topo, placement, loads, tokens, M, budget = case
    result = pack_or_nothing(loads, tokens, M, budget, placement, topo, scored_sequences=scored)
    assume(result is not None)
    if result.info["fallback"] is None:
        assert result.info["scored"] == min(scored, tokens.numel())
    if scored == 0:  # nothing by routes: the token baseline's packing
        try:
            baseline = pack_tokens(tokens, M, budget)
        except ValueError:
            return
        assert torch.equal(result.micro_batch_of, baseline)


def test_time_limit_places_the_rest_by_tokens():
    tokens = torch.tensor([4, 3, 3, 2, 2, 5, 1])
    loads = torch.randint(0, 9, (7, 2, 8), generator=torch.Generator().manual_seed(0))
    result = pack(loads, tokens, 3, 9, PLACEMENT, TOPO, time_limit_s=1e-9)  # spent before the first block
    assert result.info["scored"] == 0
    assert torch.equal(result.micro_batch_of, pack_tokens(tokens, 3, 9))


def test_route_aware_packing_spreads_prompt_groups():
    from relibra.sim.traces import TraceConfig, generate_sequences

    cfg = TraceConfig(steps=1, micro_batches=4, tokens_per_micro_batch=8192, group_size=8, concentration=16.0,
                      response_len_median=256.0, prompt_len_median=64.0, max_len=2048, seed=0)
    step = next(generate_sequences(cfg))
    topo = relibra.Topology(num_nodes=2, gpus_per_node=4, num_experts=256)
    placement = Placement.contiguous(topo, 58)
    rollout = torch.from_numpy(step.micro_batch_of)
    result = pack(step.sequence_loads, step.sequence_tokens, 4, 8192, placement, topo, start=rollout)
    assert result.method == "routes" and result.objective < result.info["start_objective"]
    # the rollout order keeps a prompt's responses together; the packing deals them out
    prompts = torch.from_numpy(step.sequence_prompt)

    def most_in_one(assign):
        return max(int(torch.bincount(assign[prompts == p], minlength=4).max()) for p in prompts.unique())

    assert most_in_one(result.micro_batch_of) < most_in_one(rollout)


# ------------------------------------------------------------------ token baseline
@settings(**SETTINGS)
@given(case=steps(min_sequences=1))
def test_pack_tokens_within_graham_bound(case):
    _, _, _, tokens, M, budget = case
    try:
        assign = pack_tokens(tokens, M, budget)
    except ValueError as exc:
        assert "cannot place sequence" in str(exc)
        return
    held = torch.zeros(M, dtype=torch.int64).index_add_(0, assign, tokens)
    assert int(held.max()) <= budget and int(held.sum()) == int(tokens.sum())
    assert int(held.max()) <= int(tokens.sum()) / M + (1 - 1 / M) * int(tokens.max()) + 1e-9
    assert torch.equal(pack_tokens(tokens.clone(), M, budget), assign)


def test_pack_tokens_is_lpt():
    # longest first into the emptiest: 5 -> 0, 4 -> 1, 3 -> 1 (7), 3 -> 0 (8), 1 -> 1 (8)
    assert pack_tokens([5, 1, 4, 3, 3], 2, 10).tolist() == [0, 1, 1, 1, 0]


# ------------------------------------------------------------------ pack + reorder
@settings(max_examples=15)
@given(case=steps(min_sequences=1), first=st.booleans(), rounds=st.integers(1, 2))
def test_pack_with_reorder(case, first, rounds):
    topo, placement, loads, tokens, M, budget = case
    try:
        joint = pack_with_reorder(loads, tokens, M, budget, topo, None if first else placement, rounds=rounds)
    except ValueError as exc:  # no packing found: the same error as pack's
        assert "no packing of the" in str(exc)
        return
    joint.placement.validate(topo)
    assert joint.packing.objective == packing_objective(joint.loads, joint.placement, topo)
    assert torch.equal(joint.loads, sum_by_micro_batch(loads, joint.packing.micro_batch_of, M))
    if rounds == 1:  # the re-pack starts from the first packing: never worse under the new placement
        before = sum_by_micro_batch(loads, joint.first_packing.micro_batch_of, M)
        assert joint.packing.objective <= packing_objective(before, joint.placement, topo)
    again = pack_with_reorder(loads, tokens, M, budget, topo, None if first else placement, rounds=rounds)
    assert torch.equal(again.placement.home_experts, joint.placement.home_experts)
    assert torch.equal(again.packing.micro_batch_of, joint.packing.micro_batch_of)


# ------------------------------------------------------------------ errors
TOPO = relibra.Topology(num_nodes=2, gpus_per_node=2, num_experts=8)
PLACEMENT = Placement.contiguous(TOPO, 2)
LOADS = torch.ones(5, 2, 8, dtype=torch.int32)
TOKENS = torch.tensor([4, 3, 3, 2, 2])


@pytest.mark.parametrize("change, match", [
    (dict(sequence_tokens=[4, 3, 30, 2, 2]), "sequence 2 has 30 tokens, more than tokens_per_micro_batch=8"),
    (dict(num_micro_batches=1), "hold 14 tokens, more than num_micro_batches=1 x tokens_per_micro_batch=8"),
    (dict(sequence_tokens=[4, 3, -3, 2, 2]), "sequence_tokens: sequence 2 has -3 tokens"),
    (dict(sequence_tokens=[4, 3, 3, 2]), "sequence_loads has 5 sequences .rows., sequence_tokens has 4"),
    (dict(sequence_tokens=[[4, 3, 3, 2, 2]]), "sequence_tokens must have 1 dimension .Z., got shape .1, 5."),
    (dict(sequence_tokens=[4, 3, 2.5, 2, 2]), "sequence_tokens must hold integers"),
    (dict(sequence_loads=torch.ones(5, 2, 6, dtype=torch.int32)), "6 experts in its last dimension, the topology has"),
    (dict(sequence_loads=torch.ones(5, 3, 8, dtype=torch.int32)), "sequence_loads has 3 layers, the placement has 2"),
    (dict(sequence_loads=torch.ones(5, 16, dtype=torch.int32)), "sequence_loads must have 3 dimensions"),
    (dict(sequence_loads=-LOADS), "sequence_loads contains a negative load -1 at index"),
    (dict(sequence_loads=LOADS * 0.5), "sequence_loads must hold integer token counts"),
    (dict(num_micro_batches=0), "num_micro_batches must be a positive int, got 0"),
    (dict(tokens_per_micro_batch=2.5), "tokens_per_micro_batch must be a positive int, got 2.5"),
    (dict(start=[0, 1, 2, 1, 0]), "start: sequence 2 is in micro-batch 2, outside \\[0, 2\\)"),
    (dict(start=[0, 1, -1, 1, 0]), "start: sequence 2 is in micro-batch -1, outside \\[0, 2\\)"),
    (dict(start=[0, 1, 0.5, 1, 0]), "start must hold integers"),
    (dict(start=[0, 0, 0, 1, 1]), "start: micro-batch 0 holds 10 tokens, more than tokens_per_micro_batch=8"),
    (dict(start=[0, 1]), "start has 2 entries, there are 5 sequences"),
    (dict(gpu_weight=-1.0), "gpu_weight must be a finite number >= 0"),
    (dict(scored_sequences=-1), "scored_sequences must be None or an int >= 0"),
    (dict(time_limit_s=0), "time_limit_s must be None or a number > 0"),
])
def test_errors_name_the_thing(change, match):
    args = dict(sequence_loads=LOADS, sequence_tokens=TOKENS, num_micro_batches=2, tokens_per_micro_batch=8,
                placement=PLACEMENT, topology=TOPO)
    options = {k: change.pop(k) for k in ("start", "gpu_weight", "scored_sequences", "time_limit_s") if k in change}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        pack(**args, **options)


def test_no_packing_found_is_an_error_and_a_start_rescues_it():
    # 3+3 | 2+2+2 fits exactly; longest-first placement (by routes or by tokens) runs out of room
    tokens = torch.tensor([3, 3, 2, 2, 2])
    loads = torch.ones(5, 2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="no packing of the 5 sequences .12 tokens. into 2 micro-batches of 6 tokens "
                                         "found: .*cannot place sequence 4"):
        pack(loads, tokens, 2, 6, PLACEMENT, TOPO)
    with pytest.raises(ValueError, match="cannot place sequence 4 .2 tokens.: the emptiest of the 2 micro-batches "
                                         "already holds 5"):
        pack_tokens(tokens, 2, 6)
    result = pack(loads, tokens, 2, 6, PLACEMENT, TOPO, start=[0, 0, 1, 1, 1])
    assert result.method == "start" and result.info["fallback"] == "start"
    assert result.micro_batch_of.tolist() == [0, 0, 1, 1, 1]


def test_joint_rounds_checked():
    with pytest.raises(ValueError, match="rounds must be an int >= 1, got 0"):
        pack_with_reorder(LOADS, TOKENS, 2, 8, TOPO, rounds=0)


def test_groups_feed_the_route_counting():
    """Routes -> per-sequence loads -> pack -> groups -> the routing wing's micro-batch loads."""
    from relibra.routing import loads_from_routes, micro_batch_loads

    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 12, 7, 4, 8, 6]
    routes = [torch.randint(0, 8, (t, 2, 2), generator=g) for t in lengths]  # [T_i, L, K]
    sequence_loads = torch.stack([loads_from_routes(r, 8) for r in routes])  # [Z, L, E]
    result = pack(sequence_loads, torch.tensor(lengths), 3, 20, PLACEMENT, TOPO)
    groups = result.groups()
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    assert torch.equal(micro_batch_loads(routes, 8, micro_batches=groups), result.loads)
