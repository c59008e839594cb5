"""A worker actor asks for exactly what its placement-group bundle holds, on cpu and on cuda."""

from __future__ import annotations

import pytest

from cluster.gang import worker_options
from cluster.parallel import ParallelConfig


@pytest.mark.parametrize("device,cpus", [("cpu", 1.0), ("cpu", 0.25), ("cuda", 1.0)])
def test_worker_options_equal_its_bundle(device, cpus):
    bundle = ParallelConfig(2, 1).worker_bundles(device, cpus)[0]
    options = worker_options(device, cpus)
    asked = {"CPU": options.get("num_cpus", 1.0), "GPU": options.get("num_gpus", 0)}  # Ray's default: 1 CPU
    held = {"CPU": bundle.get("CPU", 0.0), "GPU": bundle.get("GPU", 0.0)}
    assert asked == held
