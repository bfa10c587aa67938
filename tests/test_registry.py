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
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


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


def test_core_import_stays_light():
    code = (
        "import sys, relibra, relibra.policies, relibra.plan, relibra.routing, relibra.kernels; "
        "heavy = [m for m in ('transformers', 'triton', 'accelerate', 'matplotlib', 'hypothesis') "
        "if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
