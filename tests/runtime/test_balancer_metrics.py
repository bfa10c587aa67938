"""Balancer.metrics() is loggable as it is (plain Python), and the Balancer prints in one line."""

from __future__ import annotations

import json

import torch
import torch.nn as nn

from relibra import Balancer, ReLibraMoE


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or type(value) in (int, float, str, bool)


def _stepped(policy="static"):
    torch.manual_seed(0)
    model = nn.Sequential(ReLibraMoE(8, 6, 8, 2), ReLibraMoE(8, 6, 8, 2))
    bal = Balancer(model, None, policy)
    x = torch.randn(5, 8)
    routes = torch.randint(0, 8, (5, 2, 2))
    bal.plan_step([routes, routes])
    for m in range(2):
        with bal.micro_batch(m):
            model(x).sum().backward()
    return bal


def test_metrics_are_plain_python_and_tensors_only_when_asked():
    bal = _stepped()
    metrics = bal.metrics(gather_realised=True)
    assert all(_plain(v) for v in metrics.values()), {k: type(v) for k, v in metrics.items()}
    assert json.loads(json.dumps(metrics)) == metrics  # what wandb / a JSON logger takes
    assert len(metrics["planned_gpu_loads"]) == 2 and len(metrics["planned_gpu_loads"][0]) == 2  # [M][L][G]
    assert metrics["realised_gpu_loads"] == [[[10], [10]], [[10], [10]]]  # 5 tokens x top-2, one rank
    assert isinstance(metrics["planned_imbalance"], float) and isinstance(metrics["experts_moved"], int)
    raw = bal.metrics(gather_realised=True, as_tensors=True)
    assert isinstance(raw["planned_gpu_loads"], torch.Tensor) and raw["planned_gpu_loads"].shape == (2, 2, 1)
    assert raw["realised_gpu_loads"].tolist() == metrics["realised_gpu_loads"]


def test_balancer_repr_is_one_short_line():
    bal = _stepped()
    text = repr(bal)
    assert text.startswith("Balancer(policy='static', layers=2, experts=8, top_k=2") and "2 micro-batches" in text
    assert "\n" not in text and "tensor" not in text and len(text) < 200
    assert "plan=none" in repr(Balancer(nn.Sequential(ReLibraMoE(8, 6, 8, 2)), None, "static"))
