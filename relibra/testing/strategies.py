"""Hypothesis strategies for testing balancing policies: topologies, step loads and R3 routes.

Legend: M micro-batches, L MoE layers, E logical experts, N nodes, G GPUs, H home slots per GPU,
S spare slots per GPU, T tokens, K top-k.

This module imports hypothesis (``pip install "relibra[testing]"``); ``import relibra`` and
``import relibra.testing`` do not. Every bound is an ``int`` (that exact value) or an inclusive
``(low, high)`` pair, checked when the strategy is built (ValueError naming the argument).

Shrinking: every drawn size shrinks toward its lower bound and every load and expert id toward 0,
so a failing example shrinks toward one node, one GPU, one micro-batch, one layer and few tokens.

- :func:`topologies`: nodes, GPUs per node, experts that divide over the GPUs, spare slots,
  expert groups.
- :func:`loads`: int64 ``[M, L, E]`` token counts, from uniform to heavily skewed and a hot
  expert per micro-batch, with all-zero steps and empty micro-batches.
- :func:`step_loads`: the loads of consecutive steps (one ``L``, ``M`` may differ), for policies
  that keep state between ``plan`` calls.
- :func:`topology_and_loads`: ``(topology, loads)`` pairs, what ``policy.plan`` takes.
- :func:`routes`: R3 routes ``[T, L, K]`` of one sequence, distinct experts per token and
  layer, -1 padding (dropped slots and right-padded tokens).
"""

from __future__ import annotations

import functools
from typing import Callable, Literal, Union

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ..routing.routes import PAD
from ..topology import Topology

__all__ = ["LOAD_KINDS", "loads", "routes", "step_loads", "topologies", "topology_and_loads"]

Bound = Union[int, tuple[int, int]]

#: the shapes of load :func:`loads` draws, in shrinking order (hypothesis prefers earlier kinds):
#: ``uniform`` (one level per micro-batch and layer, a few experts up to ``max_load / 10`` above
#: it), ``skewed`` (a few hot experts per layer, hot in every micro-batch, 100x the rest),
#: ``hot_spot`` (a different hot expert in every micro-batch and layer), ``sparse`` (most experts
#: get nothing), ``zeros``
LOAD_KINDS = ("uniform", "skewed", "hot_spot", "sparse", "zeros")

_GROUPS = ("one", "any", "per_node")


def _bounds(value: Bound, name: str, minimum: int) -> tuple[int, int]:
    """``value`` as an inclusive ``(low, high)`` pair, checked against ``minimum``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        low = high = int(value)
    elif isinstance(value, tuple) and len(value) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value
    ):
        low, high = (int(v) for v in value)
    else:
        raise ValueError(f"{name} must be an int or a (low, high) pair of ints, got {value!r}")
    if low < minimum or high < low:
        raise ValueError(f"{name} must satisfy {minimum} <= low <= high, got {value!r}")
    return low, high


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def topologies(
    *,
    nodes: Bound = (1, 3),
    gpus_per_node: Bound = (1, 4),
    home_slots: Bound = (1, 2),
    spare_slots: Bound = (0, 2),
    expert_groups: Literal["one", "any", "per_node"] = "any",
    max_gpus: int | None = None,
    max_experts: int | None = None,
) -> st.SearchStrategy[Topology]:
    """Topologies with ``E = G * H`` experts, so experts always divide over the GPUs.

    Args:
        nodes: N.
        gpus_per_node: GPUs of each node.
        home_slots: H, home slots per GPU (sets ``num_experts = G * H``).
        spare_slots: S, spare slots per GPU (0: no room for replicas).
        expert_groups: ``num_expert_groups``: ``"one"`` (1), ``"any"`` (any divisor of E) or
            ``"per_node"`` (a divisor of E that is a multiple of N: the topologies on which the
            hierarchical EPLB packs groups to nodes). Shrinks toward the smallest.
        max_gpus: at most this many GPUs in all (None: ``nodes`` x ``gpus_per_node`` bounds).
        max_experts: at most this many experts (None: no cap beyond the bounds).

    Shrinks toward one node of one GPU with the fewest slots.
    """
    n_lo, n_hi = _bounds(nodes, "nodes", 1)
    g_lo, g_hi = _bounds(gpus_per_node, "gpus_per_node", 1)
    h_lo, h_hi = _bounds(home_slots, "home_slots", 1)
    s_lo, s_hi = _bounds(spare_slots, "spare_slots", 0)
    if expert_groups not in _GROUPS:
        raise ValueError(f"expert_groups must be one of {_GROUPS}, got {expert_groups!r}")
    gpu_cap = n_hi * g_hi if max_gpus is None else int(max_gpus)
    if max_experts is not None:
        gpu_cap = min(gpu_cap, int(max_experts) // h_lo)
    if n_lo * g_lo > gpu_cap:
        raise ValueError(
            f"no topology fits: at least {n_lo} nodes x {g_lo} GPUs x {h_lo} home slots, but "
            f"max_gpus={max_gpus} and max_experts={max_experts}"
        )
    n_hi = min(n_hi, gpu_cap // g_lo)

    @st.composite
    def draw_topology(draw) -> Topology:
        num_nodes = draw(st.integers(n_lo, n_hi))
        gpus = draw(st.integers(g_lo, min(g_hi, gpu_cap // num_nodes)))
        G = num_nodes * gpus
        h_cap = h_hi if max_experts is None else min(h_hi, int(max_experts) // G)
        E = G * draw(st.integers(h_lo, h_cap))
        if expert_groups == "one":
            groups = 1
        else:
            options = _divisors(E) if expert_groups == "any" else [d for d in _divisors(E) if d % num_nodes == 0]
            groups = draw(st.sampled_from(options))
        return Topology(num_nodes=num_nodes, gpus_per_node=gpus, num_experts=E,
                        spare_slots_per_gpu=draw(st.integers(s_lo, s_hi)), num_expert_groups=groups)

    return draw_topology()


def _num_experts(topology: Topology | int, name: str) -> int:
    if isinstance(topology, Topology):
        return topology.num_experts
    if isinstance(topology, (int, np.integer)) and not isinstance(topology, bool) and topology >= 1:
        return int(topology)
    raise ValueError(f"{name} needs a Topology or a number of experts >= 1, got {topology!r}")


@functools.lru_cache(maxsize=1024)  # a strategy built once per shape draws far faster than one built per draw
def _int_array(shape: tuple[int, ...], high: int, fill_zero: bool = False) -> st.SearchStrategy[np.ndarray]:
    """int64 arrays of ``shape`` with entries in ``[0, high]``; ``fill_zero``: mostly 0."""
    return hnp.arrays(np.int64, shape, elements=st.integers(0, high), fill=st.just(0) if fill_zero else None)


#: True about one time in ten; shrinks to False
_rarely = st.integers(0, 9).map(lambda draw: draw == 9)


@functools.lru_cache(maxsize=1024)
def _micro_batches(kind: str, L: int, E: int, max_load: int, empty: bool, m_lo: int, m_hi: int) -> st.SearchStrategy:
    """Lists of ``m_lo..m_hi`` pairs ``(empty, [L, E] loads)`` of ``kind`` (see :data:`LOAD_KINDS`):
    the caller adds the skewed kind's hot experts and zeroes the empty micro-batches. A list, not an
    array of drawn length, so that the shrinker deletes whole micro-batches."""
    low = max(max_load // 100, 1)  # the background of the skewed kinds: 100x below the hot experts
    if kind == "zeros":
        micro_batch = st.just(np.zeros((L, E), dtype=np.int64))
    elif kind == "uniform":  # one level per layer, a few experts up to max_load / 10 above it
        micro_batch = st.builds(np.add, _int_array((L, 1), max_load), _int_array((L, E), max(max_load // 10, 1), True))
    elif kind == "skewed":  # a low background (the step's hot experts come on top)
        micro_batch = _int_array((L, E), low)
    elif kind == "hot_spot":  # one hot expert per layer, a different one in every micro-batch
        hot_L = hnp.arrays(np.int64, (L, 1), elements=st.integers(0, E - 1))
        micro_batch = st.builds(_heat, _int_array((L, E), low), hot_L, _int_array((L, 1), max_load))
    else:  # sparse
        micro_batch = _int_array((L, E), max_load, fill_zero=True)
    return st.lists(st.tuples(_rarely if empty else st.just(False), micro_batch), min_size=m_lo, max_size=m_hi)


def _heat(background_LE: np.ndarray, hot_L1: np.ndarray, load_L1: np.ndarray) -> np.ndarray:
    """``background_LE`` with expert ``hot_L1[l]`` of layer ``l`` set to ``load_L1[l]``."""
    np.put_along_axis(background_LE, hot_L1, load_L1, axis=1)
    return background_LE


def loads(
    topology: Topology | int,
    *,
    micro_batches: Bound = (1, 3),
    layers: Bound = (1, 3),
    max_load: int = 1000,
    kinds: tuple[str, ...] = LOAD_KINDS,
    empty_micro_batches: bool = True,
) -> st.SearchStrategy[torch.Tensor]:
    """The exact loads of one step: int64 ``[M, L, E]`` token copies per expert, in ``[0, max_load]``.

    Args:
        topology: a Topology (its ``num_experts``) or E itself.
        micro_batches: M.
        layers: L (an int fixes it, as several steps of one model need).
        max_load: the largest count of one expert in one micro-batch and layer.
        kinds: which of :data:`LOAD_KINDS` to draw from (shrinks toward the first given).
        empty_micro_batches: whether whole micro-batches may get no tokens at all.

    Shrinks toward one micro-batch, one layer, the first kind and small counts.
    """
    E = _num_experts(topology, "loads")
    m_lo, m_hi = _bounds(micro_batches, "micro_batches", 1)
    l_lo, l_hi = _bounds(layers, "layers", 1)
    if isinstance(max_load, bool) or not isinstance(max_load, (int, np.integer)) or max_load < 1:
        raise ValueError(f"max_load must be an int >= 1, got {max_load!r}")
    max_load = int(max_load)
    if not isinstance(kinds, tuple) or not kinds or any(kind not in LOAD_KINDS for kind in kinds):
        raise ValueError(f"kinds must be a non-empty tuple of {LOAD_KINDS}, got {kinds!r}")

    @st.composite
    def draw_loads(draw) -> torch.Tensor:
        L = draw(st.integers(l_lo, l_hi))
        kind = draw(st.sampled_from(kinds))
        empty_M, loads_MLE = zip(*draw(_micro_batches(kind, L, E, max_load, empty_micro_batches, m_lo, m_hi)))
        loads_MLE = np.stack(loads_MLE)
        if kind == "skewed":  # the step's hot experts, hot in every micro-batch
            loads_MLE += draw(_int_array((L, E), max_load, fill_zero=True))
        loads_MLE[np.array(empty_M)] = 0
        return torch.from_numpy(np.minimum(loads_MLE, max_load).astype(np.int64))

    return draw_loads()


_default_topologies, _default_loads = topologies, loads  # for the functions whose keywords shadow them


def step_loads(
    topology: Topology | int,
    *,
    steps: Bound = (2, 3),
    layers: Bound = (1, 3),
    loads: Callable[..., st.SearchStrategy[torch.Tensor]] | None = None,
    **loads_options,
) -> st.SearchStrategy[list[torch.Tensor]]:
    """The loads of consecutive steps of one model: a list of ``[M_k, L, E]`` (one L for all).

    ``loads(topology, layers=L, **loads_options)`` draws each step (default: this module's
    :func:`loads`); M may differ between steps. Shrinks toward the fewest steps.
    """
    loads_of = _default_loads if loads is None else loads
    s_lo, s_hi = _bounds(steps, "steps", 1)
    l_lo, l_hi = _bounds(layers, "layers", 1)

    @st.composite
    def draw_steps(draw) -> list[torch.Tensor]:
        L = draw(st.integers(l_lo, l_hi))
        one_step = loads_of(topology, layers=L, **loads_options)
        return draw(st.lists(one_step, min_size=s_lo, max_size=s_hi))

    return draw_steps()


def topology_and_loads(
    topologies: st.SearchStrategy[Topology] | None = None,
    loads: Callable[..., st.SearchStrategy[torch.Tensor]] | None = None,
    **loads_options,
) -> st.SearchStrategy[tuple[Topology, torch.Tensor]]:
    """``(topology, loads [M, L, E])`` pairs, what ``policy.plan`` takes: a topology from
    ``topologies`` (default: :func:`topologies` with its defaults), then loads for it from
    ``loads(topology, **loads_options)`` (default: :func:`loads`)."""
    topologies = _default_topologies() if topologies is None else topologies
    loads_of = _default_loads if loads is None else loads
    return topologies.flatmap(lambda topology: st.tuples(st.just(topology), loads_of(topology, **loads_options)))


@functools.lru_cache(maxsize=1024)
def _tokens(E: int, L: int, K: int, padding: bool, t_lo: int, t_hi: int) -> st.SearchStrategy[list]:
    """Lists of ``t_lo..t_hi`` routed tokens ``[L, K]`` (nested lists), with a dropped slot (-1) now
    and then under ``padding``. A list, not an array of drawn length, so that the shrinker deletes
    whole tokens."""
    picks = st.lists(st.integers(0, E - 1), min_size=K, max_size=K, unique=True)
    if padding:
        picks = st.tuples(picks, st.lists(_rarely, min_size=K, max_size=K)).map(
            lambda case: [PAD if dropped else e for e, dropped in zip(*case)])
    return st.lists(st.lists(picks, min_size=L, max_size=L), min_size=t_lo, max_size=t_hi)


def routes(
    topology: Topology | int,
    *,
    tokens: Bound = (0, 16),
    layers: Bound = (1, 3),
    top_k: Bound = (1, 4),
    padding: bool = True,
) -> st.SearchStrategy[torch.Tensor]:
    """Rollout-routing-replay routes of one sequence: int64 ``[T, L, K]`` expert ids.

    Every token picks ``K`` distinct experts in every layer, as a top-k router does; with
    ``padding``, single slots (a dropped route) and whole tokens after the routed ones (a
    right-padded sequence) may be -1, which every count ignores (:data:`~relibra.routing.routes.PAD`).

    Args:
        topology: a Topology (its ``num_experts``) or E itself.
        tokens: T (0 allowed: an empty sequence).
        layers: L MoE layers (an int fixes it, as the sequences of one step need).
        top_k: K, capped at E.
        padding: whether -1 entries may appear.

    Shrinks toward few tokens, one layer, the smallest K, low expert ids and no padding.
    """
    E = _num_experts(topology, "routes")
    t_lo, t_hi = _bounds(tokens, "tokens", 0)
    l_lo, l_hi = _bounds(layers, "layers", 1)
    k_lo, k_hi = _bounds(top_k, "top_k", 1)
    if k_lo > E:
        raise ValueError(f"top_k={top_k!r} asks for more distinct experts than the {E} there are")
    k_hi = min(k_hi, E)

    @st.composite
    def draw_routes(draw) -> torch.Tensor:
        L, K = draw(st.integers(l_lo, l_hi)), draw(st.integers(k_lo, k_hi))
        routes_TLK = np.array(draw(_tokens(E, L, K, padding, t_lo, t_hi)), dtype=np.int64).reshape(-1, L, K)
        if padding:  # right padding: whole tokens of -1 after the routed ones
            padded = draw(st.integers(0, t_hi - routes_TLK.shape[0]))
            routes_TLK = np.concatenate([routes_TLK, np.full((padded, L, K), PAD, dtype=np.int64)])
        return torch.from_numpy(routes_TLK)

    return draw_routes()
