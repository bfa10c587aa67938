"""Options of ``relibra measure`` and ``relibra calibrate``: one world, one layer shape.

Legend: N nodes, G = N x gpus per node ranks, E experts, H = E / G home slots per rank,
S spare slots per rank, D dim, I hidden (expert intermediate), K top-k, L MoE layers,
T tokens per rank and micro-batch, M micro-batches per step.

Defaults (2 ranks on 2 cores) are chosen so that a CPU rank is compute-bound, as a GPU rank
is: an expert's forward + backward costs ``3 x 6 x D x I`` = 4.7 Mflop per token copy (about
75 us on one core at ~60 Gflop/s) against ``D x 4`` = 1 KiB per copy and transfer through gloo
(about 1 us at ~1 GB/s), so moving tokens costs ~1 % of computing them; and every expert slot
gets many more rows than the ~30 whose time its fixed cost equals (weights read, weight
gradients written and accumulated whatever the rows): ``T x K x G / E`` = 512 rows per expert
on average, ~150 for a cold expert under the default skew, so the fixed costs stay a small part
of a step (as on a GPU, where an expert sees thousands of rows). 16 experts give GPU 0
eight home experts, so the micro-batches' hot pairs are disjoint and ``reorder`` can split
every micro-batch's pair over two nodes. A ``static`` step takes about 2.3 s on a quiet core,
so the defaults' 5 policies x 7 steps fit in ~2 minutes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

__all__ = ["MeasureOptions", "DEFAULT_POLICIES"]

DEFAULT_POLICIES = ("static", "eplb", "reorder", "replicate", "hybrid")


@dataclass(frozen=True)
class MeasureOptions:
    """One measured world: topology, layer sizes, routes and how many steps.

    ``tokens`` are per rank and micro-batch; ``steps`` are timed steps after ``warmup_steps``
    untimed ones; ``skew`` in [0, 1) is the share of tokens sent to each micro-batch's hot
    experts, and a set of hot experts lasts ``hot_steps`` steps (1: new ones every step, as in
    RL where every step brings new prompts; 0: the same every step, so a placement that fits
    them once fits for good) (see :mod:`relibra.measure.routes`). ``policy_options`` maps a
    policy to keyword options of its factory (``{"hybrid": {"migration_weight": 1.0}}``).
    :meth:`fault` names the first bad option.
    """

    nodes: int = 1
    gpus_per_node: int = 2
    spare_slots: int = 1
    dim: int = 256
    hidden: int = 1024
    experts: int = 16
    top_k: int = 2
    layers: int = 2
    tokens: int = 2048
    micro_batches: int = 2
    steps: int = 6
    warmup_steps: int = 1
    skew: float = 0.7
    hot_steps: int = 1
    seed: int = 0
    policies: tuple[str, ...] = DEFAULT_POLICIES
    policy_options: dict = field(default_factory=dict)
    defer_state: bool | str = "auto"

    @property
    def world_size(self) -> int:
        """G: ranks of the expert-parallel group."""
        return self.nodes * self.gpus_per_node

    @property
    def home_slots(self) -> int:
        """H = E / G home experts per rank."""
        return self.experts // self.world_size

    def fault(self) -> str:
        """Why these options cannot run, naming the option (``--name``), or "" if they can."""
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("skew", "policies", "policy_options"):
                continue
            if f.name == "defer_state":
                if not isinstance(v, bool) and v != "auto":
                    return f"--defer-state must be on, off or auto, got {v!r}"
                continue
            least = 0 if f.name in ("spare_slots", "warmup_steps", "seed", "hot_steps") else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                return f"--{f.name.replace('_', '-')} must be an integer >= {least}, got {v!r}"
        skew = self.skew
        if isinstance(skew, bool) or not isinstance(skew, (int, float)) or not math.isfinite(skew) \
                or not 0.0 <= skew < 1.0:
            return f"--skew must be a number in [0, 1), got {skew!r}"
        G = self.world_size
        if G < 2:
            return (f"--nodes {self.nodes} x --gpus-per-node {self.gpus_per_node} is {G} rank; balance and links "
                    f"need at least 2")
        if self.experts % G:
            return (f"--experts {self.experts} does not divide over the {G} ranks ({self.nodes} nodes x "
                    f"{self.gpus_per_node} GPUs per node); every rank needs the same number of home experts")
        if self.top_k > self.experts:
            return f"--top-k {self.top_k} exceeds --experts {self.experts}"
        if self.skew > 0 and self.top_k > self.home_slots:
            return (f"--skew > 0 sends each skewed token to top_k={self.top_k} hot experts homed on GPU 0, "
                    f"but GPU 0 has only {self.home_slots} home experts (--experts / ranks); raise --experts")
        if not self.policies:
            return "--policies names no policy"
        if len(set(self.policies)) != len(self.policies):
            return f"--policies names a policy twice: {','.join(self.policies)}"
        from ..registry import available_policies

        known = available_policies()
        for name in self.policies:
            if name not in known:
                return f"--policies: unknown policy {name!r}; registered: {', '.join(sorted(known))}"
        from ..registry import get_policy

        for name, opts in self.policy_options.items():
            if name not in self.policies:
                return f"--option for {name!r}, which is not in --policies ({','.join(self.policies)})"
            try:
                get_policy(name, **opts)
            except (TypeError, ValueError) as exc:
                return f"--option for policy {name!r} {opts}: {exc}"
        return ""

    def check(self) -> "MeasureOptions":
        """Raise ValueError with :meth:`fault`'s text; return self."""
        fault = self.fault()
        if fault:
            raise ValueError(fault)
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["policies"] = list(self.policies)
        return d
