"""Balance at scale: hybrid's gap to ideal as expert parallelism widens (cost model, not a measurement).

    python benchmarks/scale.py [--nodes 8,16,32] [--spare-slots 1,2,4] [--domains 64]
        [--tokens-per-gpu 4096] [--fixed-tokens N] [--micro-batches 16] [--steps 3]
        [--concentration 200] [--group-size 16] [--seed 0]

Every row generates a GRPO trace with relibra.sim.traces (DeepSeek-V3 ``prefill_in4096``
popularity, groups of ``--group-size`` responses, Dirichlet concentration ``--concentration``,
``--micro-batches`` micro-batches a step, ``--steps`` steps of which the first warms up) and
simulates it with relibra.sim.cost's DeepSeek-V3 model. Tokens per micro-batch:
``--tokens-per-gpu`` times the GPUs (weak scaling: every GPU gets the same tokens), or
``--fixed-tokens`` for every row (strong scaling: one trace's micro-batches spread thinner).

Rows: N nodes x 8 GPUs on the ``h100`` cluster preset for every ``--nodes`` and
``--spare-slots``; then one NVLink domain of ``--domains`` GPUs on ``gb200-nvl72`` (a node is
one NVLink domain; 64 of an NVL72's 72 GPUs, since 72 does not divide 256 experts) for every
``--spare-slots``.

Columns: ``hybrid`` gap to ideal (step time over ideal's, minus 1) and its parts in % of
ideal's step time (``comp``: expert compute above the mean; ``a2a``: token all-to-all above
ideal's; ``repl``: replica weight copies and gradient returns; ``migr``: reorder's moves; they
add up to the gap); ``imb``: hybrid's busiest / mean GPU load; ``xnode``: share of (micro-batch,
layer)s with a cross-node replica; then the gaps of ``hybrid-intra`` (replicas inside nodes
only: the planner before cross-node replicas), ``replicate`` (MoonEP-style, planned ahead),
``replicate-live`` (planned live, inside NVLink domains) and ``hybrid - replicate`` (step time
difference in % of replicate's); ``plan s``: hybrid's planning CPU seconds per step (one thread).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from relibra.sim import gap_breakdown, simulate
from relibra.sim.cost import make_config
from relibra.sim.traces import TraceConfig, generate, load_popularity

POLICIES = ["hybrid", "hybrid-intra", "replicate", "replicate-live", "ideal"]
HEAD = ["nodes x GPUs", "cluster", "spare", "tokens/mb", "hybrid", "comp", "a2a", "repl", "migr", "imb", "xnode",
        "hybrid-intra", "replicate", "replicate-live", "hyb-rep", "plan s"]


def scale_row(nodes: int, gpus: int, cluster: str, spare: int, args: argparse.Namespace, popularity) -> list[str]:
    """One table row (strings)."""
    cfg = make_config("deepseek-v3", cluster)
    topology = cfg.topology(nodes, gpus, spare)
    tokens = args.fixed_tokens or args.tokens_per_gpu * topology.num_gpus
    trace = TraceConfig(steps=args.steps, micro_batches=args.micro_batches, tokens_per_micro_batch=tokens,
                        group_size=args.group_size, concentration=args.concentration, seed=args.seed)
    loads = generate(trace, popularity)
    res = simulate(loads, topology, cfg, POLICIES, warmup_steps=1)
    hybrid, replicate = res["hybrid"], res["replicate"]
    parts = gap_breakdown(res, "hybrid")
    xnode = hybrid.plan_info.get("cross_node_layers", 0.0) / (args.micro_batches * loads.shape[2])
    return [f"{nodes} x {gpus}", cluster, str(spare), str(tokens), f"{hybrid.gap_to_ideal:+.2%}"]\
        + [f"{parts[k]:+.1%}" for k in ("compute", "a2a", "replicas", "migration")]\
        + [f"{hybrid.imbalance_mean:.3f}", f"{xnode:.0%}", f"{res['hybrid-intra'].gap_to_ideal:+.1%}",
           f"{replicate.gap_to_ideal:+.1%}", f"{res['replicate-live'].gap_to_ideal:+.1%}",
           f"{hybrid.step_time_s / replicate.step_time_s - 1:+.1%}", f"{hybrid.planning_time_s:.3f}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="8,16,32")
    ap.add_argument("--spare-slots", default="1,2,4")
    ap.add_argument("--domains", default="64", help="GPUs of one NVLink domain rows (gb200-nvl72); empty: none")
    ap.add_argument("--tokens-per-gpu", type=int, default=4096)
    ap.add_argument("--fixed-tokens", type=int, default=0, help="tokens per micro-batch, every row (0: weak scaling)")
    ap.add_argument("--micro-batches", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--concentration", type=float, default=200.0)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    rows_todo = [(n, 8, "h100", s) for n in ints(args.nodes) for s in ints(args.spare_slots)]
    rows_todo += [(1, d, "gb200-nvl72", s) for d in ints(args.domains) for s in ints(args.spare_slots)]
    popularity = load_popularity("prefill_in4096")
    scaling = f"{args.fixed_tokens} tokens per micro-batch" if args.fixed_tokens else \
        f"{args.tokens_per_gpu} tokens per GPU per micro-batch"
    print(f"DeepSeek-V3 (cost model), GRPO trace: groups of {args.group_size}, concentration {args.concentration:g}, "
          f"{args.micro_batches} micro-batches, {args.steps} steps (1 warm-up), {scaling}, seed {args.seed}")
    rows, t0 = [HEAD], time.process_time()
    for i, r in enumerate(rows_todo):
        rows.append(scale_row(*r, args, popularity))
        print(f"  [{i + 1}/{len(rows_todo)}] {r} {time.process_time() - t0:.0f}s", file=sys.stderr)
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEAD))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    print("\n".join(lines))
    print(f"gaps to ideal; comp/a2a/repl/migr: hybrid's gap by part (% of ideal's step time); CPU "
          f"{time.process_time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
