"""The cost model's parameters: :class:`CostConfig`, the model and cluster presets, ``make_config``.

:mod:`relibra.sim.cost` prices plans with them; ``relibra calibrate`` measures the machine
parameters where it runs and :mod:`relibra.sim.profile` reads them back.

Defaults of the machine parameters, for H100-class clusters (estimates, none measured on a GPU
here; ``relibra calibrate`` measures them where it runs):

- ``expert_half_rows`` = 150: an expert's weights (2 B/param) stream from HBM (3.35 TB/s) once per
  call while each row costs ``2 flops/param`` at the effective ``989e12 * 0.5`` flop/s, so the
  fixed cost equals ``494.5e12 * 2 / (2 * 3.35e12)`` = 148 rows (the roofline ridge);
- ``message_latency_s`` = 30e-6: one NCCL all-to-all of small messages over 8 x 8 GPUs;
- ``layer_call_s`` = 2e-4: kernel launches and the dispatch's host syncs of one layer's forward
  and backward that do not overlap device work;
- ``step_overhead_s`` = 0.01: ``Balancer.plan_step``'s load all-gather and plan broadcast;
- ``optimizer_s_per_param`` = 1.2e-11: mixed-precision AdamW reads and writes ~36 B per
  parameter at ~3 TB/s;
- ``migration_s_per_byte`` = 0: not charged by default. Unmeasured on a GPU; the migration's
  checksums widen every 32-bit word to int64 and sum every value in float64 (~16-20 B of HBM
  traffic per byte moved, sender and receiver), which suggests ~6e-12 s/B: on the default
  ``relibra bench`` trace that setting raises hybrid's gap to ideal from +2.1 % to +5.2 %
  (``--set migration_s_per_byte=6e-12``). The optimizer state is checksummed before the pass
  even when it travels in the background, so all of it is paid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ..topology import Topology

__all__ = ["CostConfig", "MODEL_PRESETS", "CLUSTER_PRESETS", "make_config"]

# Published numbers (REFERENCE.md). non_moe_params: attention + shared expert of one MoE layer.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": dict(hidden=7168, expert_intermediate=2048, num_experts=256, top_k=8,
                        num_moe_layers=58, num_expert_groups=8,
                        # MLA attention ~187M + shared expert 3*7168*2048 = 44M
                        non_moe_params=231e6, attn_width=128 * 160,
                        # 3 dense layers (187M attn + 3*7168*18432 MLP) + LM head 129280*7168
                        extra_params=3 * (187e6 + 396e6) + 927e6),
    "qwen3-30b-a3b": dict(hidden=2048, expert_intermediate=768, num_experts=128, top_k=8,
                          num_moe_layers=48, num_expert_groups=1,
                          non_moe_params=18.9e6, attn_width=32 * 128, extra_params=311e6),
    "qwen3-235b-a22b": dict(hidden=4096, expert_intermediate=1536, num_experts=128, top_k=8,
                            num_moe_layers=94, num_expert_groups=1,
                            non_moe_params=71.3e6, attn_width=64 * 128, extra_params=622e6),
}
# Per GPU: dense bf16 peak, NVLink per direction, scale-out (InfiniBand / ConnectX) per direction,
# GPUs in one NVLink domain, HBM. A topology's "node" is one NVLink domain (relibra.Topology):
# its gpus_per_node may not exceed gpus_per_domain. GB200 NVL72 is one domain of 72 GPUs; with
# 256 experts use 64 of them per domain for expert parallelism (72 does not divide 256).
CLUSTER_PRESETS: dict[str, dict[str, Any]] = {
    "h100": dict(peak_flops=989e12, intra_node_bandwidth=450e9, inter_node_bandwidth=50e9,
                 gpus_per_domain=8, gpu_memory_bytes=80e9),
    "h800": dict(peak_flops=989e12, intra_node_bandwidth=200e9, inter_node_bandwidth=50e9,
                 gpus_per_domain=8, gpu_memory_bytes=80e9),
    "h200": dict(peak_flops=989e12, intra_node_bandwidth=450e9, inter_node_bandwidth=50e9,
                 gpus_per_domain=8, gpu_memory_bytes=141e9),
    # B200 HGX: NVLink 5 (900 GB/s), 400 Gb/s scale-out per GPU
    "b200": dict(peak_flops=2.25e15, intra_node_bandwidth=900e9, inter_node_bandwidth=50e9,
                 gpus_per_domain=8, gpu_memory_bytes=180e9),
    # GB200 NVL72: 72 GPUs on one NVLink 5 domain; ConnectX-7 (400 Gb/s) or ConnectX-8 (800 Gb/s)
    "gb200-nvl72": dict(peak_flops=2.5e15, intra_node_bandwidth=900e9, inter_node_bandwidth=50e9,
                        gpus_per_domain=72, gpu_memory_bytes=186e9),
    "gb200-nvl72-cx8": dict(peak_flops=2.5e15, intra_node_bandwidth=900e9, inter_node_bandwidth=100e9,
                            gpus_per_domain=72, gpu_memory_bytes=186e9),
}


@dataclass(frozen=True)
class CostConfig:
    """Every parameter of the cost model; all overridable (``make_config(..., key=value)``).

    Model: ``hidden``, ``expert_intermediate`` (gated MLP, 3 matrices), ``num_experts``,
    ``top_k``, ``num_moe_layers``, ``num_expert_groups``, ``non_moe_params`` (per MoE layer,
    balanced), ``attn_width`` (heads x head dim, for the attention score flops),
    ``attn_context`` (mean causal context per token), ``extra_params`` (dense layers, head).
    Cluster: ``peak_flops`` per GPU, ``mfu`` (effective fraction of peak at large batches),
    ``expert_half_rows`` (rows per expert slot at which the grouped GEMM reaches half that
    rate), bandwidths in bytes/s per GPU per direction, ``message_latency_s`` per transfer,
    ``migration_s_per_byte`` per byte a migration sends or receives, ``optimizer_s_per_param``,
    ``layer_call_s`` per MoE layer call (forward + backward of one micro-batch) and
    ``step_overhead_s`` per step. Knobs: ``backward_factor``, byte sizes, overlap fractions in
    [0, 1] and ``replica_reuse`` in [0, 1] (the share of a kept replica's traffic that is saved).
    ``state_move_overlap``: the share of a reorder's optimizer-state bytes (all of
    ``state_bytes_per_param`` but the ``weight_bytes``) that travels behind the training pass
    (the Balancer's ``defer_optimizer_state``, its default on GPUs: 1); the rest moves with the
    weights.
    Defaults and where they come from: the module doc.
    Cluster shape: ``gpus_per_domain`` (GPUs on one NVLink domain: a topology's node is one
    domain and may not hold more) and ``gpu_memory_bytes`` (HBM per GPU; the spare slots'
    replica weights and gradients must fit, see :meth:`topology`). ``live_planning_s``: seconds
    that planning from the live router output adds on the critical path per micro-batch and MoE
    layer (priced only for plans made live, e.g. the ``replicate-live`` bench row; plans made
    ahead from replayed routes pay nothing). Its default, 50 us (a count exchange and a planning
    kernel per layer), is an assumption, not a measurement.
    """

    hidden: int = 7168
    expert_intermediate: int = 2048
    num_experts: int = 256
    top_k: int = 8
    num_moe_layers: int = 58
    num_expert_groups: int = 8
    non_moe_params: float = 231e6
    attn_width: int = 128 * 160
    attn_context: float = 1024.0
    extra_params: float = 0.0
    peak_flops: float = 989e12
    mfu: float = 0.5
    intra_node_bandwidth: float = 450e9
    inter_node_bandwidth: float = 50e9
    backward_factor: float = 2.0
    a2a_bytes: float = 2.0
    a2a_overlap: float = 0.0
    weight_bytes: float = 2.0
    replica_grad_bytes: float = 2.0
    replica_overlap: float = 0.5
    state_bytes_per_param: float = 16.0
    reorder_overlap: float = 0.5
    state_move_overlap: float = 1.0
    replica_reuse: float = 1.0
    expert_half_rows: float = 150.0
    message_latency_s: float = 30e-6
    migration_s_per_byte: float = 0.0
    optimizer_s_per_param: float = 1.2e-11
    layer_call_s: float = 2e-4
    step_overhead_s: float = 0.01
    gpus_per_domain: int = 8
    gpu_memory_bytes: float = 80e9
    live_planning_s: float = 50e-6

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
                raise ValueError(f"CostConfig.{f.name} must be a number, got {v!r}")
            if v < 0:
                raise ValueError(f"CostConfig.{f.name} must be >= 0, got {v!r}")
        for name in ("hidden", "expert_intermediate", "num_experts", "top_k", "peak_flops", "mfu",
                     "intra_node_bandwidth", "inter_node_bandwidth", "gpus_per_domain", "gpu_memory_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CostConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("mfu", "a2a_overlap", "replica_overlap", "reorder_overlap", "replica_reuse",
                     "state_move_overlap"):
            if getattr(self, name) > 1:
                raise ValueError(f"CostConfig.{name} is a fraction in [0, 1], got {getattr(self, name)!r}")

    @property
    def expert_params(self) -> float:
        """Parameters of one routed expert: 3 matrices of ``hidden x expert_intermediate``."""
        return 3.0 * self.hidden * self.expert_intermediate

    @property
    def flops(self) -> float:
        """Effective flop/s of one GPU."""
        return self.peak_flops * self.mfu

    def topology(self, num_nodes: int, gpus_per_node: int, spare_slots_per_gpu: int = 0) -> Topology:
        """A Topology of this model on ``num_nodes x gpus_per_node`` with this cluster's links.

        A node is one NVLink domain: ValueError (naming the numbers) when ``gpus_per_node``
        exceeds ``gpus_per_domain`` or when the spare slots' replica weights and gradients (every
        MoE layer) alone exceed the GPU's memory; :class:`~relibra.topology.Topology` refuses
        experts that do not divide over the GPUs (and says how many GPUs per node would do).
        """
        if isinstance(gpus_per_node, int) and gpus_per_node > self.gpus_per_domain:
            raise ValueError(
                f"{num_nodes} nodes x {gpus_per_node} GPUs: a node of the topology is one NVLink domain, and this "
                f"cluster's domain holds {int(self.gpus_per_domain)} GPUs (gpus_per_domain); use at most "
                f"{int(self.gpus_per_domain)} GPUs per node, or a cluster preset with larger domains")
        if isinstance(spare_slots_per_gpu, int) and spare_slots_per_gpu > 0:
            need = (spare_slots_per_gpu * self.num_moe_layers * self.expert_params
                    * (self.weight_bytes + self.replica_grad_bytes))
            if need > self.gpu_memory_bytes:
                raise ValueError(
                    f"spare_slots_per_gpu={spare_slots_per_gpu}: the replicas' weights and gradients alone take "
                    f"{need / 1e9:.1f} GB per GPU ({int(self.num_moe_layers)} MoE layers x {spare_slots_per_gpu} "
                    f"slots x {self.expert_params * (self.weight_bytes + self.replica_grad_bytes) / 1e9:.3f} GB), "
                    f"more than the GPU's {self.gpu_memory_bytes / 1e9:.0f} GB (gpu_memory_bytes)")
        groups = self.num_expert_groups if self.num_experts % max(self.num_expert_groups, 1) == 0 else 1
        return Topology(num_nodes, gpus_per_node, int(self.num_experts), spare_slots_per_gpu,
                        int(max(groups, 1)), float(self.intra_node_bandwidth), float(self.inter_node_bandwidth))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_config(model: str = "deepseek-v3", cluster: str = "h100",
                overrides: Mapping[str, Any] | None = None) -> CostConfig:
    """Preset model + cluster, then ``overrides`` (unknown keys raise ValueError naming them)."""
    if model not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {model!r}; known: {', '.join(MODEL_PRESETS)}")
    if cluster not in CLUSTER_PRESETS:
        raise ValueError(f"unknown cluster preset {cluster!r}; known: {', '.join(CLUSTER_PRESETS)}")
    values = {**MODEL_PRESETS[model], **CLUSTER_PRESETS[cluster]}
    known = {f.name: f for f in fields(CostConfig)}
    for key, value in (overrides or {}).items():
        if key not in known:
            raise ValueError(f"unknown cost parameter {key!r}; known: {', '.join(sorted(known))}")
        values[key] = value
    for key, value in list(values.items()):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"cost parameter {key}={value!r} is not a number") from None
        if known[key].type in ("int", int) and float(value).is_integer():
            value = int(value)
        values[key] = value
    return CostConfig(**values)
