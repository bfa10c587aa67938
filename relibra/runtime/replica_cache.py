"""Replica lifecycle within a step: weights kept in their spare slot, gradients home once.

Legend: M micro-batches of the step, L MoE layers, G ranks of the expert-parallel group, H home
and S spare slots per rank, V = G*S spare slots of the group, F = 2*hidden, D dim, I hidden.

A *run* is one replica staying in one spare slot over consecutive micro-batches ``a..b`` of a
step (the plan's ``spare_experts [M, L, V]`` says which). The layer computes with the replica in
each of them, but the replica is fetched from its home rank once, as micro-batch ``a``'s block
starts, and its gradient goes home once, in micro-batch ``b``'s backward, where it is added into
the home expert's gradient before anything else can see it. Micro-batch ``b`` is the run's last:
the slot holds something else at ``b + 1``, or ``b`` is the step's last micro-batch.

Where things live (per layer, on this rank, plain tensors outside autograd):

- ``weights``: ``[S, F, D]`` and ``[S, D, I]``, what the spare slots hold now (zeros where empty).
  A fetch writes new tensors, so a micro-batch whose backward is still to come keeps the weights
  it computed with.
- ``grads``: the same shapes, the gradient the runs in the slots have gathered in the backward
  of their micro-batches so far.

Every rank also keeps, from the plan alone, which runs of the whole group have begun their
backward and which have sent their gradient home, so all ranks reach the same verdict on a
misuse and raise together.

Collectives (one ``all_to_all_single`` over the replica group for all layers at once, taken or
skipped alike on every rank from the plan): :meth:`ReplicaCache.enter` fetches the replicas
arriving at micro-batch m (every filled slot when m does not follow the micro-batch held now);
the backward of m sends home the gradients of the runs ending at m. Under FSDP the experts are
whole only inside the layer's forward, so there each layer fetches in its forward and returns
in its own backward (the index tensors of both are still built as the block starts).

The autograd link: the layer computes with ``_ReplicaWeights.apply(visit, *home_weights)``,
whose forward returns the cached replica weights and whose backward hands their gradient to
the cache and returns, as the home weights' gradient, what arrived for them. So the replica
gradient reaches the home parameter inside autograd, where FSDP's reduce-scatter also sees it;
a backward after the block is fine; an activation-checkpointing recompute inside the block
re-runs the forward, never the fetch. Reentrant checkpointing runs the node's backward once per
checkpointed region, each time with that region's share: a run ending at m then goes home in
parts, one collective each (still exact).

Expert weights must not change while a replica is kept: an optimizer step between micro-batches
(allowed only while no gradient waits) makes the next micro-batch fetch every replica again, as
does entering the held micro-batch again or starting a new pass over the plan at micro-batch 0.

What the caller must do: run the step's micro-batches 0..M-1 in order, each micro-batch's
backward (in its block or after it) before the backward of the next micro-batch, all of them
before ``optimizer.step()``. What breaks that is reported, never silently lost:

- entering a micro-batch other than the one held or the next while gradient waits:
  :meth:`entry_fault` (a ValueError on every rank, agreed as the block starts);
- a backward out of order (a run's gradient already sent home, or a slot's earlier run not yet):
  RuntimeError in the backward, on every rank;
- ``optimizer.step()`` while gradient waits: :meth:`pending_fault`, raised by the optimizer step
  pre-hook of :func:`guard_optimizer` (the Balancer's optimizer).

After an exception inside a block (its backward never runs) the step cannot end exact: the
gradient of runs ending there waits, so the optimizer refuses to step; the next ``plan_step``
drops it (zero the gradients, as for any abandoned step).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..topology import Topology
from .replicas import ReplicaRoute, exchange_rows, replica_route

__all__ = ["ReplicaCache", "guard_optimizer"]


class _Transfer:
    """One layer's replica transfer for this rank: its route and index tensors on the device."""

    def __init__(self, route: ReplicaRoute, device) -> None:
        self.route = route
        self.send_rows = torch.tensor(route.send_rows, dtype=torch.int64, device=device)    # home slots
        self.recv_slots = torch.tensor(route.recv_slots, dtype=torch.int64, device=device)  # spare slots


class _Visit:
    """Micro-batch ``m``'s use of the cache by layers ``ids`` (one autograd node).

    ``runs[l]``: ``(slot, run, leaves)`` of every filled spare slot of the group in layer l at m
    (slot in ``0..V-1``, run = its first micro-batch, leaves = m is its last; plain ints, so the
    backward reads no tensor); ``returns[l]``: layer l's gradient transfer home, where the
    replica group has runs ending at m.
    """

    def __init__(self, cache: "ReplicaCache", m: int, ids: list[int], returns: dict[int, _Transfer],
                 runs: dict[int, list[tuple[int, int, bool]]]) -> None:
        self.cache, self.m, self.ids, self.returns, self.runs = cache, m, ids, returns, runs

    def backward(self, grads, homes) -> list[torch.Tensor | None]:
        return self.cache._backward(self, grads, homes)


class _ReplicaWeights(torch.autograd.Function):
    """Forward: the cached spare weights of ``visit.ids``; backward: their gradient to the cache,
    and what arrived home as the gradient of ``home_weights`` (``gate_up, down`` per layer)."""

    @staticmethod
    def forward(ctx, visit: _Visit, *home_weights):
        ctx.visit = visit
        ctx.homes = [(w.shape, w.dtype, w.device) for w in home_weights]
        return tuple(w.detach() for l in visit.ids for w in visit.cache.weights[l])

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.visit.backward(grads, ctx.homes))


class ReplicaCache:
    """The replica weights and gradients of one step on this rank (see the module doc).

    Args:
        layers: the Balancer's ReLibraMoE layers (model order).
        spare_MLV: ``[M, L, V]`` int64 the plan's spare-slot contents (-1 empty), on the host.
        home_LK: ``[L, G*H]`` the placement the step runs on.
        intra_node: every replica sits in its expert's home node (the node's group carries them).
        topology, rank: the EP group's topology and this rank in it.
        prefetch: fetch for all layers as the block starts (False under FSDP: in each forward).
    """

    def __init__(self, layers, spare_MLV: torch.Tensor, home_LK: torch.Tensor, intra_node: bool,
                 topology: Topology, rank: int, prefetch: bool) -> None:
        t = topology
        self.layers, self.topology, self.rank, self.prefetch = layers, t, rank, prefetch
        self.home_LK, self.intra_node = home_LK, intra_node
        M, L, V = spare_MLV.shape
        S = t.spare_slots_per_gpu
        self.spare_MLV = spare_MLV
        empty = torch.full((1, L, V), -1, dtype=torch.int64)
        prev, nxt = torch.cat([empty, spare_MLV[:-1]]), torch.cat([spare_MLV[1:], empty])
        self.arriving_MLV = torch.where(spare_MLV != prev, spare_MLV, -1)
        self.leaving_MLV = torch.where(spare_MLV != nxt, spare_MLV, -1)
        m_idx = torch.arange(M)[:, None, None].expand(M, L, V)
        self.run_start_MLV = torch.where(spare_MLV != prev, m_idx, 0).cummax(0).values
        self.run_end_MLV = torch.where(spare_MLV != nxt, m_idx, M).flip(0).cummin(0).values.flip(0)
        ranks = list(t.gpus_of_node(t.node_of_gpu(rank))) if intra_node else list(range(t.num_gpus))
        self.group = layers[0].node_group if len(ranks) < t.num_gpus else layers[0].ep_group
        self.group_slots = torch.tensor([g * S + s for g in ranks for s in range(S)], dtype=torch.int64)
        self.device = layers[0].gate.weight.device
        self.held = -1  # the micro-batch whose replicas the slots hold (-1: none, or stale weights)
        self.weights: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * L
        self.grads: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * L
        self._open: dict[tuple[int, int], int] = {}  # (layer, slot) -> run whose backward began, gradient not home
        self._returned: set[tuple[int, int, int]] = set()  # (layer, slot, run) whose gradient went home
        self._fetches: dict[int, _Transfer] = {}  # still to fetch in the layer's forward (FSDP)
        self._visits: dict[int, _Visit] = {}
        self.closed = False

    # ------------------------------------------------------------------ checks
    def _waiting(self, l: int, slot: int, run: int) -> str:
        S, M = self.topology.spare_slots_per_gpu, self.spare_MLV.shape[0]
        e, end = int(self.spare_MLV[run, l, slot]), int(self.run_end_MLV[run, l, slot])
        return (f"the gradient of the replica of expert {e} in spare slot {slot % S} of rank {slot // S}, MoE layer "
                f"{l} (micro-batches {run}..{end} of {M}) has not gone home: it goes in the backward of "
                f"micro-batch {end}")

    def entry_fault(self, m: int) -> str:
        """Why entering micro-batch ``m`` would lose replica gradient, or "" (no communication;
        the same on every rank)."""
        if not 0 <= m < self.spare_MLV.shape[0] or m in (self.held, self.held + 1) or not self._open:
            return ""
        (l, slot), run = next(iter(self._open.items()))
        return (f"micro-batch {m} entered after micro-batch {self.held}, but {self._waiting(l, slot, run)}. Run the "
                f"step's micro-batches in order, each with its backward")

    def pending_fault(self) -> str:
        """Why an optimizer step now would miss replica gradient, or ""."""
        if not self._open:
            return ""
        (l, slot), run = next(iter(self._open.items()))
        return (f"optimizer.step() before every replica gradient of the step went home: {self._waiting(l, slot, run)}. "
                f"Run every micro-batch of the step with its backward first, or zero the gradients and call "
                f"plan_step again")

    # ------------------------------------------------------------------ forward side
    def _transfer(self, l: int, row_R: torch.Tensor) -> _Transfer | None:
        """Layer ``l``'s transfer for the replicas of ``row_R`` (None if none in the replica group)."""
        if not bool((row_R[self.group_slots] >= 0).any()):
            return None
        return _Transfer(replica_route(self.home_LK[l], row_R, self.topology, self.rank, self.intra_node),
                         self.device)

    def enter(self, m: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Prepare micro-batch ``m`` (collective when prefetching); per layer its spare weights
        (prefetch) or None (no replicas at m, or fetched in the layer's forward)."""
        L = len(self.layers)
        # after the micro-batch held, only arrivals; else (a new pass, the same micro-batch again,
        # weights changed by an optimizer step) every filled slot; so too for a layer whose forward
        # did not run to fetch the held micro-batch's replicas (FSDP)
        arriving = self.arriving_MLV[m].clone() if m == self.held + 1 else self.spare_MLV[m]
        for l in self._fetches:
            arriving[l] = self.spare_MLV[m, l]
        if m != self.held and (m == 0 or m != self.held + 1):  # a new pass over the plan: its runs begin afresh
            self._returned.clear()
        ids = [l for l in range(L) if bool((self.spare_MLV[m, l] >= 0).any())]
        fetches = {l: f for l in ids if (f := self._transfer(l, arriving[l])) is not None}
        returns = {l: f for l in ids if (f := self._transfer(l, self.leaving_MLV[m, l])) is not None}
        self.held = m
        starts, leaves = self.run_start_MLV[m].tolist(), (self.leaving_MLV[m] >= 0).tolist()
        runs = {l: [(x, starts[l][x], leaves[l][x]) for x in (self.spare_MLV[m, l] >= 0).nonzero().flatten().tolist()]
                for l in ids}
        out: list = [None] * L
        if not self.prefetch:
            self._fetches = fetches
            self._visits = {l: _Visit(self, m, [l], {l: returns[l]} if l in returns else {}, runs) for l in ids}
            return out
        homes = {l: self.layers[l].experts.local_weights() for l in ids}
        self._fetch(fetches, homes)
        if ids:
            spare = _ReplicaWeights.apply(_Visit(self, m, ids, returns, runs), *(w for l in ids for w in homes[l]))
            for i, l in enumerate(ids):
                out[l] = (spare[2 * i], spare[2 * i + 1])
        return out

    def layer_weights(self, l: int, gate_up_HFD: torch.Tensor, down_HDI: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``l``'s spare weights ``([S, F, D], [S, D, I])``, from its forward (no prefetch):
        fetches on the first call of the micro-batch (not in a recompute)."""
        fetch = self._fetches.pop(l, None)
        if fetch is not None:
            self._fetch({l: fetch}, {l: (gate_up_HFD, down_HDI)})
        else:
            self._ensure(l, gate_up_HFD, down_HDI)
        gu, dn = _ReplicaWeights.apply(self._visits[l], gate_up_HFD, down_HDI)
        return gu, dn

    def _ensure(self, l: int, gu: torch.Tensor, dn: torch.Tensor) -> None:
        if self.weights[l] is None:
            S = self.topology.spare_slots_per_gpu
            self.weights[l] = (gu.new_zeros(S, *gu.shape[1:]), dn.new_zeros(S, *dn.shape[1:]))

    @torch.no_grad()
    def _fetch(self, fetches: dict[int, _Transfer], homes: dict) -> None:
        """Replace the arriving replicas' rows of ``weights`` (new tensors), one all-to-all."""
        for l, (gu, dn) in homes.items():
            self._ensure(l, gu, dn)
        if not fetches:
            return
        rows = {l: torch.cat([homes[l][0].index_select(0, f.send_rows).flatten(1),
                              homes[l][1].index_select(0, f.send_rows).flatten(1)], 1) for l, f in fetches.items()}
        got = self._exchange(rows, {l: f.route.send_splits for l, f in fetches.items()},
                             {l: f.route.recv_splits for l, f in fetches.items()})
        for l, new in got.items():
            gu, dn = self.weights[l]
            width = gu[0].numel()
            slots = fetches[l].recv_slots
            self.weights[l] = (gu.index_copy(0, slots, new[:, :width].view(-1, *gu.shape[1:])),
                               dn.index_copy(0, slots, new[:, width:].view(-1, *dn.shape[1:])))

    # ------------------------------------------------------------------ backward side
    def _accumulate(self, visit: _Visit, l: int, g_gu: torch.Tensor, g_dn: torch.Tensor) -> None:
        """Add micro-batch ``visit.m``'s gradient of layer ``l``'s slots (empty slots add zeros);
        the runs' bookkeeping covers the whole group, so every rank raises alike."""
        m = visit.m
        for slot, run, leaves in visit.runs[l]:
            began = self._open.get((l, slot), run)
            if began != run:
                raise RuntimeError(f"ReLibraMoE replica backward of micro-batch {m}: {self._waiting(l, slot, began)}, "
                                   f"which has not run (run each micro-batch's backward, in order, before the next's)")
            if not leaves and (l, slot, run) in self._returned:
                raise RuntimeError(f"ReLibraMoE replica backward of micro-batch {m} ran after the backward that sent "
                                   f"the gradient of the replica in spare slot {slot} (group numbering) of MoE layer "
                                   f"{l} home (run each micro-batch's backward, in order, before the next's)")
            self._open[(l, slot)] = run
            if leaves:  # its gradient goes home in this backward
                del self._open[(l, slot)]
                self._returned.add((l, slot, run))
        acc = self.grads[l]
        self.grads[l] = (g_gu.clone(), g_dn.clone()) if acc is None else (acc[0] + g_gu, acc[1] + g_dn)

    def _backward(self, visit: _Visit, grads, homes) -> list[torch.Tensor | None]:
        if self.closed:
            raise RuntimeError(f"ReLibraMoE replica backward of micro-batch {visit.m} ran after plan_step started "
                               "the next step: run every micro-batch's backward before the next plan_step")
        for i, l in enumerate(visit.ids):
            self._accumulate(visit, l, grads[2 * i], grads[2 * i + 1])
        out: list[torch.Tensor | None] = [None] * (2 * len(visit.ids))
        if not visit.returns:
            return out
        rows = {}
        for l, ret in visit.returns.items():
            g_gu, g_dn = self.grads[l]
            rows[l] = torch.cat([g_gu.index_select(0, ret.recv_slots).flatten(1),
                                 g_dn.index_select(0, ret.recv_slots).flatten(1)], 1)
            g_gu.index_fill_(0, ret.recv_slots, 0)
            g_dn.index_fill_(0, ret.recv_slots, 0)
        got = self._exchange(rows, {l: r.route.recv_splits for l, r in visit.returns.items()},
                             {l: r.route.send_splits for l, r in visit.returns.items()})
        for l, new in got.items():
            i = visit.ids.index(l)
            (gu_shape, gu_dtype, dev), (dn_shape, dn_dtype, _) = homes[2 * i], homes[2 * i + 1]
            if not new.shape[0]:
                continue
            home = visit.returns[l].send_rows
            width = gu_shape[1:].numel()
            out[2 * i] = torch.zeros(gu_shape, dtype=gu_dtype, device=dev).index_add_(
                0, home, new[:, :width].view(-1, *gu_shape[1:]))
            out[2 * i + 1] = torch.zeros(dn_shape, dtype=dn_dtype, device=dev).index_add_(
                0, home, new[:, width:].view(-1, *dn_shape[1:]))
        return out

    def _exchange(self, rows: dict[int, torch.Tensor], send_splits: dict[int, list[int]],
                  recv_splits: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """:func:`exchange_rows` of layers ``rows`` over the replica group: one all-to-all per
        dtype (one in all but mixed-precision models), in the same order on every rank."""
        out = {}
        for dtype in sorted({r.dtype for r in rows.values()}, key=str):
            ids = [l for l in sorted(rows) if rows[l].dtype == dtype]
            got = exchange_rows([rows[l] for l in ids], [send_splits[l] for l in ids], [recv_splits[l] for l in ids],
                                self.group)
            out.update(zip(ids, got))
        return out

    def close(self) -> None:
        """The step is over (plan_step is planning the next): a late backward raises."""
        self.closed = True


def guard_optimizer(optimizer, cache_for: Callable[[object], ReplicaCache | None]) -> None:
    """Hooks on ``optimizer`` (if it has them) for the cache ``cache_for(optimizer)`` (None: none):
    before a step, RuntimeError while replica gradient waits to go home; after it, the cached
    replica weights are stale, so the next micro-batch fetches every replica again."""
    if not hasattr(optimizer, "register_step_pre_hook"):
        return

    def refuse_while_waiting(opt, args, kwargs):
        cache = cache_for(opt)
        fault = "" if cache is None else cache.pending_fault()
        if fault:
            raise RuntimeError(f"Balancer: {fault}")

    def forget_weights(opt, args, kwargs):
        cache = cache_for(opt)
        if cache is not None:
            cache.held = -1

    optimizer.register_step_pre_hook(refuse_while_waiting)
    optimizer.register_step_post_hook(forget_weights)
