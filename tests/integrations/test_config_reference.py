"""docs/config.md lists every key of the relibra: section, every RELIBRA_* variable and every
option of every built-in policy, with the defaults the code has."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import relibra
from relibra.config import RelibraConfig
from relibra.integrations.plugin import ENV_PREFIX, RelibraPlugin

DOC = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()


def _keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", default


def _row(key: str) -> str:
    found = re.search(rf"^\| `{re.escape(key)}` \|.*$", DOC, flags=re.M)
    assert found, f"docs/config.md has no row for {key}"
    return found.group(0)


def _documented(row: str, default) -> bool:
    """Whether the row's default cell (the third) says ``default``."""
    cell = re.split(r"(?<!\\)\|", row)[3].strip().strip("`")  # cells split on unescaped pipes
    if isinstance(default, bool):
        return cell == str(default).lower()
    if isinstance(default, (int, float)):
        return float(cell) == default
    return cell == ("{}" if default == {} else str(default))


def test_every_config_key_is_documented_with_its_default():
    keys = dict(_keys(RelibraConfig))
    assert len(keys) == 12
    for key, default in keys.items():
        assert _documented(_row(key), default), (key, default, _row(key))


def test_every_plugin_environment_variable_is_documented():
    names = [f.name for f in dataclasses.fields(RelibraPlugin) if f.name != "policy_options"]
    for name in names:
        assert f"`{ENV_PREFIX}{name.upper()}`" in DOC, name
    assert "`RELIBRA_CONFIG`" in DOC


def test_every_builtin_policy_option_is_documented_with_its_default():
    for name in relibra.policies.BUILTINS:
        cls = type(relibra.get_policy(name))
        params = [p for p in inspect.signature(cls.__init__).parameters.values()
                  if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
        if not params:
            assert re.search(rf"^\| `{name}` \| - \|", DOC, flags=re.M), name
        for p in params:
            row = re.search(rf"^\| `{name}` \| `{p.name}` \|.*$", DOC, flags=re.M)
            assert row, f"docs/config.md has no row for policy {name} option {p.name}"
            shown = "None" if p.default is None else f"`{p.default}`"
            assert shown in row.group(0), (name, p.name, p.default)
