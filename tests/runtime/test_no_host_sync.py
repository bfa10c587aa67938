"""The replay path reads no device value on the host (gloo, 2 nodes x 2 GPUs, every policy).

On a GPU, reading a device tensor on the host (``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``,
ops whose output shape depends on the data such as ``nonzero``, ``bincount``, boolean indexing or
``repeat_interleave`` without ``output_size``) stalls the host until the GPU catches up. Here every
tensor is on the CPU, so the test watches for the reads themselves: :class:`HostReads`, a
``TorchDispatchMode`` that records every such aten op, together with patched ``Tensor.tolist``,
``Tensor.item`` and ``Tensor.numpy`` (which do not dispatch), around the forward and backward of
every micro-batch. With replayed routes and a plan, the Balancer computes every split size, buffer
size and row order on the host before the micro-batch, so nothing may be recorded. The layers run
with ``agree_input_errors=False``: their input agreement is a control-plane collective whose verdict
is read on the host (on the CPU for a ``cpu:gloo,cuda:nccl`` group, on the GPU for NCCL alone).

The live router path (routes chosen by the router, or passed to ``forward``) still exchanges and
reads the split sizes: the same watch records reads there, which shows it can see them.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
from _moe_world import Net, step_data
from torch.utils._python_dispatch import TorchDispatchMode

import relibra
from relibra.runtime.balancer import Balancer
from relibra.testing import run_world

aten = torch.ops.aten
M = 4
_ALWAYS = {aten.equal.default, aten.is_nonzero.default, aten.allclose.default}


def _reads_value(func, args, kwargs) -> bool:
    """Whether the aten op ``func`` reads tensor values on the host (or sizes its output by them)."""
    if torch.Tag.data_dependent_output in func.tags or func in _ALWAYS:
        return True
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is aten.index.Tensor:  # integer indices give a known shape; boolean masks do not
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    return True


def _where() -> str:
    """The innermost relibra (or test) frame of the current stack, as ``file:line``."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/relibra/" in frame.filename or "/tests/" in frame.filename:
            return f"{frame.filename.split('/relibra/')[-1]}:{frame.lineno} {frame.name}"
    return "?"


class HostReads(TorchDispatchMode):
    """Records ``(what, where)`` for every host read of a tensor value while active."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_value(func, args, kwargs):
            self.reads.append((str(func), _where()))
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("tolist", "item", "numpy"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def watched(t, *a, _name=name, _original=original, **k):
                self.reads.append((f"Tensor.{_name}", _where()))
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, watched)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def _watch_worker(rank, mesh, policies):
    out = {}
    for policy in policies:
        torch.manual_seed(0)
        model = Net(mesh)
        for layer in (model.moe1, model.moe2):
            layer.agree_input_errors = False
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        bal = Balancer(model, mesh=mesh, policy=policy, optimizer=opt, spare_slots_per_gpu=1)
        reads, replicas = [], 0
        for s in range(2):
            data = step_data(s, M, hold=2)
            plan = bal.plan_step([data[m][rank][1] for m in range(M)])
            replicas += int(plan.replicas().sum())
            for m in range(M):
                with bal.micro_batch(m):
                    watch = HostReads()
                    with watch:
                        y = model(data[m][rank][0])
                        y.square().sum().backward()
                    reads += watch.reads
            opt.step()
            opt.zero_grad()
        out[policy] = dict(reads=sorted(set(reads)), replicas=replicas)
    # the live router path reads split sizes on the host: the watch sees it
    x = step_data(0, 1)[0][rank][0]
    watch = HostReads()
    with watch:
        model(x).square().sum().backward()
    out["live router"] = dict(reads=sorted(set(watch.reads)), replicas=0)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def watched():
    return run_world(_watch_worker, args=(list(relibra.policies.BUILTINS),), timeout=240)


@pytest.mark.parametrize("policy", list(relibra.policies.BUILTINS))
def test_replayed_forward_and_backward_read_no_device_value_on_the_host(watched, policy):
    for rank, r in enumerate(watched):
        assert r[policy]["reads"] == [], f"rank {rank} policy {policy} read on the host: {r[policy]['reads']}"
    if policy in ("replicate", "hybrid", "eplb"):
        assert watched[0][policy]["replicas"] > 0, f"{policy} made no replica: the replica path is unwatched"


def test_the_watch_sees_the_live_router_path_read_split_sizes(watched):
    for rank, r in enumerate(watched):
        names = {what for what, _ in r["live router"]["reads"]}
        assert "Tensor.tolist" in names, f"rank {rank}: the watch missed the live path's split sizes: {names}"
