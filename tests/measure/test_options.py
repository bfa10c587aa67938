"""MeasureOptions checks and the CLI's one-line errors for impossible options."""

import pytest

from relibra.cli import main
from relibra.measure import MeasureOptions


@pytest.mark.parametrize("kw, text", [
    (dict(skew=1.0), "--skew must be a number in [0, 1), got 1.0"),
    (dict(skew=-0.1), "--skew must be a number in [0, 1)"),
    (dict(skew=float("nan")), "--skew must be a number in [0, 1)"),
    (dict(experts=15), "--experts 15 does not divide over the 2 ranks"),
    (dict(nodes=2, gpus_per_node=3), "--experts 16 does not divide over the 6 ranks"),
    (dict(nodes=1, gpus_per_node=1), "is 1 rank; balance and links need at least 2"),
    (dict(tokens=0), "--tokens must be an integer >= 1, got 0"),
    (dict(spare_slots=-1), "--spare-slots must be an integer >= 0, got -1"),
    (dict(top_k=17), "--top-k 17 exceeds --experts 16"),
    (dict(experts=4, top_k=3), "GPU 0 has only 2 home experts"),
    (dict(policies=("static", "nope")), "unknown policy 'nope'"),
    (dict(policies=("static", "static")), "names a policy twice"),
    (dict(policies=()), "names no policy"),
    (dict(policy_options={"hybrid": {"nope": 1}}), "does not take option(s) ['nope']"),
    (dict(policy_options={"hybrid": {"migration_weight": -1}}), "migration_weight must be a finite number >= 0"),
    (dict(policies=("static",), policy_options={"hybrid": {}}), "--option for 'hybrid', which is not in --policies"),
])
def test_bad_options_are_named(kw, text):
    o = MeasureOptions(**kw)
    assert text in o.fault()
    with pytest.raises(ValueError, match="--"):
        o.check()


def test_defaults_are_valid_and_uniform_needs_no_hot_experts():
    assert MeasureOptions().fault() == ""
    assert MeasureOptions(experts=4, top_k=3, skew=0.0).fault() == ""  # no hot experts at skew 0


@pytest.mark.parametrize("argv, text", [
    (["measure", "--skew", "1"], "relibra measure: error: --skew must be a number in [0, 1), got 1.0"),
    (["measure", "--experts", "6", "--nodes", "2", "--gpus-per-node", "2"], "--experts 6 does not divide"),
    (["calibrate", "--out", "x.json", "--gpus-per-node", "3"], "relibra calibrate: error: --experts 16"),
    (["measure", "--policies", "static,hibrid"], "unknown policy 'hibrid'"),
    (["measure", "--option", "hybrid.migration_weight=-1"], "--option for policy 'hybrid'"),
])
def test_cli_prints_one_line_and_exits_2(argv, text, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert text in err and err.count("\n") == 1
