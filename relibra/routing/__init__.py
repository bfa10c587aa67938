"""Recorded routes (rollout routing replay, R3) in, exact loads out.

Four rooms:

- :mod:`.routes`: what a route array is (``[T, Lg, K]`` expert ids, -1 padding), its checks
  and the selection of MoE layers;
- :mod:`.loads`: routes grouped into micro-batches -> exact loads ``[M, L, E]`` (and per
  source rank ``[M, L, Q, E]``);
- :mod:`.formats`: routes as engines and trainers hand them out (vLLM, SGLang, verl,
  Megatron, base64 buffers, the ``len - 1`` alignment) and :class:`RouteStore`;
- :mod:`.trace_file`: trace files (loads of recorded or generated steps) without pickle, and
  :mod:`.trace_sequences` their per-sequence part (format 2).
"""

from .formats import (
    RouteStore,
    align_routes,
    decode_routed_experts,
    from_megatron,
    from_sglang,
    from_verl,
    from_vllm,
    to_megatron,
    token_key,
    verl_sequences,
)
from .loads import (
    count_loads,
    loads_from_routes,
    micro_batch_groups,
    micro_batch_loads,
    micro_batch_rank_loads,
    routes_for_micro_batch,
)
from .routes import PAD, as_routes, moe_layer_ids, route_fault, select_moe_layers, step_routes_fault
from .trace_file import Trace, TraceSequences, load_trace, save_trace

__all__ = [
    "PAD",
    "RouteStore",
    "Trace",
    "TraceSequences",
    "align_routes",
    "as_routes",
    "count_loads",
    "decode_routed_experts",
    "from_megatron",
    "from_sglang",
    "from_verl",
    "from_vllm",
    "load_trace",
    "loads_from_routes",
    "micro_batch_groups",
    "micro_batch_loads",
    "micro_batch_rank_loads",
    "moe_layer_ids",
    "route_fault",
    "routes_for_micro_batch",
    "save_trace",
    "select_moe_layers",
    "step_routes_fault",
    "to_megatron",
    "token_key",
    "verl_sequences",
]
