"""Replica weights per micro-batch: spare slots fetch their expert from its home rank.

Legend: E experts, G ranks, H home / S spare slots per rank, F = 2*hidden, D dim.

Every rank knows the placement and the replica plan, so the send/receive layout is computed
locally (no counts exchange). Rows of the fused weight (``gate_up`` and ``down`` of one expert
flattened side by side) travel by ``all_to_all_single`` in its autograd form over the node's
group when every replica sits in its expert's home node (the EP group otherwise). Backward of
that all-to-all returns each replica's gradient to the home rank, where the ``index_select``
that picked the rows ADDS it into the home expert's gradient: the optimizer only sees homes.
"""

from __future__ import annotations

import torch

from ..topology import Topology

__all__ = ["ReplicaRoute", "replica_route", "fetch_replicas"]


class ReplicaRoute:
    """Send/receive layout of one layer's replica fetch for one rank (plain host data).

    Attributes:
        send_rows: home-slot indices (``0..H-1``) to send, ordered by destination group rank.
        send_splits / recv_splits: rows per group rank.
        recv_slots: spare-slot index (``0..S-1``) of every received row, in receive order.
        group_ranks: EP ranks of the group used, in group-rank order.
    """

    def __init__(self, send_rows, send_splits, recv_splits, recv_slots, group_ranks):
        self.send_rows, self.send_splits = send_rows, send_splits
        self.recv_splits, self.recv_slots, self.group_ranks = recv_splits, recv_slots, group_ranks


def replica_route(home_experts_K: torch.Tensor, spare_experts_R: torch.Tensor, topology: Topology,
                  rank: int, intra_node: bool) -> ReplicaRoute:
    """Layout for EP rank ``rank`` given the layer's home row ``[G*H]`` and spare row ``[G*S]``."""
    G, H, S = topology.num_gpus, topology.home_slots_per_gpu, topology.spare_slots_per_gpu
    if intra_node:
        ranks = list(topology.gpus_of_node(topology.node_of_gpu(rank)))
    else:
        ranks = list(range(G))
    home_slot = torch.empty_like(home_experts_K)
    home_slot[home_experts_K] = torch.arange(home_experts_K.numel())
    spare = spare_experts_R.tolist()
    hs = home_slot.tolist()
    send_rows, send_splits, recv_splits, recv_slots = [], [], [], []
    for peer in ranks:
        # what `peer` needs from me: its spare slots whose expert homes on `rank`
        n = 0
        for j in range(S):
            e = spare[peer * S + j]
            if e >= 0 and hs[e] // H == rank:
                if peer == rank:
                    raise ValueError(f"rank {rank} holds a replica of its own home expert {e}")
                send_rows.append(hs[e] % H)
                n += 1
        send_splits.append(n)
        # what I need from `peer`
        n = 0
        for j in range(S):
            e = spare[rank * S + j]
            if e >= 0 and hs[e] // H == peer:
                recv_slots.append(j)
                n += 1
        recv_splits.append(n)
    needed = sum(1 for j in range(S) if spare[rank * S + j] >= 0)
    if sum(recv_splits) != needed:
        raise ValueError(f"rank {rank}: a replica's home is outside the group of ranks {ranks} "
                         "(plan promises intra-node replicas but breaks it)")
    return ReplicaRoute(send_rows, send_splits, recv_splits, recv_slots, ranks)


def fetch_replicas(gate_up_HFD: torch.Tensor, down_HDI: torch.Tensor, route: ReplicaRoute,
                   num_spare: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Spare-slot weights ``([S, F, D], [S, D, I])`` of this rank (zeros in empty slots).

    Differentiable: gradients of the returned weights add into ``gate_up_HFD`` / ``down_HDI``
    on the home ranks.
    """
    from .dispatch import all_to_all_autograd

    H, F_, D = gate_up_HFD.shape
    I = down_HDI.shape[2]
    rows = torch.tensor(route.send_rows, dtype=torch.int64, device=gate_up_HFD.device)
    n = rows.numel()  # copy only the rows that travel
    send = torch.cat([gate_up_HFD.index_select(0, rows).reshape(n, F_ * D),
                      down_HDI.index_select(0, rows).reshape(n, D * I)], 1)
    fused = send
    recv = all_to_all_autograd(send, route.recv_splits, route.send_splits, group)
    slots = torch.tensor(route.recv_slots, dtype=torch.int64, device=fused.device)
    spare = fused.new_zeros(num_spare, fused.shape[1]).index_copy(0, slots, recv)
    return spare[:, : F_ * D].reshape(num_spare, F_, D), spare[:, F_ * D:].reshape(num_spare, D, I)


def fetch_replicas_many(weights: list[tuple[torch.Tensor, torch.Tensor]], routes: list[ReplicaRoute],
                        num_spare: int, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`fetch_replicas` for several layers in ONE all-to-all (1-D, element splits).

    ``weights[i] = (gate_up_HFD, down_HDI)`` and ``routes[i]`` of layer i (same group ranks,
    same dtype). Returns every layer's ``(spare_gate_up [S, F, D], spare_down [S, D, I])``.
    The backward is one all-to-all too, run once every layer's replica gradient is in.
    """
    from .dispatch import all_to_all_autograd

    Q, L = len(routes[0].group_ranks), len(routes)
    numel = [gu[0].numel() + dn[0].numel() for gu, dn in weights]
    per_layer = []
    for (gu, dn), r in zip(weights, routes):
        rows = torch.tensor(r.send_rows, dtype=torch.int64, device=gu.device)
        n = rows.numel()
        fused = torch.cat([gu.index_select(0, rows).reshape(n, gu[0].numel()),
                           dn.index_select(0, rows).reshape(n, dn[0].numel())], 1)
        per_layer.append(fused.split(list(r.send_splits)))
    send = torch.cat([per_layer[l][q].reshape(-1) for q in range(Q) for l in range(L)])
    send_splits = [sum(routes[l].send_splits[q] * numel[l] for l in range(L)) for q in range(Q)]
    recv_sizes = [routes[l].recv_splits[q] * numel[l] for q in range(Q) for l in range(L)]
    recv_splits = [sum(recv_sizes[q * L:(q + 1) * L]) for q in range(Q)]
    recv = all_to_all_autograd(send, recv_splits, send_splits, group)
    pieces = recv.split(recv_sizes)
    out = []
    for l, ((gu, dn), r) in enumerate(zip(weights, routes)):
        got = torch.cat([pieces[q * L + l].view(-1, numel[l]) for q in range(Q)])
        slots = torch.tensor(r.recv_slots, dtype=torch.int64, device=gu.device)
        spare = got.new_zeros(num_spare, numel[l]).index_copy(0, slots, got)
        F_, D = gu.shape[1:]
        out.append((spare[:, :F_ * D].reshape(num_spare, F_, D), spare[:, F_ * D:].reshape(num_spare, *dn.shape[1:])))
    return out
