"""Measured against modelled: price the plans the Balancer ran, build the JSON and the table.

Legend: M micro-batches, L MoE layers, E experts, G ranks, V spare slots, P physical slots.

The modelled time of a step is :func:`relibra.sim.cost.step_cost` of the plan the Balancer ran
in that step (its placement, spare slots and token split; the previous step's placement for the
move; every rank's real token counts as sources), with a cost configuration of the measured
layer (:func:`measured_config`: dim, hidden, experts, top-k, layers; the router as the only
non-expert parameters) and the machine parameters of the profile, plus the policy's planning
time as the Balancer measured it on rank 0 (the cost model prices plans, not planners). Step
times are the median over timed steps (and the minimum for the measured one).
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from ..plan import Placement, Plan
from ..sim.cost import CostConfig, slot_seconds, step_cost
from ..sim.profile import Profile, profile_config
from .options import MeasureOptions

__all__ = ["measured_config", "policy_report", "add_ratios", "gemm_drift", "format_table"]

_PARTS = ("expert_compute_s", "a2a_s", "replica_s", "reorder_s", "optimizer_s", "overhead_s", "non_moe_s")


def measured_config(o: MeasureOptions, profile: Profile) -> CostConfig:
    """The cost model of the measured layer stack on ``profile``'s machine (the optimizer state
    moved with the weights, ``state_move_overlap`` 0, when ``o.defer_state`` is False)."""
    shape = CostConfig(hidden=o.dim, expert_intermediate=o.hidden, num_experts=o.experts, top_k=o.top_k,
                       num_moe_layers=o.layers, num_expert_groups=1, non_moe_params=float(o.experts * o.dim),
                       attn_width=0, attn_context=0.0, extra_params=0.0)
    cfg = profile_config(profile, shape)
    return cfg if o.defer_state is not False else dataclasses.replace(cfg, state_move_overlap=0.0)


def _modelled(record: dict, o: MeasureOptions, cfg: CostConfig) -> dict[str, float]:
    topology = cfg.topology(o.nodes, o.gpus_per_node, o.spare_slots)
    t = {k: torch.tensor(record[k], dtype=torch.int64)
         for k in ("home_experts", "previous", "spare_experts", "slot_tokens", "source_loads")}
    plan = Plan(topology, Placement(t["home_experts"]), t["spare_experts"], t["slot_tokens"])
    cost = step_cost(plan, plan.expert_loads(), cfg, previous=Placement(t["previous"]),
                     source_loads_MLGE=t["source_loads"])
    parts = {k: getattr(cost, k) for k in _PARTS}
    parts["planning_s"] = record["planning_s"]
    parts["total_s"] = cost.total_s + record["planning_s"]
    return parts


def policy_report(records: list[dict], o: MeasureOptions, cfg: CostConfig) -> dict:
    """One policy's row of the JSON from its timed steps (see :mod:`relibra.measure.step`).

    Times and plans are those of the undisturbed steps; all steps when every one was disturbed
    (``steps_undisturbed`` 0 says so).
    """
    timed = len(records)
    kept = [r for r in records if not r["disturbed"]]
    records = kept or records
    measured = [r["seconds"][0] for r in records]
    modelled = [_modelled(r, o, cfg) for r in records]
    med = statistics.median
    return {
        "steps_timed": timed,
        "steps_undisturbed": len(kept),
        "stolen_s": med(r["seconds"][5] for r in records),
        "measured_step_s": med(measured),
        "measured_min_s": min(measured),
        "modelled_step_s": med(m["total_s"] for m in modelled),
        "planned_imbalance": statistics.fmean(r["planned_imbalance"] for r in records),
        "realised_imbalance": statistics.fmean(r["realised_imbalance"] for r in records),
        "planning_s": med(r["planning_s"] for r in records),
        "measured_cpu_s": med(r["seconds"][4] for r in records),
        "measured_parts_s": {name: med(r["seconds"][i] for r in records)
                             for i, name in enumerate(("step", "plan_step", "micro_batches", "optimizer"))},
        "modelled_parts_s": {k: med(m[k] for m in modelled) for k in (*_PARTS, "planning_s")},
        "measured_steps_s": measured,
    }


def gemm_drift(probe: dict, o: MeasureOptions, cfg: CostConfig) -> dict:
    """The GEMM probe run before and after the steps against the profile's price of it.

    ``before`` / ``after``: the median sample over the profile's time for the same GEMM (1.10 =
    the machine ran that GEMM 10 % slower than when it was calibrated). Expert GEMMs are most of
    a step here, so a drift shows up in every policy's model error alike.
    """
    modelled = float(slot_seconds(probe["rows"], cfg)) * probe["slots"]
    med = statistics.median
    return {**probe, "modelled_s": modelled, "before": med(probe["before_s"]) / modelled,
            "after": med(probe["after_s"]) / modelled}


def add_ratios(policies: dict[str, dict]) -> None:
    """Speed-ups over ``static`` (measured and modelled) and the model's error, in place."""
    base = policies.get("static")
    for row in policies.values():
        row["model_error"] = row["modelled_step_s"] / row["measured_step_s"] - 1.0
        if base is not None:
            row["speedup_vs_static"] = base["measured_step_s"] / row["measured_step_s"]
            row["modelled_speedup_vs_static"] = base["modelled_step_s"] / row["modelled_step_s"]


def format_table(result: dict) -> str:
    """The human-readable table of one ``relibra measure`` result."""
    t, o = result["topology"], result["options"]
    lines = [f"relibra measure: {t['nodes']} node(s) x {t['gpus_per_node']} rank(s) = {t['ranks']} ranks, "
             f"{t['backend']} on {t['device']}; dim {o['dim']}, hidden {o['hidden']}, {o['experts']} experts "
             f"({t['home_slots']} home + {o['spare_slots']} spare per rank), top-{o['top_k']}, {o['layers']} layers, "
             f"{o['tokens']} tokens/rank x {o['micro_batches']} micro-batches, skew {o['skew']} (hot experts "
             f"{'fixed' if not o['hot_steps'] else 'new every %d step(s)' % o['hot_steps']}); "
             f"{o['steps']} timed steps after {o['warmup_steps']} warm-up"
             + {True: "; optimizer state moved in the background", False: "; optimizer state moved with the "
                "weights"}.get(o.get("defer_state", "auto"), ""),
             f"model: {result['profile']}; load average {t['load_average_before']:.2f} before, "
             f"{t['load_average_after']:.2f} after"]
    g = result.get("gemm_probe")
    if g:
        lines.append(f"GEMM probe ({g['slots']} slots x {g['rows']} rows, forward + backward) against the "
                     f"profile's price of it: {g['before']:.2f}x before the steps, {g['after']:.2f}x after "
                     "(1.00 = as calibrated)")
    head = ("policy", "median s", "min s", "x static", "cpu s", "modelled s", "x static", "model err",
            "planned imb", "realised imb", "plan s", "steps")
    rows = [head]
    for name, r in result["policies"].items():
        rows.append((name, f"{r['measured_step_s']:.3f}", f"{r['measured_min_s']:.3f}",
                     f"{r['speedup_vs_static']:.2f}" if "speedup_vs_static" in r else "-",
                     f"{r['measured_cpu_s']:.3f}", f"{r['modelled_step_s']:.3f}",
                     f"{r['modelled_speedup_vs_static']:.2f}" if "modelled_speedup_vs_static" in r else "-",
                     f"{r['model_error']:+.1%}", f"{r['planned_imbalance']:.2f}", f"{r['realised_imbalance']:.2f}",
                     f"{r['planning_s']:.3f}", f"{r['steps_undisturbed']}/{r['steps_timed']}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    table = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    table.insert(1, "-" * len(table[0]))
    lines += table
    lines.append("median/min s: measured step (plan_step + forward/backward of every micro-batch + AdamW), slowest "
                 "rank; cpu s: the busiest rank's CPU seconds per step (median); modelled s: relibra.sim.cost on "
                 "the plan the Balancer ran + its measured planning time; steps: undisturbed / timed (a step is "
                 "disturbed when another process held a rank's core for over 2 % of it; medians are over the "
                 "undisturbed ones)")
    for w in result.get("warnings", []):
        lines.append(w)
    return "\n".join(lines)
