"""Checkpoints across placements and worlds: 2 nodes x 2 GPUs, 1 node x 4 GPUs, one process (gloo).

The matrix, for every built-in policy P and both forms (a ``torch.save`` file of
``get_state(...)`` read back with ``weights_only=True``, and a DCP directory of
``get_state(..., full=False)``):

    world 1 (2 x 2)   P for steps 0-1 (reorder and hybrid move experts) -> save A;
                      the same objects run on through steps 2-4: the uninterrupted run U.
                      A -> fresh P on 2 x 2 (its policy state restored), step 2: bit for bit U
                      A -> fresh static on 1 x 4, step 2: U within fp32 -> save B
    test process      B -> fresh static, one process (mesh=None, no process group), step 3:
                      U within fp32 -> save C
    world 2 (2 x 2)   C -> fresh P on 2 x 2, step 4: U within fp32; then bad checkpoints

Every load is checked first bit for bit against the logical state (weights, AdamW moments and
steps) that was saved. World 1 also loads A the way plain torch does (``model`` and
``optimizer`` state dicts into fresh objects): the moments land on the wrong experts, which is
what this module's checks catch and what ``relibra.runtime.checkpoint`` fixes.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _moe_world import WORLD, Net, allreduce_dense_grads, logical_snapshot, max_err, outcome, same_error, step_data

import relibra
from relibra.plan import Placement
from relibra.runtime.balancer import Balancer
from relibra.runtime.checkpoint import SafeLoadPlanner, get_state, set_state
from relibra.testing import run_world

POLICIES = list(relibra.policies.BUILTINS)
FORMATS = ("plain", "dcp")
M, LR, TOL = 2, 2e-2, 2e-5


# ------------------------------------------------------------------------------ helpers
def _build(mesh, policy: str, init: dict | None = None, seed: int = 1):
    """Fresh model (random weights from ``seed`` unless ``init``), AdamW and Balancer."""
    torch.manual_seed(seed)
    model = Net(mesh)
    if init is not None:
        model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    return model, opt, Balancer(model, mesh=mesh, policy=policy, optimizer=opt, spare_slots_per_gpu=1)


def _step(model, opt, bal, step: int, rank: int | None, sum_dense: bool = True) -> None:
    """One training step on the step's data: this rank's tokens, or every rank's (``rank=None``);
    ``sum_dense``: sum the dense gradients over the ranks (False under FSDP, which does it)."""
    data = step_data(step, M)
    part = [data[m][rank] if rank is not None else
            tuple(torch.cat([data[m][r][i] for r in range(WORLD)]) for i in range(2)) for m in range(M)]
    bal.plan_step([routes for _, routes in part])
    for m, (x, _) in enumerate(part):
        with bal.micro_batch(m):
            out = model(x)
            ((out * out).sum() * 0.5).backward()
    if rank is not None and sum_dense:
        allreduce_dense_grads(model)
    opt.step()
    opt.zero_grad()


def _save(model, opt, bal, path: str, fmt: str, rank: int) -> None:
    if fmt == "plain":
        state = get_state(model, opt, bal)
        if rank == 0:
            torch.save(state, path + ".pt")
        if dist.is_initialized():
            dist.barrier()
    else:
        dcp.save(get_state(model, opt, bal, full=False), checkpoint_id=path + ".dcp")


def _load(model, opt, bal, path: str, fmt: str, strict: bool = True) -> None:
    if fmt == "plain":
        state = torch.load(path + ".pt", weights_only=True)
    else:
        state = get_state(model, opt, bal, full=False)
        dcp.load(state, checkpoint_id=path + ".dcp", planner=SafeLoadPlanner())
    set_state(model, opt, bal, state, strict=strict)


@contextlib.contextmanager
def _one_thread():
    """Tiny shapes in the test process: one intra-op thread (as in run_world's ranks), or
    thread hand-offs on the shared 2 cores cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _moved(bal) -> bool:
    return not bal.placement.equal(Placement.contiguous(bal.topology, bal.L))



# ------------------------------------------------------------------------------ world 1
def _world1(rank, mesh, tmp, init):
    from torch.distributed.device_mesh import init_device_mesh

    mesh_1x4 = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("gpu",))
    out = {}
    for policy in POLICIES:
        res = {}
        model, opt, bal = _build(mesh, policy, init)
        for s in (0, 1):
            _step(model, opt, bal, s, rank)
        res["moved"], res["steps_saved"] = _moved(bal), bal.steps_planned
        saved, placement = logical_snapshot(model, opt), bal.placement
        # the planning rank's policy state reaches every rank's Balancer.state_dict()
        policy_state = bal.state_dict()["policy_state"]
        res["policy_state"] = [t.tolist() for t in _tensors(policy_state)]
        naive = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), bal.state_dict())
        for fmt in FORMATS:
            _save(model, opt, bal, f"{tmp}/{policy}-A", fmt, rank)
        uninterrupted = {}
        for s in (2, 3, 4):
            _step(model, opt, bal, s, rank)
            uninterrupted[s] = logical_snapshot(model, opt)
        # plain torch: model + optimizer state dicts into fresh objects (contiguous placement).
        # Into a bare optimizer (no Balancer hooks it) the moments land on other experts ...
        m0, _, _ = _build(mesh, policy, seed=5)
        m0.load_state_dict(naive[0])
        bare = torch.optim.AdamW(m0.parameters(), lr=LR)
        bare.load_state_dict(naive[1])
        res["naive_error"] = max_err(logical_snapshot(m0, bare), saved)
        # ... into the Balancer's optimizer the placement stamp refuses it, and the way out it names
        # (the Balancer first, which moves the experts to the saved placement) restores it exactly
        m0, o0, b0 = _build(mesh, policy, seed=5)
        m0.load_state_dict(naive[0])
        try:
            o0.load_state_dict(naive[1])
            res["naive_refused"] = ""
        except ValueError as exc:
            res["naive_refused"] = str(exc)
        b0.load_state_dict(naive[2])
        o0.load_state_dict(naive[1])
        res["naive_after_balancer"] = max_err(logical_snapshot(m0, o0), saved)
        for fmt in FORMATS:
            m1, o1, b1 = _build(mesh, policy, seed=2)  # same world and policy: plans identical
            _load(m1, o1, b1, f"{tmp}/{policy}-A", fmt)
            res[f"{fmt} same loaded"] = max_err(logical_snapshot(m1, o1), saved)
            res[f"{fmt} same placement"] = bool(b1.placement.equal(placement))
            res[f"{fmt} same steps"] = b1.steps_planned
            _step(m1, o1, b1, 2, rank)
            res[f"{fmt} same step 2"] = max_err(logical_snapshot(m1, o1), uninterrupted[2])
            m4, o4, b4 = _build(mesh_1x4, "static", seed=3)  # 1 node x 4 GPUs, another policy
            _load(m4, o4, b4, f"{tmp}/{policy}-A", fmt, strict=False)
            res[f"{fmt} 1x4 loaded"] = max_err(logical_snapshot(m4, o4), saved)
            _step(m4, o4, b4, 2, rank)
            res[f"{fmt} 1x4 step 2"] = max_err(logical_snapshot(m4, o4), uninterrupted[2])
            _save(m4, o4, b4, f"{tmp}/{policy}-B-{fmt}", fmt, rank)
            _keep(logical_snapshot(m4, o4), f"{tmp}/{policy}-B-{fmt}", rank)
        _keep({s: uninterrupted[s] for s in (3, 4)}, f"{tmp}/{policy}-U", rank)
        out[policy] = res
    return out


def _keep(snapshot, path: str, rank: int) -> None:
    """Rank 0 writes what a later stage compares against (results travel back as numbers only)."""
    if rank == 0:
        torch.save(snapshot, path + ".snapshot")


def _kept(path: str):
    return torch.load(path + ".snapshot", weights_only=True)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


# ------------------------------------------------------------------------------ test process
def _one_process(tmp) -> dict:
    """B -> one process (no process group), step 3 -> save C. Returns per (policy, form) errors."""
    assert not dist.is_initialized()
    out = {}
    for policy, fmt in ((p, f) for p in POLICIES for f in FORMATS):
        with _one_thread():
            model, opt, bal = _build(None, "static", seed=4)
            _load(model, opt, bal, f"{tmp}/{policy}-B-{fmt}", fmt, strict=False)
            loaded = max_err(logical_snapshot(model, opt), _kept(f"{tmp}/{policy}-B-{fmt}"))
            _step(model, opt, bal, 3, None)
            step3 = max_err(logical_snapshot(model, opt), _kept(f"{tmp}/{policy}-U")[3])
            _save(model, opt, bal, f"{tmp}/{policy}-C-{fmt}", fmt, 0)
            _keep(logical_snapshot(model, opt), f"{tmp}/{policy}-C-{fmt}", 0)
            out[policy, fmt] = dict(loaded=loaded, step3=step3)
    return out


# ------------------------------------------------------------------------------ world 2
def _world2(rank, mesh, tmp):
    out = {}
    for policy in POLICIES:
        for fmt in FORMATS:
            model, opt, bal = _build(mesh, policy, seed=6)
            _load(model, opt, bal, f"{tmp}/{policy}-C-{fmt}", fmt, strict=False)
            loaded = max_err(logical_snapshot(model, opt), _kept(f"{tmp}/{policy}-C-{fmt}"))
            _step(model, opt, bal, 4, rank)
            step4 = max_err(logical_snapshot(model, opt), _kept(f"{tmp}/{policy}-U")[4])
            out[policy, fmt] = dict(loaded=loaded, step4=step4)
    out["bad"] = _bad_checkpoints(rank, mesh, tmp)
    out["fsdp"] = _fsdp_checkpoints(rank, mesh, tmp)
    return out


def _fsdp_checkpoints(rank, mesh, tmp) -> dict:
    """Saved under FSDP2 (edp 2 x ep 2, hybrid), loaded without it on 2 x 2 (exact, then a step
    like FSDP's own); loading into an FSDP2 model is refused up front."""
    from relibra.runtime.fsdp import apply_fsdp, expert_data_parallel_mesh

    _, dp_mesh, edp_mesh, ep_mesh = expert_data_parallel_mesh(2, 2)

    def sharded(seed: int):
        torch.manual_seed(seed)
        model = Net(ep_mesh)
        apply_fsdp(model, dp_mesh, edp_mesh, reduce="sum")
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        return model, opt, Balancer(model, mesh=ep_mesh, policy="hybrid", optimizer=opt, spare_slots_per_gpu=1)

    model, opt, bal = sharded(0)
    for s in (0, 1):
        _step(model, opt, bal, s, rank, sum_dense=False)
    saved = logical_snapshot(model, opt)
    for fmt in FORMATS:
        _save(model, opt, bal, f"{tmp}/fsdp", fmt, rank)
    _step(model, opt, bal, 2, rank, sum_dense=False)
    after = logical_snapshot(model, opt)
    out = {}
    for fmt in FORMATS:
        plain_model, plain_opt, plain_bal = _build(mesh, "hybrid", seed=2)
        _load(plain_model, plain_opt, plain_bal, f"{tmp}/fsdp", fmt)
        out[f"{fmt} loaded"] = max_err(logical_snapshot(plain_model, plain_opt), saved)
        _step(plain_model, plain_opt, plain_bal, 2, rank)
        out[f"{fmt} step 2"] = max_err(logical_snapshot(plain_model, plain_opt), after)
    out["into fsdp"] = outcome(_load, *sharded(3), f"{tmp}/fsdp", "plain")
    return out


def _bad_checkpoints(rank, mesh, tmp) -> dict:
    """Broken checkpoints (hybrid's A): the same ValueError on every rank, nothing changed."""
    good = torch.load(f"{tmp}/hybrid-A.pt", weights_only=True)

    def edit(change, only_rank=None):
        state = copy.deepcopy(good)
        if only_rank is None or rank == only_rank:
            change(state)
        return state

    def dup_expert(s):
        s["balancer"]["placement"][0, 1] = s["balancer"]["placement"][0, 0]

    def more_experts(s):
        key = "moe1.experts.gate_up_proj"
        s["model"][key] = torch.cat([s["model"][key], s["model"][key]])

    def one_layer(s):
        for part in (s["model"], s["optimizer"]["state"]):
            for key in [k for k in part if k.startswith("moe2.")]:
                del part[key]
        s["optimizer"]["param_groups"][0]["params"] = [
            n for n in s["optimizer"]["param_groups"][0]["params"] if not n.startswith("moe2.")]

    def renamed(s):
        s["model"]["middle.weight"] = s["model"].pop("mid.weight")

    def moment_shape(s):
        st = s["optimizer"]["state"]["moe2.experts.down_proj"]
        st["exp_avg"] = st["exp_avg"][:, :4]

    def bad_policy_state(s):
        s["balancer"]["policy_state"]["reorder"]["placement"][1, 0] = 99

    def layer_names(s):
        s["balancer"]["layers"] = ["blocks.0.moe", "blocks.1.moe"]

    def other_policy(s):
        s["balancer"]["policy"] = "static"

    cases = {
        "placement": edit(dup_expert),
        "placement_rank2": edit(dup_expert, only_rank=2),
        "experts": edit(more_experts),
        "layers": edit(one_layer),
        "other_model": edit(renamed),
        "moment_shape": edit(moment_shape),
        "policy": edit(other_policy),
        "policy_state": edit(bad_policy_state),
        "layer_names": edit(layer_names),
        "not_a_dict": [],
    }
    model, opt, bal = _build(mesh, "hybrid", seed=7)
    _step(model, opt, bal, 0, rank)  # a placement, weights and moments worth keeping
    before, placement, steps = logical_snapshot(model, opt), bal.placement, bal.steps_planned
    out = {}
    for case, state in cases.items():
        out[case] = outcome(set_state, model, opt, bal, state)
        out[case + " unchanged"] = (max_err(logical_snapshot(model, opt), before) == 0.0
                                    and bal.placement.equal(placement) and bal.steps_planned == steps)
    # DCP fills get_state's copies, so a load that set_state then refuses (another policy) changes nothing
    out["dcp_policy"] = outcome(_load, model, opt, bal, f"{tmp}/static-C-dcp", "dcp")
    out["dcp_policy unchanged"] = (max_err(logical_snapshot(model, opt), before) == 0.0
                                   and bal.placement.equal(placement) and bal.steps_planned == steps)
    one = copy.deepcopy(good["balancer"])  # Balancer.load_state_dict on its own: one MoE layer
    one["layers"], one["placement"] = one["layers"][:1], one["placement"][:1]
    out["balancer_layers"] = outcome(bal.load_state_dict, one)
    out["balancer_layers unchanged"] = bal.placement.equal(placement) and bal.steps_planned == steps
    set_state(model, opt, bal, good)  # the world still works: a good load, then a step
    _step(model, opt, bal, 2, rank)
    out["good_after"] = True
    return out


# ------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("checkpoints"))
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in Net(None).state_dict().items()}
    world1 = run_world(_world1, args=(tmp, init), timeout=400)
    one = _one_process(tmp)
    world2 = run_world(_world2, args=(tmp,), timeout=300)
    return world1, one, world2


@pytest.mark.distributed
@pytest.mark.parametrize("policy", POLICIES)
def test_resume_across_placements_and_worlds(policy, matrix):
    world1, one, world2 = matrix
    ranks = [r[policy] for r in world1]
    if policy in ("reorder", "hybrid"):
        assert ranks[0]["moved"], f"{policy} moved no expert before the save: the matrix would prove nothing"
    assert ranks[0]["steps_saved"] == 2
    for rank, res in enumerate(ranks):
        assert res["policy_state"] == ranks[0]["policy_state"], f"rank {rank}: another policy state"
        for fmt in FORMATS:
            where = f"{policy}, {fmt}, rank {rank}"
            assert res[f"{fmt} same loaded"] == 0.0, f"{where}: loaded state differs from the saved"
            assert res[f"{fmt} same placement"] and res[f"{fmt} same steps"] == 2, where
            assert res[f"{fmt} same step 2"] == 0.0, f"{where}: resumed as {policy} 2x2 is not bit-exact"
            assert res[f"{fmt} 1x4 loaded"] == 0.0, f"{where}: loaded on 1x4 differs from the saved"
            assert res[f"{fmt} 1x4 step 2"] < TOL, f"{where}: static 1x4 step 2 off by {res[f'{fmt} 1x4 step 2']}"
    for fmt in FORMATS:
        res = one[policy, fmt]
        assert res["loaded"] == 0.0, f"{policy}, {fmt}: one process loaded another state"
        assert res["step3"] < TOL, f"{policy}, {fmt}: one process step 3 off by {res['step3']}"
        for rank, r in enumerate(world2):
            back = r[policy, fmt]
            assert back["loaded"] == 0.0, f"{policy}, {fmt}, rank {rank}: back on 2x2 loaded another state"
            assert back["step4"] < TOL, f"{policy}, {fmt}, rank {rank}: back on 2x2 step 4 off by {back['step4']}"


@pytest.mark.distributed
def test_plain_torch_state_dicts_put_moments_on_the_wrong_experts(matrix):
    """What relibra.runtime.checkpoint fixes: after hybrid reordered, model.state_dict() +
    optimizer.state_dict() loaded into fresh objects give the right weights but moments of
    other experts (the check above, which the checkpoint passes with 0.0, catches it)."""
    world1, _, _ = matrix
    for rank, res in enumerate(world1):
        assert res["hybrid"]["naive_error"] > 1e-3, f"rank {rank}: {res['hybrid']['naive_error']}"


@pytest.mark.distributed
def test_plain_optimizer_state_is_refused_under_another_placement_and_loads_after_the_balancer(matrix):
    """The Balancer stamps its optimizer's state dict with the placement: loading it under
    another placement raises (instead of the silent error above); after balancer.load_state_dict
    the same plain state loads exactly. static never moves, so its state always loads."""
    world1, _, _ = matrix
    for rank, res in enumerate(world1):
        for policy in relibra.policies.BUILTINS:
            r = res[policy]
            if r["moved"]:
                assert "this optimizer state was saved under" in r["naive_refused"], (rank, policy, r["naive_refused"])
                assert "balancer.load_state_dict" in r["naive_refused"]
            else:
                assert r["naive_refused"] == "", (rank, policy, r["naive_refused"])
            assert r["naive_after_balancer"] == 0.0, (rank, policy, r["naive_after_balancer"])


@pytest.mark.distributed
def test_fsdp_checkpoints_load_without_fsdp_and_loading_into_fsdp_is_refused(matrix):
    _, _, world2 = matrix
    for rank, r in enumerate(world2):
        res = r["fsdp"]
        for fmt in FORMATS:
            assert res[f"{fmt} loaded"] == 0.0, f"rank {rank}, {fmt}: {res[f'{fmt} loaded']}"
            assert res[f"{fmt} step 2"] < TOL, f"rank {rank}, {fmt}: {res[f'{fmt} step 2']}"
        kind, msg = res["into fsdp"]
        assert kind == "ValueError" and "loading into FSDP2 models is not supported" in msg, (kind, msg)


@pytest.mark.distributed
def test_bad_checkpoints_fail_on_every_rank_and_change_nothing(matrix):
    _, _, world2 = matrix
    expect = {
        "placement": ("balancer state key 'placement'", "layer 0: expert", "has 2 home slots"),
        "placement_rank2": ("rank 2: balancer state key 'placement'",),
        "experts": ("model key 'moe1.experts.gate_up_proj' has shape (16, 12, 8) in the checkpoint, (8, 12, 8)",),
        "layers": ("model key 'moe2.gate.weight' is missing from the checkpoint",),
        "other_model": ("model key 'mid.weight' is missing from the checkpoint",),
        "moment_shape": ("optimizer state key 'moe2.experts.down_proj.exp_avg' has shape (8, 4, 6)",),
        "policy": ("balancer state key 'policy': the checkpoint was saved by policy 'static', this Balancer "
                   "runs 'hybrid' (load with strict=False to start it fresh)",),
        "policy_state": ("balancer state key 'policy_state': reorder state key 'placement'", "outside [0, 8)"),
        "layer_names": ("balancer state key 'layers': MoE layer 0 is 'blocks.0.moe' in the checkpoint, 'moe1'",),
        "not_a_dict": ("a checkpoint state must be a dict", "got list"),
        "balancer_layers": ("Balancer.load_state_dict", "balancer state key 'layers'", "['moe1']"),
        "dcp_policy": ("set_state", "balancer state key 'policy': the checkpoint was saved by policy 'static'",),
    }
    for case, needles in expect.items():
        same_error([r["bad"][case] for r in world2], "ValueError", ("nothing was changed on any rank", *needles), case)
        assert all(r["bad"][case + " unchanged"] for r in world2), f"{case}: something changed"
    assert all(r["bad"]["good_after"] for r in world2)


def test_one_process_checkpoint_round_trip_and_bad_input(tmp_path):
    """mesh=None, no process group: a reordering policy's checkpoint loads exactly, and a bad
    one raises ValueError naming the key with nothing changed (the optimizer stays fresh)."""
    with _one_thread():
        model, opt, bal = _build(None, "hybrid")
        for s in (0, 1):
            _step(model, opt, bal, s, None)
    state = get_state(model, opt, bal)
    torch.save(state, tmp_path / "one.pt")
    fresh, fresh_opt, fresh_bal = _build(None, "hybrid", seed=9)
    set_state(fresh, fresh_opt, fresh_bal, torch.load(tmp_path / "one.pt", weights_only=True))
    assert max_err(logical_snapshot(fresh, fresh_opt), logical_snapshot(model, opt)) == 0.0
    assert fresh_bal.placement.equal(bal.placement) and fresh_bal.steps_planned == 2
    bad = copy.deepcopy(state)
    bad["balancer"]["placement"] = bad["balancer"]["placement"][:1]
    other, other_opt, other_bal = _build(None, "hybrid", seed=9)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"key 'placement' must be \[2, 8\] \(layers, experts\), got \(1, ") as info:
        set_state(other, other_opt, other_bal, bad)
    assert "nothing was changed" in str(info.value)
    assert not other_opt.state, "a failed load left optimizer state behind"
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="the optimizer is not the Balancer's"):
        get_state(model, torch.optim.AdamW(model.parameters()), bal)


def test_the_docs_example_runs_and_restores_exactly(tmp_path, monkeypatch):
    """docs/checkpoints.md's runnable example, as written: both loads restore the saved state."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "checkpoints.md").read_text()
    example = re.findall(r"```python\n(.*?)```", doc, flags=re.S)[0]
    monkeypatch.setattr("tempfile.mkdtemp", lambda: str(tmp_path))
    namespace: dict = {}
    with _one_thread():
        exec(compile(example, "docs/checkpoints.md", "exec"), namespace)
    saved = logical_snapshot(namespace["model"], namespace["opt"])
    for suffix in ("2", "3"):
        assert max_err(logical_snapshot(namespace["model" + suffix], namespace["opt" + suffix]), saved) == 0.0
        assert namespace["balancer" + suffix].placement.equal(namespace["balancer"].placement)
        assert namespace["balancer" + suffix].steps_planned == 2
