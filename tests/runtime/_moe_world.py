"""Shared pieces of the distributed MoE tests: a tiny two-MoE-layer net and skewed R3 data.

World: 4 ranks as 2 nodes x 2 GPUs; E = 8 experts (H = 2 home + 1 spare slot per rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from relibra import ReLibraMoE

D, I, E, K, WORLD = 8, 6, 8, 2, 4


class Net(nn.Module):
    """Linear -> MoE (softmax, shared expert) -> Linear -> MoE (sigmoid) + residual."""

    def __init__(self, mesh=None):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe1 = ReLibraMoE(D, I, E, K, mesh, shared_expert_hidden_dim=4, shared_expert_gate=True)
        self.mid = nn.Linear(D, D)
        self.moe2 = ReLibraMoE(D, I, E, K, mesh, score_func="sigmoid")

    def forward(self, x):
        h = self.moe1(torch.tanh(self.inp(x)))
        return self.moe2(self.mid(h)) + h


def uniform_routes(tokens: int, M: int = 2) -> list[torch.Tensor]:
    """``M`` micro-batches of routes ``[tokens, 2, K]`` that give every expert the same tokens on
    every rank (token t picks K consecutive experts): no placement beats another."""
    ids_TK = (torch.arange(tokens)[:, None] * K + torch.arange(K)) % E
    return [ids_TK[:, None, :].expand(tokens, 2, K).contiguous() for _ in range(M)]


def step_data(step: int, M: int = 2, hold: int = 1):
    """Per micro-batch, per rank: (x [T, D], routes [T, 2, K]). Hot experts move every ``hold``
    micro-batches, one expert gets no token, rank 2 has no token in micro-batch 1."""
    g = torch.Generator().manual_seed(1000 + step)
    data = []
    for m in range(M):
        h = m // hold
        hot = [(3 * step + h) % E, (3 * step + h + 5) % E]
        cold = (3 * step + m + 2) % E
        others = [e for e in range(E) if e not in hot and e != cold]
        per_rank = []
        for r in range(WORLD):
            T = 0 if (m == 1 and r == 2) else 6 + (r + m + step) % 4
            x = torch.randn(T, D, generator=g)
            routes = torch.empty(T, 2, K, dtype=torch.int64)
            for t in range(T):
                for l in range(2):
                    first = hot[l] if torch.rand((), generator=g) < 0.7 else others[t % len(others)]
                    pool = [e for e in others if e != first]
                    second = pool[int(torch.randint(len(pool), (), generator=g))]
                    routes[t, l] = torch.tensor([first, second])
            per_rank.append((x, routes))
        data.append(per_rank)
    return data


def logical_grads(model) -> dict:
    """Every parameter's grad in logical expert order (collective with a mesh)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        if hasattr(g, "full_tensor"):
            mod = model.get_submodule(name.rsplit(".", 1)[0])
            full = g.full_tensor()
            lg = torch.empty_like(full)
            lg[mod.home_experts_K] = full
            g = lg
        out[name] = g.detach().clone()
    return out


def logical_state(model, opt) -> dict:
    out = {}
    for name, p in model.named_parameters():
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in st:
                continue
            v = st[key]
            if hasattr(v, "full_tensor"):
                mod = model.get_submodule(name.rsplit(".", 1)[0])
                full = v.full_tensor()
                lv = torch.empty_like(full)
                lv[mod.home_experts_K] = full
                v = lv
            out[f"{name}.{key}"] = v.detach().clone()
    return out


def logical_snapshot(model, opt) -> dict[str, torch.Tensor]:
    """Logical weights, AdamW moments and steps, indexed here from the live objects (collective)."""
    out = {f"weight {k}": (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
           for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        for key, v in opt.state.get(p, {}).items():
            full = v.full_tensor() if hasattr(v, "full_tensor") else v
            if v.dim() and ".experts." in name:  # rows are in placement order: put them in expert order
                home = model.get_submodule(name.rsplit(".", 1)[0]).home_experts_K
                full = torch.empty_like(full).index_copy_(0, home, full)
            out[f"{key} {name}"] = full.detach().clone()
    return out


def allreduce_dense_grads(model) -> None:
    """DDP-style: sum the grads of replicated (non-expert) parameters across ranks."""
    for p in model.parameters():
        if p.grad is not None and not hasattr(p.grad, "full_tensor"):
            dist.all_reduce(p.grad)


def max_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) if a[k].numel() else 0.0 for k in a)


def outcome(run, *args, **kwargs) -> tuple[str, str]:
    """``(exception type name, message)`` of ``run(*args, **kwargs)``, or ``("no error", "")``:
    what one rank saw, as plain data the test compares across ranks."""
    try:
        run(*args, **kwargs)
        return ("no error", "")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return (type(exc).__name__, str(exc))


def same_error(per_rank, kind: str = "ValueError", needles=(), case: str = "") -> str:
    """The one ``(kind, message)`` every rank saw for ``case``; asserts its kind and that every
    needle is in the message, which it returns."""
    outcomes = set(per_rank)
    assert len(outcomes) == 1, f"{case}: ranks raised different errors: {outcomes}"
    got_kind, msg = outcomes.pop()
    assert got_kind == kind, f"{case}: expected {kind} on every rank, got {got_kind}: {msg}"
    for needle in needles:
        assert needle in msg, f"{case}: {needle!r} not in {msg!r}"
    return msg
