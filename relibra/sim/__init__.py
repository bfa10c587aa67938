"""What a plan costs: the cost model, RL trace generator and step simulator behind ``relibra bench``.

- :mod:`.cost`: a model of one RL training step under a plan (compute, all-to-all, replicas,
  reorder, optimizer and host); :mod:`.cost_config` holds its parameters and the model and
  cluster presets, :mod:`.profile` reads machine profiles that ``relibra calibrate`` measured;
- :mod:`.traces`: synthetic GRPO traces around DeepSeek-V3's real expert popularity (per
  micro-batch, or per sequence: format 2), and the default trace shipped in ``data/``;
- :mod:`.simulate`: runs policies step after step on a trace and prices every plan;
- :mod:`.rl_step`: the step's packing (``--packing``) and passes (``--phases``) in the simulator;
- :mod:`.realism`: how a trace's skew and movement compare with measured ones;
- :mod:`.bench_plot`: ``relibra bench --plot`` (matplotlib, optional).
"""

from .cost import CLUSTER_PRESETS, MODEL_PRESETS, CostConfig, StepCost, ideal_step_cost, make_config, step_cost
from .simulate import DEFAULT_POLICIES, PolicyResult, gap_breakdown, simulate

__all__ = ["CLUSTER_PRESETS", "DEFAULT_POLICIES", "MODEL_PRESETS", "CostConfig", "PolicyResult", "StepCost",
           "gap_breakdown", "ideal_step_cost", "make_config", "simulate", "step_cost"]
