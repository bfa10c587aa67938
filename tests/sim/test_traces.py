"""Trace generator: exact with a seed, consistent totals, real skew, GRPO knobs that act."""

import numpy as np
import pytest

from relibra.sim.traces import (
    TraceConfig,
    default_trace_path,
    describe,
    format_description,
    generate,
    load_popularity,
    load_trace_file,
    save_trace_file,
    waterfill,
)

SMALL = dict(steps=2, micro_batches=4, tokens_per_micro_batch=8192, group_size=4,
             response_len_median=256.0, prompt_len_median=64.0, max_len=2048)


def test_popularity_is_real_and_normalized():
    p = load_popularity("prefill_in4096")
    assert p.shape == (58, 256)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    assert (p.max(1) * 256).mean() > 4  # the real data is skewed: hottest expert ~8x mean
    with pytest.raises(ValueError, match="workload 'nope'"):
        load_popularity("nope")


def test_seed_makes_trace_exact_and_totals_hold():
    cfg = TraceConfig(**SMALL, seed=3)
    a, b = generate(cfg), generate(cfg)
    assert a.shape == (2, 4, 58, 256) and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, generate(TraceConfig(**SMALL, seed=4)))
    # every layer of a micro-batch sees the same tokens x top_k copies, within the token budget
    per_layer = a.sum(-1)
    assert (per_layer == per_layer[..., :1]).all()
    assert (per_layer[..., 0] <= 8192 * 8).all() and (per_layer[..., 0] > 0).all()


def test_smaller_concentration_gives_stronger_hot_spots():
    def skew(c):
        x = generate(TraceConfig(**SMALL, concentration=c, seed=0)).astype(float)
        return float((x.max(-1) / x.mean(-1)).mean())

    assert skew(4.0) > skew(64.0) > skew(4096.0)


def test_waterfill_caps_inclusion_at_one():
    q = np.array([[0.7, 0.1, 0.1, 0.05, 0.05]])
    pi = waterfill(q, 2)
    np.testing.assert_allclose(pi.sum(-1), 2.0)
    assert pi.max() <= 1.0 + 1e-12 and pi[0, 0] == pytest.approx(1.0)
    np.testing.assert_allclose(pi[0, 1:] / pi[0, 1:].sum(), q[0, 1:] / q[0, 1:].sum())


def test_trace_file_round_trip_and_default(tmp_path):
    x = generate(TraceConfig(**SMALL))
    path = str(tmp_path / "t.npz")
    save_trace_file(path, x, 8, meta={"seed": 0})
    loads, top_k, _ = load_trace_file(path)
    np.testing.assert_array_equal(loads, x)
    assert top_k == 8
    loads, top_k, meta = load_trace_file(default_trace_path())
    assert loads.ndim == 4 and loads.shape[2:] == (58, 256) and top_k == 8
    with pytest.raises(ValueError, match="does not exist"):
        load_trace_file(str(tmp_path / "missing.npz"))


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="group_size"):
        TraceConfig(group_size=0)
    with pytest.raises(ValueError, match="concentration"):
        TraceConfig(concentration=0.0)


def test_describe_hand_computed():
    # 2 batches, 1 layer, 8 experts, 4-way EP (2 experts per GPU)
    loads = np.array([[[6, 0, 1, 1, 1, 1, 1, 1]], [[0, 6, 1, 1, 1, 1, 1, 1]]])  # [B, L, E]
    d = describe(loads, ep=4, windows=(1, 2, 3))
    # GPU loads per batch: [6, 2, 2, 2] -> 3.0; long run [12, 4, 4, 4] -> 3.0
    assert d["gpu_max_min_per_batch"] == pytest.approx(3.0) and d["gpu_max_min_long_run"] == pytest.approx(3.0)
    assert set(d["corr_with_long_run"]) == {1, 2}  # a 3-batch window does not fit in 2 batches
    assert d["corr_with_long_run"][2] == pytest.approx(1.0)  # the whole trace is its own long run
    ref = np.array([[3.0, 3, 1, 1, 1, 1, 1, 1]])
    one = np.corrcoef(loads[0, 0], ref[0])[0, 1]
    two = np.corrcoef(loads[1, 0], ref[0])[0, 1]
    assert describe(loads, ref, ep=4, windows=(1,))["corr_with_long_run"][1] == pytest.approx((one + two) / 2)
    assert "Qwen3-235B" in format_description(d)
    with pytest.raises(ValueError, match="ep=3"):
        describe(loads, ep=3)
    with pytest.raises(ValueError, match="popularity"):
        describe(loads, np.ones((2, 8)), ep=4)


def test_describe_tracks_concentration():
    p = load_popularity("prefill_in4096")
    small = dict(SMALL, micro_batches=8)

    def r1(c):
        x = generate(TraceConfig(**small, concentration=c, seed=0))
        return describe(x, p, windows=(1, 4))["corr_with_long_run"]

    lo, hi = r1(8.0), r1(4096.0)
    assert lo[1] < hi[1] and lo[1] < lo[4]  # prompt-specific hot spots average out over batches
    assert hi[1] > 0.9


# ----------------------------------------------------------------------------- per sequence
def test_sequences_sum_to_generate_exactly():
    from relibra.sim.traces import generate_sequences

    for cfg in (TraceConfig(**SMALL, seed=5), TraceConfig(**dict(SMALL, group_size=3, concentration=8.0), seed=1)):
        steps = list(generate_sequences(cfg))
        loads = generate(cfg)
        assert len(steps) == cfg.steps
        for s, step in enumerate(steps):
            Q = step.sequence_tokens.shape[0]
            assert step.sequence_loads.shape == (Q, 58, 256) and step.sequence_loads.dtype == np.int32
            np.testing.assert_array_equal(step.loads(), loads[s])
            # every layer of a sequence holds top_k copies of each of its tokens
            assert (step.sequence_loads.sum(-1) == step.sequence_tokens[:, None] * cfg.top_k).all()
            # rollout order: micro-batches in order, each within the budget, all M used
            assert (np.diff(step.micro_batch_of) >= 0).all()
            held = np.bincount(step.micro_batch_of, weights=step.sequence_tokens, minlength=cfg.micro_batches)
            assert held.max() <= cfg.tokens_per_micro_batch and (held > 0).all()
            # prompt groups in order, group_size responses each (the last may be cut by the step's end)
            counts = np.bincount(step.sequence_prompt)
            assert (np.diff(step.sequence_prompt) >= 0).all() and (counts[:-1] == cfg.group_size).all()
            # any packing sums the same way
            other = step.micro_batch_of[::-1].copy()
            np.testing.assert_array_equal(step.loads(other).sum(0), loads[s].sum(0))


def test_sequences_are_seeded_and_siblings_route_alike():
    from relibra.sim.traces import generate_sequences

    cfg = TraceConfig(**dict(SMALL, steps=1, concentration=16.0), seed=2)
    a, b = next(generate_sequences(cfg)), next(generate_sequences(cfg))
    np.testing.assert_array_equal(a.sequence_loads, b.sequence_loads)
    c = next(generate_sequences(TraceConfig(**dict(SMALL, steps=1, concentration=16.0), seed=3)))
    assert a.sequence_loads.shape != c.sequence_loads.shape or not np.array_equal(a.sequence_loads, c.sequence_loads)
    # responses of one prompt share its expert mix: their loads are closer in direction than
    # those of responses of different prompts (what route-aware packing exploits)
    x = a.sequence_loads.reshape(len(a.sequence_tokens), -1).astype(float)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cos = x @ x.T
    same = a.sequence_prompt[:, None] == a.sequence_prompt[None, :]
    off = ~np.eye(len(x), dtype=bool)
    assert cos[same & off].mean() > cos[~same].mean() + 0.2
