"""Search budgets: a bound stops reorder's searches where it says, deterministically, and the plan says so."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import relibra
from relibra.policies.budget import ROUND_COST, SearchBudget, round_cost

TOPO = relibra.Topology(num_nodes=4, gpus_per_node=2, num_experts=32, spare_slots_per_gpu=1)


def skewed(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.poisson(rng.dirichlet(np.full(32, 0.3), size=(4, 3)) * 4000)).to(torch.int64)


def test_charge_refuses_past_the_work_and_names_the_stage():
    budget = SearchBudget(work=10.0, stage="reorder node search")
    assert budget.charge(6.0) and budget.spent == 6.0
    assert not budget.charge(6.0)
    assert budget.cut == "work budget (10 units) spent in reorder node search"
    assert not budget.charge(0.0)  # once cut, no more rounds
    assert round_cost(2, 3, 4, 5) == ROUND_COST + 2 * 3 * (4 + 5)


@pytest.mark.parametrize("name", ["reorder", "hybrid"])
def test_tiny_work_budget_cuts_gracefully_and_deterministically(name):
    loads = skewed(0)
    plans = [relibra.get_policy(name, work_budget=3 * ROUND_COST).plan(loads, TOPO) for _ in range(2)]
    for plan in plans:
        plan.validate(TOPO, loads)
        assert plan.info["budget_cut"].startswith("work budget (4.5e+06 units) spent in reorder ")
        assert plan.info["reorder_work"] <= 3 * ROUND_COST
    assert torch.equal(plans[0].placement.home_experts, plans[1].placement.home_experts)  # every rank agrees
    assert torch.equal(plans[0].slot_tokens, plans[1].slot_tokens)
    free = relibra.get_policy(name, work_budget=math.inf).plan(loads, TOPO)
    assert free.info["budget_cut"] == ""
    cut_busiest = plans[0].gpu_loads().amax(-1).sum()
    assert int(free.gpu_loads().amax(-1).sum()) <= int(cut_busiest)  # more search never did worse here


def test_default_budget_does_not_cut_ordinary_loads():
    plan = relibra.get_policy("hybrid").plan(skewed(1), TOPO)
    assert plan.info["budget_cut"] == ""
    assert 0 < plan.info["reorder_work"] < relibra.policies.reorder.WORK_BUDGET


def test_time_budget_is_opt_in_and_says_so():
    plan = relibra.get_policy("reorder", time_budget_s=1e-9).plan(skewed(2), TOPO)
    plan.validate(TOPO, skewed(2))
    assert plan.info["budget_cut"].startswith("time budget (1e-09 s) spent in reorder ")


@pytest.mark.parametrize("option,value,message", [
    ("work_budget", 0, "work_budget must be a number > 0 (inf: no bound), got 0"),
    ("work_budget", -5.0, "work_budget must be a number > 0"),
    ("work_budget", True, "work_budget must be a number > 0"),
    ("work_budget", "1e9", "work_budget must be a number > 0"),
    ("time_budget_s", math.inf, "time_budget_s must be None or a finite number > 0 (seconds), got inf"),
    ("time_budget_s", 0.0, "time_budget_s must be None or a finite number > 0"),
])
@pytest.mark.parametrize("name", ["reorder", "hybrid"])
def test_budget_options_are_checked(name, option, value, message):
    with pytest.raises(ValueError, match=re.escape(f"{name} option {message}")):
        relibra.get_policy(name, **{option: value})
