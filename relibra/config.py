"""relibra's configuration: OmegaConf structured dataclasses, YAML plus dotlist overrides.

Every field is documented where it is declared (in the style of Megatron-Core's
``TransformerConfig``); fields with a closed set of values name it with a ``Literal`` alias
and are checked on load (OmegaConf 2.3 types them as ``str``).

Example YAML::

    enabled: true
    topology: {num_nodes: 8, gpus_per_node: 8, num_experts: 256, spare_slots_per_gpu: 1}
    policy: {name: hybrid, options: {}}

    cfg = load_config("relibra.yaml", ["policy.name=eplb", "policy.options.source=oracle"])
    topo, policy = to_topology(cfg), build_policy(cfg)

Unknown keys, wrong types and bad values raise ValueError naming the key.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Mapping, Sequence, Union, get_args

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .topology import Topology

__all__ = [
    "KernelBackend",
    "TopologyConfig",
    "PolicyConfig",
    "RelibraConfig",
    "load_config",
    "to_topology",
    "build_policy",
]

KernelBackend = Literal["auto", "torch", "triton"]
"""Dispatch kernels: ``auto`` picks triton when it is installed and a GPU is present."""


@dataclass
class TopologyConfig:
    """The expert-parallel group; mirrors :class:`relibra.Topology`."""

    num_nodes: int = 1
    """Nodes in the expert-parallel group (>= 1)."""
    gpus_per_node: int = 8
    """GPUs of the group on each node (>= 1)."""
    num_experts: int = 64
    """Logical routed experts per MoE layer; divisible by num_nodes * gpus_per_node."""
    spare_slots_per_gpu: int = 1
    """Slots per GPU for replicas (>= 0; 0 disables replication)."""
    num_expert_groups: int = 1
    """Expert groups of group-limited routing (DeepSeek-V3: 8); divides num_experts."""
    intra_node_bandwidth: float = 450e9
    """Bytes/s per GPU per direction inside a node (NVLink)."""
    inter_node_bandwidth: float = 50e9
    """Bytes/s per GPU per direction between nodes (InfiniBand)."""


@dataclass
class PolicyConfig:
    """Which balancing policy, with its keyword options (``relibra.get_policy(name, **options)``)."""

    name: str = "hybrid"
    """A name from :func:`relibra.available_policies` (static, eplb, reorder, replicate, hybrid, ...)."""
    options: Dict[str, Any] = field(default_factory=dict)
    """Keyword options of the policy, e.g. ``{source: oracle}`` for eplb."""


@dataclass
class RelibraConfig:
    """Everything relibra needs to balance a training run."""

    enabled: bool = True
    """False leaves the model unbalanced (static placement, no replicas)."""
    replay: bool = True
    """Replay the rollout's recorded routes in the training forward (R3)."""
    kernel_backend: str = "auto"
    """KernelBackend: ``auto``, ``torch`` or ``triton``."""
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


_POSITIVE_INTS = ("num_nodes", "gpus_per_node", "num_experts", "num_expert_groups")


def _wrap(exc: OmegaConfBaseException, source: str) -> ValueError:
    key = getattr(exc, "full_key", None) or "?"
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ValueError(f"config key {key!r} ({source}): {message}")


def _validate(cfg: DictConfig) -> None:
    from .registry import available_policies, get_policy

    topo = cfg.topology
    for name in _POSITIVE_INTS:
        if getattr(topo, name) < 1:
            raise ValueError(f"config key 'topology.{name}' must be >= 1, got {getattr(topo, name)}")
    if topo.spare_slots_per_gpu < 0:
        raise ValueError(f"config key 'topology.spare_slots_per_gpu' must be >= 0, got {topo.spare_slots_per_gpu}")
    for name in ("intra_node_bandwidth", "inter_node_bandwidth"):
        if not 0 < getattr(topo, name) < math.inf:
            raise ValueError(f"config key 'topology.{name}' must be a finite number > 0 bytes/s, "
                             f"got {getattr(topo, name)}")
    try:
        to_topology(cfg)
    except ValueError as exc:
        raise ValueError(f"config key 'topology': {exc}") from None
    backends = get_args(KernelBackend)
    if cfg.kernel_backend not in backends:
        raise ValueError(f"config key 'kernel_backend' must be one of {list(backends)}, got {cfg.kernel_backend!r}")
    known = available_policies()
    if cfg.policy.name not in known:
        try:  # says why: unknown, or a plugin that failed to load
            get_policy(cfg.policy.name)
        except ValueError as exc:
            raise ValueError(f"config key 'policy.name': {exc}") from None
    try:
        get_policy(cfg.policy.name, **_options(cfg))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config key 'policy.options': {exc}") from None


def _options(cfg: DictConfig) -> dict[str, Any]:
    return dict(OmegaConf.to_container(cfg.policy.options, resolve=True))


def load_config(
    path: Union[str, os.PathLike, Mapping[str, Any], None] = None,
    overrides: Sequence[str] = (),
    *,
    section: str | None = None,
) -> DictConfig:
    """The defaults of :class:`RelibraConfig`, merged with a YAML file (or mapping), then dotlist overrides.

    Args:
        path: a YAML file (read with ``OmegaConf.load``), a mapping, or None for defaults only.
        overrides: dotlist strings, e.g. ``["topology.num_nodes=2", "policy.name=static"]``.
        section: read only this top-level key of the file (e.g. ``"relibra"`` of an accelerate
            config carrying a ``relibra:`` section).

    Returns a typed, struct-mode ``DictConfig`` (setting an unknown key later raises too).
    Raises FileNotFoundError for a missing file and ValueError naming the key (and the file)
    for unknown keys, wrong types, bad values, interpolations (``${...}``) that do not resolve,
    an unknown policy (or a plugin that failed to load) or options it does not take.
    """
    cfg = OmegaConf.structured(RelibraConfig)
    source = "defaults"
    if path is not None:
        if isinstance(path, Mapping):
            source, data = "mapping", OmegaConf.create(dict(path))
        else:
            source = os.fspath(path)
            if not os.path.isfile(source):
                raise FileNotFoundError(f"relibra config file {source!r} does not exist")
            try:
                data = OmegaConf.load(source)
            except Exception as exc:  # yaml errors are many types
                raise ValueError(f"relibra config file {source!r} is not valid YAML: {exc}") from None
        if section is not None:
            if not isinstance(data, DictConfig) or section not in data:
                raise ValueError(f"config {source!r} has no top-level section {section!r}")
            data = data[section]
        if not isinstance(data, DictConfig):
            raise ValueError(f"config {source!r} must hold a mapping, got a {type(data).__name__}")
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as exc:
            raise _wrap(exc, source) from None
    overrides = list(overrides)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        except OmegaConfBaseException as exc:
            raise _wrap(exc, "overrides") from None
        source = "overrides" if path is None else f"{source} with overrides"
    try:  # interpolations (${...}) resolve lazily: resolve every key now, naming the one that fails
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, source) from None
    _validate(cfg)
    return cfg


def to_topology(cfg: DictConfig | RelibraConfig) -> Topology:
    """The :class:`relibra.Topology` of a config."""
    t = cfg.topology
    return Topology(
        num_nodes=int(t.num_nodes),
        gpus_per_node=int(t.gpus_per_node),
        num_experts=int(t.num_experts),
        spare_slots_per_gpu=int(t.spare_slots_per_gpu),
        num_expert_groups=int(t.num_expert_groups),
        intra_node_bandwidth=float(t.intra_node_bandwidth),
        inter_node_bandwidth=float(t.inter_node_bandwidth),
    )


def build_policy(cfg: DictConfig | RelibraConfig) -> Any:
    """A fresh policy object: ``relibra.get_policy(cfg.policy.name, **cfg.policy.options)``."""
    from .registry import get_policy

    options = _options(cfg) if isinstance(cfg, DictConfig) else dict(cfg.policy.options)
    return get_policy(cfg.policy.name, **options)
