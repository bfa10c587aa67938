"""docs/testing-policies.md: its Python snippets run as written, with "mine" standing for static."""

from __future__ import annotations

import re
from pathlib import Path

import relibra
from relibra import registry
from relibra.policies import StaticPolicy

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing-policies.md"


def test_the_snippets_run(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    relibra.register_policy("mine")(StaticPolicy)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 4
    for number, block in enumerate(blocks):
        namespace: dict = {}
        exec(compile(block, f"docs/testing-policies.md python block {number}", "exec"), namespace)
        tests = [value for name, value in namespace.items() if name.startswith("test_")]
        for test in tests:
            test()
