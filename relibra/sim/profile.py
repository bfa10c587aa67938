"""Machine profiles: what ``relibra calibrate`` measured, read back to price plans with it.

A profile is one JSON object (no pickle)::

    {"format": "relibra-profile", "version": 1,
     "machine": {"backend": "gloo", "device": "cpu", ...},   # where it was measured
     "world": {"nodes": 1, "gpus_per_node": 2},              # the ranks it was measured on
     "sizes": {"dim": 256, "hidden": 1024, "experts": 16, "top_k": 2, "layers": 2, "spare_slots": 1},
     "cost": {every name of MACHINE_PARAMETERS: number},     # CostConfig fields of the machine
                                                             # (and any of OPTIONAL_MACHINE_PARAMETERS)
     "measured": {...}}                                      # the raw probes (free-form)

The ``cost`` block holds only machine parameters (rates, bandwidths, latencies, overheads, byte
sizes, overlaps); the model's shape (hidden size, experts, layers, ...) always comes from the
caller: a preset for ``relibra bench --profile``, the measured layer for ``relibra measure``.

Profiles shipped with relibra live in ``relibra/data/profiles/NAME.json`` (package data, written
there by ``benchmarks/gpu_check.py`` on a GPU); :func:`profile_path` resolves such a NAME, so
``relibra bench --profile NAME`` takes a name as well as a file. No GPU profile measured yet: the
directory ships empty.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from .cost import CostConfig

__all__ = ["PROFILE_FORMAT", "PROFILE_VERSION", "MACHINE_PARAMETERS", "OPTIONAL_MACHINE_PARAMETERS", "PROFILE_DIR",
           "Profile", "load_profile", "save_profile", "profile_from_dict", "profile_config", "profile_path",
           "shipped_profiles"]

PROFILE_FORMAT = "relibra-profile"
PROFILE_VERSION = 1
#: CostConfig fields a profile sets (the machine, not the model)
MACHINE_PARAMETERS = ("peak_flops", "mfu", "backward_factor", "expert_half_rows", "intra_node_bandwidth",
                      "inter_node_bandwidth", "message_latency_s", "migration_s_per_byte",
                      "optimizer_s_per_param", "layer_call_s", "step_overhead_s", "a2a_bytes", "weight_bytes",
                      "replica_grad_bytes", "state_bytes_per_param", "a2a_overlap", "replica_overlap",
                      "reorder_overlap", "replica_reuse")
#: machine parameters a profile may leave out (profiles written before they existed): the model's
#: default then holds
OPTIONAL_MACHINE_PARAMETERS = ("state_move_overlap",)
_SIZES = ("dim", "hidden", "experts", "top_k", "layers", "spare_slots")
#: profiles shipped with relibra (package data): ``NAME.json``
PROFILE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "profiles")


@dataclass(frozen=True)
class Profile:
    """A validated profile (see the module doc); ``source`` names where it came from."""

    source: str
    machine: dict
    world: dict
    sizes: dict
    cost: dict
    measured: dict

    @property
    def world_size(self) -> int:
        return self.world["nodes"] * self.world["gpus_per_node"]

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "machine": self.machine,
                "world": self.world, "sizes": self.sizes, "cost": self.cost, "measured": self.measured}


def _int_fault(block: dict, key: str, where: str, least: int) -> str:
    v = block.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < least:
        return f"{where}.{key} must be an integer >= {least}, got {v!r}"
    return ""


def _fault(d: Any) -> str:
    """Why ``d`` is not a valid profile, naming the key, or ""."""
    if not isinstance(d, dict):
        return f"must hold one JSON object, got {type(d).__name__}"
    if d.get("format") != PROFILE_FORMAT:
        return f"format must be {PROFILE_FORMAT!r}, got {d.get('format')!r}"
    if d.get("version") != PROFILE_VERSION:
        return f"version must be {PROFILE_VERSION}, got {d.get('version')!r}"
    for key in ("machine", "world", "sizes", "cost", "measured"):
        if not isinstance(d.get(key), dict):
            return f"{key} must be a JSON object, got {type(d.get(key)).__name__}"
    if not isinstance(d["machine"].get("backend"), str):
        return f"machine.backend must be a string, got {d['machine'].get('backend')!r}"
    for key in ("nodes", "gpus_per_node"):
        fault = _int_fault(d["world"], key, "world", 1)
        if fault:
            return fault
    for key in _SIZES:
        fault = _int_fault(d["sizes"], key, "sizes", 0 if key == "spare_slots" else 1)
        if fault:
            return fault
    G = d["world"]["nodes"] * d["world"]["gpus_per_node"]
    if d["sizes"]["experts"] % G:
        return f"sizes.experts={d['sizes']['experts']} does not divide over world's {G} ranks"
    cost = d["cost"]
    allowed = MACHINE_PARAMETERS + OPTIONAL_MACHINE_PARAMETERS
    unknown = sorted(set(cost) - set(allowed))
    if unknown:
        return f"cost has unknown key {unknown[0]!r}; known: {', '.join(allowed)}"
    missing = [k for k in MACHINE_PARAMETERS if k not in cost]
    if missing:
        return f"cost lacks {missing[0]!r}"
    for key in (k for k in allowed if k in cost):
        v = cost[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"cost.{key} must be a finite number, got {v!r}"
    try:
        CostConfig(**cost)
    except ValueError as exc:
        return str(exc).replace("CostConfig.", "cost.")
    return ""


def profile_from_dict(d: Any, source: str = "<dict>") -> Profile:
    """Validate ``d``; ValueError ``"profile {source}: ..."`` naming the bad key."""
    fault = _fault(d)
    if fault:
        raise ValueError(f"profile {source}: {fault}")
    return Profile(source, dict(d["machine"]), dict(d["world"]), dict(d["sizes"]),
                   {k: float(v) for k, v in d["cost"].items()}, dict(d["measured"]))


def load_profile(path: str) -> Profile:
    """Read and validate the profile file ``path``; ValueError naming the file and the fault."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"profile file {path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"profile file {path}: not UTF-8 text (is it a profile from relibra calibrate?)") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"profile file {path}: not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    return profile_from_dict(d, f"file {path}")


def shipped_profiles() -> list[str]:
    """Names of the profiles in :data:`PROFILE_DIR`, sorted (none until one is measured)."""
    if not os.path.isdir(PROFILE_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".json"))


def profile_path(name_or_path: str) -> str:
    """The profile file ``name_or_path`` names: the path itself when it exists, else the shipped
    profile ``PROFILE_DIR/NAME.json``; ValueError naming it and the shipped names otherwise."""
    if os.path.exists(name_or_path):
        return name_or_path
    shipped = os.path.join(PROFILE_DIR, f"{name_or_path}.json")
    if os.sep not in name_or_path and os.path.isfile(shipped):
        return shipped
    names = ", ".join(shipped_profiles()) or "none yet"
    raise ValueError(f"profile {name_or_path!r}: no such file, nor a profile shipped with relibra "
                     f"(shipped: {names})")


def save_profile(profile: Profile | dict, path: str) -> Profile:
    """Validate and write ``profile`` as JSON to ``path``; returns the validated profile."""
    p = profile if isinstance(profile, Profile) else profile_from_dict(profile)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(p.to_dict(), f, indent=1)
        f.write("\n")
    return p


def profile_config(profile: Profile, model: CostConfig) -> CostConfig:
    """``model``'s shape (hidden, experts, layers, ...) priced with ``profile``'s machine."""
    known = {f.name for f in fields(CostConfig)}
    return replace(model, **{k: v for k, v in profile.cost.items() if k in known})
