"""EPLB placed into relibra's memory model: one home per expert, replicas in spare slots.

Legend:

    L  layers      E  logical experts      G  GPUs       S  spare slots per GPU
    U  packing units: the N nodes (hierarchical) or the whole group (global)
    g  GPUs per unit       n  experts per unit (= g * H, H home slots per GPU)
    B  rows = L * U        K  replicas per unit (= g * S)

DeepSeek's last step packs all physical experts of a node onto its GPUs without telling a
home copy from a replica, and may put two copies of one expert on one GPU. A relibra plan
needs exactly H homes and S spare slots per GPU and never two copies on one GPU. So:

1. groups to nodes exactly as EPLB (hierarchical), or one unit (global);
2. replica counts exactly as EPLB, except that an expert gets at most ``g`` copies (one per
   GPU of its unit); a slot no expert can take stays empty;
3. homes first: every expert's one home copy (load per copy) longest-first onto the
   lightest GPU with a free home slot;
4. then replicas longest-first onto the lightest GPU with a free spare slot that does not
   hold the expert yet. A replica that finds no such GPU is dropped, and each spare slot
   left free is then given to the expert with most load per copy that the GPU does not
   hold (the same rule as step 2).
"""

from __future__ import annotations

import numpy as np
import torch

from .eplb_algorithm import _inverse, balanced_packing, group_node_map, replicate_experts

__all__ = ["place_home_aware"]


def place_home_aware(
    weight_LE: torch.Tensor,
    num_nodes: int,
    gpus_per_node: int,
    spare_slots_per_gpu: int,
    num_groups: int,
    hierarchical: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EPLB's replicas and node packing, placed home-aware (see the module docstring).

    Args:
        weight_LE: ``[L, E]`` float64 load of every expert (>= 0).
        num_nodes, gpus_per_node, spare_slots_per_gpu: the topology.
        num_groups: expert groups; hierarchical needs ``num_groups % num_nodes == 0``.
        hierarchical: pack groups to nodes and keep replicas in their node; else global.
    Returns:
        ``home_gpu [L, E]`` GPU homing each expert (exactly ``E / G`` per GPU) and
        ``spare_experts [L, G*S]`` expert in each spare slot (slot ``r`` on GPU ``r // S``),
        -1 when empty. No GPU holds two copies of one expert.
    """
    L, E = weight_LE.shape
    G, S = num_nodes * gpus_per_node, spare_slots_per_gpu
    U = num_nodes if hierarchical else 1
    g, n = G // U, E // U
    if hierarchical:
        log2mlog = group_node_map(weight_LE, num_groups, num_nodes)
    else:
        log2mlog = torch.arange(E).expand(L, E).clone()
    mlog2log = _inverse(log2mlog)
    w_BN = weight_LE.gather(1, mlog2log).view(L * U, n)
    phy2mlog, _, cnt = replicate_experts(w_BN, n + g * S, max_copies=g)
    per_copy = w_BN / cnt.to(torch.float64)
    home_local, _ = balanced_packing(per_copy, g)  # [B, n] GPU inside the unit
    spare_local = _pack_replicas(w_BN, cnt, per_copy, home_local, phy2mlog[:, n:], g, S)
    unit_gpu0 = (torch.arange(U) * g).repeat(L)[:, None]  # [B, 1]
    unit_expert0 = (torch.arange(U) * n).repeat(L)[:, None]
    home_gpu_mlog = (home_local + unit_gpu0).view(L, E)
    home_gpu = home_gpu_mlog.gather(1, log2mlog)
    spare_mlog = torch.where(spare_local >= 0, spare_local + unit_expert0, -1).view(L, G * S)
    spare = torch.where(spare_mlog >= 0, mlog2log.gather(1, spare_mlog.clamp(min=0)), -1)
    return home_gpu, spare


def _pack_replicas(
    w_BN: torch.Tensor,
    cnt_BN: torch.Tensor,
    per_copy_BN: torch.Tensor,
    home_BN: torch.Tensor,
    extra_BK: torch.Tensor,
    g: int,
    S: int,
) -> torch.Tensor:
    """Replicas longest-first into spare slots; returns ``[B, g*S]`` unit-local experts, -1 empty."""
    B, n = w_BN.shape
    K = g * S
    spare = np.full((B, K), -1, dtype=np.int64)
    if K == 0:
        return torch.from_numpy(spare)
    w = w_BN.numpy()
    cnt = cnt_BN.numpy().astype(np.float64)
    per_copy = per_copy_BN.numpy()
    rows = np.arange(B)
    load = np.zeros((B, g))
    np.add.at(load, (rows[:, None], home_BN.numpy()), per_copy)
    holds = np.zeros((B, n, g), dtype=bool)  # holds[b, e, gpu]
    holds[rows[:, None], np.arange(n)[None, :], home_BN.numpy()] = True
    room = np.full((B, g), S, dtype=np.int64)
    extra = extra_BK.numpy()  # [B, K] experts given replicas, -1 empty
    item_w = np.where(extra >= 0, per_copy[rows[:, None], extra.clip(min=0)], -np.inf)
    order = np.argsort(-item_w, axis=1, kind="stable")  # heaviest first, ties by slot order
    for i in range(K):
        e = extra[rows, order[:, i]]
        has = e >= 0
        ec = e.clip(min=0)
        free = (room > 0) & ~holds[rows, ec]
        key = np.where(free, load, np.inf)
        gpu = key.argmin(axis=1)
        ok = has & free[rows, gpu]
        cnt[rows, ec] -= has & ~ok  # dropped: no GPU with room lacks this expert
        _put(spare, room, load, holds, rows[ok], gpu[ok], ec[ok], item_w[rows, order[:, i]][ok], S)
    # refill spare slots left free with the most loaded expert (per copy) the GPU lacks
    for _ in range(K):
        has_room = room > 0
        if not has_room.any():
            break
        gpu = np.where(has_room, load, np.inf).argmin(axis=1)
        live = has_room[rows, gpu]
        score = np.where(holds[rows, :, gpu], -np.inf, w / (cnt + 1.0))
        e = score.argmax(axis=1)
        ok = live & (score[rows, e] > -np.inf)
        room[rows[live & ~ok], gpu[live & ~ok]] = 0  # this GPU already holds every expert
        cnt[rows[ok], e[ok]] += 1.0
        _put(spare, room, load, holds, rows[ok], gpu[ok], e[ok], (w / cnt)[rows[ok], e[ok]], S)
    return torch.from_numpy(spare)


def _put(spare, room, load, holds, rows, gpu, expert, weight, S) -> None:
    """Place replicas of ``expert`` on ``gpu`` (one per listed row) in its next free spare slot."""
    if rows.size == 0:
        return
    spare[rows, gpu * S + (S - room[rows, gpu])] = expert
    room[rows, gpu] -= 1
    load[rows, gpu] += weight
    holds[rows, expert, gpu] = True
