import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

import relibra
from relibra import registry


@pytest.fixture(autouse=True)
def _private_registry(monkeypatch):
    """Registrations (and plugin loads) made by a test vanish after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_FAILED_PLUGINS", dict(registry._FAILED_PLUGINS))


def test_builtins_are_registered():
    assert set(relibra.policies.BUILTINS) == {"static", "eplb", "reorder", "replicate", "hybrid"}
    assert set(relibra.policies.BUILTINS) <= set(relibra.available_policies())
    for name, factory in relibra.policies.BUILTINS.items():
        assert registry._REGISTRY[name] is factory


def test_a_built_in_that_fails_to_import_fails_import_relibra(tmp_path):
    # a copy of the package whose hybrid module raises on import: import relibra must fail, not
    # silently register one policy fewer (which would skip that policy's tests)
    import shutil

    pkg = tmp_path / "relibra"
    shutil.copytree(Path(relibra.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__", "data"))
    broken = "raise ModuleNotFoundError('simulated', name='relibra.policies.hybrid')\n"
    (pkg / "policies" / "hybrid.py").write_text(broken)
    proc = subprocess.run([sys.executable, "-c", "import relibra"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "relibra.policies.hybrid" in proc.stderr or "simulated" in proc.stderr


def test_register_decorator_and_call_form():
    @relibra.register_policy("test-mine-decorated")
    class Mine:
        def __init__(self, knob: int = 1):
            self.knob = knob

        def plan(self, loads, topology):
            return relibra.get_policy("static").plan(loads, topology)

    policy = relibra.get_policy("test-mine-decorated", knob=3)
    assert isinstance(policy, Mine) and policy.knob == 3
    relibra.register_policy("test-mine-called")(Mine)
    topo = relibra.Topology(num_nodes=1, gpus_per_node=2, num_experts=4)
    loads = torch.ones(1, 1, 4, dtype=torch.int64)
    relibra.get_policy("test-mine-called").plan(loads, topo).validate(topo, loads)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        relibra.get_policy("nope")
    with pytest.raises(TypeError, match="does not take option"):
        relibra.get_policy("static", bogus=1)
    with pytest.raises(ValueError, match="already registered"):
        relibra.register_policy("static")(object)

    class NoPlan:
        pass

    relibra.register_policy("test-no-plan")(NoPlan)
    with pytest.raises(TypeError, match="no plan"):
        relibra.get_policy("test-no-plan")


def test_entry_point_discovery(monkeypatch):
    ep = EntryPoint(name="test-from-entry-point", value="relibra.policies.static:StaticPolicy",
                    group="relibra.policies")
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == "relibra.policies" else [])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert "test-from-entry-point" in relibra.available_policies()
    assert type(relibra.get_policy("test-from-entry-point")).__name__ == "StaticPolicy"


def _fake_plugins(monkeypatch, tmp_path, *specs):
    """Entry points ``(name, "module:attr")`` in the relibra.policies group, modules written to tmp_path."""
    (tmp_path / "relibra_test_boom_plugin.py").write_text("raise RuntimeError('plugin boom')\n")
    (tmp_path / "relibra_test_plain_plugin.py").write_text("NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint(name=name, value=value, group="relibra.policies") for name, value in specs]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps if group == "relibra.policies" else [])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)


def test_a_plugin_that_fails_to_load_is_isolated(monkeypatch, tmp_path, recwarn):
    # broken plugins listed first: they used to make every lookup raise and, on the next call,
    # the valid plugins after them silently vanished
    _fake_plugins(monkeypatch, tmp_path,
                  ("test-boom", "relibra_test_boom_plugin:Policy"),
                  ("test-missing", "relibra_no_such_module_anywhere:Policy"),
                  ("test-not-callable", "relibra_test_plain_plugin:NOT_CALLABLE"),
                  ("test-good", "relibra.policies.static:StaticPolicy"))
    first = relibra.available_policies()
    assert "test-good" in first and set(relibra.policies.BUILTINS) <= set(first)
    assert not {"test-boom", "test-missing", "test-not-callable"} & set(first)
    messages = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 3
    assert "'test-boom' (entry point 'relibra_test_boom_plugin:Policy') failed to load: RuntimeError: plugin boom" \
        in messages[0]
    assert "'test-missing'" in messages[1] and "ModuleNotFoundError" in messages[1]
    assert "'test-not-callable'" in messages[2] and "is not a class or callable (int)" in messages[2]
    recwarn.clear()
    # every later call: the same set, no new warning, no new import attempt
    for _ in range(2):
        assert relibra.available_policies() == first
        assert type(relibra.get_policy("static")).__name__ == "StaticPolicy"
        assert type(relibra.get_policy("test-good")).__name__ == "StaticPolicy"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    # only asking for the broken one raises, naming the entry point and the original error
    with pytest.raises(ValueError, match=r"policy 'test-boom' is unavailable: .*entry point "
                                         r"'relibra_test_boom_plugin:Policy'.*RuntimeError: plugin boom") as info:
        relibra.get_policy("test-boom")
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match=r"'test-not-callable' is unavailable"):
        relibra.get_policy("test-not-callable")
    with pytest.raises(ValueError, match=r"unknown policy 'nope'"):
        relibra.get_policy("nope")


def test_config_and_balancer_work_beside_a_broken_plugin(monkeypatch, tmp_path):
    from relibra import Balancer, ReLibraMoE
    from relibra.config import load_config

    _fake_plugins(monkeypatch, tmp_path, ("test-boom", "relibra_test_boom_plugin:Policy"))
    with pytest.warns(RuntimeWarning, match="test-boom"):
        cfg = load_config(None, ["policy.name=static", "topology.num_experts=8"])
    assert cfg.policy.name == "static"
    assert Balancer(ReLibraMoE(8, 4, 8, 2), policy="static").policy_name == "static"
    with pytest.raises(ValueError, match=r"config key 'policy.name': policy 'test-boom' is unavailable.*plugin boom"):
        load_config(None, ["policy.name=test-boom", "topology.num_experts=8"])
    with pytest.raises(ValueError, match=r"'test-boom' is unavailable"):
        Balancer(ReLibraMoE(8, 4, 8, 2), policy="test-boom")


def test_core_import_stays_light():
    code = (
        "import sys, relibra, relibra.policies, relibra.plan, relibra.routing, relibra.kernels; "
        "heavy = [m for m in ('transformers', 'triton', 'accelerate', 'matplotlib', 'hypothesis') "
        "if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
