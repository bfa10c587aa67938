"""Watch for host reads of tensor values: what stalls the host on a GPU, caught on any device.

On a GPU, reading a device tensor on the host (``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``,
ops whose output shape depends on the data such as ``nonzero``, ``bincount``, boolean indexing or
``repeat_interleave`` without ``output_size``) stalls the host until the GPU catches up. On CPU
nothing stalls, so :class:`HostReads` watches for the reads themselves: a ``TorchDispatchMode``
that records every such aten op, together with patched ``Tensor.tolist``, ``Tensor.item`` and
``Tensor.numpy`` (which do not dispatch). On CUDA, ``torch.cuda.set_sync_debug_mode("error")``
catches the syncs themselves (blocking copies too); the two complement each other.

    with HostReads() as watch:
        model(x).sum().backward()
    assert watch.reads == [], watch.reads      # [(op name, "file:line function"), ...]
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReads", "reads_value"]

_aten = torch.ops.aten
_ALWAYS = {_aten.equal.default, _aten.is_nonzero.default, _aten.allclose.default}


def reads_value(func, args, kwargs) -> bool:
    """Whether the aten op ``func`` reads tensor values on the host (or sizes its output by them)."""
    if torch.Tag.data_dependent_output in func.tags or func in _ALWAYS:
        return True
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is _aten.index.Tensor:  # integer indices give a known shape; boolean masks do not
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if func is _aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    return True


def _where() -> str:
    """The innermost relibra, test or benchmark frame of the current stack, as ``file:line function``."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if "/relibra/" in name or "/tests/" in name or "/benchmarks/" in name:
            return f"{name.split('/relibra/')[-1]}:{frame.lineno} {frame.name}"
    return "?"


class HostReads(TorchDispatchMode):
    """Records ``(what, where)`` for every host read of a tensor value while active (``.reads``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if reads_value(func, args, kwargs):
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
        self._saved = {}
        return super().__exit__(*exc)
