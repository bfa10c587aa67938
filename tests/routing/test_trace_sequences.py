"""Per-sequence (format 2) trace files: written, read by every reader, refused when their keys disagree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from relibra.routing import TraceSequences, load_trace, save_trace
from relibra.sim.traces import load_trace_file, read_trace_file, sequence_steps

L, E, M, BUDGET = 3, 8, 3, 40


def honest_arrays(seed: int = 0, steps: int = 2) -> dict[str, np.ndarray]:
    """A consistent format-2 trace: each step's sequences in rollout order, padding rows at the end
    of the shorter step."""
    rng = np.random.default_rng(seed)
    per_step = []
    for s in range(steps):
        Z = 7 - s
        tokens = rng.integers(1, 12, size=Z)
        micro_batch_of = np.sort(rng.integers(0, M, size=Z))
        loads = np.stack([rng.multinomial(2 * n, np.ones(E) / E, size=L) for n in tokens]).astype(np.int32)
        prompt = np.arange(Z) // 2
        per_step.append((loads, tokens, prompt, micro_batch_of))
    seqs = TraceSequences.stack(per_step, BUDGET)
    loads = np.zeros((steps, M, L, E), dtype=np.int64)
    for s, (seq_loads, _, _, mb) in enumerate(per_step):
        for z, m in enumerate(mb):
            loads[s, m] += seq_loads[z]
    return {"loads": loads, "top_k": np.int64(2), **seqs.arrays()}


def write(path, arrays) -> None:
    np.savez(path, **arrays)


def test_round_trip_every_reader(tmp_path):
    arrays = honest_arrays()
    seqs = TraceSequences(*(torch.from_numpy(arrays[k]) for k in ("sequence_loads", "sequence_tokens",
                                                                  "sequence_prompt", "micro_batch_of")), BUDGET)
    path = tmp_path / "v2.npz"
    save_trace(path, arrays["loads"], 2, meta={"m": 1}, sequences=seqs)
    trace = load_trace(path)
    assert trace.format == 2 and trace.top_k == 2 and trace.meta == {"m": 1}
    assert torch.equal(trace.loads, torch.from_numpy(arrays["loads"]))
    got = trace.sequences
    assert got.loads.dtype == torch.int32 and got.tokens_per_micro_batch == BUDGET
    for key, tensor in (("sequence_loads", got.loads), ("sequence_tokens", got.tokens),
                        ("sequence_prompt", got.prompt), ("micro_batch_of", got.micro_batch_of)):
        np.testing.assert_array_equal(tensor.numpy(), arrays[key])
    # the format-1 reader of relibra.sim reads a format-2 file as its loads
    loads, top_k, meta = load_trace_file(str(path))
    np.testing.assert_array_equal(loads, arrays["loads"])
    with np.load(path, allow_pickle=False) as npz:  # and so does plain NumPy
        assert set(npz.files) == set(arrays) | {"meta"} and json.loads(str(npz["meta"])) == {"m": 1}
    steps = sequence_steps(read_trace_file(str(path)))
    assert [len(st.sequence_tokens) for st in steps] == [7, 6]  # the padding row of step 1 is dropped
    for s, step in enumerate(steps):
        np.testing.assert_array_equal(step.loads(), arrays["loads"][s])
        assert step.num_micro_batches == M and step.tokens_per_micro_batch == BUDGET and step.top_k == 2


def test_format_1_has_no_sequences(tmp_path):
    path = tmp_path / "v1.npz"
    save_trace(path, np.ones((1, 2, L, E), np.int64), 2)
    trace = load_trace(path)
    assert trace.format == 1 and trace.sequences is None
    with pytest.raises(ValueError, match=r"v1.npz' has no per-sequence data \(a format-1 trace.*--per-sequence"):
        sequence_steps(trace, where=f"trace file {str(path)!r}")


def _set(arrays, key, index, value):
    out = {k: v.copy() for k, v in arrays.items()}
    out[key][index] = value
    return out


def _cases():
    a = honest_arrays()
    # row 6 of step 1 is padding; step 0's rows are sequences
    moved = a["micro_batch_of"][0, 0]
    cases = [
        ("loads not the sum", _set(a, "loads", (0, 1, 2, 3), a["loads"][0, 1, 2, 3] + 1), "loads",
         r"step 0, micro-batch 1, layer 2, expert 3 holds \d+ token copies, but the sequences micro_batch_of "
         r"puts there hold \d+"),
        ("a sequence counted in another micro-batch", _set(a, "micro_batch_of", (0, 0), (moved + 1) % M), "loads",
         r"loads must be sequence_loads summed by micro_batch_of"),
        ("micro-batch outside [0, M)", _set(a, "micro_batch_of", (0, 2), M), "micro_batch_of",
         rf"step 0, sequence 2 \(\d+ tokens\) has micro_batch_of {M}, outside \[0, {M}\)"),
        ("a sequence not in any micro-batch", _set(a, "micro_batch_of", (0, 2), -1), "micro_batch_of",
         r"outside \[0, 3\)"),
        ("prompt id for padding", _set(a, "sequence_prompt", (1, 6), 4), "sequence_prompt",
         r"step 1, row 6 is padding \(0 tokens\) but has sequence_prompt 4; padding rows hold -1"),
        ("micro-batch for padding", _set(a, "micro_batch_of", (1, 6), 0), "micro_batch_of", r"row 6 is padding"),
        ("loads for padding", _set(a, "sequence_loads", (1, 6, 1, 5), 3), "sequence_loads",
         r"step 1, row 6 is padding \(0 tokens\) but routes 3 copies to expert 5 of layer 1"),
        ("negative prompt of a sequence", _set(a, "sequence_prompt", (0, 1), -1), "sequence_prompt", r">= 0"),
        ("negative tokens", _set(a, "sequence_tokens", (0, 1), -4), "sequence_tokens", r"sequence 1 has -4 tokens"),
        ("negative sequence load", _set(a, "sequence_loads", (0, 1, 0, 0), -2), "sequence_loads", r"negative load -2"),
        ("over the budget", {**a, "tokens_per_micro_batch": np.int64(5)}, "micro_batch_of",
         r"micro-batch \d holds \d+ tokens, more than tokens_per_micro_batch=5"),
        ("budget zero", {**a, "tokens_per_micro_batch": np.int64(0)}, "tokens_per_micro_batch", r"positive"),
        ("tokens of another shape", {**a, "sequence_tokens": a["sequence_tokens"][:, :5]}, "sequence_tokens",
         r"shape \[steps, sequences\] = \[2, 7\].*got int64 of shape \(2, 5\)"),
        ("prompt of another step count", {**a, "sequence_prompt": a["sequence_prompt"][:1]}, "sequence_prompt",
         r"shape \(1, 7\)"),
        ("sequence loads of other layers", {**a, "sequence_loads": a["sequence_loads"][:, :, :2]}, "sequence_loads",
         r"steps, layers and experts must agree"),
        ("float micro-batches", {**a, "micro_batch_of": a["micro_batch_of"].astype(np.float64)}, "micro_batch_of",
         r"must hold integers"),
    ]
    missing = {k: v for k, v in a.items() if k != "sequence_prompt"}
    cases.append(("a key missing", missing, None, r"lacks key\(s\) \['sequence_prompt'\]: a per-sequence"))
    return cases


@pytest.mark.parametrize("what, arrays, key, match", _cases(), ids=[c[0] for c in _cases()])
def test_inconsistent_files_name_the_key(tmp_path, what, arrays, key, match):
    path = tmp_path / "bad.npz"
    write(path, arrays)
    for read in (load_trace, lambda p: load_trace_file(str(p))):  # every reader
        with pytest.raises(ValueError, match=match) as info:
            read(path)
        assert f"trace file {str(path)!r}" in str(info.value), what
        if key is not None:
            assert f"key {key!r}" in str(info.value), (what, str(info.value))


def test_save_refuses_what_load_refuses(tmp_path):
    a = honest_arrays()
    seqs = TraceSequences(torch.from_numpy(a["sequence_loads"]), torch.from_numpy(a["sequence_tokens"]),
                          torch.from_numpy(a["sequence_prompt"]), torch.from_numpy(a["micro_batch_of"]), BUDGET)
    path = tmp_path / "x.npz"
    with pytest.raises(ValueError, match=r"save_trace, key 'loads': step 0, micro-batch"):
        save_trace(path, a["loads"] * 2, 2, sequences=seqs)
    assert not path.exists()  # nothing written
    with pytest.raises(ValueError, match=r"sequences must be a TraceSequences"):
        save_trace(path, a["loads"], 2, sequences={"sequence_loads": 1})
