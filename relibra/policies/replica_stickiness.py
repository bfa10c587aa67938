"""Sticky replicas: keep a node's replicas from one micro-batch to the next when that costs no balance.

Legend (see :mod:`relibra.policies.replica_problems`): M micro-batches, L layers, N nodes, Gn GPUs
per node, H home slots and S spare slots per GPU, Sn = Gn * S spare slots per node, B problems.

:func:`~relibra.policies.replicate.replicate_on` picks every micro-batch's replicas afresh, and
small load differences flip them: after route-aware packing, two consecutive micro-batches share
the expert of only about a third of their spare slots (docs/packing.md). A replica that stays in
its slot costs nothing more (its gradient accumulates in place; ``relibra.sim.cost``'s
``replica_reuse``), a new one costs a weight copy in and a gradient return out.

:func:`stick_replicas` post-processes a plan, micro-batch after micro-batch (the first is left
as it is): every node of every layer keeps the replicas its spare slots held in the micro-batch
before (as this pass left them) when their exact optimal split (:func:`~relibra.policies.
replica_greedy.best_level`, then the exact split of :mod:`~relibra.policies.replica_split`) leaves
the node's busiest GPU at most ``the layer's busiest GPU in the fresh plan + tolerance x the
layer's mean GPU load``. A layer waits for its busiest GPU, so with ``tolerance`` 0 no layer of
any micro-batch gets slower than the fresh plan; nodes that are not the busiest have slack and
keep their replicas. A kept replica may end with no tokens; it stays in its slot (no copy now,
none later if it is needed again). Deterministic (integer arithmetic); the plan stays a plan of
the same loads and placement, so the layer's outputs and gradients are those of any plan.
Nodes of more than 10 GPUs (where the exact level is not enumerated) keep the fresh plan, and
so does a node tied to another by a cross-node replica (its problem does not stand alone).
"""

from __future__ import annotations

import numpy as np
import torch

from ..plan import Plan
from .base import check_loads
from .replica_greedy import best_level
from .replica_problems import node_problems, problem_first, problem_last
from .replica_split import forest_split, optimal_split

__all__ = ["stick_replicas", "sticky_plan"]

#: passes over a node's spare slots in which each slot may take its previous replica back (a
#: swap in a later slot can make room for an earlier one)
_PASSES = 2


def sticky_plan(plan: Plan, loads: torch.Tensor, setting: float | str | None) -> Plan:
    """``plan`` under a policy's ``replica_stickiness`` ``setting``: None keeps it as it is; a
    number is :func:`stick_replicas`' tolerance; ``"auto"`` is 0 with one spare slot per GPU (the
    exact split of a node's kept replicas is then two sweeps over a forest) and None with more
    (there it takes augmenting rounds, about a second a step at 8 x 8 GPUs with 4 spare slots,
    for under 0.1 % of the step in ``benchmarks/scale.py``)."""
    if setting == "auto":
        setting = 0.0 if plan.topology.spare_slots_per_gpu == 1 else None
    if setting is None:
        return plan
    return stick_replicas(plan, check_loads(loads, plan.topology), setting)


def stick_replicas(plan: Plan, loads_MLE: torch.Tensor, tolerance: float = 0.0) -> Plan:
    """``plan`` with each node's replicas kept from the micro-batch before where that costs no
    balance (module docstring). ``loads_MLE`` are the plan's checked int64 loads ``[M, L, E]``;
    ``tolerance`` >= 0 is in units of the layer's mean GPU load."""
    t = plan.topology
    M, L, E = loads_MLE.shape
    N, Gn, H, S = t.num_nodes, t.gpus_per_node, t.home_slots_per_gpu, t.spare_slots_per_gpu
    if M < 2 or S == 0 or Gn > 10 or Gn == 1:
        return plan
    Sn = Gn * S
    home = plan.placement.home_experts  # [L, G*H]
    local_slot = torch.empty(L, E, dtype=torch.int64)  # expert -> its home slot among its node's Gn*H
    local_slot.scatter_(1, home, (torch.arange(N * Gn * H) % (Gn * H)).expand(L, -1).contiguous())
    home_node = plan.placement.home_gpu(t) // Gn  # [L, E]
    spare, tokens = plan.spare_experts.clone(), plan.slot_tokens.clone()
    fresh_peak = plan.gpu_loads().amax(-1)  # [M, L]
    slack = (tolerance * loads_MLE.sum(-1).to(torch.float64) / t.num_gpus).floor().to(torch.int64)  # [M, L]
    kept = 0
    for m in range(1, M):
        w = problem_last(node_problems(loads_MLE[m:m + 1], home, N, Gn).reshape(L * N, Gn * H))  # [Gn*H, L*N]
        before = spare[m - 1].view(L * N, Sn)
        prev = problem_last(torch.where(before >= 0, local_slot.gather(1, spare[m - 1].clamp(min=0)).view(L * N, Sn),
                                        -1))  # [Sn, L*N] home slot (within the node) copied into each spare slot
        fresh_rep = torch.where(spare[m] >= 0, local_slot.gather(1, spare[m].clamp(min=0)), -1).view(L * N, Sn)
        limit = (fresh_peak[m] + slack[m]).repeat_interleave(N).numpy()  # [L*N]
        alone = _node_local(spare[m - 1], spare[m], home_node, N, Sn)
        rep, level = _bring_back(w, prev, problem_last(fresh_rep), limit, alone, Gn, H, S)
        changed = np.flatnonzero((rep != problem_last(fresh_rep)).any(0))
        if not changed.size:
            continue
        h, x = _exact_split(w[:, changed], rep[:, changed], level[changed], Gn, S)
        slots = torch.from_numpy(np.concatenate([h.reshape(Gn, H, -1), x.reshape(Gn, S, -1)], 1)
                                 .transpose(2, 0, 1).reshape(changed.size, -1))  # [changed, Gn*(H+S)]
        rows = torch.from_numpy(changed)
        tokens[m].view(L * N, -1)[rows] = slots
        node_first = (rows % N) * Gn * H  # placement index of the node's first home slot
        logical = home[rows // N].gather(1, node_first[:, None] + problem_first(rep[:, changed]).clamp(min=0))
        spare[m].view(L * N, Sn)[rows] = torch.where(problem_first(rep[:, changed]) >= 0, logical, -1)
        kept += int(((rep == prev) & (prev >= 0)).any(0)[changed].sum())
    out = Plan(t, plan.placement, spare, tokens, plan.intra_node_replicas, plan.policy, dict(plan.info))
    out.info["sticky_node_problems"] = kept
    return out


def _bring_back(w: np.ndarray, prev: np.ndarray, fresh: np.ndarray, limit: np.ndarray, alone: np.ndarray,
                Gn: int, H: int, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Spare slots ``[Sn, B]`` that hold as many of ``prev``'s replicas as ``limit [B]`` allows, and
    their exact optimal level ``[B]``.

    First every problem keeps all of ``prev`` if its level is within the limit; then, slot by slot,
    a slot takes back its previous replica (swapped in from a slot that holds it now and is not
    holding its own previous one, or in place of the fresh one) when the result is valid (no copy
    on its expert's home GPU, none twice on a GPU) and its level stays within the limit. Problems
    not ``alone`` keep ``fresh``.
    """
    Sn, B = fresh.shape
    rep, level = fresh.copy(), np.zeros(B, np.int64)  # the level of a problem not alone is never read
    own = np.flatnonzero(alone)  # elsewhere a slot may hold another node's expert: no level of this node's
    if not own.size:
        return rep, level
    level[own] = best_level(w[:, own], fresh[:, own], Gn, S)
    whole = np.zeros(B, bool)
    whole[own] = best_level(w[:, own], prev[:, own], Gn, S) <= limit[own]
    rep[:, whole] = prev[:, whole]
    level[whole] = best_level(w[:, whole], prev[:, whole], Gn, S) if whole.any() else level[whole]
    cols = np.arange(B)
    for k in list(range(Sn)) * _PASSES:
        target = prev[k]
        todo = alone & ~whole & (target >= 0) & (rep[k] != target)
        if not todo.any():
            continue
        # the slot holding it now (Sn: none), among slots not yet holding their own previous replica
        at = np.where((rep == target[None]) & (rep != prev), np.arange(Sn)[:, None], Sn).min(0)
        cand = rep.copy()
        moved = at < Sn
        cand[k] = target
        cand[np.minimum(at, Sn - 1)[moved], cols[moved]] = rep[k, moved]
        valid = todo & _valid_slots(cand, Gn, H, S)
        if not valid.any():
            continue
        new_level = best_level(w[:, valid], cand[:, valid], Gn, S)
        ok = np.flatnonzero(valid)[new_level <= limit[valid]]
        rep[:, ok] = cand[:, ok]
        level[ok] = new_level[new_level <= limit[valid]]
    return rep, level


def _valid_slots(rep: np.ndarray, Gn: int, H: int, S: int) -> np.ndarray:
    """``[B]`` bool: no replica on its expert's home GPU and no expert twice on one GPU."""
    Sn, B = rep.shape
    gpu = (np.arange(Sn) // S)[:, None]
    ok = ~((rep >= 0) & (rep // H == gpu)).any(0)
    if S > 1:
        per_gpu = np.sort(rep.reshape(Gn, S, B), axis=1)
        ok &= ~((per_gpu[:, 1:] == per_gpu[:, :-1]) & (per_gpu[:, 1:] >= 0)).any((0, 1))
    return ok


def _node_local(before_LV: torch.Tensor, fresh_LV: torch.Tensor, home_node_LE: torch.Tensor, N: int,
                Sn: int) -> np.ndarray:
    """``[L*N]`` bool: the node's problem stands alone in both micro-batches (no replica in the
    node of an expert homed elsewhere, none elsewhere of an expert homed in the node), so its
    replicas and split can be swapped without touching another node's."""
    L, V = before_LV.shape
    slot_node = (torch.arange(V) // Sn).expand(L, V)
    alone = torch.ones(L, N, dtype=torch.bool)
    for spare in (before_LV, fresh_LV):
        held = spare >= 0
        owner = torch.where(held, home_node_LE.gather(1, spare.clamp(min=0)), slot_node)
        crossing = held & (owner != slot_node)
        for node in (slot_node, owner):  # the node holding a foreign replica, the node whose expert left
            bad = torch.zeros(L, N, dtype=torch.int64).scatter_add_(1, node, crossing.to(torch.int64))
            alone &= bad == 0
    return alone.reshape(-1).numpy()


def _exact_split(w: np.ndarray, rep: np.ndarray, level: np.ndarray, Gn: int, S: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact min-max split of home loads ``w [Gn*H, B]`` with replicas ``rep [Sn, B]`` at their
    optimal ``level [B]``: ``(hshare [Gn*H, B], x [Sn, B])``."""
    GH, B = w.shape
    ok = np.zeros(B, bool)
    if S == 1:
        h, x, ok = forest_split(w, rep, level)
    else:
        h, x = w.copy(), np.zeros(rep.shape, np.int64)
    todo = np.flatnonzero(~ok)
    if todo.size:  # two replica cycles, or several spare slots per GPU: augmenting rounds from no split
        h_t = problem_first(w[:, todo]).view(todo.size, Gn, GH // Gn).clone()
        x_t = torch.zeros(todo.size, rep.shape[0], dtype=torch.int64)
        optimal_split(h_t, problem_first(rep[:, todo]), x_t, S, level_B=torch.from_numpy(level[todo]))
        h[:, todo], x[:, todo] = problem_last(h_t.view(todo.size, GH)), problem_last(x_t)
    return h, x
