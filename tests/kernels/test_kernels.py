"""relibra.kernels: the torch reference against plain-loop oracles, gradcheck, API and errors.

The Triton versions are compared with the reference in tests/test_kernels_triton.py. Tests taking
``device`` also run on CUDA when a GPU is present (tests/conftest.py); the oracles run on CPU.
Legend: T tokens, K copies per token, D hidden, G groups, R permuted rows.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import assign_cases, oracle_assign, oracle_permute, oracle_unpermute, permute_cases

from relibra import kernels
from relibra.kernels import reference as ref

SETTINGS = settings(max_examples=40, deadline=None)


def test_docstring_layout_example():
    x = torch.arange(3.0).repeat_interleave(2).view(3, 2)
    dest = torch.tensor([[1, 0], [1, -1], [0, 1]])
    x_perm, row_index, offsets = kernels.permute(x, dest, 2, align=4)
    assert offsets.tolist() == [0, 4, 8]
    assert row_index.tolist() == [[4, 0], [5, -1], [1, 6]]
    assert x_perm[:, 0].tolist() == [0, 2, 0, 0, 0, 1, 2, 0]


@SETTINGS
@given(permute_cases())
def test_permute_matches_oracle(device, case):
    x, dest, G, align = case
    x_perm, row_index, offsets = (t.cpu() for t in ref.permute(x.to(device), dest.to(device), G, align))
    want_perm, want_rows, want_offsets = oracle_permute(x, dest, G, align)
    assert torch.equal(row_index, want_rows)
    assert torch.equal(offsets, want_offsets)
    assert x_perm.dtype == x.dtype and torch.equal(x_perm, want_perm)
    sizes = offsets.diff()
    assert bool((sizes % align == 0).all())
    assert int(offsets[-1]) == x_perm.shape[0]


@SETTINGS
@given(permute_cases(), st.integers(0, 2**31 - 1))
def test_unpermute_matches_oracle(device, case, seed):
    x, dest, G, align = case
    x_perm, row_index, _ = ref.permute(x, dest, G, align)
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(row_index.shape, generator=gen)
    w[row_index < 0] = float("nan")  # dropped copies must not touch the sum
    y = (x_perm.float() * 3 - 1).to(x.dtype)
    out = ref.unpermute(y.to(device), row_index.to(device), w.to(device)).cpu()
    assert out.dtype == y.dtype and out.shape == x.shape
    want = oracle_unpermute(y, row_index, w)
    tol = 2e-2 if y.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), want.to(y.dtype).double(), rtol=tol, atol=tol)


@SETTINGS
@given(assign_cases())
def test_assign_copies_matches_oracle(device, case):
    ids, slots, ends, offset = case
    dest = ref.assign_copies(*(t.to(device) for t in case)).cpu()
    assert torch.equal(dest, oracle_assign(ids, slots, ends, offset))
    assert torch.equal(dest < 0, (ids < 0) | ((slots[ids.clamp(min=0)] >= 0).sum(-1) == 0))


def test_assign_copies_follows_token_split():
    """Expert 0 has copies in slots 3, 9 taking 2 and 4 tokens; 1 copy before this rank."""
    ids = torch.tensor([[0, 1], [0, 0], [1, -1], [0, 0], [0, 0]])
    slots = torch.tensor([[3, 9], [5, -1]])
    ends = torch.tensor([[2, 6], [7, 7]])
    dest = ref.assign_copies(ids, slots, ends, torch.tensor([1, 0]))
    # expert 0 positions 1..7: 1 -> slot 3, 2..5 -> slot 9, 6 -> past the end -> last copy 9
    assert dest.tolist() == [[3, 5], [9, 9], [5, -1], [9, 9], [9, 9]]


def test_permute_unpermute_roundtrip_sums_copies(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 7, generator=gen).to(device)
    dest = torch.randint(-1, 5, (9, 3), generator=gen).to(device)
    x_perm, row_index, _ = ref.permute(x, dest, 5, align=4)
    out = ref.unpermute(x_perm, row_index, torch.ones(9, 3, device=device))
    torch.testing.assert_close(out, x * (dest >= 0).sum(1, keepdim=True).float())


@settings(max_examples=15, deadline=None)
@given(permute_cases(max_t=5, max_d=4, max_g=3))
def test_gradcheck_reference(case):
    x, dest, G, align = case
    x = x.double().requires_grad_()
    torch.autograd.gradcheck(lambda a: ref.permute(a, dest, G, align)[0], (x,))
    _, row_index, offsets = ref.permute(x.detach(), dest, G, align)
    y = torch.randn(int(offsets[-1]), x.shape[1], dtype=torch.float64, requires_grad=True)
    w = torch.randn(row_index.shape, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: ref.unpermute(a, row_index, b), (y, w))


def test_permute_backward_is_gather_sum(device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=gen).to(device).requires_grad_()
    dest = torch.tensor([[0, 2], [2, 2], [-1, 1], [0, -1], [1, 1], [-1, -1]], device=device)
    x_perm, row_index, _ = ref.permute(x, dest, 3, align=2)
    g = torch.randn(x_perm.shape, generator=gen).to(device)
    (grad,) = torch.autograd.grad(x_perm, x, g)
    torch.testing.assert_close(grad, ref.unpermute(g, row_index, torch.ones(6, 2, device=device)))


# ---------------------------------------------------------------- errors and backend choice

def test_bad_inputs_raise_value_error_naming_the_argument():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="dest_TK holds group 5"):
        kernels.permute(x, torch.tensor([[5], [0], [1]]), 3)
    with pytest.raises(ValueError, match="dest_TK holds group -2"):
        kernels.permute(x, torch.tensor([[-2], [0], [1]]), 3)
    with pytest.raises(ValueError, match="dest_TK must be int64"):
        kernels.permute(x, torch.zeros(3, 1, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="dest_TK must be"):
        kernels.permute(x, torch.zeros(2, 1, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="align"):
        kernels.permute(x, torch.zeros(3, 1, dtype=torch.int64), 3, align=0)
    with pytest.raises(ValueError, match="x_TD"):
        kernels.permute(torch.zeros(3, dtype=torch.int64), torch.zeros(3, 1, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="row_index_TK holds row 7"):
        kernels.unpermute(torch.zeros(4, 2), torch.tensor([[7]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="weights_TK"):
        kernels.unpermute(torch.zeros(4, 2), torch.tensor([[1]]), torch.ones(1, 2))
    slots, ends, off = torch.tensor([[0]]), torch.tensor([[1]]), torch.tensor([0])
    with pytest.raises(ValueError, match="topk_ids_TK holds expert 1"):
        kernels.assign_copies(torch.tensor([[1]]), slots, ends, off)
    with pytest.raises(ValueError, match="copy_ends_EX must have shape"):
        kernels.assign_copies(torch.tensor([[0]]), slots, torch.tensor([[1, 1]]), off)
    with pytest.raises(ValueError, match="token_offset_E must be an int64"):
        kernels.assign_copies(torch.tensor([[0]]), slots, ends, off.float())


def test_backend_selection(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.resolve_backend(None, cpu) == "reference"
    assert kernels.resolve_backend("triton", cpu) == "triton"
    assert kernels.resolve_backend("torch", cpu) == "reference"  # relibra.config's names
    assert kernels.resolve_backend("auto", cpu) == "reference"
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert kernels.resolve_backend(None, cpu) == "triton"
    assert kernels.resolve_backend("reference", cpu) == "reference"
    monkeypatch.setenv(kernels.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match=kernels.ENV_VAR):
        kernels.resolve_backend(None, cpu)
    monkeypatch.delenv(kernels.ENV_VAR)
    with pytest.raises(ValueError, match="backend must be"):
        kernels.permute(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.int64), 1, backend="cuda")


def test_import_relibra_does_not_import_triton():
    code = ("import sys, relibra, relibra.kernels, torch;"
            "relibra.kernels.permute(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.int64), 1);"
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@SETTINGS
@given(permute_cases())
def test_permute_with_known_row_count_reads_nothing_back_and_matches(case):
    """``num_rows`` (the caller knows R, e.g. from a plan) gives the same buffer; a wrong count is
    caught on CPU while values are checked."""
    x, dest, G, align = case
    want = ref.permute(x, dest, G, align)
    R = want[0].shape[0]
    got = kernels.permute(x, dest, G, align, num_rows=R, check_values=False)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    with pytest.raises(ValueError, match=f"num_rows={R + 1} but dest_TK fills {R} rows"):
        kernels.permute(x, dest, G, align, num_rows=R + 1)


def test_check_values_false_skips_only_the_value_scan():
    x = torch.zeros(3, 4)
    bad = torch.tensor([[-2], [0], [1]])
    with pytest.raises(ValueError, match="dest_TK holds group -2"):
        kernels.permute(x, bad, 3)
    with pytest.raises(ValueError, match="dest_TK must be int64"):  # shapes and dtypes are still checked
        kernels.permute(x, bad.int(), 3, check_values=False)
    with pytest.raises(ValueError, match="num_rows must be None or an int >= 0"):
        kernels.permute(x, bad, 3, num_rows=-1, check_values=False)
