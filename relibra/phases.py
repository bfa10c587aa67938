"""The passes of an RL step over its sequences ("phases"), and the schedule text that names them.

An RL step runs several passes over the same sequences: forward-only passes first (the old
policy's log-probabilities, the reference model's), then one or more training epochs of forward
and backward. One placement serves them all; replicas are planned per phase and micro-batch.

    PHASES        phase names by id, the id the runtime's collective-order check carries
    parse_phases  "logprob,ref,train", "logprob,train*2" or "2+1" -> a tuple of names

``train`` is id 0 (the one phase relibra ran before phases had names), so an order check made
by an older relibra reads the same.
"""

from __future__ import annotations

__all__ = ["PHASES", "TRAIN", "FORWARD_ONLY", "has_backward", "parse_phases", "check_phase"]

TRAIN = "train"
#: phase names by id: ``train`` (forward + backward), then the forward-only passes: ``logprob``
#: (the old policy's log-probabilities), ``ref`` (the reference model's), ``forward`` (any other)
PHASES = (TRAIN, "logprob", "ref", "forward")
FORWARD_ONLY = frozenset(PHASES[1:])

_MAX_PASSES = 64  # a schedule of more passes than this is a typo, not an RL step


def has_backward(name: str) -> bool:
    """Whether phase ``name`` runs a backward (only ``train``)."""
    return check_phase(name) == TRAIN


def check_phase(name: object) -> str:
    """``name`` if it is a phase name; else ValueError listing the names."""
    if not isinstance(name, str) or name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; phases are {', '.join(PHASES)} (train has a backward, the others "
                         "are forward-only)")
    return name


def _count(text: str, what: str, whole: str, minimum: int = 1) -> int:
    if not text.strip().isdigit() or int(text) < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"phases {whole!r}: {what} must be {kind}, got {text.strip()!r}")
    return int(text)


def parse_phases(text: str) -> tuple[str, ...]:
    """The phases of a step, in order, from a schedule text.

    Forms: names separated by commas, each optionally repeated with ``*N`` (``"logprob,ref,train"``,
    ``"logprob,train*2"``); or ``"F+T"``: ``F`` forward-only passes (``logprob``, then ``ref``,
    then ``forward``) and ``T`` training epochs (``"2+1"`` is ``logprob,ref,train``).

    Raises ValueError naming the fault: an unknown name, a bad count, no ``train`` phase (a
    step's placement moves before its first training phase), more than 64 passes.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"phases must name at least one phase, got {text!r}")
    if "+" in text:
        forward, _, train = text.partition("+")
        n_forward = _count(forward or "0", "the number of forward-only passes", text, minimum=0)
        n_train = _count(train, "the number of training epochs", text)
        names = tuple(PHASES[1 + min(i, 2)] for i in range(n_forward)) + (TRAIN,) * n_train
    else:
        parts: list[str] = []
        for item in text.split(","):
            name, star, times = item.strip().partition("*")
            check_phase(name.strip())
            parts += [name.strip()] * (_count(times, f"the repeat count of {name.strip()!r}", text) if star else 1)
        names = tuple(parts)
    if len(names) > _MAX_PASSES:
        raise ValueError(f"phases {text!r}: {len(names)} passes, more than {_MAX_PASSES}")
    if TRAIN not in names:
        raise ValueError(f"phases {text!r} has no training phase ({TRAIN}); an RL step trains at least once "
                         "(the step's placement moves before its first training phase)")
    return names
