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

from .eplb_algorithm import group_node_map, inverse_perm, pack_array, replicate_array

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
    w_LE = weight_LE.detach().to(device="cpu", dtype=torch.float64).numpy() if isinstance(
        weight_LE, torch.Tensor) else np.asarray(weight_LE, dtype=np.float64)
    L, E = w_LE.shape
    G, S = num_nodes * gpus_per_node, spare_slots_per_gpu
    U = num_nodes if hierarchical else 1
    g, n = G // U, E // U
    identity = not hierarchical or num_groups == num_nodes  # node-major order is expert order
    if identity:
        w_BN = np.ascontiguousarray(w_LE).reshape(L * U, n)
    else:
        log2mlog = group_node_map(w_LE, num_groups, num_nodes)
        mlog2log = inverse_perm(log2mlog)
        w_BN = np.take_along_axis(w_LE, mlog2log, 1).reshape(L * U, n)
    phy2mlog, _, cnt = replicate_array(w_BN, n + g * S, max_copies=g)
    per_copy = w_BN / cnt
    home_local, _ = pack_array(per_copy, g)  # [B, n] GPU inside the unit
    spare_local = _pack_replicas(w_BN, cnt, per_copy, home_local, phy2mlog[:, n:], g, S)
    home_gpu = (home_local.reshape(L, U, n) + (np.arange(U) * g)[:, None]).reshape(L, E)
    spare = spare_local.reshape(L, U, g * S) + (np.arange(U) * n)[:, None]
    spare = np.where(spare_local.reshape(L, U, g * S) >= 0, spare, -1).reshape(L, G * S)
    if not identity:
        home_gpu = np.take_along_axis(home_gpu, log2mlog, 1)
        spare = np.where(spare >= 0, np.take_along_axis(mlog2log, spare.clip(min=0), 1), -1)
    return torch.from_numpy(home_gpu), torch.from_numpy(spare)


def _pack_replicas(
    w_BN: np.ndarray,
    cnt_BN: np.ndarray,
    per_copy_BN: np.ndarray,
    home_BN: np.ndarray,
    extra_BK: np.ndarray,
    g: int,
    S: int,
) -> np.ndarray:
    """Replicas longest-first into spare slots; returns ``[B, g*S]`` unit-local experts, -1 empty."""
    B, n = w_BN.shape
    K = g * S
    spare = np.full((B, K), -1, dtype=np.int64)
    if K == 0:
        return spare
    w = w_BN
    cnt = cnt_BN.astype(np.float64)
    per_copy = per_copy_BN
    rows = np.arange(B)
    load = np.zeros((B, g))
    np.add.at(load, (rows[:, None], home_BN), per_copy)
    holds = np.zeros((B, n, g), dtype=bool)  # holds[b, e, gpu]
    holds[rows[:, None], np.arange(n)[None, :], home_BN] = True
    room = np.full((B, g), S, dtype=np.int64)
    extra = extra_BK  # [B, K] experts given replicas, -1 empty
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
    return spare


def _put(spare, room, load, holds, rows, gpu, expert, weight, S) -> None:
    """Place replicas of ``expert`` on ``gpu`` (one per listed row) in its next free spare slot."""
    if rows.size == 0:
        return
    spare[rows, gpu * S + (S - room[rows, gpu])] = expert
    room[rows, gpu] -= 1
    load[rows, gpu] += weight
    holds[rows, expert, gpu] = True
