"""`RelibraPlugin`: relibra's settings as an accelerate-style plugin dataclass.

A setting travels from the ``relibra:`` section of an accelerate config YAML (taken out by
``relibra launch``, see :mod:`relibra.integrations.launcher`) through the environment to
every rank, the way accelerate's own plugins (``FSDP_*``) do:

    explicit constructor argument  >  RELIBRA_<FIELD> env var  >  RELIBRA_CONFIG YAML  >  default

This module imports neither accelerate nor transformers, so the launcher and the ranks can
read the plugin cheaply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["RelibraPlugin", "ENV_PREFIX", "CONFIG_ENV"]

ENV_PREFIX = "RELIBRA_"
CONFIG_ENV = "RELIBRA_CONFIG"

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"RelibraPlugin.{name}: cannot read {value!r} as a boolean")


def _to_int(name: str, value: Any, minimum: int) -> int:
    try:
        out = int(str(value).strip()) if not isinstance(value, int) or isinstance(value, bool) else value
    except ValueError:
        raise ValueError(f"RelibraPlugin.{name}: cannot read {value!r} as an int") from None
    if isinstance(value, bool) or out < minimum:
        raise ValueError(f"RelibraPlugin.{name} must be an int >= {minimum}, got {value!r}")
    return out


#: plugin field -> key path in the RelibraConfig schema (relibra.config)
_FILE_KEYS = {
    "enabled": ("enabled",),
    "replay": ("replay",),
    "kernel_backend": ("kernel_backend",),
    "policy": ("policy", "name"),
    "policy_options": ("policy", "options"),
    "num_nodes": ("topology", "num_nodes"),
    "spare_slots_per_gpu": ("topology", "spare_slots_per_gpu"),
}


def load_relibra_yaml(path: str) -> dict[str, Any]:
    """Plugin fields set in a relibra YAML (the :class:`relibra.config.RelibraConfig` schema).

    The file is validated by :func:`relibra.config.load_config` (unknown keys, bad values and
    unknown policies raise ValueError naming the key); only keys the file sets are returned,
    so unset ones fall back to the plugin's defaults (``num_nodes``: derived from the world).
    """
    from omegaconf import OmegaConf

    from relibra.config import load_config

    if not os.path.isfile(path):
        raise ValueError(f"{CONFIG_ENV} file {path!r} does not exist")
    cfg = load_config(path)
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    out: dict[str, Any] = {}
    for name, keys in _FILE_KEYS.items():
        node, val = raw, cfg
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                break
            node, val = node[k], val[k]
        else:
            out[name] = OmegaConf.to_container(val, resolve=True) if OmegaConf.is_config(val) else val
    return out


@dataclass
class RelibraPlugin:
    """Settings of relibra's balancing, filled from the environment like accelerate's plugins.

    Args:
        enabled: swap the MoE blocks and balance (``RELIBRA_ENABLED``). False leaves the model
            as it is (``prepare`` then returns None).
        policy: balancing policy name from :func:`relibra.available_policies`
            (``RELIBRA_POLICY``), e.g. ``static`` or ``hybrid``.
        spare_slots_per_gpu: spare slots per GPU for replicas (``RELIBRA_SPARE_SLOTS_PER_GPU``).
        num_nodes: nodes of the expert-parallel group when relibra builds its own mesh
            (``RELIBRA_NUM_NODES``); None: 1 node on CPU, the launch's machines on GPU.
        replay: replay recorded routes in training (``RELIBRA_REPLAY``).
        kernel_backend: ``auto``, ``torch`` or ``triton`` (``RELIBRA_KERNEL_BACKEND``).
        policy_options: keyword options of the policy (only from ``RELIBRA_CONFIG``).

    ``RELIBRA_CONFIG`` names a YAML in the :class:`relibra.config.RelibraConfig` schema
    (``policy: {name, options}``, ``topology: {num_nodes, spare_slots_per_gpu}``, ``enabled``,
    ``replay``, ``kernel_backend``); the topology's other fields come from the model and the
    world at :func:`relibra.integrations.accelerate.prepare`.
    """

    enabled: Optional[bool] = None
    policy: Optional[str] = None
    spare_slots_per_gpu: Optional[int] = None
    num_nodes: Optional[int] = None
    replay: Optional[bool] = None
    kernel_backend: Optional[str] = None
    policy_options: dict = field(default_factory=dict)

    _DEFAULTS = {"enabled": True, "policy": "hybrid", "spare_slots_per_gpu": 1, "num_nodes": None, "replay": True,
                 "kernel_backend": "auto"}

    def __post_init__(self) -> None:
        from_file: dict[str, Any] = {}
        path = os.environ.get(CONFIG_ENV)
        if path:
            from_file = load_relibra_yaml(path)
        for name, default in self._DEFAULTS.items():
            if getattr(self, name) is not None:
                continue
            env = os.environ.get(ENV_PREFIX + name.upper())
            if env is not None and env != "":
                value: Any = env
            elif name in from_file:
                value = from_file[name]
            else:
                value = default
            setattr(self, name, value)
        if not self.policy_options and "policy_options" in from_file:
            self.policy_options = dict(from_file["policy_options"] or {})
        self._check()

    def _check(self) -> None:
        self.enabled = _to_bool("enabled", self.enabled)
        self.replay = _to_bool("replay", self.replay)
        self.spare_slots_per_gpu = _to_int("spare_slots_per_gpu", self.spare_slots_per_gpu, 0)
        if self.num_nodes is not None and str(self.num_nodes).strip().lower() not in ("none", "null"):
            self.num_nodes = _to_int("num_nodes", self.num_nodes, 1)
        else:
            self.num_nodes = None
        if not isinstance(self.policy, str) or not self.policy:
            raise ValueError(f"RelibraPlugin.policy must be a policy name, got {self.policy!r}")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"RelibraPlugin.kernel_backend must be auto, torch or triton, got {self.kernel_backend!r}")
        if not isinstance(self.policy_options, dict):
            raise ValueError(f"RelibraPlugin.policy_options must be a mapping, got {self.policy_options!r}")

    def to_env(self) -> dict[str, str]:
        """The ``RELIBRA_*`` variables that rebuild this plugin on another process."""
        env = {
            ENV_PREFIX + "ENABLED": str(self.enabled).lower(),
            ENV_PREFIX + "POLICY": self.policy,
            ENV_PREFIX + "SPARE_SLOTS_PER_GPU": str(self.spare_slots_per_gpu),
            ENV_PREFIX + "REPLAY": str(self.replay).lower(),
            ENV_PREFIX + "KERNEL_BACKEND": self.kernel_backend,
        }
        if self.num_nodes is not None:
            env[ENV_PREFIX + "NUM_NODES"] = str(self.num_nodes)
        return env
