"""Small control-plane collectives shared by the Balancer, migration and FSDP glue.

Every helper here runs on the group's *communication device* (:func:`comm_device`): CUDA for an
NCCL group (NCCL rejects CPU tensors), CPU otherwise (gloo). Callers build their small tensors on
CPU, the helpers move them there and back, so planners keep working on CPU tensors.

    comm_device(group)                   -> torch.device
    all_gather_flat(t [N, ...], group)   -> [G, N, ...] every rank's t, on t's device
    all_reduce_(t, group, op)            -> t reduced in place (any device)
    broadcast_(t, src, group)            -> t overwritten with group rank src's t (any device)
    all_gather_text(text, group)         -> list of G strings (no pickle)
    agree(error, group, position)        -> Verdict: ranks at different positions, or the lowest
                                            rank's error; None when all is well (one all-reduce)
    first_error(error, group)            -> (rank, text) of the lowest rank with a non-empty error, or None
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["comm_device", "all_gather_flat", "all_reduce_", "broadcast_", "all_gather_text", "agree", "Verdict",
           "first_error"]


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


@dataclass(frozen=True)
class Verdict:
    """What :func:`agree` found, the same on every rank of the group.

    ``positions``: every rank's position (in group rank order) when they are not all equal,
    else None. Otherwise ``rank`` / ``error``: the lowest group rank with an error and its text.
    """

    positions: list[tuple[int, ...]] | None = None
    rank: int = -1
    error: str = ""


def agree(error: str, group, position: Sequence[int] = ()) -> Verdict | None:
    """Agree over ``group`` that no rank has an ``error`` and every rank stands at ``position``.

    ``position``: a few ints saying where in the program this rank is (e.g. phase, micro-batch,
    layer); every rank must pass the same number. Collective: one all-reduce (MIN over
    ``[error rank or G, p_0, -p_0, p_1, -p_1, ...]``, so the minimum and the maximum of every
    ``p_i`` arrive together) returns None when all is well. Ranks at different positions
    are reported first (every rank's position travels in one all-gather; their errors may
    belong to different calls and are not exchanged); otherwise the lowest faulty rank's text
    travels (two more small collectives).
    """
    world = dist.get_world_size(group)
    pos = [int(p) for p in position]
    head = [dist.get_rank(group) if error else world]
    verdict = torch.tensor(head + [v for p in pos for v in (p, -p)], dtype=torch.int64)
    all_reduce_(verdict, group, op=dist.ReduceOp.MIN)
    first, *bounds = verdict.tolist()
    if any(low != -neg_high for low, neg_high in zip(bounds[0::2], bounds[1::2])):
        every = all_gather_flat(torch.tensor([pos], dtype=torch.int64), group)  # [G, 1, n]
        return Verdict(positions=[tuple(row) for row in every[:, 0].tolist()])
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
