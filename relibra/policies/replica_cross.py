"""Cross-node replicas: a node that cannot absorb its hot experts exports tokens to other nodes' spare slots.

Legend (see :mod:`relibra.policies.replica_problems`):

    Q  (micro-batch, layer) problems = M * L          N  nodes       Gn  GPUs per node
    G  GPUs = N * Gn          H  home slots per GPU   S  spare slots per GPU
    I  home slots per node = Gn * H                   B  node problems = Q * N (b = q * N + n)
    C  (micro-batch, layer) problems that try exports Sn spare slots per node = Gn * S

Intra-node replicas balance the GPUs of a node to (about) its own mean; they cannot lower a node
whose load is above the group's mean, so the busiest GPU of a (micro-batch, layer) sits in its
busiest node. :func:`plan_with_cross_node` lets such a node export: its hottest expert gets a
replica in an empty spare slot of another node, taking a share of the expert's tokens (a
cross-node replica: its weights come over the inter-node link, its gradient goes back). Per
(micro-batch, layer), with the level ``T = ceil(total / G) + slack``:

1. Nodes with room (load at most ``Gn * T``) are balanced only down to ``T``, each move on
   the GPU whose room fits it most tightly
   (:func:`~relibra.policies.replica_exports.fill_to_target`): the GPUs with most room keep
   their spare slots empty. A node this does not bring down to ``T`` gets the intra-node plan.
2. The node furthest above ``Gn * T`` exports its hottest expert to the GPU with the most room
   and an empty spare slot on another node, one per round
   (:func:`~relibra.policies.replica_exports.plan_exports`); one cross-node replica per GPU.
3. The nodes above ``Gn * T`` are solved again by the intra-node solver with their experts'
   shares lowered by what they exported.
4. The result replaces the intra-node plan only where its busiest GPU is lower by more than
   ``price * units`` tokens (:func:`cross_node_units`; ``price`` from :func:`cross_node_price`).
   Elsewhere the plan is the intra-node one, bit for bit. The intra-node plan is solved only
   where needed: where no cross-node replica can pay (``ceil(busiest node / Gn) - ceil(total /
   G) <= price``) and where the cross-node result does not beat ``ceil(busiest node / Gn)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .replica_exports import Exports, fill_to_target, plan_exports
from .replica_greedy import greedy_replicas
from .replica_problems import assemble, node_rows

__all__ = ["cross_node_price", "DEEPSEEK_V3_H100", "cross_node_units", "plan_with_cross_node", "CROSS_NODE_ROUNDS",
           "CROSS_NODE_SLACK"]

#: what :func:`cross_node_price` assumes when the caller does not say: a DeepSeek-V3 expert
#: (intermediate 2048) on H100-class GPUs (989 TFLOP/s bf16 at 50 % MFU), relibra.sim.cost's
#: default byte sizes and overlaps
DEEPSEEK_V3_H100 = dict(expert_intermediate=2048, effective_flops=989e12 * 0.5, backward_factor=2.0,
                        weight_bytes=2.0, replica_grad_bytes=2.0, replica_overlap=0.5, a2a_bytes=2.0,
                        a2a_overlap=0.0)
#: the export greedy stops after this many rounds (each gives every problem still exporting one
#: more receiving GPU): a deterministic bound on its time
CROSS_NODE_ROUNDS = 64
#: the level aimed at is ``ceil(total / G)`` plus this fraction of it: a little above the
#: perfect level, nodes with room keep more of their GPUs' room for imports
CROSS_NODE_SLACK = 0.02

Solver = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray, np.ndarray, int]]


def cross_node_price(num_nodes: int, gpus_per_node: int, inter_node_bandwidth: float, expert_intermediate: float,
                     effective_flops: float, backward_factor: float, weight_bytes: float, replica_grad_bytes: float,
                     replica_overlap: float, a2a_bytes: float, a2a_overlap: float) -> float:
    """Token copies on the busiest GPU that one cross-node replica costs, as relibra.sim.cost prices them.

    One replica's weights arrive and its gradient leaves over the inter-node link, net of
    overlap: ``3 * hidden * I * (weight_bytes + replica_grad_bytes) * (1 - replica_overlap) /
    bandwidth`` seconds. One token copy less on the busiest GPU saves its expert compute
    (``2 * 3 * hidden * I * (1 + backward_factor) / flops``) and its share of the four token
    transfers over the inter-node link (``4 * hidden * a2a_bytes * (G - Gn) / G * (1 -
    a2a_overlap) / bandwidth``). ``hidden`` cancels. With one node there is nothing to price: inf.
    """
    if num_nodes < 2:
        return float("inf")
    G = num_nodes * gpus_per_node
    replica_s = 3.0 * expert_intermediate * (weight_bytes + replica_grad_bytes) * (1.0 - replica_overlap)
    replica_s /= inter_node_bandwidth
    copy_s = 6.0 * expert_intermediate * (1.0 + backward_factor) / effective_flops
    copy_s += 4.0 * a2a_bytes * (G - gpus_per_node) / G * (1.0 - a2a_overlap) / inter_node_bandwidth
    return replica_s / copy_s


def cross_node_units(exports: Exports, num_tried: int, num_gpus: int, home_per_gpu: int) -> np.ndarray:
    """``[C]`` cross-node weight copies the slowest GPU sends or receives, per tried problem.

    A receiving GPU gets one copy (one cross-node replica per GPU at most); a home GPU sends
    each exported expert once however many nodes take it (a broadcast tree, as relibra.sim.cost
    prices it), so the busiest sender counts its distinct exported experts. 0: no export.
    """
    units = np.zeros(num_tried, np.int64)
    units[exports.problem] = 1
    exported = np.zeros((num_tried, num_gpus * home_per_gpu), bool)
    exported[exports.problem, exports.item] = True  # distinct (problem, expert)
    return np.maximum(units, exported.reshape(num_tried, num_gpus, home_per_gpu).sum(-1).max(-1))


class _NodePlans:
    """Per-node results of some node problems, problem-first: ``h [B, I]`` (tokens each home copy
    keeps), ``rep`` and ``x [B, Sn]``."""

    def __init__(self, B: int, I: int, Sn: int) -> None:
        self.h = np.zeros((B, I), np.int64)
        self.rep = np.full((B, Sn), -1, np.int64)
        self.x = np.zeros((B, Sn), np.int64)

    def put(self, nodes: np.ndarray, h_IB: np.ndarray, rep_SB: np.ndarray, x_SB: np.ndarray) -> None:
        """Store the problem-last results of ``nodes`` (the solvers' layout)."""
        self.h[nodes], self.rep[nodes], self.x[nodes] = h_IB.T, rep_SB.T, x_SB.T

    def put_rows(self, nodes: np.ndarray, h_BI: np.ndarray, rep_BS: np.ndarray, x_BS: np.ndarray) -> None:
        """Store problem-first results of ``nodes``."""
        self.h[nodes], self.rep[nodes], self.x[nodes] = h_BI, rep_BS, x_BS

    def gpu_loads(self, nodes: np.ndarray, Gn: int) -> np.ndarray:
        """``[len(nodes), Gn]`` load of every GPU."""
        return self.h[nodes].reshape(nodes.size, Gn, -1).sum(-1) + self.x[nodes].reshape(nodes.size, Gn, -1).sum(-1)

    def rows(self, nodes: np.ndarray, home_experts_LE: torch.Tensor, L: int, N: int, Gn: int
             ) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``nodes`` in the plan: ``spare [b, Sn]`` (logical expert, -1 empty; replicas
        with no tokens dropped) and ``tokens [b, Gn*(H+S)]``, as
        :func:`~relibra.policies.replica_problems.node_rows` lays them out."""
        I = self.h.shape[1]
        x = self.x[nodes]
        rep = np.where(x > 0, self.rep[nodes], -1)
        first = ((nodes // N) % L) * (N * I) + (nodes % N) * I  # flat placement index of each node's slot 0
        logical = home_experts_LE.numpy().reshape(-1).take(first[:, None] + np.maximum(rep, 0))
        tokens = np.concatenate([self.h[nodes].reshape(nodes.size, Gn, -1), x.reshape(nodes.size, Gn, -1)], 2)
        return np.where(rep >= 0, logical, -1), tokens.reshape(nodes.size, -1)


def plan_with_cross_node(hshare_BGH: np.ndarray, home_experts_LE: torch.Tensor, M: int, L: int, N: int, S: int,
                         price: float, solve: Solver) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The plan of every node problem (module docstring), as ``spare_experts [M, L, G*S]``,
    ``slot_tokens [M, L, P]`` and what was done (``plan.info``: ``cross_node_layers``,
    ``cross_node_replicas``, ``cross_node_tried``; ``budget_cut`` says when the export greedy
    stopped at :data:`CROSS_NODE_ROUNDS` with exports left to make).

    Args:
        hshare_BGH: ``[B, Gn, H]`` home-expert loads of every node problem.
        solve: the intra-node solver (:func:`~relibra.policies.replica_solve.solve_node_problems`
            with its options bound), called on ``[B', Gn, H]`` problems.
    """
    B, Gn, H = hshare_BGH.shape
    Q, I, G, Sn = M * L, Gn * H, N * Gn, Gn * S
    share_QNI = hshare_BGH.reshape(Q, N, I)
    node_load = share_QNI.sum(-1)  # [Q, N]
    fair = -(-node_load.sum(1) // G)  # ceil(total / G): no plan goes below it
    bound = (-(-node_load // Gn)).max(1)  # no intra-node plan goes below it
    tried = np.flatnonzero(bound - fair > price)  # elsewhere no cross-node replica can pay
    info = dict(cross_node_tried=int(tried.size), cross_node_layers=0, cross_node_replicas=0, budget_cut="")
    accept = np.zeros(Q, bool)
    if tried.size:
        cross = _NodePlans(B, I, Sn)
        exports, cost = _try_exports(hshare_BGH, share_QNI, tried, fair, Gn, S, price, solve, cross)
        if exports.rounds >= CROSS_NODE_ROUNDS:
            info["budget_cut"] = f"cross-node exports stopped after {CROSS_NODE_ROUNDS} rounds"
        accept[tried] = cost < bound[tried]  # better than any intra-node plan
    # the intra-node plan wherever the cross-node one is not sure to win (everywhere, when that is
    # most problems: one plan to overwrite costs less than two to merge)
    unsure = np.flatnonzero(~accept) if 2 * accept.sum() > Q else np.arange(Q)
    nodes = (unsure[:, None] * N + np.arange(N)).reshape(-1)
    h, rep, x, _ = solve(torch.from_numpy(hshare_BGH[nodes]))
    check = np.flatnonzero(~accept[tried])  # tried problems, as rows of ``tried``
    if check.size:
        level = (h.reshape(Gn, H, -1).sum(1) + x.reshape(Gn, S, -1).sum(1)).max(0).reshape(-1, N).max(1)
        accept[tried[check]] = cost[check] < level[np.searchsorted(unsure, tried[check])]
    if unsure.size == Q:
        spare_t, tokens_t = assemble(h, rep, x, home_experts_LE, M, L, N, Gn, S)
        spare, tokens = spare_t.view(B, Sn).numpy(), tokens_t.view(B, -1).numpy()
    else:
        spare, tokens = np.empty((B, Sn), np.int64), np.empty((B, Gn * (H + S)), np.int64)
        spare[nodes], tokens[nodes] = node_rows(h, rep, x, home_experts_LE, nodes, L, N, Gn, S)
    if not accept.any():
        return spare_t, tokens_t, info
    taken = (np.flatnonzero(accept)[:, None] * N + np.arange(N)).reshape(-1)
    spare[taken], tokens[taken] = cross.rows(taken, home_experts_LE, L, N, Gn)
    placed = _place_imports(exports, tried, accept, cross, spare.reshape(Q, -1), tokens.reshape(Q, -1),
                            home_experts_LE, N, Gn, H, S)
    info.update(cross_node_layers=int(accept.sum()), cross_node_replicas=placed)
    return torch.from_numpy(spare).view(M, L, -1), torch.from_numpy(tokens).view(M, L, -1), info


def _try_exports(hshare_BGH: np.ndarray, share_QNI: np.ndarray, tried: np.ndarray, fair: np.ndarray, Gn: int,
                 S: int, price: float, solve: Solver, cross: _NodePlans) -> tuple[Exports, np.ndarray]:
    """Steps 1-3 of the module docstring on the ``tried`` problems: their cross-node plan goes into
    ``cross``. Returns the exports and, per tried problem, its busiest GPU plus ``price * units``
    (inf where nothing was exported)."""
    C, (_, N, I), H = tried.size, share_QNI.shape, hshare_BGH.shape[2]
    target = fair[tried] + np.ceil(fair[tried] * CROSS_NODE_SLACK).astype(np.int64)
    nodes = (tried[:, None] * N + np.arange(N)).reshape(-1)  # [C*N]
    node_target = np.repeat(target, N)
    light = share_QNI[tried].sum(-1).reshape(-1) <= Gn * node_target
    # 1. nodes with room: down to the target only; the rest of them get their intra-node plan
    lit = nodes[light]
    h_l = hshare_BGH[lit].reshape(-1, I)  # a copy, problem-first
    if S == 1:
        cross.put_rows(lit, h_l, *fill_to_target(h_l, Gn, node_target[light]))
    else:  # the direct greedy rule with the target: the GPUs it does not fill keep free slots
        h_l = np.ascontiguousarray(h_l.T)
        rep_l, x_l, _ = greedy_replicas(h_l, Gn, S, target=node_target[light])
        cross.put(lit, h_l, rep_l, x_l)
    failed = lit[cross.gpu_loads(lit, Gn).max(1) > node_target[light]]
    if failed.size:
        cross.put(failed, *solve(torch.from_numpy(hshare_BGH[failed]))[:3])
    # 2. exports from the nodes above the target into the empty slots of the others
    load = np.zeros((C * N, Gn), np.int64)
    load[light] = cross.gpu_loads(lit, Gn)
    free = np.zeros((C * N, Gn), bool)
    free[light] = (cross.x[lit] == 0).reshape(-1, Gn, S).any(-1)
    exports = plan_exports(share_QNI[tried], load.reshape(C, -1), free.reshape(C, -1), target, Gn,
                           CROSS_NODE_ROUNDS)
    # 3. the nodes above the target, solved with what they exported taken off
    heavy = np.flatnonzero(~light)  # positions in nodes
    at = exports.problem * (N * I) + exports.item  # flat (tried problem, node, item)
    lowered = (hshare_BGH[nodes].reshape(-1) - np.bincount(at, exports.amount, C * N * I).astype(np.int64))
    lowered = lowered.reshape(C * N, I)[heavy]
    heavy = nodes[heavy]
    h_h, rep_h, x_h, _ = solve(torch.from_numpy(lowered.reshape(-1, Gn, H)), greedy_split=True)
    cross.put(heavy, h_h, rep_h, x_h)
    level = np.empty(C * N, np.int64)
    level[~light] = (h_h.reshape(Gn, H, -1).sum(1) + x_h.reshape(Gn, S, -1).sum(1)).max(0)
    imported = load.reshape(-1).copy()
    imported[exports.problem * (N * Gn) + exports.gpu] += exports.amount  # one import per GPU at most
    level[light] = imported.reshape(C * N, Gn)[light].max(1)
    units = cross_node_units(exports, C, N * Gn, H)
    cost = np.where(units > 0, level.reshape(C, N).max(1) + price * units, np.inf)
    return exports, cost


def _place_imports(exports: Exports, tried: np.ndarray, accept: np.ndarray, cross: _NodePlans, spare_QR: np.ndarray,
                   tokens_QP: np.ndarray, home_experts_LE: torch.Tensor, N: int, Gn: int, H: int, S: int) -> int:
    """Write the accepted problems' cross-node replicas into ``spare_QR [Q, G*S]`` and ``tokens_QP
    [Q, P]`` (the receiving GPU's first empty spare slot); returns how many."""
    q = tried[exports.problem]
    ok = accept[q]
    q, g, item, amount = q[ok], exports.gpu[ok], exports.item[ok], exports.amount[ok]
    if q.size == 0:
        return 0
    L, E = home_experts_LE.shape
    empty = (cross.x[q * N + g // Gn] == 0).reshape(q.size, Gn, S)[np.arange(q.size), g % Gn]  # [X, S]
    slot = empty.argmax(1)
    spare_QR[q, g * S + slot] = home_experts_LE.numpy().reshape(-1)[(q % L) * E + item]
    tokens_QP[q, g * (H + S) + H + slot] = amount
    return int(q.size)
