"""relibra.routing: every route format in, exact loads out; every bad input refused by name."""

from __future__ import annotations

import base64
import json
import random
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relibra.routing import (
    RouteStore,
    align_routes,
    decode_routed_experts,
    from_megatron,
    from_sglang,
    from_verl,
    from_vllm,
    loads_from_routes,
    micro_batch_groups,
    micro_batch_loads,
    micro_batch_rank_loads,
    moe_layer_ids,
    routes_for_micro_batch,
    to_megatron,
    token_key,
    verl_sequences,
)
from relibra.routing.trace_file import Trace, load_trace, save_trace


def loop_loads(seqs, num_experts, groups, moe_layers, ranks=None, num_ranks=1):
    """Plain-Python reference: count every (micro-batch, layer, rank, expert) one by one."""
    out = np.zeros((len(groups), len(moe_layers), num_ranks, num_experts), dtype=np.int64)
    for m, group in enumerate(groups):
        for i in group:
            r = 0 if ranks is None else ranks[i]
            for token in np.asarray(seqs[i]):
                for li, layer in enumerate(moe_layers):
                    for e in token[layer]:
                        if e >= 0:
                            out[m, li, r, e] += 1
    return torch.from_numpy(out)


def random_seqs(rng, n, num_layers, top_k, num_experts, max_len=7, pad=0.2):
    seqs = []
    for _ in range(n):
        length = int(rng.integers(0, max_len + 1))
        routes = rng.integers(0, num_experts, size=(length, num_layers, top_k))
        routes[rng.random((length, num_layers, top_k)) < pad] = -1
        seqs.append(routes.astype(np.int32))
    return seqs


# --------------------------------------------------------------------------- exact loads
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 6),
    num_layers=st.integers(1, 4),
    top_k=st.integers(1, 3),
    num_experts=st.integers(1, 9),
    num_ranks=st.integers(1, 3),
    dense=st.integers(0, 1),
)
def test_loads_match_loop_reference(seed, n, num_layers, top_k, num_experts, num_ranks, dense):
    rng = np.random.default_rng(seed)
    total_layers = num_layers + dense
    seqs = random_seqs(rng, n, total_layers, top_k, num_experts)
    for s in seqs:  # dense rows hold garbage that must be ignored, as vLLM's zeros are
        s[:, :dense] = 0
    order = list(rng.permutation(n))
    cut = int(rng.integers(0, n + 1))
    groups = [order[:cut], order[cut:]]
    ranks = [int(r) for r in rng.integers(0, num_ranks, size=n)]
    moe = list(range(dense, total_layers))

    loads = micro_batch_loads(seqs, num_experts, micro_batches=groups, first_k_dense=dense or None)
    rank_loads = micro_batch_rank_loads(seqs, num_experts, ranks, num_ranks, micro_batches=groups, moe_layers=moe)
    want = loop_loads(seqs, num_experts, groups, moe, ranks, num_ranks)
    assert loads.dtype == torch.int64 and loads.shape == (2, num_layers, num_experts)
    assert torch.equal(rank_loads, want)
    assert torch.equal(loads, want.sum(2))
    # conservation: every non-padding id is counted exactly once
    assert int(loads.sum()) == sum(int((s[:, dense:] >= 0).sum()) for s in seqs)
    for m, group in enumerate(groups):
        routes = routes_for_micro_batch(seqs, num_experts, group, first_k_dense=dense or None)
        assert routes.dtype == torch.int64 and routes.shape[1:] == (num_layers, top_k)
        assert torch.equal(loads_from_routes(routes, num_experts), loads[m])


def test_global_layer_ids_and_dense_rows():
    # 4 global layers, layers 0 and 2 dense (rows of zeros), MoE layers 1 and 3
    seq = torch.zeros(3, 4, 2, dtype=torch.int32)
    seq[:, 1] = torch.tensor([[0, 1], [1, 2], [2, 3]])
    seq[:, 3] = torch.tensor([[3, 3], [3, -1], [-1, -1]])
    loads = micro_batch_loads([seq], 4, moe_layers=[1, 3])
    assert loads.tolist() == [[[1, 2, 2, 1], [0, 0, 0, 3]]]
    assert moe_layer_ids(61, first_k_dense=3) == list(range(3, 61))
    assert moe_layer_ids(2) == [0, 1]


def test_moe_layers_must_be_integers():
    # [0.5] used to be read as layer 0
    assert moe_layer_ids(4, [np.int64(1), torch.tensor(3)]) == [1, 3]
    assert moe_layer_ids(4, np.array([0, 2])) == [0, 2] and moe_layer_ids(4, torch.tensor([1, 2])) == [1, 2]
    for bad in ([0.5], [1.0], [True], [np.float64(2.0)], [torch.tensor(1.5)], ["1"]):
        with pytest.raises(ValueError, match=r"moe_layers must hold integer layer ids, got "):
            moe_layer_ids(4, bad)
    with pytest.raises(ValueError, match=r"moe_layers must be a sequence"):
        moe_layer_ids(4, 3)
    seq = torch.zeros(3, 4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"got 0.5 \(float\)"):
        micro_batch_loads([seq], 4, moe_layers=[0.5, 3])


def test_micro_batch_sizes_and_index_lists():
    seqs = [np.full((1, 1, 1), e) for e in range(4)]
    by_size = micro_batch_loads(seqs, 4, micro_batches=[1, 3])
    assert by_size[:, 0].tolist() == [[1, 0, 0, 0], [0, 1, 1, 1]]
    by_index = micro_batch_loads(seqs, 4, micro_batches=[[3, 0], [], [2]])
    assert by_index[:, 0].tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]]
    assert micro_batch_groups(3, None) == [[0, 1, 2]]


def test_empty_and_all_padding_sequences():
    seqs = [np.zeros((0, 2, 2), dtype=np.int64), np.full((3, 2, 2), -1)]
    assert micro_batch_loads(seqs, 5).sum() == 0
    routes = routes_for_micro_batch(seqs, 5)
    assert routes.shape == (0, 2, 2)  # padding tokens dropped
    assert routes_for_micro_batch(seqs, 5, drop_padding=False).shape == (3, 2, 2)


def test_torch_numpy_list_inputs_agree():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 6, size=(5, 3, 2))
    a = micro_batch_loads([arr], 6)
    assert torch.equal(a, micro_batch_loads([torch.from_numpy(arr).int()], 6))
    assert torch.equal(a, micro_batch_loads([arr.tolist()], 6))
    assert torch.equal(a, micro_batch_loads([arr.astype(np.uint8)], 6))
    parts = [torch.from_numpy(arr[:2]).to(torch.int16), arr[2:].astype(np.uint8)]
    mixed = micro_batch_loads(parts, 6, micro_batches=[2])
    assert torch.equal(a, mixed)  # mixed dtypes inside one micro-batch


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "seqs, kwargs, match",
    [
        ([np.array([[[0, 7]]])], {}, r"sequence 0\[0, 0, 1\] = 7 is not an expert id in \[0, 6\)"),
        ([np.zeros((2, 3, 1), int), np.array([[[0], [0], [9]]])], {}, r"sequence 1\[0, 2, 0\] = 9 is not an expert id"),
        ([np.array([[[0], [-2]]])], {}, r"= -2 is not an expert id"),
        ([np.zeros((2, 3, 1), int) + [[[0], [0], [6]]]], {"first_k_dense": 1}, r"sequence 0\[0, 2, 0\] = 6"),
        ([np.zeros((2, 2, 1), np.float32)], {}, r"integer expert ids, got dtype float32"),
        ([torch.zeros(2, 2, 1)], {}, r"integer expert ids, got dtype torch.float32"),
        ([np.zeros((2, 2, 1), bool)], {}, r"got dtype bool"),
        ([torch.zeros(2, 2, 1, dtype=torch.bool)], {}, r"got dtype torch.bool"),
        ([np.zeros((2, 2), int)], {}, r"sequence 0 must be \[tokens, layers, top_k\]"),
        ([np.zeros((2, 2, 1), int), np.zeros((2, 3, 1), int)], {}, r"sequence 1 has routes of shape .* but sequence 0"),
        ([[[[0, 1]], [[0]]]], {}, r"ragged|rectangular"),
        ([np.zeros((1, 2, 1), int)], {"moe_layers": [0, 2]}, r"moe_layers holds layer 2"),
        ([np.zeros((1, 2, 1), int)], {"moe_layers": [1, 0]}, r"unique and ascending"),
        ([np.zeros((1, 2, 1), int)], {"moe_layers": [1], "first_k_dense": 1}, r"not both"),
        ([np.zeros((1, 2, 1), int)], {"first_k_dense": 2}, r"first_k_dense=2"),
        ([np.zeros((1, 2, 1), int)] * 2, {"micro_batches": [1, 2]}, r"add up to 3, but there are 2"),
        (
            [np.zeros((1, 2, 1), int)] * 2,
            {"micro_batches": [[0], [0, 1]]},
            r"sequence 0 is in micro-batch 0 and micro-batch 1",
        ),
        ([np.zeros((1, 2, 1), int)] * 2, {"micro_batches": [[2]]}, r"micro-batch 0 holds sequence 2"),
        ([], {}, r"no sequences"),
        (np.zeros((2, 3, 2, 1), int), {}, r"verl_sequences"),
    ],
)
def test_bad_routes_raise_naming_the_fault(seqs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        micro_batch_loads(seqs, 6, **kwargs)


def test_uint8_with_more_than_256_experts_is_refused():
    with pytest.raises(ValueError, match=r"uint8.*300 experts"):
        micro_batch_loads([np.zeros((1, 1, 1), np.uint8)], 300)
    with pytest.raises(ValueError, match=r"uint8.*300 experts"):
        micro_batch_loads([torch.zeros(1, 1, 1, dtype=torch.uint8)], 300)


def test_bad_ranks_and_num_experts():
    seqs = [np.zeros((1, 1, 1), int)] * 2
    with pytest.raises(ValueError, match=r"ranks has 1 entries but there are 2"):
        micro_batch_rank_loads(seqs, 2, [0], 2)
    with pytest.raises(ValueError, match=r"ranks\[1\] = 3 is out of range"):
        micro_batch_rank_loads(seqs, 2, [0, 3], 2)
    with pytest.raises(ValueError, match=r"num_experts"):
        micro_batch_loads(seqs, 0)
    with pytest.raises(ValueError, match=r"routes_TLK\[0, 1, 0\] = 4 is not an expert id"):
        loads_from_routes(torch.tensor([[[0], [4]]]), 4)


# --------------------------------------------------------------------------- engines
def _b64(array, dtype=np.int32):
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


def test_vllm_and_sglang_adapters():
    rng = np.random.default_rng(1)
    routes = rng.integers(0, 8, size=(6, 3, 2))
    want = torch.from_numpy(routes)

    class Output:  # a vLLM CompletionOutput-like object
        routed_experts = routes.astype(np.int32)

    assert torch.equal(from_vllm(Output()), want)
    assert torch.equal(from_vllm({"routed_experts": _b64(routes)}, num_layers=3, top_k=2), want)
    assert torch.equal(from_vllm(routes.reshape(-1).tolist(), num_layers=3, top_k=2), want)
    assert torch.equal(
        from_sglang({"text": "x", "meta_info": {"routed_experts": _b64(routes)}}, num_layers=3, top_k=2), want
    )
    assert torch.equal(from_sglang({"routed_experts": routes}), want)
    raw = np.ascontiguousarray(routes, dtype=np.int16).tobytes()
    assert torch.equal(decode_routed_experts(raw, raw=True, dtype="int16", num_layers=3, top_k=2), want)


def test_engine_adapter_faults():
    with pytest.raises(ValueError, match=r"enable_return_routed_experts"):
        from_vllm({"text": "x"})
    with pytest.raises(ValueError, match=r"--enable-return-routed-experts"):
        from_sglang({"meta_info": {}})
    with pytest.raises(ValueError, match=r"not valid base64"):
        decode_routed_experts("@@not base64@@", num_layers=1, top_k=1)
    with pytest.raises(ValueError, match=r"7 bytes is not a whole number of int32"):
        decode_routed_experts(base64.b64encode(b"1234567").decode(), num_layers=1, top_k=1)
    with pytest.raises(ValueError, match=r"holds 6 ids, not a multiple of num_layers \* top_k = 4 \* 1"):
        decode_routed_experts(_b64(np.zeros(6)), num_layers=4, top_k=1)
    with pytest.raises(ValueError, match=r"flat .* give num_layers and top_k"):
        decode_routed_experts(_b64(np.zeros(6)))
    with pytest.raises(ValueError, match=r"expected top_k=3"):
        decode_routed_experts(np.zeros((2, 2, 2), int), top_k=3)
    with pytest.raises(ValueError, match=r"= 9 is not an expert id in \[0, 8\)"):
        decode_routed_experts(np.full((1, 1, 1), 9), num_experts=8)
    with pytest.raises(ValueError, match=r"dtype must be an integer"):
        decode_routed_experts(_b64(np.zeros(2)), dtype="float32", num_layers=1, top_k=1)


def test_verl_masks_padding_left_right_and_response():
    # batch of 2, seq 4, 1 layer, top-1, uint8 as verl keeps it; padding holds 0 (a valid id!)
    routes = torch.tensor([[1, 2, 0, 0], [0, 0, 3, 3]], dtype=torch.uint8).view(2, 4, 1, 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])
    seqs = verl_sequences(routes, mask)
    assert [s.flatten().tolist() for s in seqs] == [[1, 2], [3, 3]]
    loads = micro_batch_loads(from_verl({"routed_experts": routes, "attention_mask": mask.bool()}), 4)
    assert loads.tolist() == [[[0, 1, 1, 2]]]  # padding zeros not counted as expert 0
    response = verl_sequences(routes, np.array([[0, 1], [1, 0]]))  # last 2 positions
    assert [s.flatten().tolist() for s in response] == [[0], [3]]
    assert len(verl_sequences(routes)) == 2
    assert seqs[0].dtype == torch.uint8  # kept compact
    with pytest.raises(ValueError, match=r"uint8.*300 experts"):
        micro_batch_loads(seqs, 300)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 4\)"):
        verl_sequences(routes, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"only 0/1"):
        verl_sequences(routes, torch.full((2, 4), 2))
    with pytest.raises(ValueError, match=r"\[batch, seq, layers, top_k\]"):
        verl_sequences(routes[0])
    with pytest.raises(ValueError, match=r"no 'routed_experts'"):
        from_verl({"attention_mask": mask})
    with pytest.raises(ValueError, match=r"no mask 'attention_mask'"):
        from_verl({"routed_experts": routes})


def test_megatron_round_trip_and_faults():
    routes = torch.randint(0, 5, (7, 3, 2))
    per_layer = to_megatron(routes)
    assert len(per_layer) == 3 and per_layer[1].shape == (7, 2) and per_layer[1].is_contiguous()
    assert torch.equal(from_megatron(per_layer), routes)
    with pytest.raises(ValueError, match=r"layer 1 has routes of shape \(6, 2\) but layer 0 has \(7, 2\)"):
        from_megatron([routes[:, 0], routes[:6, 1]])
    with pytest.raises(ValueError, match=r"layer 0 routes must be \[tokens, top_k\]"):
        from_megatron([routes])
    with pytest.raises(ValueError, match=r"no layers"):
        from_megatron([])


def test_len_minus_one_alignment():
    routes = torch.arange(5 * 2).view(5, 1, 2) % 4
    assert torch.equal(align_routes(routes, 5), routes[:4])  # one row too many: dropped
    assert torch.equal(align_routes(routes[:4], 5), routes[:4])
    padded = align_routes(routes[:4], 5, pad_last=True)
    assert padded.shape == (5, 1, 2) and padded[-1].tolist() == [[-1, -1]]
    with pytest.raises(ValueError, match=r"cover 3 positions but a sequence of 5 tokens needs 4"):
        align_routes(routes[:3], 5)


# --------------------------------------------------------------------------- RouteStore
def test_route_store_survives_padding_shuffling_and_splitting():
    rng = random.Random(0)
    num_layers, top_k, num_experts = 3, 2, 6  # layer 0 dense
    store = RouteStore(num_experts, first_k_dense=1)
    samples = []
    for _ in range(6):
        n = rng.randint(2, 6)
        tokens = [rng.randrange(100) for _ in range(n)]
        engine = torch.randint(0, num_experts, (n - 1, num_layers, top_k))  # len - 1 rows
        store.put_tokens(tokens, engine)
        samples.append((tokens, engine[:, 1:]))
    rng.shuffle(samples)
    for side in ("left", "right"):
        for chunk in (samples[:4], samples[4:]):  # micro-batch split
            width = max(len(t) for t, _ in chunk) + 1
            ids = torch.zeros(len(chunk), width, dtype=torch.int64)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool)
            for b, (tokens, _) in enumerate(chunk):
                sl = slice(0, len(tokens)) if side == "right" else slice(width - len(tokens), width)
                ids[b, sl] = torch.tensor(tokens)
                mask[b, sl] = True
            got = store.gather_tokens(ids, mask)
            assert got.shape == (len(chunk), width, num_layers - 1, top_k)
            for b, (_, moe_routes) in enumerate(chunk):
                real = got[b][mask[b]]
                assert torch.equal(real[:-1], moe_routes)
                assert (real[-1] == -1).all()  # last sampled token: no recorded route
                assert (got[b][~mask[b]] == -1).all()


def test_route_store_by_sequence_id():
    store = RouteStore(4)
    store.put("a", torch.tensor([[[1]], [[2]]]))
    store.put("b", torch.tensor([[[3]]]))
    assert len(store) == 2 and "a" in store
    right = store.gather(["b", "a"])
    assert right[..., 0, 0].tolist() == [[3, -1], [1, 2]]
    left = store.gather(["b", "a"], padding_side="left", seq_len=3)
    assert left[..., 0, 0].tolist() == [[-1, -1, 3], [-1, 1, 2]]
    masked = store.gather(["a"], attention_mask=[[0, 1, 0, 1]])
    assert masked[..., 0, 0].tolist() == [[-1, 1, -1, 2]]
    assert store.flat(["a", "b"])[:, 0, 0].tolist() == [1, 2, 3]
    assert store.get("a").dtype == torch.int64
    with pytest.raises(ValueError, match=r"no routes stored for sequence 'c'"):
        store.get("c")
    with pytest.raises(ValueError, match=r"batch row 0 holds 4 tokens"):
        store.gather(["a"], attention_mask=[[1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"= 4 is not an expert id"):
        store.put("bad", torch.tensor([[[4]]]))
    with pytest.raises(ValueError, match=r"the store holds \(1, 1\)"):
        store.put("wide", torch.zeros(1, 2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"seq_len=1 is shorter"):
        store.gather(["a"], seq_len=1)
    store.clear()
    assert len(store) == 0


def test_token_key_is_content_hash():
    assert token_key([1, 2, 3]) == token_key(torch.tensor([1, 2, 3], dtype=torch.int32))
    assert token_key([1, 2, 3]) != token_key([1, 2, 4])
    with pytest.raises(ValueError, match=r"1-D"):
        token_key([[1, 2]])


# --------------------------------------------------------------------------- trace files
def test_trace_round_trip(tmp_path):
    loads = torch.randint(0, 1000, (3, 2, 4, 8))
    path = tmp_path / "t.npz"
    save_trace(path, loads, top_k=8, meta={"model": "tiny", "steps": 3})
    trace = load_trace(path)
    assert isinstance(trace, Trace)
    assert torch.equal(trace.loads, loads) and trace.loads.dtype == torch.int64
    assert trace.top_k == 8 and trace.meta == {"model": "tiny", "steps": 3}
    assert (trace.num_steps, trace.num_micro_batches, trace.num_layers, trace.num_experts) == (3, 2, 4, 8)
    with np.load(path, allow_pickle=False) as npz:  # the contract, read without relibra
        assert npz["loads"].dtype == np.int64 and int(npz["top_k"]) == 8
        assert json.loads(str(npz["meta"])) == {"model": "tiny", "steps": 3}
    save_trace(tmp_path / "nometa.npz", loads.numpy(), top_k=2)
    assert load_trace(tmp_path / "nometa.npz").meta == {}


_ZEROS = np.zeros((1, 1, 1, 2), np.int64)


@pytest.mark.parametrize(
    "arrays, key, match",
    [
        ({"loads": np.array([1, 2], dtype=object), "top_k": np.int64(2)}, "loads",
         r"object array \(dtype object\), which would need pickle"),
        ({"top_k": np.int64(2)}, None, r"lacks key\(s\) \['loads'\]"),
        ({"loads": _ZEROS}, None, r"lacks key\(s\) \['top_k'\]"),
        ({"loads": np.zeros((1, 1, 2), np.int64), "top_k": np.int64(2)}, "loads", r"must be 4 dimensions"),
        ({"loads": np.full((1, 1, 1, 2), np.nan), "top_k": np.int64(2)}, "loads",
         r"must hold integers, got dtype float64"),
        ({"loads": -np.ones((1, 1, 1, 2), np.int64), "top_k": np.int64(2)}, "loads", r"negative load -1 at index"),
        ({"loads": np.full((1, 1, 1, 2), 2**64 - 1, np.uint64), "top_k": np.int64(2)}, "loads", r"beyond int64"),
        ({"loads": np.asfortranarray(np.zeros((1, 1, 2, 2), np.int64)), "top_k": np.int64(2)}, "loads",
         r"Fortran order"),
        ({"loads": _ZEROS, "top_k": np.int64(0)}, "top_k", r"top_k must be a positive int"),
        ({"loads": _ZEROS, "top_k": np.zeros(2, np.int64)}, "top_k", r"must be a scalar, got shape \(2,\)"),
        ({"loads": _ZEROS, "top_k": np.float64(2.0)}, "top_k", r"must hold integers, got dtype float64"),
        ({"loads": _ZEROS, "top_k": np.int64(2), "meta": np.array("{bad")}, "meta", r"not valid JSON"),
        ({"loads": _ZEROS, "top_k": np.int64(2), "meta": np.array("[" * 100_000)}, "meta", r"not valid JSON"),
        ({"loads": _ZEROS, "top_k": np.int64(2), "meta": np.array("[1]")}, "meta", r"JSON object"),
        ({"loads": _ZEROS, "top_k": np.int64(2), "meta": np.array(b"{}")}, "meta", r"must hold unicode text"),
        ({"loads": _ZEROS, "top_k": np.int64(2), "extra": np.zeros(1)}, None, r"unknown key\(s\) \['extra'\]"),
    ],
)
def test_bad_trace_files_name_file_and_fault(tmp_path, arrays, key, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match) as info:
        load_trace(path)
    assert f"trace file {str(path)!r}" in str(info.value)
    if key is not None:
        assert f"key {key!r}" in str(info.value)


def test_trace_loads_in_any_integer_dtype_and_byte_order(tmp_path):
    # what np.savez / np.savez_compressed write from int32, uint16 or big-endian arrays reads as int64
    loads = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    for dtype in (np.int32, np.uint16, ">i8", np.uint64):
        for save in (np.savez, np.savez_compressed):
            path = tmp_path / "t.npz"
            save(path, loads=loads.astype(dtype), top_k=np.array(3, dtype=">i4"), meta=np.array('{"a": 1}'))
            trace = load_trace(path)
            assert trace.loads.dtype == torch.int64 and torch.equal(trace.loads, torch.from_numpy(loads))
            assert trace.top_k == 3 and trace.meta == {"a": 1}


def test_trace_size_cap(tmp_path):
    path = tmp_path / "t.npz"
    save_trace(path, torch.zeros(4, 4, 4, 64, dtype=torch.int64), top_k=2)  # 32 KiB of loads
    assert load_trace(path, max_bytes=40_000).num_steps == 4
    with pytest.raises(ValueError, match=r"key 'loads': the arrays would take 32\d{3} bytes .* limit of 30000 "
                                         r"bytes \(max_bytes\)"):
        load_trace(path, max_bytes=30_000)
    with pytest.raises(ValueError, match=r"max_bytes must be a positive int"):
        load_trace(path, max_bytes=0)


def test_trace_file_not_npz_and_bad_save(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=r"junk.npz.* is not an .npz \(zip\) archive"):
        load_trace(junk)
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"NaN"):
        save_trace(tmp_path / "x.npz", torch.full((1, 1, 1, 2), float("nan")), top_k=1)
    with pytest.raises(ValueError, match=r"negative"):
        save_trace(tmp_path / "x.npz", -torch.ones(1, 1, 1, 2, dtype=torch.int64), top_k=1)
    with pytest.raises(ValueError, match=r"top_k"):
        save_trace(tmp_path / "x.npz", torch.ones(1, 1, 1, 2, dtype=torch.int64), top_k=True)
    with pytest.raises(ValueError, match=r"JSON-serialisable"):
        save_trace(tmp_path / "x.npz", torch.ones(1, 1, 1, 2, dtype=torch.int64), top_k=1, meta={"a": object()})


@pytest.mark.parametrize(
    "routes,match",
    [
        ([[0, 1]], r"routes must be a tensor \[T, 3, 2\], got list"),
        (torch.zeros(4, 3, 2), r"routes must hold integer expert ids, got dtype torch.float32"),
        (torch.zeros(4, 2, 2, dtype=torch.int64), r"routes must have shape \[T, 3, 2\], got \(4, 2, 2\)"),
        (torch.zeros(4, 3, dtype=torch.int64), r"routes must have shape \[T, 3, 2\], got \(4, 3\)"),
        (
            torch.tensor([[[0, 1]] * 3, [[0, 1], [2, 8], [0, -2]]]),
            r"routes\[1, 1, 1\] = 8 is not an expert id in \[0, 8\)",
        ),
        (torch.tensor([[[0, 1]] * 3, [[0, 1], [2, 3], [0, -2]]]), r"routes\[1, 2, 1\] = -2 is not an expert id"),
    ],
)
def test_route_fault_names_the_first_fault(routes, match):
    from relibra.routing import route_fault

    assert re.search(match, route_fault(routes, (None, 3, 2), 8))


def test_route_fault_accepts_ids_padding_and_any_token_count():
    from relibra.routing import route_fault

    for T in (0, 1, 5):
        assert route_fault(torch.full((T, 3, 2), -1, dtype=torch.int32), (None, 3, 2), 8) == ""
    assert route_fault(torch.tensor([[7, 0]], dtype=torch.uint8), (1, 2), 8) == ""


def test_from_vllm_names_the_missing_attribute():
    class CompletionOutput:  # started without enable_return_routed_experts: no such field
        text = "x"

    class RequestOutput:
        outputs = [CompletionOutput()]

    with pytest.raises(ValueError, match=r"CompletionOutput has no attribute 'routed_experts'.*"
                                         r"enable_return_routed_experts") as exc:
        from_vllm(CompletionOutput())
    assert "ragged" not in str(exc.value)
    with pytest.raises(ValueError, match=r"RequestOutput has no attribute 'routed_experts' \(a request output: "
                                         r"pass one of its \.outputs\)"):
        from_vllm(RequestOutput())


@pytest.mark.parametrize(
    "routes,match",
    [
        (torch.zeros(2, 2, dtype=torch.int64, device="meta"), r"routes is on meta, but the tokens are on cpu"),
        (torch.zeros(2, 2, dtype=torch.uint8), r"routes is uint8, which cannot hold expert ids of 300 experts"),
        (torch.zeros(2, 2, dtype=torch.int8), r"routes is int8, which cannot hold expert ids of 300 experts"),
        (torch.zeros(2, 2, dtype=torch.bool), r"integer expert ids, got dtype torch.bool"),
    ],
)
def test_route_fault_names_device_and_too_narrow_dtypes(routes, match):
    from relibra.routing import route_fault

    assert re.search(match, route_fault(routes, (2, 2), 300, device="cpu"))


def test_uint8_padding_that_wrapped_to_255_is_named():
    """verl's uint8 cannot hold -1: a -1 written into it is 255, an id beyond 8 experts."""
    from relibra.routing import route_fault
    from relibra.routing.routes import step_routes_fault

    wrapped = torch.tensor([[3, -1]]).to(torch.uint8)
    fault = route_fault(wrapped, (1, 2), 8)
    assert re.search(r"routes\[0, 1\] = 255 is not an expert id in \[0, 8\).*wraps to 255", fault)
    assert route_fault(wrapped, (1, 2), 256) == ""  # 255 is an expert of 256
    with pytest.raises(ValueError, match=r"sequence 0\[0, 0, 1\] = 255 .*wraps to 255"):
        micro_batch_loads([wrapped.view(1, 1, 2)], 8)
    assert "wraps" not in route_fault(torch.tensor([[3, 255]]), (1, 2), 8)  # int64 255 is just out of range
    assert re.search(r"routes\[1\]\[0, 0, 1\] = 255 .*wraps", step_routes_fault(
        [torch.zeros(0, 1, 2, dtype=torch.uint8), wrapped.view(1, 1, 2)], 1, 2, 8))


@pytest.mark.parametrize(
    "routes,match",
    [
        (torch.zeros(3, 1, 2, dtype=torch.int64), r"routes must be a list of int tensors \[T_m, 1, 2\], one per "
                                                   r"micro-batch, got Tensor"),
        ([], r"non-empty list .* got an empty list"),
        ([torch.zeros(3, 1, 2, dtype=torch.int64), torch.zeros(3, 2, 2, dtype=torch.int64)],
         r"routes\[1\] must have shape \[T, 1, 2\], got \(3, 2, 2\)"),
        ((torch.zeros(3, 1, 2), ), r"routes\[0\] must hold integer expert ids"),
    ],
)
def test_step_routes_fault_names_the_micro_batch(routes, match):
    from relibra.routing.routes import step_routes_fault

    assert re.search(match, step_routes_fault(routes, 1, 2, 8))
    assert step_routes_fault([torch.zeros(0, 1, 2, dtype=torch.int32), torch.full((2, 1, 2), -1)], 1, 2, 8) == ""
