"""Triton kernels against the torch reference: compiled on a GPU, through the interpreter on CPU.

Without CUDA, ``TRITON_INTERPRET=1`` is set before relibra.kernels.triton is imported (and the
module is reloaded if something imported it before) and every test runs on CPU tensors. With
CUDA, the kernels are compiled by Triton and every test runs on the GPU (``DEVICES``; one
process cannot run both). Shapes stay tiny: the interpreter runs every program in Python.
Legend: T tokens, K copies per token, D hidden, G groups, R permuted rows.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kernel_cases import assign_cases, oracle_assign, permute_cases  # noqa: E402

from relibra.kernels import reference as ref  # noqa: E402

if "relibra.kernels.triton" in sys.modules:  # imported earlier, maybe in the other mode
    tri = importlib.reload(sys.modules["relibra.kernels.triton"])
else:
    tri = importlib.import_module("relibra.kernels.triton")

from relibra import kernels  # noqa: E402

SETTINGS = settings(max_examples=20, deadline=None)
#: where the ``device`` tests run (tests/conftest.py): the GPU with compiled Triton, else the interpreter
DEVICES = ("cuda",) if torch.cuda.is_available() else ("cpu",)
SMALL = dict(max_t=6, max_d=9, max_g=5)


def _tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


@SETTINGS
@given(permute_cases(**SMALL))
def test_permute_bit_exact(device, case):
    x, dest, G, align = (a.to(device) if torch.is_tensor(a) else a for a in case)
    got = kernels.permute(x, dest, G, align, backend="triton")
    want = ref.permute(x, dest, G, align)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


@SETTINGS
@given(permute_cases(**SMALL))
def test_permute_with_known_row_count_matches(device, case):
    x, dest, G, align = (a.to(device) if torch.is_tensor(a) else a for a in case)
    want = ref.permute(x, dest, G, align)
    got = kernels.permute(x, dest, G, align, backend="triton", num_rows=want[0].shape[0], check_values=False)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@SETTINGS
@given(permute_cases(**SMALL), st.integers(0, 2**31 - 1))
def test_unpermute_and_gradients_match(device, case, seed):
    x, dest, G, align = (a.to(device) if torch.is_tensor(a) else a for a in case)
    gen = torch.Generator().manual_seed(seed)
    x_perm, row_index, _ = ref.permute(x, dest, G, align)
    w = torch.rand(row_index.shape, generator=gen).to(device)
    g_out = torch.randn(x.shape, generator=gen).to(device=device, dtype=x.dtype)
    results = []
    for backend in ("triton", "reference"):
        y = x_perm.detach().clone().requires_grad_()
        ww = w.clone().requires_grad_()
        out = kernels.unpermute(y, row_index, ww, backend=backend)
        grads = torch.autograd.grad(out, (y, ww), g_out) if out.numel() else (None, None)
        results.append((out, *grads))
    (out_t, gy_t, gw_t), (out_r, gy_r, gw_r) = results
    assert out_t.dtype == x.dtype
    torch.testing.assert_close(out_t, out_r, **_tol(x.dtype))
    if gy_t is not None:
        torch.testing.assert_close(gy_t, gy_r, **_tol(x.dtype))
        torch.testing.assert_close(gw_t, gw_r, **_tol(x.dtype))


@SETTINGS
@given(permute_cases(**SMALL))
def test_permute_backward_matches(device, case):
    x, dest, G, align = (a.to(device) if torch.is_tensor(a) else a for a in case)
    grads = []
    for backend in ("triton", "reference"):
        xx = x.detach().clone().float().requires_grad_()
        x_perm, _, _ = kernels.permute(xx, dest, G, align, backend=backend)
        g = torch.arange(x_perm.numel(), dtype=torch.float32, device=device).view(x_perm.shape) % 7 - 3
        # allow_unused: a backend that drops x from the graph gives None here, which must fail
        (grad,) = torch.autograd.grad(x_perm, xx, g, allow_unused=True)
        assert grad is not None, f"{backend} permute lost the gradient of x"
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])  # small integers: sums are exact


@SETTINGS
@given(assign_cases(max_t=8))
def test_assign_copies_matches(device, case):
    ids, slots, ends, offset = (a.to(device) for a in case)
    got = kernels.assign_copies(ids, slots, ends, offset, backend="triton")
    assert torch.equal(got, ref.assign_copies(ids, slots, ends, offset))
    assert torch.equal(got.cpu(), oracle_assign(*case))


def test_float64_gradients_match_reference_tightly(device):
    """float64 data accumulates in float64 in both backends: gradients agree to 1e-12."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 6, dtype=torch.float64, generator=gen).to(device)
    dest = torch.tensor([[0, 1, -1], [1, 1, 2], [-1, -1, -1], [2, 0, 0], [1, -1, 2]], device=device)
    w = torch.randn(5, 3, dtype=torch.float64, generator=gen).to(device)
    g = torch.randn(5, 6, dtype=torch.float64, generator=gen).to(device)
    grads = []
    for mod in (tri, ref):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        x_perm, row_index, _ = mod.permute(xx, dest, 3, 2)
        out = mod.unpermute(x_perm * 2, row_index, ww)
        grads.append(torch.autograd.grad(out, (xx, ww), g))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_index_kernel_spans_many_blocks(device):
    """More copies than one index block (128) and more groups than one tile (32)."""
    gen = torch.Generator().manual_seed(4)
    keys = torch.randint(-1, 70, (700,), generator=gen).to(device)
    rank, counts = tri.group_ranks(keys, torch.zeros(70, dtype=torch.int64, device=device))
    want_rank, want_counts = ref.group_ranks(keys, 70)
    assert torch.equal(counts, want_counts)
    assert torch.equal(rank[keys >= 0], want_rank[keys >= 0])
    assert bool((rank[keys < 0] == -1).all())
