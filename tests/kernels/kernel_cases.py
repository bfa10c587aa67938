"""Shared hypothesis strategies and plain-loop oracles for the kernel tests (holds no tests).

Legend: T tokens, K copies per token, D hidden, G groups, E experts, X copies per expert.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.bfloat16)


@st.composite
def permute_cases(draw, max_t=12, max_d=13, max_g=6):
    """``(x_TD, dest_TK, num_groups, align)`` with dropped copies and empty groups."""
    T = draw(st.integers(0, max_t))
    K = draw(st.integers(1, 8))
    D = draw(st.integers(1, max_d))
    G = draw(st.integers(0, max_g))
    align = draw(st.sampled_from([1, 1, 2, 3, 8]))
    dtype = draw(st.sampled_from(DTYPES))
    dest = draw(st.lists(st.integers(-1, G - 1), min_size=T * K, max_size=T * K))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen).to(dtype)
    return x, torch.tensor(dest, dtype=torch.int64).view(T, K), G, align


@st.composite
def assign_cases(draw, max_t=12):
    """``(topk_ids_TK, copy_slots_EX, copy_ends_EX, token_offset_E)`` of a small replica plan.

    Some experts have no copy, some copies take 0 tokens, and positions may run past the
    last end (the op must then pick the last copy).
    """
    E = draw(st.integers(1, 6))
    X = draw(st.integers(1, 3))
    T = draw(st.integers(0, max_t))
    K = draw(st.integers(1, 8))
    slots = torch.full((E, X), -1, dtype=torch.int64)
    ends = torch.zeros(E, X, dtype=torch.int64)
    free = list(range(E * X + 4))
    for e in range(E):
        n = draw(st.integers(0, X))
        chosen = sorted(draw(st.lists(st.sampled_from(free), min_size=n, max_size=n, unique=True)))
        counts = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
        total = 0
        for c in range(X):
            if c < n:
                slots[e, c] = chosen[c]
                total += counts[c]
            ends[e, c] = total
    offset = torch.tensor(draw(st.lists(st.integers(0, 8), min_size=E, max_size=E)), dtype=torch.int64)
    ids = torch.tensor(draw(st.lists(st.integers(-1, E - 1), min_size=T * K, max_size=T * K)),
                       dtype=torch.int64).view(T, K)
    return ids, slots, ends, offset


def oracle_permute(x_TD, dest_TK, G, align):
    """Plain loops: copies grouped by destination, token then k inside a group, zero padding."""
    T, K = dest_TK.shape
    rows, row_index = [], [[-1] * K for _ in range(T)]
    offsets = [0]
    for g in range(G):
        for t in range(T):
            for k in range(K):
                if int(dest_TK[t, k]) == g:
                    row_index[t][k] = len(rows)
                    rows.append(x_TD[t])
        while len(rows) % align:
            rows.append(torch.zeros_like(x_TD[0]))
        offsets.append(len(rows))
    x_perm = torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])
    return x_perm, torch.tensor(row_index, dtype=torch.int64).view(T, K), torch.tensor(offsets)


def oracle_unpermute(y_RD, row_index_TK, w_TK):
    """Plain loops, float64 sums."""
    T, K = row_index_TK.shape
    out = torch.zeros(T, y_RD.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            r = int(row_index_TK[t, k])
            if r >= 0:
                out[t] += float(w_TK[t, k]) * y_RD[r].double()
    return out


def oracle_assign(ids_TK, slots_EX, ends_EX, offset_E):
    """Plain loops over copies in token-then-k order."""
    T, K = ids_TK.shape
    seen = [0] * slots_EX.shape[0]
    dest = torch.full((T, K), -1, dtype=torch.int64)
    for t in range(T):
        for k in range(K):
            e = int(ids_TK[t, k])
            if e < 0:
                continue
            pos = int(offset_E[e]) + seen[e]
            seen[e] += 1
            copies = [c for c in range(slots_EX.shape[1]) if int(slots_EX[e, c]) >= 0]
            if not copies:
                continue
            chosen = copies[-1]
            for c in copies:
                if pos < int(ends_EX[e, c]):
                    chosen = c
                    break
            dest[t, k] = slots_EX[e, chosen]
    return dest
