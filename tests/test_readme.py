"""The README's planning snippets run as written (a newcomer copies them)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_planning_and_custom_policy_snippets_run(monkeypatch):
    from relibra import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    blocks = _python_blocks()
    planning = next(b for b in blocks if "policy.plan(loads, topo)" in b)
    custom = next(b for b in blocks if "register_policy(" in b)
    namespace: dict = {}
    exec(compile(planning, "README planning", "exec"), namespace)
    exec(compile(custom, "README custom policy", "exec"), namespace)
    plan, topo, loads = namespace["plan"], namespace["topo"], namespace["loads"]
    plan.validate(topo, loads)
    assert plan.policy == "round-robin"
    assert plan.gpu_loads(loads).shape == (16, 58, 64)


def test_quickstart_has_exactly_two_commands():
    text = README.read_text()
    block = re.search(r"## Quickstart\n.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "relibra bench" in commands[0] and "pytest" in commands[1]
