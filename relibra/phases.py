"""The passes of an RL step over its sequences ("phases"), and the schedule text that names them.

An RL step runs several passes over the same sequences: forward-only passes first (the old
policy's log-probabilities, the reference model's), then one or more training epochs of forward
and backward. One placement serves them all; replicas are planned per phase and micro-batch.

    PHASES        phase names by id
    parse_phases  "logprob,ref,train", "logprob,train*2" or "2+1" -> a tuple of names
    pass_id       (pass index in the schedule, phase name) -> the id the runtime's order check carries
    pass_label    that id -> "logprob" / "train (pass 2)", for messages
    early_micro_batches  how many micro-batches run on the step before's placement (overlap)

``train`` is id 0 and the first pass has index 0, so a step of one training pass (what relibra
ran before phases had names) carries id 0 as it always did.
"""

from __future__ import annotations

__all__ = ["PHASES", "TRAIN", "FORWARD_ONLY", "MAX_PASSES", "has_backward", "parse_phases", "check_phase", "pass_id",
           "pass_label", "early_micro_batches"]

TRAIN = "train"
#: phase names by id: ``train`` (forward + backward), then the forward-only passes: ``logprob``
#: (the old policy's log-probabilities), ``ref`` (the reference model's), ``forward`` (any other)
PHASES = (TRAIN, "logprob", "ref", "forward")
FORWARD_ONLY = frozenset(PHASES[1:])

#: most passes of one step (a schedule of more is a typo, not an RL step); the order check's
#: phase digit holds MAX_PASSES * len(PHASES) = 256 ids
MAX_PASSES = 64


def early_micro_batches(before_training: int, overlap: bool = True, overlap_micro_batches: int | None = 1) -> int:
    """How many of a step's micro-batches (every pass's, in schedule order) run on the placement of
    the step before while the step's is planned: at most ``overlap_micro_batches`` (None: no
    bound) of the ``before_training`` forward-only micro-batches before the first training pass;
    0 without ``overlap``. The Balancer and the simulator both count this way."""
    if not overlap:
        return 0
    return before_training if overlap_micro_batches is None else min(before_training, overlap_micro_batches)


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
    if len(names) > MAX_PASSES:
        raise ValueError(f"phases {text!r}: {len(names)} passes, more than {MAX_PASSES}")
    if TRAIN not in names:
        raise ValueError(f"phases {text!r} has no training phase ({TRAIN}); an RL step trains at least once "
                         "(the step's placement moves before its first training phase)")
    return names


def pass_id(index: int, name: str) -> int:
    """The id of pass ``index`` (0-based, in the schedule) running phase ``name``: ``index *
    len(PHASES) + PHASES.index(name)``, in ``[0, 256)``."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_PASSES:
        raise ValueError(f"pass index must be an int in [0, {MAX_PASSES}), got {index!r}")
    return index * len(PHASES) + PHASES.index(check_phase(name))


def pass_label(pass_id_: int) -> str:
    """The phase name, with the pass index after the first pass: ``"logprob"``, ``"train (pass 1)"``."""
    index, name = divmod(pass_id_, len(PHASES))
    return PHASES[name] if index == 0 else f"{PHASES[name]} (pass {index})"
