"""CUDA and NVML for real: skipped on machines without a GPU (see tests/conftest.py)."""

import pytest
from paralab.core import nvml
from paralab.core.config import RunConfig
from paralab.core.events import MemorySample, UtilizationSample

from tests.helpers import ended, losses, run_events

pytestmark = pytest.mark.gpu

TINY = {"model.kind": "mlp", "model.width": 32, "model.depth": 2, "train.batch_size": 8, "train.steps": 20}


def test_nvml_lists_the_gpus_without_a_cuda_context_here():
    gpus = nvml.list_gpus()
    assert gpus and all(g.total_bytes > 0 and g.name for g in gpus)
    import torch

    assert not torch.cuda.is_initialized()  # discovery went through NVML only


@pytest.mark.parametrize("mode", ["ddp", "tensor-parallel", "data-parallel", "model-parallel"])
def test_modes_on_one_shared_gpu_train_like_single(mode, no_leftover_ranks):
    reference = losses(run_events(RunConfig(devices="sim:1").with_overrides(TINY)))
    events = run_events(RunConfig(mode=mode, devices="cuda:0x2").with_overrides(TINY))
    assert ended(events).status == "ok", ended(events)
    got = losses(events)
    # CUDA kernels sum in another order than the CPU's: float error only.
    assert got == pytest.approx(reference, rel=1e-3)
    memory = [e for e in events if isinstance(e, MemorySample)]
    assert {e.device for e in memory} == {0, 1}
    assert all(e.capacity_bytes == memory[0].capacity_bytes for e in memory)  # each capped at its share
    assert any("reserved" in e.extra for e in memory)


def test_nvml_utilization_reaches_the_events(no_leftover_ranks):
    events = run_events(RunConfig(mode="ddp", devices="cuda:0x2").with_overrides(dict(TINY, **{"train.steps": 400})))
    util = [e for e in events if isinstance(e, UtilizationSample) and e.source == "nvml"]
    assert util and any(e.percent is not None for e in util)
