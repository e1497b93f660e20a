"""data-parallel and model-parallel: one process drives several logical devices.

Each mode must train exactly like `single`, reach the seeds' results from their presets,
and show its lesson: data-parallel piles memory on device 0, model-parallel keeps each
device to its own layers and leaves the others idle while one computes.
"""

import gc
import os
import re
from time import perf_counter

import pytest
import torch
from paralab.core import presets
from paralab.core.config import RunConfig
from paralab.core.devices import Device
from paralab.core.events import MemorySample, PhaseSpan
from paralab.core.memory import MemoryLedger
from paralab.core.models import build_model, split_layers
from paralab.core.parallel.data_parallel import apply_data_parallel
from paralab.core.strategy import Probe, RankContext, RankJob

from tests.helpers import adam_state_bytes, ended, losses, memory_by_device, run_events

SMALL = {
    "mlp": {"model.kind": "mlp", "model.width": 32, "model.depth": 2},
    "transformer": {"model.kind": "transformer", "model.width": 32, "model.depth": 2, "model.heads": 2,
                    "model.seq_len": 16, "model.vocab": 64},
}
MLP = RunConfig().with_overrides({**SMALL["mlp"], "train.batch_size": 8, "train.steps": 3})


def _bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def _spans(events, step: int, clock: str = "host") -> list[PhaseSpan]:
    return [e for e in events if isinstance(e, PhaseSpan) and e.step == step and e.clock == clock]


def _overlap(a: PhaseSpan, b: PhaseSpan) -> float:
    return min(a.end_s, b.end_s) - max(a.start_s, b.start_s)


# ---- the same training as single ---------------------------------------------------------------


@pytest.mark.parametrize("kind", SMALL)
def test_both_modes_train_like_single_step_by_step(kind, no_leftover_ranks):
    cfg = RunConfig().with_overrides({**SMALL[kind], "train.steps": 20, "train.batch_size": 8})
    single = losses(run_events(cfg, mode="single", devices="sim:1"))
    assert len(single) == 20 and single[-1] < single[0]
    for mode in ("data-parallel", "model-parallel"):
        events = run_events(cfg, mode=mode, devices="sim:2")
        assert ended(events).status == "ok", ended(events).message
        assert losses(events) == pytest.approx(single, rel=1e-4), mode


def test_uneven_layouts_train_like_single(no_leftover_ranks):
    """DataParallel's scatter gives 7 samples over 3 devices as 3, 3, 1; a split of 1, 2, 1
    layers puts the two residual blocks on the middle device."""
    cfg = MLP.with_overrides({"train.steps": 10, "train.batch_size": 7})
    single = losses(run_events(cfg, mode="single", devices="sim:1"))
    data = losses(run_events(cfg, mode="data-parallel", devices="sim:3"))
    model = losses(run_events(cfg, mode="model-parallel", devices="sim:3", placement__split="1,2,1"))
    assert data == pytest.approx(single, rel=1e-4)
    assert model == pytest.approx(single, rel=1e-4)


# ---- the seeds ---------------------------------------------------------------------------------


def test_seed_data_parallel_learns_y_equals_3x(no_leftover_ranks):
    cfg = presets.load("seed-data-parallel")
    assert cfg.mode == "data-parallel" and cfg.train.steps == 500
    # Adam's steps do not depend on how many follow: step 500 of 1500 is the seed's last epoch.
    events = run_events(cfg, devices="sim:2", train__steps=1500)
    curve = losses(events)
    assert curve[0] > 10 and curve[99] < curve[0] and 0.25 < curve[cfg.train.steps - 1] < 0.5
    assert curve[-1] == pytest.approx(0.25, abs=0.02)  # the noise's variance: nothing more to learn
    end = ended(events)
    assert end.status == "ok"
    weight = float(re.search(r"learned y = (-?[\d.]+)·x", end.message).group(1))
    assert weight == pytest.approx(3.0, abs=0.02)


def test_seed_model_parallel_splitnn_trains_toward_zero(no_leftover_ranks):
    cfg = presets.load("seed-model-parallel")
    assert cfg.mode == "model-parallel" and cfg.train.optimizer == "sgd"
    events = run_events(cfg, devices="sim:2")
    curve = losses(events)
    assert ended(events).status == "ok" and len(curve) == cfg.train.steps
    assert curve[0] > 0.5 and curve[-1] < 0.02 and curve[-1] < curve[len(curve) // 2]
    # The seed's SplitNN: Linear(10, 50) on the first device, the other two layers on the second.
    layers = build_model(cfg.model, cfg.seed)
    memory = memory_by_device(events)
    assert memory[0].bytes["params"] == _bytes(layers[:1])
    assert memory[1].bytes["params"] == _bytes(layers[1:])


# ---- memory ------------------------------------------------------------------------------------


def test_data_parallel_piles_memory_on_device_0(no_leftover_ranks):
    events = run_events(MLP, mode="data-parallel", devices="sim:2")
    net = build_model(MLP.model, MLP.seed)
    model = _bytes([net])
    memory = memory_by_device(events)
    first, second = memory[0].bytes, memory[1].bytes
    # Device 0 holds the model, its gradients and Adam's state; device 1 only a replica.
    adam = adam_state_bytes(model, len(list(net.parameters())))
    assert (first["params"], first["grads"], first["optimizer"]) == (model, model, adam)
    assert second["params"] == model and second["optimizer"] == 0
    assert sum(first.values()) > sum(second.values())
    assert memory[0].peak_bytes > memory[1].peak_bytes
    # Every sampled step counts one replica on device 1, never an accumulation of them.
    assert {e.bytes["params"] for e in events if isinstance(e, MemorySample) and e.device == 1} == {model}

    spans = _spans(events, 2)
    phases = {d: {s.phase for s in spans if s.device == d} for d in (0, 1)}
    assert {"forward", "backward", "communication"} <= phases[1] and "optimizer" not in phases[1]
    optimizer = next(s for s in spans if s.device == 0 and s.phase == "optimizer")
    assert any(s.device == 1 and s.phase == "idle" and _overlap(s, optimizer) > 0 for s in spans)


def test_model_parallel_devices_hold_only_their_layers(no_leftover_ranks):
    split = (1, 2, 1)
    events = run_events(MLP, mode="model-parallel", devices="sim:3", placement__split="1,2,1")
    assert ended(events).status == "ok"
    layers = build_model(MLP.model, MLP.seed)
    memory = memory_by_device(events)
    for d, r in enumerate(split_layers(len(layers), 3, split)):
        own = _bytes(layers[r.start:r.stop])
        got = memory[d].bytes
        adam = adam_state_bytes(own, len(list(layers[r.start:r.stop].parameters())))
        assert (got["params"], got["grads"], got["optimizer"]) == (own, own, adam), d


def test_data_parallel_replicas_do_not_outlive_their_step():
    """Many steps in this process: the number of live tensors stays flat."""
    cfg = MLP.with_overrides({"mode": "data-parallel", "devices": "sim:2"})
    devices = [Device(i, "sim", 2**30) for i in range(2)]
    ledger = MemoryLedger(devices)
    ctx = RankContext(RankJob(cfg.to_dict(), devices, 0, 1, perf_counter(), os.getpid()), cfg, devices, ledger)
    trainer, probe = apply_data_parallel(ctx), Probe(ctx)

    def run(steps: range) -> int:
        for i in steps:
            probe.active, probe.step = i % 2 == 0, i  # sampled and unsampled steps alike
            ledger.begin_step()
            trainer.step(i, probe)
            probe.spans.clear()
        gc.collect()
        return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and steady on a busy machine
    try:
        before = run(range(1, 5))
        # A leak grows with the steps; fewer is fine (what earlier tests left can be collected).
        assert run(range(5, 30)) <= before
    finally:
        torch.set_num_threads(threads)


# ---- the timeline ------------------------------------------------------------------------------


def test_model_parallel_one_device_computes_while_the_other_idles(no_leftover_ranks):
    events = run_events(MLP, mode="model-parallel", devices="sim:2")
    spans = _spans(events, 2)
    compute = [s for s in spans if s.phase in ("forward", "backward")]
    idle = [s for s in spans if s.phase == "idle"]
    for s in compute:
        other = 1 - s.device
        # While a device computes, the other one is marked idle, and computes nothing.
        assert any(i.device == other and _overlap(i, s) > 0 for i in idle), s
        assert not any(c.device == other and _overlap(c, s) > 0 for c in compute), s
        assert not any(i.device == s.device and _overlap(i, s) > 0 for i in idle), s
    assert {s.device for s in idle} == {0, 1}
