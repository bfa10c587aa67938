"""RelibraPlugin settings, `relibra launch` config rewriting, and prepare() on 2 gloo processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import yaml

from relibra.integrations.launcher import rewrite_argv, split_config
from relibra.integrations.plugin import RelibraPlugin

ACCEL = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "use_cpu": True,
         "num_machines": 1, "num_processes": 2, "mixed_precision": "no"}


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("RELIBRA_"):
            monkeypatch.delenv(k)
    return monkeypatch


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_plugin_precedence_argument_env_file_default(clean_env, tmp_path):
    assert RelibraPlugin().policy == "hybrid" and RelibraPlugin().num_nodes is None
    cfg = _write(tmp_path / "r.yaml", {"policy": {"name": "static"}, "replay": False,
                                       "topology": {"spare_slots_per_gpu": 2, "num_nodes": 1}})
    clean_env.setenv("RELIBRA_CONFIG", cfg)
    p = RelibraPlugin()
    assert (p.policy, p.replay, p.spare_slots_per_gpu, p.num_nodes) == ("static", False, 2, 1)
    clean_env.setenv("RELIBRA_SPARE_SLOTS_PER_GPU", "3")
    clean_env.setenv("RELIBRA_REPLAY", "true")
    p = RelibraPlugin()
    assert (p.spare_slots_per_gpu, p.replay, p.policy) == (3, True, "static")
    assert RelibraPlugin(spare_slots_per_gpu=0).spare_slots_per_gpu == 0
    # to_env round-trips through a fresh process environment
    clean_env.delenv("RELIBRA_CONFIG")
    for k, v in RelibraPlugin(policy="static", num_nodes=2).to_env().items():
        clean_env.setenv(k, v)
    assert RelibraPlugin() == RelibraPlugin(policy="static", num_nodes=2, spare_slots_per_gpu=3)


@pytest.mark.parametrize("env, match", [({"RELIBRA_SPARE_SLOTS_PER_GPU": "-1"}, "spare_slots_per_gpu"),
                                        ({"RELIBRA_ENABLED": "maybe"}, "enabled"),
                                        ({"RELIBRA_NUM_NODES": "two"}, "num_nodes")])
def test_plugin_bad_env_values_name_the_field(clean_env, env, match):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        RelibraPlugin()


def test_plugin_config_file_errors_name_key_and_file(clean_env, tmp_path):
    clean_env.setenv("RELIBRA_CONFIG", _write(tmp_path / "r.yaml", {"polcy": {"name": "static"}}))
    with pytest.raises(ValueError, match="polcy"):
        RelibraPlugin()
    clean_env.setenv("RELIBRA_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="missing.yaml"):
        RelibraPlugin()


def test_launch_strips_the_relibra_section_and_keeps_every_other_argument(tmp_path):
    path = _write(tmp_path / "acc.yaml", {**ACCEL, "relibra": {"policy": {"name": "static"}}})
    accel, section = split_config(path)
    assert "relibra" not in accel and section == {"policy": {"name": "static"}}
    argv = ["--num_processes", "2", "--config_file", path, "train.py", "--config_file", "mine.yaml"]
    with rewrite_argv(argv) as (new, env):
        assert new[:3] == argv[:3] and new[4:] == argv[4:]  # only the launcher's config path changes
        assert yaml.safe_load(open(new[3])) == ACCEL
        assert yaml.safe_load(open(env["RELIBRA_CONFIG"])) == {"policy": {"name": "static"}}
        tmp = new[3]
    assert not os.path.exists(tmp)  # temporary files are gone after the launch
    with rewrite_argv([f"--config_file={path}", "x.py"]) as (new, env):
        assert new[0].startswith("--config_file=") and new[0] != f"--config_file={path}" and "RELIBRA_CONFIG" in env
    plain = _write(tmp_path / "plain.yaml", ACCEL)
    with rewrite_argv(["--config_file", plain, "x.py"]) as (new, env):
        assert new == ["--config_file", plain, "x.py"] and env == {}
    (tmp_path / "bad.yaml").write_text("relibra: 3\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        split_config(str(tmp_path / "bad.yaml"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = textwrap.dedent("""
    import os, sys, types, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import transformers
    from relibra.integrations.accelerate import prepare, RelibraPlugin
    from torch.distributed.tensor import DTensor
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    def model():
        torch.manual_seed(0)
        cfg = transformers.Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
            num_experts_per_tok=2, max_position_embeddings=32, tie_word_embeddings=False)
        return transformers.Qwen3MoeForCausalLM(cfg).float()
    torch.manual_seed(1)
    ids = torch.randint(0, 32, (2 * world, 5))
    # reference: one process, the whole batch, loss = mean over ranks of each rank's mean loss
    ref = model(); ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_loss = sum(ref(ids[2 * r:2 * r + 2]).logits.square().mean() for r in range(world)) / world
    ref_loss.backward(); ref_opt.step()
    acc = types.SimpleNamespace(num_processes=world, device=torch.device("cpu"), torch_device_mesh=None, state=None)
    m = model(); opt = torch.optim.SGD(m.parameters(), lr=0.5)
    bal = prepare(acc, m, opt, RelibraPlugin(policy="static", spare_slots_per_gpu=0))
    ex = m.model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(ex, DTensor) and ex.to_local().shape[0] == 4 // world
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in m.parameters()}
    ddp = DDP(m)
    ddp(ids[2 * rank:2 * rank + 2]).logits.square().mean().backward()
    opt.step()
    got, want = m.state_dict(), ref.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    print("OK", rank, bal.topology, flush=True)
    dist.barrier()  # both ranks done before either tears gloo down (one exiting first can abort the other)
    dist.destroy_process_group()
""")


@pytest.mark.distributed
def test_prepare_with_ddp_on_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    pytest.importorskip("transformers")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {r}" in out, out[-3000:]


@pytest.mark.parametrize("section, needles", [
    ({"polcy": {"name": "static"}}, ["'polcy'", "'policy'"]),                    # misspelt key
    ({"policy": {"name": "hybird"}}, ["policy.name", "'hybird'", "hybrid"]),     # unknown policy
    ({"topology": {"num_nodes": "two"}}, ["topology.num_nodes", "'two'"]),       # wrong type
    ({"policy": {"name": "hybrid", "options": {"nope": 1}}}, ["policy.options", "nope"]),
])
def test_launch_validates_the_relibra_section_once_before_spawning(tmp_path, monkeypatch, capsys, clean_env,
                                                                   section, needles):
    import accelerate.commands.launch as accel_launch

    from relibra.cli import main

    launched = []
    monkeypatch.setattr(accel_launch, "launch_command", lambda args: launched.append(args))
    path = _write(tmp_path / "my_accelerate.yaml", {**ACCEL, "relibra": section})
    assert main(["launch", "--config_file", path, "train.py"]) == 2
    err = capsys.readouterr().err
    assert launched == []  # nothing was spawned
    assert err.count("\n") == 1 and err.startswith("relibra launch: ")  # one line, once
    assert path in err and "relibra_launch_" not in err  # the user's file, not the temporary copy
    for needle in needles:
        assert needle in err, err
    good = _write(tmp_path / "good.yaml", {**ACCEL, "relibra": {"policy": {"name": "static"}}})
    assert main(["launch", "--config_file", good, "train.py"]) == 0 and len(launched) == 1
    assert "RELIBRA_CONFIG" not in os.environ  # restored after the launch


def test_launch_reports_bad_relibra_environment_variables_once(tmp_path, monkeypatch, capsys, clean_env):
    import accelerate.commands.launch as accel_launch

    from relibra.cli import main

    monkeypatch.setattr(accel_launch, "launch_command", lambda args: pytest.fail("launched"))
    clean_env.setenv("RELIBRA_SPARE_SLOTS_PER_GPU", "-1")
    assert main(["launch", "--config_file", _write(tmp_path / "a.yaml", ACCEL), "train.py"]) == 2
    assert "spare_slots_per_gpu" in capsys.readouterr().err


def test_prepare_sets_the_kernel_backend_from_the_plugin(clean_env, tmp_path):
    import types

    import torch
    transformers = pytest.importorskip("transformers")

    from relibra.integrations.accelerate import prepare
    from relibra.kernels import resolve_backend

    cfg = transformers.Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    acc = types.SimpleNamespace(num_processes=1, device=torch.device("cpu"), torch_device_mesh=None, state=None)
    clean_env.setenv("RELIBRA_CONFIG", _write(tmp_path / "r.yaml", {"kernel_backend": "triton"}))
    clean_env.setenv("RELIBRA_KERNEL_BACKEND", "")  # unset for the plugin; prepare writes it
    balancer = prepare(acc, transformers.Qwen3MoeForCausalLM(cfg), None, RelibraPlugin())
    assert balancer is not None and os.environ["RELIBRA_KERNEL_BACKEND"] == "triton"
    assert resolve_backend(None, torch.zeros(1)) == "triton"  # forced, where auto would pick the reference
