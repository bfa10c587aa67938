"""The ``relibra`` console script: ``relibra bench``, ``measure``, ``calibrate`` and ``launch``.

``relibra bench`` simulates the balancing policies on a routing trace (the embedded default
or ``--trace FILE``) with the cost model of :mod:`relibra.sim.cost` and prints the comparison;
``--json`` prints one JSON object instead, ``--plot FILE.png`` draws it (needs matplotlib);
``--profile FILE`` prices with a machine profile from ``relibra calibrate``.
``--packing tokens|routes`` re-packs every step's sequences (a per-sequence trace) and
``--phases`` prices a whole RL step (log-prob, reference and training passes): see
:mod:`relibra.sim.rl_step` and docs/rl-step.md.

``relibra measure`` runs the real stack (ReLibraMoE layers, the Balancer, AdamW) for every
policy on real ranks and prints measured against modelled step times; ``relibra calibrate``
measures the cost model's machine parameters on those ranks and writes a profile
(:mod:`relibra.measure`, docs/measure.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["main", "bench", "measure", "calibrate", "check_policy_names"]

_COLUMNS = (("step_time_s", "step s", "{:.2f}"), ("tokens_per_s", "tok/s", "{:,.0f}"),
            ("speedup_vs_static", "x static", "{:.2f}"), ("speedup_vs_eplb_oracle", "x eplb-or", "{:.2f}"),
            ("speedup_vs_eplb_oracle_global", "x eplb-gl", "{:.2f}"),
            ("gap_to_ideal", "gap ideal", "{:+.1%}"), ("imbalance_mean", "imb mean", "{:.2f}"),
            ("imbalance_worst", "imb worst", "{:.2f}"), ("bytes_moved", "GB moved", "{:.1f}"),
            ("planning_time_s", "plan s", "{:.3f}"))


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def parse_options(items: list[str], policies: list[str]) -> dict[str, dict[str, Any]]:
    """``["hybrid.migration_weight=0.5", ...]`` -> ``{"hybrid": {"migration_weight": 0.5}}``.

    Values are YAML scalars (``0.5``, ``true``, ``null``, ``global``; quote for a string that
    looks like a number). The policy must be one of the bench rows in ``policies`` (not
    ``ideal``) and the option one the policy takes; otherwise ValueError naming it.
    """
    import yaml

    from .sim.simulate import policy_factory

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        name, dot, option = key.strip().rpartition(".")
        if not sep or not dot or not name or not option:
            raise ValueError(f"--option expects POLICY.OPTION=VALUE (e.g. hybrid.migration_weight=0.5), got {item!r}")
        if name not in policies or name == "ideal":
            rows = ", ".join(p for p in policies if p != "ideal")
            raise ValueError(f"--option {item!r}: policy {name!r} is not a simulated policy row; rows: {rows}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ValueError(f"--option {item!r}: value {text!r} is not a YAML scalar ({exc})") from None
        if isinstance(value, (dict, list)):
            raise ValueError(f"--option {item!r}: value must be a scalar, got {type(value).__name__}")
        out.setdefault(name, {})[option] = value
    for name, opts in out.items():
        try:
            policy_factory(name, opts)
        except TypeError as exc:
            raise ValueError(f"--option for policy {name!r}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"--option for policy {name!r} {opts}: {exc}") from None
    return out


def check_policy_names(text: str) -> list[str]:
    """The bench rows of ``--policies`` (comma-separated); ValueError for a name that is neither a
    bench row (``relibra.sim.simulate.ROW_SYSTEMS``) nor a registered policy, with the
    closest known names as a suggestion."""
    import difflib

    from .registry import available_policies
    from .sim.simulate import DEFAULT_POLICIES, ROW_SYSTEMS

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--policies names no policy: {text!r}")
    known = list(dict.fromkeys([*DEFAULT_POLICIES, *ROW_SYSTEMS, *available_policies()]))
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise ValueError(f"--policies: unknown policy {name!r}; {hint}known: {', '.join(known)}")
    return names


def _table(results: dict[str, Any]) -> str:
    head = ["policy"] + [c[1] for c in _COLUMNS]
    rows = [head]
    skipped = []
    for name, r in results.items():
        if r.skipped:
            skipped.append(f"  skipped {name}: {r.skipped}")
            continue
        row = [name]
        for key, _, fmt in _COLUMNS:
            v = getattr(r, key)
            if key == "bytes_moved":
                v = v / 1e9
            row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + skipped)


def _row_systems(results: dict[str, Any]) -> str:
    """Which system each bench row stands for (relibra.sim.simulate.ROW_SYSTEMS), one line each."""
    from .sim.simulate import ROW_SYSTEMS

    named = [n for n in results if n in ROW_SYSTEMS]
    width = max((len(n) for n in named), default=0)
    return "\n".join(["rows:"] + [f"  {n:{width}s}  {ROW_SYSTEMS[n]}" for n in named])


def _packing(args: argparse.Namespace, trace: Any, topology: Any) -> tuple[Any, dict[str, Any]]:
    """``(packer or None, the JSON's "packing" object)`` of ``--packing``; ValueError naming the
    trace when ``tokens``/``routes`` meet a trace without sequences."""
    from .sim.rl_step import StepPacker
    from .sim.traces import sequence_steps

    if args.packing == "rollout":
        return None, {"mode": "rollout", "packer": "none: the trace's loads (rollout order)"}
    where = f"--packing {args.packing} needs a per-sequence (format 2) trace, but trace file {args.trace or 'default'}"
    steps = sequence_steps(trace, where=where)[: args.steps]
    packer = StepPacker(steps, args.packing, topology)
    return packer, {"mode": args.packing}


def bench(args: argparse.Namespace) -> int:
    from .phases import TRAIN, parse_phases
    from .sim.cost import make_config
    from .sim.simulate import gap_breakdown, simulate
    from .sim.traces import default_trace_path, read_trace_file

    names = check_policy_names(args.policies)  # before any work: a typo is not a skipped row
    phases = parse_phases(args.phases) if args.phases is not None else None
    cfg = make_config(args.preset, args.cluster, _parse_sets(args.set))
    trace = read_trace_file(args.trace or default_trace_path())
    loads, top_k, meta = trace.loads.numpy(), int(trace.top_k), dict(trace.meta)
    if top_k != cfg.top_k:
        raise ValueError(f"trace top_k={top_k} differs from preset {args.preset} top_k={cfg.top_k}")
    if args.steps is not None:
        if args.steps < 2:
            raise ValueError(f"--steps must be >= 2 (one warm-up step plus one measured), got {args.steps}")
        loads = loads[: args.steps]
    if loads.shape[2] != cfg.num_moe_layers:
        cfg = make_config(args.preset, args.cluster, {**_parse_sets(args.set), "num_moe_layers": loads.shape[2]})
    cfg = _with_profile(cfg, args.profile)
    topology = cfg.topology(args.nodes, args.gpus_per_node, args.spare_slots)
    options = parse_options(args.option, names)
    packer, packing = _packing(args, trace, topology)
    bar = None
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(names), file=sys.stderr, desc="relibra bench", disable=None)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        pass

    def progress(name: str) -> None:
        if bar is not None:
            bar.set_postfix_str(name)
            if name != names[0]:
                bar.update(1)

    results = simulate(loads, topology, cfg, names, warmup_steps=args.warmup_steps, progress=progress,
                       options=options, packer=packer, phases=phases, overlap=not args.no_overlap,
                       overlap_micro_batches=args.overlap_micro_batches)
    if packer is not None:
        packing.update(packer.describe())
    if bar is not None:
        bar.update(1)
        bar.close()
    S, M, L, E = loads.shape
    stats = _describe(loads, meta) if args.describe else None
    header = {"trace": args.trace or "default", "trace_meta": meta, "steps": S, "micro_batches": M,
              "layers": L, "experts": E, "warmup_steps": args.warmup_steps, "topology": str(topology),
              "preset": args.preset, "cluster": args.cluster, "cost": cfg.to_dict(), "policy_options": options,
              "planning_time": "process CPU seconds of policy.plan per step, one torch thread",
              "packing": packing, "phases": list(phases or (TRAIN,)), "overlap": not args.no_overlap,
              "overlap_micro_batches": args.overlap_micro_batches}
    if stats is not None:
        header["trace_stats"] = stats
    for name in results:
        parts = gap_breakdown(results, name)
        if parts is not None and name != "ideal":
            results[name].breakdown_s["gap_parts"] = parts
    if args.json:
        from .sim.simulate import ROW_SYSTEMS

        header["row_systems"] = {n: ROW_SYSTEMS[n] for n in results if n in ROW_SYSTEMS}
        print(json.dumps({"policies": {n: r.to_json() for n, r in results.items()}, **header}))
    else:
        print(f"trace {header['trace']}: {S} steps x {M} micro-batches x {L} layers x {E} experts; "
              f"{topology}; {args.preset} on {args.cluster}; steady state after {args.warmup_steps} warm-up step(s)")
        if stats is not None:
            from .sim.traces import format_description

            print(format_description(stats))
        if options:
            print("policy options: " + "; ".join(f"{n}: {o}" for n, o in options.items()))
        if packer is not None or phases is not None:
            k = args.overlap_micro_batches
            where = ("every pass on the step's placement" if args.no_overlap else
                     "forward-only passes before training on the step before's placement (overlap)" if k is None else
                     f"the first {k} forward-only micro-batch(es) on the step before's placement (overlap), "
                     "the rest on the step's")
            print(f"packing: {packing['mode']}; phases: {', '.join(header['phases'])} (step time = all passes; "
                  f"{where})")
        print(_table(results))
        print(_row_systems(results))
        for name in ("hybrid", "ideal"):
            if phases is not None and name in results and not results[name].skipped:
                print(f"{name}'s step by phase: " + ", ".join(
                    f"{p['phase']} {p['seconds']:.2f}s" for p in results[name].breakdown_s["phases_s"]))
        parts = gap_breakdown(results, "hybrid")
        if parts is not None:
            print("hybrid's gap to ideal = " + " ".join(f"{k} {v:+.1%}" for k, v in parts.items()))
        print("plan s: process CPU time of policy.plan per step (all micro-batches), one torch thread; "
              "times and volumes come from relibra.sim.cost's model, not a measurement")
    if args.plot:
        from .sim.bench_plot import plot_bench

        plot_bench(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _describe(loads: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Realism statistics of the trace (relibra.sim.traces.describe), against the shipped popularity of
    the trace's workload when the trace names one and its shape fits, else against its own total."""
    from .sim.traces import describe, load_popularity

    popularity = None
    workload = meta.get("workload") if meta.get("generator") == "relibra.sim.traces" else None
    if workload:
        try:
            popularity = load_popularity(workload)
        except ValueError:
            popularity = None
        if popularity is not None and popularity.shape != loads.shape[2:]:
            popularity = None
    ep = 8 if loads.shape[-1] % 8 == 0 else 1
    d = describe(loads, popularity, ep=ep)
    d["corr_with_long_run"] = {str(k): v for k, v in d["corr_with_long_run"].items()}
    return d


def _with_profile(cfg: Any, path: str | None) -> Any:
    """``cfg`` with the machine parameters of the profile ``path`` (a file, or the name of a profile
    shipped with relibra; unchanged for None)."""
    if path is None:
        return cfg
    from .sim.profile import load_profile, profile_config, profile_path

    return profile_config(load_profile(profile_path(path)), cfg)


def _measure_options(args: argparse.Namespace) -> Any:
    from .measure import MeasureOptions

    names = tuple(n.strip() for n in args.policies.split(",") if n.strip())
    options = parse_options(args.option, list(names)) if args.option else {}
    return MeasureOptions(args.nodes, args.gpus_per_node, args.spare_slots, args.dim, args.hidden, args.experts,
                          args.top_k, args.layers, args.tokens, args.micro_batches, args.steps, args.warmup_steps,
                          args.skew, args.hot_steps, args.seed, names, options,
                          defer_state=_DEFER[getattr(args, "defer_state", "auto")]).check()


def measure(args: argparse.Namespace) -> int:
    """``relibra measure``: every policy on real ranks, measured against modelled (docs/measure.md)."""
    from .measure import run_measure
    from .measure.report import format_table
    from .measure.run import measure_fault
    from .measure.world import shared_core_warning
    from .sim.profile import load_profile

    options = _measure_options(args)
    profile = load_profile(args.profile) if args.profile else None
    fault = measure_fault(options, profile)
    if fault:
        raise ValueError(fault)
    warning = shared_core_warning(options.world_size)
    if warning:
        print(warning, file=sys.stderr)
    result = run_measure(options, profile)
    if result is None:  # a torchrun rank other than 0
        return 0
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def calibrate(args: argparse.Namespace) -> int:
    """``relibra calibrate``: measure the cost model's machine parameters, write a profile."""
    from .measure import run_calibrate
    from .sim.profile import profile_from_dict, save_profile

    options = _measure_options(args)
    profile = run_calibrate(options)
    if profile is None:
        return 0
    saved = save_profile(profile_from_dict(profile, "from relibra calibrate"), args.out)
    if args.json:
        print(json.dumps(saved.to_dict()))
        return 0
    m = saved.machine
    print(f"relibra calibrate: {options.nodes} node(s) x {options.gpus_per_node} ranks, {m['backend']} on "
          f"{m['device']}, dim {options.dim}, hidden {options.hidden}, {options.experts} experts, load average "
          f"{m['load_average'][0]:.2f}; wrote {args.out}")
    for key, value in saved.cost.items():
        print(f"  {key:24} {value:.6g}")
    return 0


def _add_world_options(p: argparse.ArgumentParser, with_steps: bool) -> None:
    """The options ``measure`` and ``calibrate`` share (defaults from MeasureOptions)."""
    from .measure.options import MeasureOptions

    d = MeasureOptions()
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help="ranks per node")
    p.add_argument("--spare-slots", type=int, default=d.spare_slots, help="spare slots per rank")
    p.add_argument("--dim", type=int, default=d.dim, help="model width D")
    p.add_argument("--hidden", type=int, default=d.hidden, help="expert intermediate size I")
    p.add_argument("--experts", type=int, default=d.experts)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--layers", type=int, default=d.layers, help="ReLibraMoE layers in the stack")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", action="store_true", help="print one JSON object (the last line)")
    if with_steps:
        p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per rank and micro-batch")
        p.add_argument("--micro-batches", type=int, default=d.micro_batches)
        p.add_argument("--steps", type=int, default=d.steps, help="timed steps per policy")
        p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="untimed steps first")
        p.add_argument("--skew", type=float, default=d.skew,
                       help="share of tokens sent to each micro-batch's hot experts on GPU 0, in [0, 1)")
        p.add_argument("--hot-steps", type=int, default=d.hot_steps,
                       help="steps a set of hot experts lasts (1: new every step; 0: the same in every step)")
        p.add_argument("--policies", default=",".join(d.policies))
        p.add_argument("--option", action="append", default=[], metavar="POLICY.OPTION=VALUE",
                       help="pass an option to one policy, e.g. hybrid.migration_weight=1 (YAML scalar), repeatable")
        p.add_argument("--profile", default=None, metavar="FILE",
                       help="price plans with this profile from relibra calibrate (default: probe this world first)")
        p.add_argument("--defer-state", choices=tuple(_DEFER), default="auto",
                       help="move the experts' optimizer state in the background (on), with their weights (off), "
                            "or as the Balancer's default decides (auto: in the background on GPUs)")
    else:
        p.set_defaults(tokens=d.tokens, micro_batches=d.micro_batches, steps=d.steps, warmup_steps=d.warmup_steps,
                       skew=d.skew, hot_steps=d.hot_steps, policies=",".join(d.policies), option=[])
        p.add_argument("--out", required=True, metavar="FILE", help="write the profile JSON here")


#: ``--defer-state`` -> the Balancer's ``defer_optimizer_state``
_DEFER = {"auto": "auto", "on": True, "off": False}


def _overlap_micro_batches(text: str) -> int | None:
    """``--overlap-micro-batches``: an int >= 1, or ``all`` (None)."""
    if text == "all":
        return None
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"expects an integer >= 1 or 'all', got {text!r}")
    return k


def _launch(argv: list[str]) -> int:
    try:
        from .integrations import launcher  # type: ignore[attr-defined]
    except ImportError as exc:
        print(f"relibra launch is unavailable: relibra.integrations.launcher cannot be imported ({exc}). "
              "Install relibra with its integrations (pip install 'relibra[hf]').", file=sys.stderr)
        return 2
    return int(launcher.main(argv) or 0)


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .sim.cost import CLUSTER_PRESETS
    from .sim.simulate import DEFAULT_POLICIES

    ap = argparse.ArgumentParser(prog="relibra", description="Expert load balancing for RL training of MoE models.")
    ap.add_argument("--version", action="version", version=f"relibra {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="compare balancing policies on a routing trace with the cost model")
    b.add_argument("--trace", default=None, help="trace .npz (loads [steps, M, L, E], top_k); default: embedded")
    b.add_argument("--preset", default="deepseek-v3", choices=["deepseek-v3", "qwen3-30b-a3b", "qwen3-235b-a22b"])
    b.add_argument("--cluster", default="h100", choices=list(CLUSTER_PRESETS),
                   help="GPU and links; a node is one NVLink domain (gb200-nvl72: up to 72 GPUs per node)")
    b.add_argument("--nodes", type=int, default=8)
    b.add_argument("--gpus-per-node", type=int, default=8)
    b.add_argument("--spare-slots", type=int, default=1)
    b.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    b.add_argument("--steps", type=int, default=None, help="use only the first K steps of the trace")
    b.add_argument("--warmup-steps", type=int, default=1)
    b.add_argument("--packing", default="rollout", choices=["rollout", "tokens", "routes"],
                   help="which sequences share a micro-batch: the trace's rollout order (default), token "
                        "packing (LPT on lengths) or route-aware packing (relibra.packing.pack); tokens and "
                        "routes need a per-sequence trace (python -m relibra.sim.traces --per-sequence)")
    b.add_argument("--phases", default=None, metavar="SCHEDULE",
                   help="price a whole RL step: its passes in order, e.g. logprob,ref,train or logprob,train*2 "
                        "or 2+1 (forward-only passes + training epochs); default: one training pass")
    b.add_argument("--no-overlap", action="store_true",
                   help="with --phases: move the experts before the first pass, so the forward-only passes run on "
                        "the step's placement (default: they run on the step before's, while it is planned)")
    b.add_argument("--overlap-micro-batches", type=_overlap_micro_batches, default=1, metavar="K|all",
                   help="with --phases: forward-only micro-batches that run on the step before's placement while "
                        "the step's is planned (the Balancer's overlap_micro_batches; default 1); all: every "
                        "forward-only pass before the first training pass")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--plot", default=None, metavar="FILE.png")
    b.add_argument("--describe", action="store_true",
                   help="also print the trace's realism statistics (relibra.sim.traces.describe) next to "
                        "the Qwen3-235B measurements")
    b.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="override a cost parameter (see relibra.sim.cost.CostConfig), repeatable")
    b.add_argument("--option", action="append", default=[], metavar="POLICY.OPTION=VALUE",
                   help="pass an option to one policy row, e.g. hybrid.migration_weight=0.5 "
                        "(value read as a YAML scalar), repeatable")
    b.add_argument("--profile", default=None, metavar="FILE|NAME",
                   help="price with the machine parameters of a profile from relibra calibrate (a file, or the "
                        "name of one in relibra/data/profiles/)")
    _add_world_options(sub.add_parser("measure", help="run every policy on real ranks: measured vs modelled"),
                       with_steps=True)
    _add_world_options(sub.add_parser("calibrate", help="measure the cost model's machine parameters, write "
                                                        "a profile"), with_steps=False)
    sub.add_parser("launch", help="accelerate launch with relibra's settings", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":
        return _launch(argv[1:])
    args = _parser().parse_args(argv)
    command = {"bench": bench, "measure": measure, "calibrate": calibrate}[args.command]
    try:
        return command(args)
    except ValueError as exc:
        print(f"relibra {args.command}: error: {exc}", file=sys.stderr)
        return 2
