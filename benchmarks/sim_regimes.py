"""Harder regimes: where hybrid's gap to ideal grows, and why (cost model, not a measurement).

    python benchmarks/sim_regimes.py [--steps 2] [--micro-batches 8] [--tokens-per-gpu 2048]
        [--concentrations 16,64,256,1024,4096] [--group-sizes 4,16] [--spare-slots 1,2]
        [--four-node-concentrations 64,256,1024] [--option hybrid.migration_weight=0.5] [--seed 0]

Every row generates its own GRPO trace (relibra.sim.traces, DeepSeek-V3 prefill_in4096 popularity,
``--steps`` steps of ``--micro-batches`` micro-batches, ``--tokens-per-gpu`` tokens per GPU per
micro-batch, one warm-up step) and simulates static, eplb-oracle (EPLB's own hierarchical
choice), eplb-oracle-global, hybrid and ideal with relibra.sim.cost's DeepSeek-V3 / H100 model.
Defaults: 8 nodes x 8 GPUs; the extra 4-node rows keep the tokens per GPU.

Columns: ``x static``, ``x eplb-or``, ``x eplb-gl``: hybrid's speedup over those rows;
``gap``: hybrid over ideal; ``imb``: hybrid's busiest/mean GPU load, mean and worst over
micro-batches x layers; then hybrid's gap split by part, each in % of ideal's step time:
``comp`` (expert compute above the mean: residual imbalance), ``a2a`` (token all-to-all above
ideal's uniform traffic), ``repl`` (replica weight copies and gradient reductions), ``migr``
(reorder's expert moves, net of overlap); they add up to ``gap``. ``xnode``: share of hybrid's
(micro-batch, layer)s with a cross-node replica. ``r1``/``r4``: realism of the
trace, correlation of 1- and 4-micro-batch loads with the long-run popularity (Qwen3-235B
measured 0.57 and 0.71; relibra.sim.traces.describe). One CPU thread (planning timed on one).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from relibra.cli import parse_options
from relibra.sim import gap_breakdown, simulate
from relibra.sim.cost import make_config
from relibra.sim.traces import TraceConfig, describe, generate, load_popularity

POLICIES = ["static", "eplb-oracle", "eplb-oracle-global", "hybrid", "ideal"]
HEAD = ["nodes", "spare", "group", "conc", "x static", "x eplb-or", "x eplb-gl", "gap", "imb mean", "imb worst",
        "comp", "a2a", "repl", "migr", "xnode", "r1", "r4"]


def regime_row(nodes: int, spare: int, group: int, conc: float, args: argparse.Namespace,
               options: dict, popularity) -> list[str]:
    """One table row (strings) for one regime."""
    gpn = 8
    cfg = make_config("deepseek-v3", "h100")
    tcfg = TraceConfig(steps=args.steps, micro_batches=args.micro_batches,
                       tokens_per_micro_batch=args.tokens_per_gpu * nodes * gpn, group_size=group,
                       concentration=conc, workload="prefill_in4096", seed=args.seed)
    loads = generate(tcfg, popularity)
    res = simulate(loads, cfg.topology(nodes, gpn, spare), cfg, POLICIES, warmup_steps=1, options=options)
    h = res["hybrid"]
    parts = [gap_breakdown(res, "hybrid")[k] for k in ("compute", "a2a", "replicas", "migration")]
    xnode = h.plan_info.get("cross_node_layers", 0.0) / (args.micro_batches * loads.shape[2])
    d = describe(loads, popularity, ep=8, windows=(1, 4))
    corr = d["corr_with_long_run"]
    return [str(nodes), str(spare), str(group), f"{conc:g}", f"{h.speedup_vs_static:.2f}",
            f"{h.speedup_vs_eplb_oracle:.2f}", f"{h.speedup_vs_eplb_oracle_global:.2f}", f"{h.gap_to_ideal:+.1%}",
            f"{h.imbalance_mean:.2f}", f"{h.imbalance_worst:.2f}"] + [f"{p:+.1%}" for p in parts] + [
            f"{xnode:.0%}", f"{corr.get(1, float('nan')):.2f}", f"{corr.get(4, float('nan')):.2f}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--tokens-per-gpu", type=int, default=2048)
    ap.add_argument("--concentrations", default="16,64,256,1024,4096")
    ap.add_argument("--group-sizes", default="4,16")
    ap.add_argument("--spare-slots", default="1,2")
    ap.add_argument("--four-node-concentrations", default="64,256,1024",
                    help="extra 4-node rows (group 16, 1 spare slot); empty for none")
    ap.add_argument("--option", action="append", default=[], metavar="POLICY.OPTION=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    options = parse_options(args.option, POLICIES)
    floats = lambda s: [float(v) for v in s.split(",") if v.strip()]  # noqa: E731
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    regimes = [(8, sp, g, c) for sp in ints(args.spare_slots) for g in ints(args.group_sizes)
               for c in floats(args.concentrations)]
    regimes += [(4, 1, 16, c) for c in floats(args.four_node_concentrations)]
    popularity = load_popularity("prefill_in4096")
    print(f"DeepSeek-V3 on H100 (cost model), {args.steps} steps x {args.micro_batches} micro-batches "
          f"(1 warm-up), {args.tokens_per_gpu} tokens per GPU per micro-batch, seed {args.seed}; "
          f"columns after 'gap' are hybrid's; options {options or 'default'}")
    rows, t0 = [HEAD], time.process_time()
    for i, r in enumerate(regimes):
        rows.append(regime_row(*r, args, options, popularity))
        print(f"  [{i + 1}/{len(regimes)}] {r} {time.process_time() - t0:.0f}s", file=sys.stderr)
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEAD))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    print("\n".join(lines))
    print(f"gap parts in % of ideal's step time; CPU {time.process_time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
