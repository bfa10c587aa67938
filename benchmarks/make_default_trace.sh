#!/usr/bin/env bash
# Regenerates relibra/data/default_trace.npz, the trace `relibra bench` uses without --trace.
# DeepSeek-V3 popularity of the prefill_in4096 workload (real), GRPO groups of 16 responses per
# prompt, Dirichlet concentration 256 per layer, 131072 tokens per micro-batch (2048 per GPU on
# 64 GPUs), 8 micro-batches per step, 2 steps (one warm-up, one measured), seed 0.
# Add --derive-from ../shared/data/deepseek_v3_expert_load to rebuild the popularity file too.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m relibra.traces --out relibra/data/default_trace.npz \
  --steps 2 --micro-batches 8 --tokens-per-micro-batch 131072 \
  --group-size 16 --concentration 256 --workload prefill_in4096 --seed 0 "$@"
