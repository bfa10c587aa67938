"""relibra.runtime.comm: the control-plane collectives (gloo world) and the NCCL device choice."""

from __future__ import annotations

import torch

from relibra.runtime import comm
from relibra.testing import run_world


def _worker(rank, mesh):
    """Returns plain lists, no tensors: a tensor crosses run_world's queue as a shared file
    descriptor that dies with its rank, which may exit before the parent reads it."""
    group = mesh.get_group("gpu")  # 2 ranks per node
    g = torch.distributed.get_rank(group)
    out = {}
    t = torch.full((2, 3), rank, dtype=torch.int64)
    gathered = comm.all_gather_flat(t, group)
    out["gather"] = (tuple(gathered.shape), gathered.device.type, gathered[:, 0, 0].tolist())
    r = torch.tensor([rank + 1, -rank], dtype=torch.int64)
    out["reduce"] = comm.all_reduce_(r, group, op=torch.distributed.ReduceOp.MAX).tolist()
    b = torch.full((3,), 10 * rank, dtype=torch.int64)
    out["bcast"] = comm.broadcast_(b, 1, group).tolist()
    out["texts"] = comm.all_gather_text("é" * g + f"r{rank}", group)
    out["none"] = comm.first_error("", group)
    out["first"] = comm.first_error("bad" if g == 1 else "", group)
    out["lowest"] = comm.first_error(f"bad on {g}", group)  # every rank has one: the lowest wins
    out["agree_same"] = comm.agree("", group, 2**48 - 1)  # the largest key
    out["agree_error"] = comm.agree("bad" if g == 1 else "", group, 7)
    # out of step wins over errors: the texts may belong to different calls
    out["agree_apart"] = comm.agree(f"bad on {g}", group, 7 + 5 * g)
    out["agree_apart_ok"] = comm.agree("", group, 0 if g else 2**47)
    try:
        comm.agree("", group, 2**48)
    except ValueError as exc:
        out["agree_key_too_big"] = str(exc)
    return out


def test_collectives_on_a_gloo_group():
    res = run_world(_worker, world_size=4, nodes=2, timeout=60)
    for rank, out in enumerate(res):
        node = rank // 2
        peers = [2 * node, 2 * node + 1]
        assert out["gather"] == ((2, 2, 3), "cpu", peers)
        assert out["reduce"] == [peers[1] + 1, -peers[0]]
        assert out["bcast"] == [10 * peers[1]] * 3
        assert out["texts"] == [f"r{peers[0]}", f"ér{peers[1]}"]
        assert out["none"] is None
        assert out["first"] == (1, "bad")
        assert out["lowest"] == (0, "bad on 0")
        assert out["agree_same"] is None
        assert out["agree_error"] == comm.Verdict(rank=1, error="bad")
        assert out["agree_apart"] == comm.Verdict(keys=[7, 12])
        assert out["agree_apart_ok"] == comm.Verdict(keys=[2**47, 0])
        assert out["agree_key_too_big"] == "agree: key must be in [0, 2**48), got 281474976710656"


def test_nccl_groups_communicate_on_the_current_cuda_device(monkeypatch):
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(comm.torch.cuda, "current_device", lambda: 3)
    assert comm.comm_device(object()) == torch.device("cuda", 3)
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: "gloo")
    assert comm.comm_device(object()) == torch.device("cpu")
    # a group with both backends sends CPU tensors through gloo: control-plane agreement
    # (e.g. ReLibraMoE's input check) then never waits for the GPU
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert comm.comm_device(object()) == torch.device("cpu")
