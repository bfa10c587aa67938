"""Collective order on a gloo world (2 nodes x 2 GPUs): a rank out of step raises, never aborts.

The MoE layers' collectives pair up across ranks by order, so every rank must run every
micro-batch of a step, in the same order, empty or not. A rank that swaps two micro-batches or
skips an empty one must make every rank raise the same ValueError naming where each side is
(not a gloo abort, not a hang until the world's timeout), and leave the world usable; a run in
order must be unchanged by the check and pay one small all-reduce per layer call (plus one as
each micro-batch block starts and ends).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist
from _moe_world import Net, outcome, same_error, step_data
from hypothesis import given, settings
from hypothesis import strategies as st

from relibra.runtime import layer as layer_module
from relibra.runtime.balancer import Balancer
from relibra.runtime.comm import KEY_LIMIT
from relibra.testing import run_world

EMPTY_RANK = 2  # step_data: rank 2 has no token in micro-batch 1



def _run_micro_batch(bal, model, m, x):
    with bal.micro_batch(m):
        model(x).square().sum().backward()


def _good_step(bal, model, data, rank):
    """Every micro-batch in order, empty ones included: proves the world is still usable."""
    bal.plan_step([data[m][rank][1] for m in range(len(data))])
    for m in range(len(data)):
        _run_micro_batch(bal, model, m, data[m][rank][0])
    return True


def _swapped(bal, model, rank, x):
    for m in ([1, 0] if rank == EMPTY_RANK else [0, 1]):
        _run_micro_batch(bal, model, m, x[m])


def _skips_forward(bal, model, rank, x):
    """Enters the block of its empty micro-batch 1 (the step's last) and runs nothing in it."""
    for m in range(2):
        with bal.micro_batch(m):
            if x[m].numel():
                model(x[m]).square().sum().backward()


def _skips_block(bal, model, rank, x):
    """Leaves out the whole block of its empty micro-batch 1 (of 3: not the last)."""
    for m in range(3):
        if x[m].numel():
            _run_micro_batch(bal, model, m, x[m])


def _outside_block(bal, model, rank, x):
    """Runs micro-batch 0's forward without the Balancer's block."""
    if rank == EMPTY_RANK:
        model(x[0])
    else:
        _run_micro_batch(bal, model, 0, x[0])


FAULTS = {"swapped": (_swapped, 2), "skips_forward": (_skips_forward, 2), "skips_block": (_skips_block, 3),
          "outside_block": (_outside_block, 2)}  # case -> (what the ranks run, micro-batches)


def _faults_worker(rank, mesh):
    torch.manual_seed(0)
    model = Net(mesh)
    out = {}
    for policy in ("static", "replicate"):  # replicate: the block fetches replicas (a collective) first
        bal = Balancer(model, mesh=mesh, policy=policy, spare_slots_per_gpu=1)
        for case, (run, M) in FAULTS.items():
            data = step_data(0, M)
            bal.plan_step([data[m][rank][1] for m in range(M)])
            model.zero_grad()
            out[f"{policy}/{case}"] = outcome(partial(run, bal, model, rank, [d[rank][0] for d in data]))
            out[f"{policy}/{case}/then"] = _good_step(bal, model, step_data(1, 2), rank)
    return out


@pytest.fixture(scope="module")
def fault_results():
    return run_world(_faults_worker, timeout=120)


@pytest.mark.parametrize("policy", ["static", "replicate"])
@pytest.mark.parametrize("case,needles", [
    ("swapped", ("ranks 0, 1, 3 at train micro-batch 0, entering Balancer.micro_batch",
                 "rank 2 at train micro-batch 1, entering Balancer.micro_batch")),
    ("skips_forward", ("ranks 0, 1, 3 at train micro-batch 1, forward of MoE layer 0",
                       "rank 2 at train micro-batch 1, leaving Balancer.micro_batch")),
    ("skips_block", ("ranks 0, 1, 3 at train micro-batch 1, entering Balancer.micro_batch",
                     "rank 2 at train micro-batch 2, entering Balancer.micro_batch")),
    ("outside_block", ("ranks 0, 1, 3 at train micro-batch 0, entering Balancer.micro_batch",
                       "rank 2 at train, outside any micro-batch block, forward of MoE layer 0")),
])
def test_a_rank_out_of_step_raises_the_same_value_error_on_every_rank(fault_results, policy, case, needles):
    msg = same_error([r[f"{policy}/{case}"] for r in fault_results], "ValueError",
                     needles + ("every micro-batch of a step in the same order, empty or not",), case)
    assert msg.startswith("ranks of the expert-parallel group are out of step: "), msg
    assert all(r[f"{policy}/{case}/then"] for r in fault_results), "the world did not run a good step after"


def _in_order_worker(rank, mesh):
    """The same steps with the order check on and off: identical numbers; count the all-reduces."""
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    out = {}
    for agree in (True, False):
        torch.manual_seed(0)
        model = Net(mesh)
        for layer in (model.moe1, model.moe2):
            layer.agree_input_errors = agree
        bal = Balancer(model, mesh=mesh, policy="replicate", spare_slots_per_gpu=1)
        outs, per_block = [], []
        for step in range(2):
            data = step_data(step, 2)
            bal.plan_step([data[m][rank][1] for m in range(2)])
            for m in range(2):  # rank 2's micro-batch 1 is empty: it runs anyway
                dist.all_reduce = counting_all_reduce
                try:
                    with bal.micro_batch(m):
                        y = model(data[m][rank][0])
                        y.square().sum().backward()
                finally:
                    dist.all_reduce = all_reduce
                per_block.append(list(calls))
                calls.clear()
                outs.append(y.detach().clone())
        grads = {n: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).clone()
                 for n, p in model.named_parameters() if p.grad is not None}
        out[agree] = dict(outs=outs, grads=grads, all_reduces=per_block)
    on, off = out[True], out[False]  # compared here: tensors do not outlive a forked rank
    return dict(outs_equal=all(torch.equal(a, b) for a, b in zip(on["outs"], off["outs"])),
                grads_equal=on["grads"].keys() == off["grads"].keys() and len(on["grads"]) > 0
                and all(torch.equal(on["grads"][k], off["grads"][k]) for k in on["grads"]),
                all_reduces_on=on["all_reduces"], all_reduces_off=off["all_reduces"])


def test_a_run_in_order_is_unchanged_and_pays_one_all_reduce_per_layer_call():
    for rank, res in enumerate(run_world(_in_order_worker, timeout=120)):
        assert res["outs_equal"] and res["grads_equal"], f"rank {rank}: the order check changed the numbers"
        # per block: start, MoE layer 0, MoE layer 1, end; each two int64 (position and error rank packed)
        assert res["all_reduces_on"] == [[2, 2, 2, 2]] * 4, f"rank {rank}: {res['all_reduces_on']}"
        assert res["all_reduces_off"] == [[]] * 4, f"rank {rank}: {res['all_reduces_off']}"


_positions = st.tuples(st.integers(0, 255), st.integers(-1, 2**24 - 2),
                       st.integers(layer_module.BLOCK_END, 2**14 + layer_module.BLOCK_END - 1))


@settings(max_examples=200)
@given(a=_positions, b=_positions)
def test_positions_pack_into_distinct_keys_that_read_back(a, b):
    """Two ranks at different positions must never send the same key (the check would miss them)."""
    key_a, key_b = layer_module._position_key(*a), layer_module._position_key(*b)
    assert 0 <= key_a < KEY_LIMIT and (key_a == key_b) == (a == b)
    phase, m, layer = a
    text = layer_module._describe_position(key_a)
    assert (f"micro-batch {m}," in text) == (m >= 0) and (f"MoE layer {layer}" in text) == (layer >= 0), text
    index, name = divmod(phase, len(layer_module.PHASES))
    assert text.startswith(layer_module.PHASES[name] if index == 0 else f"{layer_module.PHASES[name]} (pass {index})")
