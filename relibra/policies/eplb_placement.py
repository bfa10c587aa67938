"""EPLB placed into relibra's memory model: one home per expert, replicas in spare slots.

Legend:

    L  layers      E  logical experts      G  GPUs       H  home slots per GPU
    S  spare slots per GPU                 U  packing units: the N nodes (hierarchical) or one
    g  GPUs per unit (G / U)               n  experts per unit (E / U = g * H)
    B  rows = L * U                        r  spare slots per unit (g * S)

DeepSeek's last step packs all physical copies of a node onto its GPUs without telling a home
copy from a replica, and may put two copies of one expert on one GPU. A relibra plan needs
exactly H homes and S spare slots per GPU and never two copies on one GPU. So, with the steps of
:mod:`.eplb_algorithm`:

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

from .eplb_algorithm import expert_weight, node_major_order, pack_rows, replicate_rows

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
        weight_LE: ``[L, E]`` load of every expert (>= 0).
        num_nodes, gpus_per_node, spare_slots_per_gpu: the topology.
        num_groups: expert groups; hierarchical needs ``num_groups % num_nodes == 0``.
        hierarchical: pack groups to nodes and keep replicas in their node; else global.
    Returns:
        ``home_gpu [L, E]`` GPU homing each expert (exactly ``E / G`` per GPU) and
        ``spare_experts [L, G*S]`` expert in each spare slot (slot ``k`` on GPU ``k // S``),
        -1 when empty. No GPU holds two copies of one expert.
    """
    weight = expert_weight(weight_LE, "eplb weight")
    L, E = weight.shape
    G, S = num_nodes * gpus_per_node, spare_slots_per_gpu
    U = num_nodes if hierarchical else 1
    g, n = G // U, E // U
    order_LE = node_major_order(weight, num_groups if hierarchical else 1, U)  # step 1
    layer_expert0 = np.arange(0, L * E, E)[:, None]  # flat index of every layer's expert 0
    weight_Bn = weight.reshape(-1)[order_LE + layer_expert0].reshape(L * U, n)
    copy_expert, _, count_Bn = replicate_rows(weight_Bn, n + g * S, max_copies=g)  # step 2
    per_copy = weight_Bn / count_Bn
    home_Bn = pack_rows(per_copy, g) // (n // g)  # step 3: GPU in the unit of every home copy
    spare_Br = _pack_replicas(weight_Bn, count_Bn, per_copy, home_Bn, copy_expert[:, n:], g, S)  # step 4
    unit_first_gpu = np.arange(0, G, g)[:, None]
    home_gpu = np.empty((L, E), dtype=np.int64)
    home_gpu.reshape(-1)[(order_LE + layer_expert0).reshape(-1)] = (
        home_Bn.reshape(L, U, n) + unit_first_gpu).reshape(-1)
    unit_first_expert = np.arange(0, E, n)[:, None]
    spare_Br = spare_Br.reshape(L, U, g * S)
    spare = np.where(spare_Br >= 0, spare_Br + unit_first_expert, -1).reshape(L, G * S)
    spare = np.where(spare >= 0, np.take_along_axis(order_LE, spare.clip(min=0), 1), -1)
    return torch.from_numpy(home_gpu), torch.from_numpy(spare)


def _pack_replicas(
    weight_Bn: np.ndarray,
    count_Bn: np.ndarray,
    per_copy_Bn: np.ndarray,
    home_Bn: np.ndarray,
    replica_Br: np.ndarray,
    g: int,
    S: int,
) -> np.ndarray:
    """Step 4: replicas longest-first into spare slots; returns ``[B, g*S]`` unit-local experts, -1 empty.

    ``replica_Br`` lists the expert of every replica step 2 gave out (-1 empty), ``home_Bn``
    every expert's GPU in its unit. GPUs start at the load of their homes (per copy).
    """
    B, n = weight_Bn.shape
    r = g * S
    spare = np.full((B, r), -1, dtype=np.int64)
    if r == 0:
        return spare
    copies = count_Bn.astype(np.float64)
    rows = np.arange(B)
    load = np.zeros((B, g))
    np.add.at(load, (rows[:, None], home_Bn), per_copy_Bn)
    holds = np.zeros((B, n, g), dtype=bool)  # holds[b, expert, gpu]
    holds[rows[:, None], np.arange(n)[None, :], home_Bn] = True
    room = np.full((B, g), S, dtype=np.int64)
    item_weight = np.where(replica_Br >= 0, per_copy_Bn[rows[:, None], replica_Br.clip(min=0)], -np.inf)
    heaviest_first = np.argsort(-item_weight, axis=1, kind="stable")  # ties by slot order
    for i in range(r):
        expert = replica_Br[rows, heaviest_first[:, i]]
        has = expert >= 0
        expert = expert.clip(min=0)
        free = (room > 0) & ~holds[rows, expert]
        gpu = np.where(free, load, np.inf).argmin(axis=1)
        ok = has & free[rows, gpu]
        copies[rows, expert] -= has & ~ok  # dropped: no GPU with room lacks this expert
        weight = item_weight[rows, heaviest_first[:, i]]
        _put(spare, room, load, holds, rows[ok], gpu[ok], expert[ok], weight[ok], S)
    # refill spare slots left free with the most loaded expert (per copy) the GPU lacks
    for _ in range(r):
        has_room = room > 0
        if not has_room.any():
            break
        gpu = np.where(has_room, load, np.inf).argmin(axis=1)
        live = has_room[rows, gpu]
        score = np.where(holds[rows, :, gpu], -np.inf, weight_Bn / (copies + 1.0))
        expert = score.argmax(axis=1)
        ok = live & (score[rows, expert] > -np.inf)
        room[rows[live & ~ok], gpu[live & ~ok]] = 0  # this GPU already holds every expert
        copies[rows[ok], expert[ok]] += 1.0
        weight = (weight_Bn / copies)[rows[ok], expert[ok]]
        _put(spare, room, load, holds, rows[ok], gpu[ok], expert[ok], weight, S)
    return spare


def _put(spare, room, load, holds, rows, gpu, expert, weight, S) -> None:
    """Place replicas of ``expert`` on ``gpu`` (one per listed row) in its next free spare slot."""
    if rows.size == 0:
        return
    spare[rows, gpu * S + (S - room[rows, gpu])] = expert
    room[rows, gpu] -= 1
    load[rows, gpu] += weight
    holds[rows, expert, gpu] = True
