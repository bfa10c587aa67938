"""relibra.config: structured defaults, YAML merge, dotlist overrides, and refusals naming the key."""

from __future__ import annotations

import omegaconf
import pytest
from omegaconf import OmegaConf

import relibra
from relibra.config import RelibraConfig, build_policy, load_config, to_topology

STATIC = ["policy.name=static"]  # a policy that exists whatever else is registered yet


def write(tmp_path, text, name="relibra.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_typed():
    cfg = load_config(None, STATIC)
    assert cfg.enabled is True and cfg.replay is True and cfg.kernel_backend == "auto"
    assert cfg.topology.spare_slots_per_gpu == 1
    assert OmegaConf.get_type(cfg) is RelibraConfig


@pytest.mark.skipif("hybrid" not in relibra.available_policies(), reason="hybrid not registered yet")
def test_default_policy_is_hybrid():
    assert load_config().policy.name == "hybrid"


def test_yaml_merge_then_overrides(tmp_path):
    path = write(
        tmp_path,
        "enabled: false\n"
        "topology: {num_nodes: 2, gpus_per_node: 4, num_experts: 16, num_expert_groups: 4}\n"
        "policy: {name: static}\n",
    )
    cfg = load_config(path, ["topology.spare_slots_per_gpu=2", "kernel_backend=torch"])
    assert cfg.enabled is False and cfg.kernel_backend == "torch"
    topo = to_topology(cfg)
    assert topo == relibra.Topology(
        num_nodes=2, gpus_per_node=4, num_experts=16, spare_slots_per_gpu=2, num_expert_groups=4
    )
    assert topo.intra_node_bandwidth == 450e9
    # overrides win over the file
    assert load_config(path, ["topology.num_nodes=1"]).topology.num_nodes == 1


def test_section_of_an_accelerate_yaml(tmp_path):
    path = write(
        tmp_path, "distributed_type: MULTI_GPU\nrelibra:\n  policy: {name: static}\n  topology: {num_experts: 32}\n"
    )
    cfg = load_config(path, section="relibra")
    assert cfg.topology.num_experts == 32
    with pytest.raises(ValueError, match=r"unknown|distributed_type"):
        load_config(path)  # the accelerate keys are unknown to relibra
    with pytest.raises(ValueError, match=r"no top-level section 'nope'"):
        load_config(path, section="nope")


def test_mapping_input_and_build_policy():
    cfg = load_config({"policy": {"name": "static", "options": {}}, "topology": {"gpus_per_node": 2, "num_experts": 4}})
    policy = build_policy(cfg)
    assert callable(policy.plan)
    topo = to_topology(cfg)
    import torch

    plan = policy.plan(torch.ones(1, 1, 4, dtype=torch.int64), topo)
    plan.validate(topo)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["topology.bogus=1"], r"'topology.bogus'"),
        (["nonsense=1"], r"'nonsense'"),
        (["topology.num_nodes=abc"], r"'topology.num_nodes'.*could not be converted"),
        (["topology.num_nodes=2.5"], r"'topology.num_nodes'"),
        (["topology.num_nodes=0"], r"'topology.num_nodes' must be >= 1"),
        (["topology.gpus_per_node=-8"], r"'topology.gpus_per_node' must be >= 1"),
        (["topology.spare_slots_per_gpu=-1"], r"'topology.spare_slots_per_gpu' must be >= 0"),
        (["topology.inter_node_bandwidth=0"], r"'topology.inter_node_bandwidth' must be a finite number > 0"),
        (["topology.intra_node_bandwidth=inf"], r"'topology.intra_node_bandwidth' must be a finite number > 0"),
        (["topology.num_nodes=${nope.name}"], r"'topology.num_nodes' \(overrides\): Interpolation key 'nope.name'"),
        (["topology.num_experts=60"], r"'topology'.*not divisible"),
        (["topology.num_expert_groups=5"], r"'topology'.*num_expert_groups"),
        (["enabled=maybe"], r"'enabled'"),
        (["kernel_backend=cuda"], r"'kernel_backend' must be one of \['auto', 'torch', 'triton'\]"),
        (["policy.name=no_such_policy"], r"'policy.name': unknown policy 'no_such_policy'; registered: .*static"),
        (["policy.options.bogus_option=1"], r"'policy.options'.*bogus_option"),
        (["policy.name"], r"key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, STATIC + overrides)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"'topology.gpus'.*bad.yaml"):
        load_config(write(tmp_path, "topology: {gpus: 8}\n", "bad.yaml"))
    with pytest.raises(ValueError, match=r"'topology.num_experts'"):
        load_config(write(tmp_path, "policy: {name: static}\ntopology: {num_experts: lots}\n", "bad2.yaml"))
    with pytest.raises(ValueError, match=r"must hold a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))
    with pytest.raises(ValueError, match=r"not valid YAML"):
        load_config(write(tmp_path, "topology: {num_nodes: [\n", "broken.yaml"))


def test_interpolation_errors_name_key_and_file(tmp_path):
    # interpolations resolve lazily: they used to escape as raw omegaconf errors naming no file
    path = write(tmp_path, "policy: {name: static}\ntopology:\n  num_nodes: ${nope.name}\n", "interp.yaml")
    with pytest.raises(ValueError, match=r"^config key 'topology.num_nodes' \(.*interp.yaml\): "
                                         r"Interpolation key 'nope.name' not found$"):
        load_config(path)
    path = write(tmp_path, "policy:\n  name: static\n  options:\n    source: ${env_nope}\n", "opts.yaml")
    with pytest.raises(ValueError, match=r"^config key 'policy.options.source' \(.*opts.yaml\): "
                                         r"Interpolation key 'env_nope' not found$"):
        load_config(path)
    path = write(tmp_path, "policy: {name: static}\n", "plain.yaml")
    with pytest.raises(ValueError, match=r"'policy.name' \(.*plain.yaml with overrides\): Interpolation key"):
        load_config(path, ["topology.num_experts=8", "policy.name=${policy.nope}"])
    # interpolations that resolve still work
    cfg = load_config(write(tmp_path, "policy: {name: static}\ntopology:\n  num_experts: 16\n"
                                      "  gpus_per_node: ${topology.num_experts}\n", "ok.yaml"))
    assert cfg.topology.gpus_per_node == 16


def test_struct_mode_refuses_new_keys_later():
    cfg = load_config(None, STATIC)
    with pytest.raises(omegaconf.errors.ConfigAttributeError):
        cfg.topology.bogus = 1
