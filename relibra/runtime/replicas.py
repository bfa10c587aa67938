"""Replica transfers: spare slots receive their expert's weights from its home rank; gradients go back.

Legend: E experts, G ranks, H home / S spare slots per rank, W elements of one expert's fused
weights (``gate_up [F, D]`` and ``down [D, I]`` flattened side by side), L layers.

Every rank knows the placement and the replica plan, so the send/receive layout of a transfer
(:func:`replica_route`) is computed locally, with no counts exchange. :func:`exchange_rows` moves
the rows of several layers in ONE ``all_to_all_single`` over the node's group when every replica
sits in its expert's home node (the EP group otherwise); it is not differentiable: when replica
weights go out and when their gradients come home is decided by
:class:`relibra.runtime.replica_cache.ReplicaCache`, which calls it the other way round (a
replica's accumulated gradient travels from the spare slot to the home rank, where it is added
into the home expert's gradient: the optimizer only sees homes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..topology import Topology

__all__ = ["ReplicaRoute", "replica_route", "exchange_rows"]


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


def exchange_rows(rows: list[torch.Tensor], send_splits: list[list[int]], recv_splits: list[list[int]],
                  group) -> list[torch.Tensor]:
    """Send ``rows[l] [n_l, W_l]`` of several layers to the group's ranks in ONE all-to-all.

    ``send_splits[l][q]`` rows of layer l go to group rank q (in row order), ``recv_splits[l][q]``
    rows of layer l come from q. Returns every layer's received rows ``[m_l, W_l]`` ordered by
    source rank. One dtype and device for all layers. Not differentiable; no host read of a device
    value (every size is given).
    """
    L, Q = len(rows), len(send_splits[0]) if send_splits else 0
    width = [r.shape[1] for r in rows]
    pieces = [r.split(list(s)) for r, s in zip(rows, send_splits)]
    send = torch.cat([pieces[l][q].reshape(-1) for q in range(Q) for l in range(L)]) if L else None
    out_sizes = [recv_splits[l][q] * width[l] for q in range(Q) for l in range(L)]
    in_splits = [sum(send_splits[l][q] * width[l] for l in range(L)) for q in range(Q)]
    out_splits = [sum(out_sizes[q * L:(q + 1) * L]) for q in range(Q)]
    recv = send.new_empty(sum(out_splits))
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    got = recv.split(out_sizes)
    return [torch.cat([got[q * L + l].view(-1, width[l]) for q in range(Q)]) for l in range(L)]
