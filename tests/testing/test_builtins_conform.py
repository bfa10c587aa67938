"""Every built-in policy passes check_policy under its contract: the kit is what relibra trusts for itself.

Contracts: ``static`` and ``reorder`` never replicate; ``replicate`` and ``hybrid`` replicate
anywhere (inside a node, and on other nodes where a cross-node replica pays); ``eplb`` replicates
inside a node where it plans hierarchically (its expert groups divide over the nodes) and
anywhere where it plans globally. Claims each built-in makes on top:
``static`` and ``replicate`` are never worse than ``static`` on the busiest GPU of any micro-batch
and layer; every policy whose placement is a function of the step's loads (all but the
history-fed ``eplb``) moves nothing when the same loads come again.
"""

from __future__ import annotations

import functools

import pytest

import relibra
from relibra.policies import EplbPolicy
from relibra.testing import check_policy, strategies


def eplb_contract(topology: relibra.Topology) -> str:
    """Where EPLB's replicas may sit: inside their node when it plans hierarchically."""
    return "intra_node" if topology.num_expert_groups % topology.num_nodes == 0 else "any"


#: name -> (contract, claims); one entry per built-in, so a new built-in without one fails below
CONTRACTS = {
    "static": ("none", dict(never_worse_than_static=True, same_loads_move_nothing=True)),
    "reorder": ("none", dict(same_loads_move_nothing=True)),
    "replicate": ("any", dict(never_worse_than_static=True, same_loads_move_nothing=True)),
    "hybrid": ("any", dict(same_loads_move_nothing=True)),
    "eplb": (eplb_contract, {}),
}
# reorder and hybrid plan in ~10-100 ms; the others in a few
MAX_EXAMPLES = {"reorder": 15, "hybrid": 15}


def test_every_builtin_has_a_declared_contract():
    assert set(CONTRACTS) == set(relibra.policies.BUILTINS)


@pytest.mark.parametrize("name", list(relibra.policies.BUILTINS))
def test_builtin_passes_check_policy(name):
    replicas, claims = CONTRACTS[name]
    check_policy(name, replicas=replicas, max_examples=MAX_EXAMPLES.get(name, 25), **claims)


@pytest.mark.parametrize("options,replicas,claims", [
    (dict(source="oracle"), eplb_contract, dict(same_loads_move_nothing=True)),
    (dict(mode="global", history="ema"), "any", {}),
])
def test_eplb_variants_pass_check_policy(options, replicas, claims):
    check_policy("eplb", options=options, replicas=replicas, max_examples=20, **claims)


def test_hierarchical_eplb_keeps_replicas_in_their_node_on_many_nodes():
    """Topologies whose groups divide over the nodes, so the hierarchical EPLB runs on 2-3 nodes too."""
    topologies = strategies.topologies(nodes=(2, 3), spare_slots=(1, 2), expert_groups="per_node")
    check_policy(functools.partial(EplbPolicy, mode="hierarchical", source="oracle"), replicas="intra_node",
                 topologies=topologies, max_examples=20)
