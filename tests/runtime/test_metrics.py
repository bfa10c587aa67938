"""relibra.runtime.metrics: verl's max_vio and vLLM's balancedness per micro-batch and layer, by hand."""

from __future__ import annotations

import pytest
import torch

from relibra.placement import Placement
from relibra.plan import Plan
from relibra.runtime.metrics import plain, planned_metrics, realised_metrics
from relibra.topology import Topology


def test_planned_and_realised_balance_by_hand():
    topo = Topology(1, 2, 4, 0)  # 2 GPUs, experts 0-1 on GPU 0, 2-3 on GPU 1
    loads = torch.tensor([[[3, 3, 1, 1]], [[0, 0, 0, 0]]])  # GPU loads [6, 2]; an empty micro-batch
    plan = Plan.without_replicas(Placement.contiguous(topo, 1), loads, topo)
    m = planned_metrics("static", [(plan, loads)], topo, None, 10, 0.5, 0.75, [("train", 2)])
    assert m["planned_gpu_loads"].tolist() == [[[6, 2]], [[0, 0]]]
    assert m["planned_max_vio"].tolist() == [[pytest.approx(0.5)], [0.0]]  # (6 - 4) / 4; empty: balanced
    assert m["planned_balancedness"].tolist() == [[pytest.approx(4 / 6)], [1.0]]
    assert m["planned_max_vio_mean"] == pytest.approx(0.25) and m["pass_phases"] == ["train"]
    assert m["experts_moved"] == 0 and m["replica_bytes"] == 0.0 and m["planning_seconds"] == 0.5
    r = realised_metrics(torch.tensor([[[5, 3]]]))
    assert r["realised_max_vio"].tolist() == [[0.25]] and r["realised_balancedness"].tolist() == [[0.8]]
    assert plain(r)["realised_gpu_loads"] == [[[5, 3]]] and isinstance(plain(r, as_tensors=True)["realised_max_vio"],
                                                                       torch.Tensor)
