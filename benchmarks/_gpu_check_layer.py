"""gpu_check sections ``layer`` and ``memory``: one ReLibraMoE layer in a world of one rank, bf16,
forward + backward under replayed routes, against the same layer in float32 on the CPU.

Legend: T tokens, K top-k, E experts, D dim, I expert hidden, N = T K token copies (all kept:
one rank holds every expert), P parameters, ``el`` bytes per element (2 for bf16).

The layer (a DeepSeek-V3 expert, D 7168 x I 2048, top-8 of 16 experts, 2048 tokens on a GPU;
tiny on CPU) runs under a ``static`` Balancer on the world's 1-rank mesh, with
``agree_input_errors=False`` so the forward holds no control-plane collective. The Balancer's
``plan_step`` gets two micro-batches of the same routes:

- micro-batch 0 is measured: its output and the gradients of x, of the router and of both expert
  weights are compared with a float32 copy of the layer on the CPU (``mesh=None``, same state
  dict, same routes) by relative error ``|a - b| / |b|`` (Frobenius), which must stay within
  :data:`BF16_TOLERANCE`; on CUDA its peak memory is read (``torch.cuda.max_memory_allocated``);
- micro-batch 1 runs watched: :class:`relibra.testing.host_reads.HostReads` (host reads of tensor
  values) and, on CUDA, ``torch.cuda.set_sync_debug_mode("error")`` (any synchronising call
  raises); the plan's routes and layout are installed before the watch starts, as in training.

Memory the plan says one forward + backward adds to the weights (:func:`planned_bytes`): the
weights' gradients (P el) plus every buffer the replay path of N rows keeps or makes, counted as
if all were alive at once: forward ``x_send, x_recv, x_local, y_local, y_recv, y_send`` (6 D),
``gate_up`` out (2 I), ``silu(gate)`` and ``h`` (2 I); backward ``grad y`` twice (2 D), ``grad h``
(I), ``grad gate_up`` (2 I); plus x, out and their gradients (4 T D). The peak measured above
what was allocated before (the weights) must stay within it times :data:`MEMORY_SLACK`: more
means a buffer the plan does not know of.
"""

from __future__ import annotations

import torch

from relibra import ReLibraMoE
from relibra.runtime.balancer import Balancer
from relibra.testing.host_reads import HostReads

BF16_TOLERANCE = 2e-2
MEMORY_SLACK = 1.10  # allocator rounding and small tensors (router scores, indices)


def layer_sizes(device: torch.device) -> dict:
    """``T, K, E, D, I`` of the checked layer: DeepSeek-V3's expert on a GPU, tiny on CPU."""
    if device.type == "cuda":
        return dict(T=2048, K=8, E=16, D=7168, I=2048)
    return dict(T=64, K=4, E=8, D=64, I=32)


def planned_bytes(T: int, K: int, E: int, D: int, I: int, el: int) -> dict[str, int]:
    """``weights`` and the upper bound of what one forward + backward adds: ``grads``, ``activations``
    (see the module doc)."""
    params = E * (3 * D * I + D)  # gate_up, down, router
    N = T * K
    return dict(weights=params * el, grads=params * el, activations=N * el * (8 * D + 7 * I) + 4 * T * D * el)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _expert_grads(layer: ReLibraMoE) -> dict[str, torch.Tensor]:
    """Expert weight gradients in logical expert order (the mesh layer's are DTensors in slot order)."""
    out = {}
    for name in ("gate_up_proj", "down_proj"):
        g = getattr(layer.experts, name).grad
        full = g.full_tensor() if hasattr(g, "full_tensor") else g
        logical = torch.empty_like(full)
        logical[layer.home_experts_K.to(full.device)] = full
        out[name] = logical
    return out


def run(mesh, device: torch.device) -> tuple[dict, dict]:
    """Both sections: ``(layer, memory)``, each with its checks."""
    s = layer_sizes(device)
    T, K, E, D, I = s["T"], s["K"], s["E"], s["D"], s["I"]
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    kw = dict(score_func="sigmoid", route_scale=2.5)
    ref = ReLibraMoE(D, I, E, K, **kw)
    layer = ReLibraMoE(D, I, E, K, mesh, dtype=torch.bfloat16, device=device, agree_input_errors=False, **kw)
    layer.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    skew = torch.linspace(0, 1, E)  # hot experts get more tokens
    routes_TK = (torch.rand(T, E, generator=gen) + skew).topk(K, dim=1).indices
    x = torch.randn(T, D, generator=gen)
    g = torch.randn(T, D, generator=gen)
    bal = Balancer(layer, mesh, "static", spare_slots_per_gpu=0)
    bal.plan_step([routes_TK[:, None, :], routes_TK[:, None, :]])

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with bal.micro_batch(0):
        xd = x.to(device, torch.bfloat16).requires_grad_()
        y = layer(xd)
        y.backward(g.to(device, torch.bfloat16))
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    xr = x.clone().requires_grad_()
    y_ref = ref(xr, routes_TK)
    y_ref.backward(g)
    errors = {"output": _rel(y, y_ref), "grad x": _rel(xd.grad, xr.grad),
              "grad router": _rel(layer.gate.weight.grad, ref.gate.weight.grad)}
    got, want = _expert_grads(layer), _expert_grads(ref)
    errors.update({f"grad {n}": _rel(got[n], want[n]) for n in got})

    layer.zero_grad(set_to_none=True)
    watch, sync_error = HostReads(), ""
    with bal.micro_batch(1):
        xd = x.to(device, torch.bfloat16).requires_grad_()
        gd = g.to(device, torch.bfloat16)
        with watch:
            if cuda:
                torch.cuda.set_sync_debug_mode("error")
            try:
                layer(xd).backward(gd)
            except RuntimeError as exc:  # only what the sync debug mode raises is a finding; the rest propagates
                if "synchroniz" not in str(exc):
                    raise
                sync_error = str(exc).splitlines()[0]
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")

    checks = [dict(name=f"{name} vs fp32 CPU (relative error)", value=f"{err:.2e}",
                   target=f"<= {BF16_TOLERANCE:.0e}", status="pass" if err <= BF16_TOLERANCE else "fail")
              for name, err in errors.items()]
    reads = sorted(set(watch.reads))
    checks.append(dict(name="host reads in the replayed forward + backward", value=str(len(reads)),
                       target="0", status="pass" if not reads else "fail"))
    checks.append(dict(name="sync debug mode 'error' in the replayed forward + backward",
                       value=(sync_error or "no sync") if cuda else "n/a (CPU)", target="no sync",
                       status=("fail" if sync_error else "pass") if cuda else "n/a"))
    layer_section = dict(sizes=s, dtype="bfloat16", errors=errors, host_reads=reads, sync_error=sync_error,
                         checks=checks)

    parts = planned_bytes(T, K, E, D, I, el=2)
    added_plan = parts["grads"] + parts["activations"]
    memory = dict(planned=parts, planned_bytes=added_plan, peak_bytes=peak, base_bytes=base if cuda else None)
    name, target = "peak memory of forward + backward above the weights vs plan", \
        f"<= {MEMORY_SLACK:.2f} x {added_plan / 2**30:.3f} GiB"
    if cuda:
        added = peak - base
        memory["checks"] = [dict(name=name, value=f"{added / 2**30:.3f} GiB (before: {base / 2**30:.3f} GiB)",
                                 target=target, status="pass" if added <= MEMORY_SLACK * added_plan else "fail")]
    else:
        memory["checks"] = [dict(name=name, value="n/a (CPU)", target=target, status="n/a")]
    return layer_section, memory
