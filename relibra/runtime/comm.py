"""Small control-plane collectives shared by the Balancer, migration and FSDP glue.

Every helper here runs on the group's *communication device* (:func:`comm_device`): CUDA for an
NCCL group (NCCL rejects CPU tensors), CPU otherwise (gloo). Callers build their small tensors on
CPU, the helpers move them there and back, so planners keep working on CPU tensors.

    comm_device(group)                   -> torch.device
    all_gather_flat(t [N, ...], group)   -> [G, N, ...] every rank's t, on t's device
    all_reduce_(t, group, op)            -> t reduced in place (any device)
    broadcast_(t, src, group)            -> t overwritten with group rank src's t (any device)
    all_gather_text(text, group)         -> list of G strings (no pickle)
    agree(error, group, key)             -> Verdict: ranks at different keys (positions), or the lowest
                                            rank's error; None when all is well (one all-reduce)
    first_error(error, group)            -> (rank, text) of the lowest rank with a non-empty error, or None
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["comm_device", "all_gather_flat", "all_reduce_", "broadcast_", "all_gather_text", "agree", "KEY_LIMIT",
           "Verdict", "first_error"]


def comm_device(group) -> torch.device:
    """Device that collectives of ``group`` need: the current CUDA device for NCCL, else CPU."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_flat(t: torch.Tensor, group) -> torch.Tensor:
    """``[G, *t.shape]`` stack of every rank's ``t`` (one collective), on ``t``'s device."""
    world = dist.get_world_size(group)
    dev = comm_device(group)
    src = t.to(dev).contiguous()
    out = torch.empty(world * src.shape[0], *src.shape[1:], dtype=src.dtype, device=dev)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, src, group=group)
    return out.view(world, *t.shape).to(t.device)


def all_reduce_(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``t`` in place over ``group`` (through the comm device if ``t`` is elsewhere)."""
    dev = comm_device(group)
    if t.device == dev:
        dist.all_reduce(t, op=op, group=group)
        return t
    tmp = t.to(dev)
    dist.all_reduce(tmp, op=op, group=group)
    return t.copy_(tmp)


def broadcast_(t: torch.Tensor, src: int, group) -> torch.Tensor:
    """Overwrite ``t`` with group rank ``src``'s ``t`` (through the comm device if needed)."""
    dev = comm_device(group)
    gsrc = dist.get_global_rank(group, src)
    if t.device == dev:
        dist.broadcast(t, gsrc, group=group)
        return t
    tmp = t.to(dev)
    dist.broadcast(tmp, gsrc, group=group)
    return t.copy_(tmp)


def all_gather_text(text: str, group) -> list[str]:
    """Every rank's ``text``, in rank order (two small collectives, no pickle)."""
    dev = comm_device(group)
    payload = text.encode("utf-8", "replace")
    world = dist.get_world_size(group)
    n = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes_i = [int(s) for s in sizes]
    buf = torch.zeros(max(1, max(sizes_i)), dtype=torch.uint8)
    if payload:
        buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    buf = buf.to(dev)
    out = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(out, buf, group=group)
    return [bytes(o[:s].cpu().numpy().tobytes()).decode("utf-8", "replace") for o, s in zip(out, sizes_i)]


#: the largest position key :func:`agree` takes, exclusive (key x (G + 1) + G must fit in int64)
KEY_LIMIT = 2**48


@dataclass(frozen=True)
class Verdict:
    """What :func:`agree` found, the same on every rank of the group.

    ``keys``: every rank's position key (in group rank order) when they are not all equal,
    else None. Otherwise ``rank`` / ``error``: the lowest group rank with an error and its text.
    """

    keys: list[int] | None = None
    rank: int = -1
    error: str = ""


def agree(error: str, group, key: int = 0) -> Verdict | None:
    """Agree over ``group`` that no rank has an ``error`` and every rank stands at the same ``key``.

    ``key``: an int in ``[0, KEY_LIMIT)`` naming where in the program this rank is (e.g. a
    phase, micro-batch and layer packed together); ranks with different keys are out of step.
    Collective: one all-reduce of two int64 (MIN over ``[key * (G + 1) + (error rank or G),
    -key]``: the lowest key with its lowest faulty rank, and the highest key) returns None when
    all is well; gloo's cost grows with the elements, so the verdict is packed this tight.
    Ranks out of step are reported first (every rank's key travels in one all-gather; their
    errors may belong to different calls and are not exchanged); otherwise the lowest faulty
    rank's text travels (two more small collectives).
    """
    world = dist.get_world_size(group)
    if not 0 <= key < KEY_LIMIT:
        raise ValueError(f"agree: key must be in [0, 2**48), got {key}")
    if world >= 2**14:
        raise ValueError(f"agree: groups of up to 2**14 - 1 ranks, got {world}")
    me = dist.get_rank(group) if error else world
    verdict = torch.tensor([key * (world + 1) + me, -key], dtype=torch.int64)
    all_reduce_(verdict, group, op=dist.ReduceOp.MIN)
    lowest, neg_highest = verdict.tolist()
    low_key, first = divmod(lowest, world + 1)
    if low_key != -neg_highest:
        keys = all_gather_flat(torch.tensor([key], dtype=torch.int64), group)  # [G, 1]
        return Verdict(keys=keys[:, 0].tolist())
    if first == world:
        return None
    return Verdict(rank=first, error=all_gather_text(error, group)[first])


def first_error(error: str, group) -> tuple[int, str] | None:
    """``(rank, text)`` of the lowest group rank whose ``error`` is non-empty, None if none.

    Collective: every rank gets the same answer, so all can raise the same exception. One
    small all-reduce when no rank has an error; the text travels only when one has.
    """
    verdict = agree(error, group)
    return None if verdict is None else (verdict.rank, verdict.error)
