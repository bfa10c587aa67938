"""Phase schedules: the names the runtime's order check carries and the text that lists a step's passes."""

import pytest

from relibra.phases import FORWARD_ONLY, PHASES, TRAIN, early_micro_batches, has_backward, parse_phases


def test_names_and_ids():
    assert PHASES[0] == TRAIN == "train"  # id 0 is what relibra ran before phases had names
    assert set(FORWARD_ONLY) == {"logprob", "ref", "forward"} and not has_backward("logprob") and has_backward("train")


@pytest.mark.parametrize("text, phases", [
    ("train", ("train",)),
    ("logprob,ref,train", ("logprob", "ref", "train")),
    (" logprob , train*2 ", ("logprob", "train", "train")),
    ("2+1", ("logprob", "ref", "train")),
    ("4+2", ("logprob", "ref", "forward", "forward", "train", "train")),
    ("+1", ("train",)),
    ("0+2", ("train", "train")),
])
def test_parse(text, phases):
    assert parse_phases(text) == phases


@pytest.mark.parametrize("text, match", [
    ("", r"at least one phase"),
    ("logprob,ref", r"has no training phase \(train\)"),
    ("0+0", r"number of training epochs must be a positive integer, got '0'"),
    ("x+1", r"number of forward-only passes must be an integer >= 0, got 'x'"),
    ("logprob,trian", r"unknown phase 'trian'; phases are train, logprob, ref, forward"),
    ("train*0", r"repeat count of 'train' must be a positive integer"),
    ("train*65", r"65 passes, more than 64"),
])
def test_bad_schedules_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        parse_phases(text)


def test_early_micro_batches_counts_the_overlap():
    assert early_micro_batches(16) == 1  # the Balancer's default: one forward-only micro-batch
    assert early_micro_batches(16, overlap_micro_batches=4) == 4
    assert early_micro_batches(3, overlap_micro_batches=4) == 3  # never past the first training pass
    assert early_micro_batches(16, overlap_micro_batches=None) == 16
    assert early_micro_batches(16, overlap=False) == 0 and early_micro_batches(0) == 0
