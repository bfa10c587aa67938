"""relibra.testing.strategies: every draw is valid input, the corners are reachable, shrinking is small.

``find`` shows a strategy can reach a case (it raises if it cannot within its examples) and
returns the shrunk example, so it also shows how small counterexamples get. It runs without the
explain phase (which reruns the found case hundreds of times to explain it, 90 % of the time).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import find as find_any
from hypothesis import strategies as st

import relibra
from relibra.policies import check_loads
from relibra.routing import loads_from_routes
from relibra.routing.routes import as_routes
from relibra.testing import strategies

SETTINGS = dict(max_examples=40)


def find(strategy, condition):
    """The shrunk example of ``strategy`` that meets ``condition``."""
    return find_any(strategy, condition, settings=settings(database=None, phases=[Phase.generate, Phase.shrink]))


def test_import_relibra_and_relibra_testing_do_not_import_hypothesis():
    code = ("import sys, relibra, relibra.testing; from relibra.testing import check_policy; "
            "print('hypothesis' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ topologies
@settings(**SETTINGS)
@given(topology=strategies.topologies())
def test_default_topologies_are_the_policy_tests_space(topology):
    """1-3 nodes, 1-4 GPUs per node, 1-2 home and 0-2 spare slots per GPU, as the policy tests draw."""
    assert 1 <= topology.num_nodes <= 3 and 1 <= topology.gpus_per_node <= 4
    assert topology.num_experts % topology.num_gpus == 0 and 1 <= topology.home_slots_per_gpu <= 2
    assert 0 <= topology.spare_slots_per_gpu <= 2
    assert topology.num_experts % topology.num_expert_groups == 0


@settings(**SETTINGS)
@given(topology=strategies.topologies(nodes=(2, 4), gpus_per_node=2, home_slots=(1, 6), spare_slots=1,
                                      expert_groups="per_node", max_experts=24))
def test_topologies_keep_the_callers_bounds(topology):
    assert 2 <= topology.num_nodes <= 4 and topology.gpus_per_node == 2 and topology.spare_slots_per_gpu == 1
    assert topology.num_experts <= 24
    assert topology.num_expert_groups % topology.num_nodes == 0  # the hierarchical EPLB's topologies


@settings(**SETTINGS)
@given(topology=strategies.topologies(nodes=(1, 8), gpus_per_node=(1, 8), max_gpus=6))
def test_topologies_cap_the_gpus(topology):
    assert topology.num_gpus <= 6


def test_topologies_reach_the_largest_corner_and_shrink_to_the_smallest():
    largest = find(strategies.topologies(), lambda t: t.num_physical_slots == 3 * 4 * (2 + 2))
    assert (largest.num_nodes, largest.gpus_per_node, largest.num_experts) == (3, 4, 24)
    smallest = find(strategies.topologies(), lambda t: t.spare_slots_per_gpu > 0)
    assert (smallest.num_nodes, smallest.gpus_per_node, smallest.num_experts, smallest.spare_slots_per_gpu,
            smallest.num_expert_groups) == (1, 1, 1, 1, 1)
    two_nodes = find(strategies.topologies(), lambda t: t.num_nodes > 1)
    assert (two_nodes.num_nodes, two_nodes.gpus_per_node, two_nodes.num_experts) == (2, 1, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(nodes=(3, 1)), "nodes must satisfy"),
    (dict(spare_slots=-1), "spare_slots must satisfy"),
    (dict(gpus_per_node=2.0), "gpus_per_node must be an int"),
    (dict(expert_groups="all"), "expert_groups must be one of"),
    (dict(nodes=(2, 3), gpus_per_node=2, max_gpus=3), "no topology fits"),
    (dict(home_slots=4, max_experts=3), "no topology fits"),
])
def test_topologies_bad_bounds_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        strategies.topologies(**kwargs)


# ------------------------------------------------------------------ loads
@settings(**SETTINGS)
@given(case=strategies.topology_and_loads(max_load=500))
def test_loads_are_valid_step_loads(case):
    topology, loads = case
    assert loads.dtype == torch.int64
    M, L, E = loads.shape
    assert 1 <= M <= 3 and 1 <= L <= 3 and E == topology.num_experts
    assert int(loads.min()) >= 0 and int(loads.max()) <= 500
    assert torch.equal(check_loads(loads, topology), loads)


def test_loads_reach_zeros_empty_micro_batches_skew_and_hot_spots():
    draw = strategies.loads(6, micro_batches=(1, 3), max_load=1000)
    assert int(find(draw, lambda x: x.shape[0] > 1 and int(x.sum()) == 0).sum()) == 0
    empty = find(draw, lambda x: bool((x.sum((1, 2)) == 0).any()) and bool((x.sum((1, 2)) > 0).any()))
    assert (empty.sum((1, 2)) == 0).any()
    # heavy skew: one expert above 100x the median of its micro-batch and layer
    skewed = find(draw, lambda x: bool((x.amax(-1) > 100 * x.median(-1).values.clamp(min=1)).any()))
    assert int(skewed.max()) > 100
    # a hot spot per micro-batch: the hottest expert differs between micro-batches, each far above the rest
    def moving_hot_spot(x):
        if x.shape[0] < 2 or int(x.sum()) == 0:
            return False
        top = x[:, 0].topk(2, dim=-1).values  # [M, 2]
        return len(set(x[:, 0].argmax(-1).tolist())) > 1 and bool((top[:, 0] > 10 * top[:, 1].clamp(min=1)).all())
    assert find(strategies.loads(6, micro_batches=2, layers=1, kinds=("hot_spot",)), moving_hot_spot).shape[0] == 2


def test_loads_shrink_to_one_micro_batch_one_layer_small_counts():
    smallest = find(strategies.loads(4), lambda x: int(x.sum()) > 0)
    assert tuple(smallest.shape[:2]) == (1, 1) and int(smallest.max()) == 1
    two_layers = find(strategies.loads(4), lambda x: x.shape[1] > 1 and int(x.sum()) > 0)
    assert tuple(two_layers.shape[:2]) == (1, 2) and int(two_layers.max()) == 1


@settings(**SETTINGS)
@given(steps=strategies.step_loads(6, steps=(2, 4), layers=(1, 3), micro_batches=(1, 3)))
def test_step_loads_share_one_layer_count(steps):
    assert 2 <= len(steps) <= 4
    assert len({x.shape[1] for x in steps}) == 1 and all(x.shape[2] == 6 for x in steps)


@pytest.mark.parametrize("kwargs,match", [
    (dict(micro_batches=0), "micro_batches must satisfy"),
    (dict(layers=(2, 1)), "layers must satisfy"),
    (dict(max_load=0), "max_load must be an int >= 1"),
    (dict(kinds=("gaussian",)), "kinds must be a non-empty tuple"),
])
def test_loads_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        strategies.loads(4, **kwargs)
    with pytest.raises(ValueError, match="needs a Topology or a number of experts"):
        strategies.loads(0)


# ------------------------------------------------------------------ routes
@settings(**SETTINGS)
@given(data=st.data(), topology=strategies.topologies())
def test_routes_are_valid_r3_routes(data, topology):
    routes = data.draw(strategies.routes(topology, tokens=(0, 8), layers=(1, 3), top_k=(1, 4)))
    E = topology.num_experts
    T, L, K = routes.shape
    assert routes.dtype == torch.int64 and T <= 8 and 1 <= L <= 3 and 1 <= K <= min(4, E)
    assert torch.equal(as_routes(routes, E), routes)
    for row in routes.reshape(T * L, K).tolist():
        picked = [e for e in row if e >= 0]
        assert len(picked) == len(set(picked))  # a top-k router picks distinct experts
    loads = loads_from_routes(routes, E)
    assert tuple(loads.shape) == (L, E) and int(loads.sum()) == int((routes >= 0).sum())


def test_routes_reach_padding_and_shrink_small():
    draw = strategies.routes(4, tokens=(0, 6), layers=2, top_k=2)
    padded_token = find(draw, lambda r: r.shape[0] > 1 and bool((r == -1).all(-1).all(-1).any())
                        and bool((r >= 0).any()))
    assert tuple(padded_token.shape) == (2, 2, 2)
    assert find(draw, lambda r: bool((r == -1).any()) and bool((r >= 0).any())).shape[0] <= 2
    assert find(draw, lambda r: r.shape[0] > 0).tolist() == [[[0, 1], [0, 1]]]
    with pytest.raises(ValueError, match="more distinct experts"):
        strategies.routes(2, top_k=3)


def test_routes_of_a_micro_batch_count_like_the_loads_strategy():
    """Routes concatenated over a micro-batch count into the [M, L, E] the policies take."""
    seqs = find(st.lists(strategies.routes(4, tokens=(1, 5), layers=2, top_k=2, padding=False), min_size=2,
                         max_size=3), lambda s: len(s) == 3)
    loads = relibra.micro_batch_loads(seqs, num_experts=4, micro_batches=[2, 1])
    assert tuple(loads.shape) == (2, 2, 4) and int(loads.sum()) == sum(r.numel() for r in seqs)
