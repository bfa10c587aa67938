"""RL routing traces: exact-looking expert loads per step and micro-batch, from real skew.

Legend: ``S`` steps, ``M`` micro-batches per step, ``L`` MoE layers, ``E`` experts, ``W`` workloads;
per sequence ``Z`` sequences of a step and ``U`` (prompt, micro-batch) groups of its sequences.

What is real and what is modelled, plainly:

* Real: the per-layer expert popularity of DeepSeek-V3 serving runs (SGLang's published
  ``logical_count``, 58 MoE layers x 256 experts; see ``relibra/sim/data/README`` and
  ``../shared/data/deepseek_v3_expert_load``). Those are long-run sums: they show skew, not
  how load moves from one micro-batch to the next.
* Modelled: that movement. A GRPO step holds prompt groups; every prompt draws its own
  expert mix per layer, ``q ~ Dirichlet(concentration * p_workload)``, and all ``group_size``
  responses of the prompt route by that mix (they share content). ``concentration`` is the
  Dirichlet's total mass per layer: large keeps prompts near the workload mean, small makes
  few, strong, prompt-specific hot spots. Prompt and response lengths are log-normal
  (response lengths heavy-tailed), sequences are packed in rollout order (groups
  contiguous) into micro-batches of at most ``tokens_per_micro_batch`` tokens, so a
  micro-batch holds few prompts.
* Top-k sampling: a token picks ``top_k`` distinct experts. Its inclusion probabilities
  ``pi = min(1, c * q)`` with ``sum(pi) = top_k`` (water-filling keeps every expert's expected
  count at most one per token); the copies of a prompt's ``n`` tokens in a micro-batch are
  then drawn as ``Multinomial(n * top_k, pi / top_k)``: exact totals and means, a
  multinomial approximation of the distinct-top-k variance.

* Realism check (:func:`relibra.sim.realism.describe`, ``relibra bench --describe``): the real DeepSeek-V3
  popularity gives a long-run busiest/idlest GPU ratio of ~4.7 under 8-way contiguous EP
  (Qwen3-235B measured 2.3-4.4). The movement knob is harder to pin: Qwen3-235B's per-batch
  loads correlate 0.57 with the long run (0.71 over 4 batches); with 16 responses per prompt
  and 131072-token micro-batches, concentration ~16-32 reproduces that, 512 (the default
  trace, chosen for the paper's ~1.2x hybrid/oracle-EPLB regime) gives 0.94. Their batch size
  and domain mix are unknown, so neither end is "the" real value.

Per sequence (:func:`generate_sequences`): the same model and random stream, plus each
sequence's own expert copies, so that packings other than the rollout order can be priced.

A seed makes a trace exact. ``python -m relibra.sim.traces --out FILE.npz`` writes one
(``--per-sequence``: a format-2 trace with every sequence, :mod:`relibra.routing.trace_sequences`);
the default trace shipped in ``relibra/sim/data`` is made by ``benchmarks/make_default_trace.sh``
(format 1: a per-sequence trace of its size takes ~10 MB, too much to ship in the wheel;
``benchmarks/make_default_trace.sh --per-sequence --out FILE`` writes one).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Iterator

import numpy as np

from ..routing.trace_file import Trace, TraceSequences, load_trace, save_trace
from .realism import describe, format_description

__all__ = ["TraceConfig", "SequenceStep", "generate", "generate_sequences", "load_popularity", "derive_popularity",
           "load_trace_file", "read_trace_file", "save_trace_file", "save_sequence_trace", "sequence_steps",
           "default_trace_path", "waterfill", "describe", "format_description"]

_DATA = "data"
POPULARITY_FILE = "deepseek_v3_popularity.npz"
DEFAULT_TRACE_FILE = "default_trace.npz"
SHIPPED_WORKLOADS = ("prefill_in4096", "prefill_in1000out1000", "decode_in1000out1000")


def _data_path(name: str) -> str:
    return str(resources.files("relibra.sim").joinpath(_DATA, name))


def default_trace_path() -> str:
    """Path of the trace shipped in the package."""
    return _data_path(DEFAULT_TRACE_FILE)


def derive_popularity(src_dir: str, out: str, workloads: tuple[str, ...] = SHIPPED_WORKLOADS) -> None:
    """Write ``{workload: float16 [L, E]}`` per-layer normalized popularity from SGLang's JSON files.

    Dense layers (all-zero rows) are dropped. Raises ValueError naming a missing or bad file.
    """
    arrays = {}
    for w in workloads:
        path = os.path.join(src_dir, f"{w}.json")
        if not os.path.exists(path):
            raise ValueError(f"popularity source {path} does not exist")
        with open(path) as f:
            counts = np.asarray(json.load(f)["logical_count"], dtype=np.float64)
        if counts.ndim != 2:
            raise ValueError(f"{path}: logical_count must be 2-D [layers, experts], got {counts.shape}")
        counts = counts[counts.sum(1) > 0]
        arrays[w] = (counts / counts.sum(1, keepdims=True)).astype(np.float16)
    np.savez_compressed(out, **arrays)


def load_popularity(workload: str = "prefill_in4096", path: str | None = None) -> np.ndarray:
    """``[L, E]`` float64 per-layer popularity (rows sum to 1) of one shipped workload."""
    path = path or _data_path(POPULARITY_FILE)
    with np.load(path, allow_pickle=False) as z:
        if workload not in z.files:
            raise ValueError(f"workload {workload!r} not in {path}; has {', '.join(z.files)}")
        p = z[workload].astype(np.float64)
    return p / p.sum(1, keepdims=True)


def waterfill(q: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities ``pi = min(1, c * q)`` over the last axis with ``sum(pi) = k``.

    ``q`` ``[..., E]`` non-negative, summing to 1, with at least ``k`` positive entries.
    """
    q = np.asarray(q, dtype=np.float64)
    capped = np.zeros(q.shape, dtype=bool)
    for _ in range(k + 1):
        free = np.where(capped, 0.0, q)
        c = (k - capped.sum(-1, keepdims=True)) / np.maximum(free.sum(-1, keepdims=True), 1e-300)
        pi = np.where(capped, 1.0, c * q)
        new = pi > 1.0
        if not new.any():
            break
        capped |= new
    return np.minimum(pi, 1.0)


@dataclass(frozen=True)
class TraceConfig:
    """Knobs of the GRPO trace model (see the module docstring)."""

    steps: int = 3
    micro_batches: int = 16
    tokens_per_micro_batch: int = 64 * 4096
    group_size: int = 16
    concentration: float = 64.0
    prompt_len_median: float = 512.0
    prompt_len_sigma: float = 0.5
    response_len_median: float = 1024.0
    response_len_sigma: float = 1.0
    max_len: int = 16384
    top_k: int = 8
    workload: str = "prefill_in4096"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batches", "tokens_per_micro_batch", "group_size", "max_len", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TraceConfig.{name} must be a positive int, got {v!r}")
        for name in ("concentration", "prompt_len_median", "response_len_median"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TraceConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("prompt_len_sigma", "response_len_sigma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TraceConfig.{name} must be >= 0, got {getattr(self, name)!r}")


def _lengths(rng: np.random.Generator, median: float, sigma: float, size: int, cap: int) -> np.ndarray:
    return np.clip(np.rint(median * np.exp(sigma * rng.standard_normal(size))), 1, cap).astype(np.int64)


def _pack_step(rng: np.random.Generator, cfg: TraceConfig) -> list[list[tuple[int, int]]]:
    """Micro-batches of ``(prompt index, tokens)``, groups in rollout order."""
    budget, mbs = cfg.tokens_per_micro_batch, [[]]
    used, prompt = 0, 0
    while True:
        plen = int(_lengths(rng, cfg.prompt_len_median, cfg.prompt_len_sigma, 1, cfg.max_len)[0])
        rlens = _lengths(rng, cfg.response_len_median, cfg.response_len_sigma, cfg.group_size, cfg.max_len)
        for r in rlens:
            n = min(plen + int(r), cfg.max_len, budget)
            if used + n > budget:
                if len(mbs) == cfg.micro_batches:
                    return mbs
                mbs.append([])
                used = 0
            mbs[-1].append((prompt, n))
            used += n
        prompt += 1


def generate(cfg: TraceConfig = TraceConfig(), popularity: np.ndarray | None = None) -> np.ndarray:
    """Loads ``[S, M, L, E]`` int64 of a GRPO run under ``cfg`` (exact for a given seed)."""
    p = load_popularity(cfg.workload) if popularity is None else np.asarray(popularity, dtype=np.float64)
    if p.ndim != 2 or (p < 0).any() or not np.allclose(p.sum(1), 1.0):
        raise ValueError(f"popularity must be [L, E] non-negative rows summing to 1, got shape {p.shape}")
    L, E = p.shape
    if cfg.top_k > E:
        raise ValueError(f"top_k={cfg.top_k} exceeds the {E} experts")
    rng = np.random.default_rng(cfg.seed)
    alpha = np.maximum(cfg.concentration * p, 1e-3)
    out = np.zeros((cfg.steps, cfg.micro_batches, L, E), dtype=np.int64)
    for s in range(cfg.steps):
        mbs = _pack_step(rng, cfg)
        n_prompts = mbs[-1][-1][0] + 1
        g = rng.gamma(alpha, size=(n_prompts, L, E))
        q = g / g.sum(-1, keepdims=True)
        pi = waterfill(q, cfg.top_k) / cfg.top_k  # [prompts, L, E]
        for m, seqs in enumerate(mbs):
            tokens: dict[int, int] = {}
            for prompt, n in seqs:
                tokens[prompt] = tokens.get(prompt, 0) + n
            ids = np.fromiter(tokens, dtype=np.int64)
            n = np.fromiter(tokens.values(), dtype=np.int64) * cfg.top_k
            pv = pi[ids]
            pv = pv / pv.sum(-1, keepdims=True)
            draws = rng.multinomial(np.broadcast_to(n[:, None], (len(ids), L)), pv)  # [prompts, L, E]
            out[s, m] = draws.sum(0)
    return out


@dataclass(frozen=True)
class SequenceStep:
    """One step of a GRPO trace, per sequence (``Z`` sequences, in rollout order).

    Attributes:
        sequence_loads: ``[Z, L, E]`` int32 token copies of each sequence per layer and expert
            (each row of a layer sums to ``top_k`` times the sequence's tokens).
        sequence_tokens: ``[Z]`` int64 tokens of each sequence (prompt + response).
        sequence_prompt: ``[Z]`` int64 prompt group of each sequence (0-based within the step).
        micro_batch_of: ``[Z]`` int64 micro-batch of each sequence in the rollout-order packing
            (non-decreasing, every micro-batch within ``tokens_per_micro_batch``).
        num_micro_batches: ``M``.
        tokens_per_micro_batch: the token budget of one micro-batch.
        top_k: experts per token.
    """

    sequence_loads: np.ndarray
    sequence_tokens: np.ndarray
    sequence_prompt: np.ndarray
    micro_batch_of: np.ndarray
    num_micro_batches: int
    tokens_per_micro_batch: int
    top_k: int

    def loads(self, micro_batch_of: np.ndarray | None = None) -> np.ndarray:
        """``[M, L, E]`` int64 loads of the packing ``micro_batch_of [Z]`` (default: rollout order)."""
        mb = self.micro_batch_of if micro_batch_of is None else np.asarray(micro_batch_of, dtype=np.int64)
        Z, L, E = self.sequence_loads.shape
        flat = self.sequence_loads.reshape(Z, L * E)
        out = np.zeros((self.num_micro_batches, L * E), dtype=np.int64)
        for m in range(self.num_micro_batches):  # one gather per micro-batch (np.add.at is 20x slower)
            out[m] = flat[np.flatnonzero(mb == m)].sum(0, dtype=np.int64)
        return out.reshape(self.num_micro_batches, L, E)


#: the split of a prompt's draws among its sequences uses its own stream (seeded ``[seed,
#: _SPLIT_STREAM]``), so the main stream runs exactly as in :func:`generate`
_SPLIT_STREAM = 0x5E0


def generate_sequences(cfg: TraceConfig = TraceConfig(), popularity: np.ndarray | None = None
                       ) -> Iterator[SequenceStep]:
    """Yield the ``cfg.steps`` steps of :func:`generate`'s trace per sequence, one at a time.

    Same model, same random stream: the loads of step ``s`` summed by its rollout packing
    (:meth:`SequenceStep.loads`) equal ``generate(cfg, popularity)[s]`` exactly. Each prompt's
    copies in a micro-batch (one multinomial draw there) are dealt to its sequences by a
    multivariate hypergeometric split in proportion to their tokens, which is the exact
    conditional law of independent per-sequence multinomials given their sum.
    """
    p = load_popularity(cfg.workload) if popularity is None else np.asarray(popularity, dtype=np.float64)
    if p.ndim != 2 or (p < 0).any() or not np.allclose(p.sum(1), 1.0):
        raise ValueError(f"popularity must be [L, E] non-negative rows summing to 1, got shape {p.shape}")
    L, E = p.shape
    if cfg.top_k > E:
        raise ValueError(f"top_k={cfg.top_k} exceeds the {E} experts")
    rng = np.random.default_rng(cfg.seed)
    split_rng = np.random.default_rng([cfg.seed, _SPLIT_STREAM])
    alpha = np.maximum(cfg.concentration * p, 1e-3)
    for _ in range(cfg.steps):
        mbs = _pack_step(rng, cfg)
        n_prompts = mbs[-1][-1][0] + 1
        g = rng.gamma(alpha, size=(n_prompts, L, E))
        q = g / g.sum(-1, keepdims=True)
        pi = waterfill(q, cfg.top_k) / cfg.top_k
        seqs = [(m, prompt, n) for m, batch in enumerate(mbs) for prompt, n in batch]
        tokens = np.array([n for _, _, n in seqs], dtype=np.int64)
        draws, members = [], []  # per (micro-batch, prompt): its copies [L, E], its sequences
        for m, batch in enumerate(mbs):
            per_prompt: dict[int, list[int]] = {}
            first = sum(len(b) for b in mbs[:m])
            for offset, (prompt, _) in enumerate(batch):
                per_prompt.setdefault(prompt, []).append(first + offset)
            ids = np.fromiter(per_prompt, dtype=np.int64)
            n = np.array([tokens[s].sum() for s in per_prompt.values()], dtype=np.int64) * cfg.top_k
            pv = pi[ids]
            pv = pv / pv.sum(-1, keepdims=True)
            draws.extend(rng.multinomial(np.broadcast_to(n[:, None], (len(ids), L)), pv))
            members.extend(per_prompt.values())
        yield SequenceStep(
            sequence_loads=_split_draws(split_rng, np.stack(draws), members, tokens * cfg.top_k),
            sequence_tokens=tokens,
            sequence_prompt=np.array([prompt for _, prompt, _ in seqs], dtype=np.int64),
            micro_batch_of=np.array([m for m, _, _ in seqs], dtype=np.int64),
            num_micro_batches=cfg.micro_batches,
            tokens_per_micro_batch=cfg.tokens_per_micro_batch,
            top_k=cfg.top_k,
        )


def _split_draws(rng: np.random.Generator, draws_ULE: np.ndarray, members: list[list[int]],
                 copies_Z: np.ndarray) -> np.ndarray:
    """``[Z, L, E]`` int32: group ``q``'s copies ``draws_ULE[q]`` dealt to its sequences ``members[q]``.

    Sequence ``k`` of a group takes ``copies_Z[k]`` copies of every layer, drawn without
    replacement from what its group's earlier sequences left (multivariate hypergeometric, one
    expert at a time, vectorised over groups and layers); the last sequence takes the rest.
    """
    U, L, E = draws_ULE.shape
    out = np.zeros((len(copies_Z), L, E), dtype=np.int32)
    left = draws_ULE.astype(np.int64)  # [U, L, E] copies not yet dealt
    for k in range(max(len(s) for s in members)):
        last = [q for q, s in enumerate(members) if len(s) == k + 1]
        for q in last:
            out[members[q][k]] = left[q]
        split = [q for q, s in enumerate(members) if len(s) > k + 1]
        if not split:
            continue
        rows = left[split].reshape(-1, E)  # [len(split) * L, E]
        need = np.repeat(copies_Z[[members[q][k] for q in split]], L)
        tail = rows[:, ::-1].cumsum(1)[:, ::-1]  # copies of experts e.. onwards
        taken = np.zeros_like(rows)
        for e in range(E - 1):
            taken[:, e] = rng.hypergeometric(rows[:, e], tail[:, e + 1], need)
            need = need - taken[:, e]
        taken[:, E - 1] = need
        taken = taken.reshape(len(split), L, E)
        out[[members[q][k] for q in split]] = taken
        left[split] -= taken
    return out


def save_trace_file(path: str, loads: np.ndarray, top_k: int, meta: dict[str, Any] | None = None) -> None:
    """Write a trace ``.npz`` (``loads`` [S, M, L, E], ``top_k``, ``meta``): see
    :func:`relibra.routing.save_trace`."""
    save_trace(path, loads, top_k, meta=meta)


def save_sequence_trace(path: str, steps: list[SequenceStep], meta: dict[str, Any] | None = None) -> None:
    """Write ``steps`` as a per-sequence (format 2) trace: their rollout-order loads and every sequence.

    The steps must share ``M``, the budget, ``top_k`` and the layer and expert counts
    (ValueError naming the first that differs).
    """
    if not steps:
        raise ValueError("save_sequence_trace: no step given")
    first = steps[0]
    for s, step in enumerate(steps):
        for name in ("num_micro_batches", "tokens_per_micro_batch", "top_k"):
            if getattr(step, name) != getattr(first, name):
                raise ValueError(f"save_sequence_trace: step {s} has {name}={getattr(step, name)}, step 0 "
                                 f"{getattr(first, name)}")
    loads = np.stack([step.loads() for step in steps])
    sequences = TraceSequences.stack([(st.sequence_loads, st.sequence_tokens, st.sequence_prompt, st.micro_batch_of)
                                      for st in steps], first.tokens_per_micro_batch)
    save_trace(path, loads, first.top_k, meta=meta, sequences=sequences)


def read_trace_file(path: str, max_bytes: int | None = None) -> Trace:
    """Read and check a trace ``.npz`` of either format (:func:`relibra.routing.load_trace`, which
    ``max_bytes`` is passed to). Every fault, a missing file included, raises ValueError naming the file."""
    if not os.path.exists(path):
        raise ValueError(f"trace file {path!r} does not exist")
    return load_trace(path, max_bytes=max_bytes)


def load_trace_file(path: str, max_bytes: int | None = None) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Read a trace ``.npz`` of either format as ``(loads int64 [S, M, L, E], top_k, meta)``.

    The file is untrusted input: see :func:`read_trace_file`. A per-sequence (format 2) file is
    checked whole (its keys must agree) and read as its ``loads``; :func:`sequence_steps` gives
    its sequences.
    """
    trace = read_trace_file(path, max_bytes=max_bytes)
    return trace.loads.numpy(), int(trace.top_k), dict(trace.meta)  # int64 already: no copy


def sequence_steps(trace: Trace, where: str = "trace") -> list[SequenceStep]:
    """The per-sequence steps of a format-2 ``trace`` (padding rows dropped; loads are views).

    Raises ValueError naming ``where`` for a format-1 trace, which has no sequences.
    """
    seqs = trace.sequences
    if seqs is None:
        raise ValueError(f"{where} has no per-sequence data (a format-1 trace, loads per micro-batch only); "
                         "write one with python -m relibra.sim.traces --per-sequence --out FILE.npz "
                         "(or benchmarks/make_default_trace.sh --per-sequence --out FILE.npz)")
    out = []
    for s in range(trace.num_steps):
        loads, tokens, prompt, micro_batch_of = (t.numpy() for t in seqs.step(s))
        out.append(SequenceStep(loads, tokens, prompt, micro_batch_of, trace.num_micro_batches,
                                seqs.tokens_per_micro_batch, trace.top_k))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m relibra.sim.traces", description="Write a GRPO routing trace.")
    ap.add_argument("--out", required=True)
    for name, default in asdict(TraceConfig()).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    ap.add_argument("--per-sequence", action="store_true",
                    help="write a per-sequence (format 2) trace: every sequence's loads, tokens, prompt and "
                         "rollout-order micro-batch, for --packing tokens|routes in relibra bench")
    ap.add_argument(
        "--derive-from",
        default=None,
        help="rebuild the shipped popularity file from SGLang JSON files in this folder first",
    )
    args = ap.parse_args(argv)
    if args.derive_from:
        derive_popularity(args.derive_from, _data_path(POPULARITY_FILE))
    cfg = TraceConfig(**{k: getattr(args, k) for k in asdict(TraceConfig())})
    meta = {"generator": "relibra.sim.traces", **asdict(cfg)}
    if args.per_sequence:
        steps = list(generate_sequences(cfg))
        save_sequence_trace(args.out, steps, meta={**meta, "per_sequence": True})
        shape = [len(steps), cfg.micro_batches, *steps[0].sequence_loads.shape[1:]]
        extra = f", {max(len(st.sequence_tokens) for st in steps)} sequences per step at most"
    else:
        loads = generate(cfg)
        save_trace_file(args.out, loads.astype(np.int32), cfg.top_k, meta=meta)
        shape, extra = list(loads.shape), ""
    print(f"wrote {args.out}: loads {shape}{extra}, {os.path.getsize(args.out) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
