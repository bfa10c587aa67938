"""``eplb``: DeepSeek's expert-parallel load balancer as a relibra policy.

Two things live here:

* :func:`rebalance_experts` (from :mod:`.eplb_algorithm`): DeepSeek's EPLB with the
  reference's exact outputs, vectorised across layers.
* :class:`EplbPolicy`, registered as ``"eplb"``: once a step, it runs EPLB on a weight
  ``[L, E]`` and keeps that placement and those replicas for the whole step (the same
  ``spare_experts`` in every micro-batch); each expert's tokens are split evenly over its
  copies (:func:`relibra.plan.even_slot_tokens`).

Memory, adapted honestly (details in :mod:`.eplb_placement`): EPLB is given all
``G * (H + S)`` slots, but a relibra plan needs one home slot per expert, exactly ``H`` per
GPU, and replicas only in the ``S`` spare slots, never two copies of one expert on one GPU.
DeepSeek's last step (all physical experts of a node packed onto its GPUs at once) can break
both rules. So the policy keeps EPLB's group-to-node packing and its replica counts (capped
at one copy per GPU of the unit), then packs inside each node home-aware: first every
expert's home copy (longest-first, ``H`` per GPU), then the replicas into spare slots
(longest-first onto the lightest GPU that does not hold the expert yet). Hierarchical plans
keep replicas inside their home node (``intra_node_replicas=True``); global plans may
replicate across nodes (``False``). With ``S == 0`` it is an EPLB-ordered placement without
replicas.

Weight sources: ``source="oracle"`` uses the step's own loads summed over micro-batches;
``source="history"`` uses the summed loads of earlier ``plan`` calls (mean of the last
``window`` steps, or an exponential moving average). With no history yet (the first step)
the plan is ``static``'s contiguous placement without replicas. After planning, the step's
loads are recorded.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import torch

from ..plan import Placement, Plan, slot_ranks
from ..topology import Topology
from .base import check_loads
from .eplb_algorithm import rebalance_experts
from .eplb_placement import place_home_aware
from .replicate import replicate_on

__all__ = ["EplbPolicy", "rebalance_experts", "even_split_plan"]

_SOURCES = ("history", "oracle")
_HISTORIES = ("window", "ema")
_MODES = ("auto", "hierarchical", "global")


class EplbPolicy:
    """DeepSeek EPLB fed by past loads (``history``) or the step's own loads (``oracle``).

    Args:
        source: ``"history"`` (default) or ``"oracle"``.
        history: ``"window"`` (mean of the last ``window`` steps, default) or ``"ema"``.
        window: steps averaged by ``history="window"`` (>= 1).
        ema_decay: weight of the past in ``history="ema"``: ``ema = d * ema + (1 - d) * step``
            (0 <= d < 1; 0 keeps only the last step).
        mode: ``"auto"`` (hierarchical when the topology's expert groups divide evenly over
            its nodes, as the reference decides), ``"hierarchical"`` or ``"global"``.
    """

    def __init__(
        self,
        source: Literal["history", "oracle"] = "history",
        history: Literal["window", "ema"] = "window",
        window: int = 4,
        ema_decay: float = 0.9,
        mode: Literal["auto", "hierarchical", "global"] = "auto",
    ) -> None:
        if source not in _SOURCES:
            raise ValueError(f"eplb: source must be one of {_SOURCES}, got {source!r}")
        if history not in _HISTORIES:
            raise ValueError(f"eplb: history must be one of {_HISTORIES}, got {history!r}")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"eplb: window must be an int >= 1, got {window!r}")
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0 <= ema_decay < 1:
            raise ValueError(f"eplb: ema_decay must be a number in [0, 1), got {ema_decay!r}")
        if mode not in _MODES:
            raise ValueError(f"eplb: mode must be one of {_MODES}, got {mode!r}")
        self.source = source
        self.history = history
        self.window = window
        self.ema_decay = float(ema_decay)
        self.mode = mode
        self.reset()

    def reset(self) -> None:
        """Forget the recorded load history (the next history-sourced step is static)."""
        self._steps: deque[torch.Tensor] = deque(maxlen=self.window)
        self._ema: torch.Tensor | None = None

    @property
    def steps_recorded(self) -> int:
        return len(self._steps) if self.history == "window" else int(self._ema is not None)

    def weight(self) -> torch.Tensor | None:
        """``[L, E]`` float64 weight the next history-sourced plan uses; None before any step."""
        if self.history == "ema":
            return None if self._ema is None else self._ema.clone()
        if not self._steps:
            return None
        return torch.stack(list(self._steps)).mean(0)

    def hierarchical(self, topology: Topology) -> bool:
        """Whether plans for ``topology`` pack groups to nodes (and keep replicas there)."""
        fits = topology.num_expert_groups % topology.num_nodes == 0
        if self.mode == "hierarchical" and not fits:
            raise ValueError(
                f"eplb: mode='hierarchical' needs the expert groups ({topology.num_expert_groups}) "
                f"to divide evenly over the {topology.num_nodes} nodes; use mode='auto' or 'global'"
            )
        return fits if self.mode == "auto" else self.mode == "hierarchical"

    def plan(self, loads: torch.Tensor, topology: Topology) -> Plan:
        """One placement and one replica set for the whole step; loads ``[M, L, E]``."""
        loads = check_loads(loads, topology)
        step_LE = loads.sum(0).to(torch.float64)
        hierarchical = self.hierarchical(topology)
        if self.source == "oracle":
            weight = step_LE
        else:
            self._check_history(step_LE)
            weight = self.weight()
        if weight is None:
            plan = Plan.without_replicas(Placement.contiguous(topology, loads.shape[1]), loads, topology, "eplb")
            plan.info.update(eplb_fallback="static (no history yet)")
        else:
            home_gpu, spare = place_home_aware(
                weight,
                topology.num_nodes,
                topology.gpus_per_node,
                topology.spare_slots_per_gpu,
                topology.num_expert_groups,
                hierarchical,
            )
            placement = Placement.from_home_gpu(home_gpu, topology)
            plan = even_split_plan(placement, spare, loads, topology, intra_node_replicas=hierarchical)
        plan.info.update(eplb_source=self.source, eplb_mode="hierarchical" if hierarchical else "global")
        if self.source == "history":
            self._record(step_LE)
        return plan

    def replan(self, loads: torch.Tensor, placement: Placement, topology: Topology) -> Plan:
        """Replicas and split of ``loads`` on a placement chosen elsewhere (see the contract): the
        intra-node replicas of ``replicate``, since EPLB's own replicas come with its placement."""
        return replicate_on(loads, placement, topology, policy="eplb")

    def _check_history(self, step_LE: torch.Tensor) -> None:
        past = self._ema if self.history == "ema" else (self._steps[-1] if self._steps else None)
        if past is not None and past.shape != step_LE.shape:
            raise ValueError(
                f"eplb: loads have {step_LE.shape[0]} layers x {step_LE.shape[1]} experts, the "
                f"recorded history {past.shape[0]} x {past.shape[1]}; call reset() for a new model"
            )

    def _record(self, step_LE: torch.Tensor) -> None:
        if self.history == "window":
            self._steps.append(step_LE)
        elif self._ema is None:
            self._ema = step_LE.clone()
        else:
            self._ema = self.ema_decay * self._ema + (1.0 - self.ema_decay) * step_LE

    def state_dict(self) -> dict:
        """The recorded load history: ``{"history": "window" | "ema", "steps": [...], "ema": ...}``,
        ``steps`` the last ``window`` steps' summed loads (each ``[L, E]`` float64, oldest
        first; empty for ``"ema"``), ``ema`` the ``[L, E]`` float64 average (None for
        ``"window"`` or before any step)."""
        return {"history": self.history, "steps": [s.clone() for s in self._steps],
                "ema": None if self._ema is None else self._ema.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output. Raises ValueError naming the key, with the policy
        unchanged, if it does not fit this policy's ``history``; a ``window`` history longer than
        this policy's ``window`` keeps its last ``window`` steps."""
        if not isinstance(state, dict) or set(state) != {"history", "steps", "ema"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"eplb state must be a dict with the keys 'ema', 'history', 'steps', got {got}")
        if state["history"] != self.history:
            raise ValueError(f"eplb state key 'history': the state was recorded with history="
                             f"{state['history']!r}, this policy uses {self.history!r}")
        steps, ema = state["steps"], state["ema"]
        if not isinstance(steps, list) or (steps and self.history == "ema"):
            raise ValueError("eplb state key 'steps' must be a list of [L, E] tensors (empty for history='ema')")
        if ema is not None and self.history == "window":
            raise ValueError("eplb state key 'ema' must be None for history='window'")
        loads = steps + ([] if ema is None else [ema])
        for i, t in enumerate(loads):
            key = "ema" if ema is not None and i == len(loads) - 1 else f"steps[{i}]"
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.float64:
                raise ValueError(f"eplb state key {key!r} must be a float64 tensor [L, E], got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
            if t.shape != loads[0].shape:
                raise ValueError(f"eplb state key {key!r} has shape {tuple(t.shape)}, the history before it "
                                 f"{tuple(loads[0].shape)}")
        self._steps = deque((t.detach().cpu().clone() for t in steps), maxlen=self.window)
        self._ema = None if ema is None else ema.detach().cpu().clone()


def even_split_plan(
    placement: Placement,
    spare_LV: torch.Tensor,
    loads: torch.Tensor,
    topology: Topology,
    intra_node_replicas: bool,
    policy: str = "eplb",
) -> Plan:
    """``Plan.with_spares`` for one replica set ``spare_LV [L, V]`` shared by all micro-batches.

    The same plan (even split, :func:`relibra.plan.even_slot_tokens`' rule: copy ``j`` of
    ``c`` gets ``n // c + (j < n % c)``), but the copy ranks and counts, which do not depend
    on the micro-batch, are computed once for ``[L, P]`` instead of for every micro-batch.
    ``loads`` are checked int64 ``[M, L, E]``.
    """
    M, L, E = loads.shape
    G, H, S = topology.num_gpus, topology.home_slots_per_gpu, topology.spare_slots_per_gpu
    phy2log = torch.cat([placement.home_experts.view(L, G, H), spare_LV.view(L, G, S)], dim=-1).view(L, -1)
    rank, logcnt = slot_ranks(phy2log, E)  # [L, P], [L, E]
    safe = phy2log.clamp(min=0)
    copies = logcnt.gather(1, safe).clamp(min=1)  # [L, P]
    tokens = loads.gather(2, safe.expand(M, L, -1))  # [M, L, P]
    share = torch.div(tokens, copies, rounding_mode="floor")
    tokens -= share * copies  # now n % c
    share += rank < tokens  # the first n % c copies take one more
    share.masked_fill_(phy2log < 0, 0)
    spare = spare_LV.expand(M, L, topology.num_spare_slots).contiguous()
    return Plan(topology, placement, spare, share, intra_node_replicas, policy)
