"""CPU offload (placement.cpu_offload): FSDP2's CPUOffloadPolicy keeps the parameter shards,
their gradients and the optimizer state in host memory and steps there.

It must train exactly like fsdp, take those bytes off the device (its categories, its peak)
and show them as the device's host bytes; the trace must predict the same, the modelled
clock must charge the copies over PCIe and run the optimizer off the GPU.  Tiny mlp, sim:2;
runs are cached per configuration (2 CPU cores: every run counts).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from paralab.core import presets
from paralab.core.cli import main
from paralab.core.clock import OpLog
from paralab.core.config import RunConfig
from paralab.core.estimate import compare, estimate
from paralab.core.events import MemorySample
from paralab.core.gpus import gpu_models
from paralab.core.models import build_model
from paralab.core.validation import problems

from tests.helpers import adam_state_bytes, ended, losses, run_events

pytestmark = pytest.mark.usefixtures("no_leftover_ranks")

STEPS = 10
MLP = {"model.kind": "mlp", "model.width": 32, "model.depth": 3, "model.in_features": 16,
       "train.batch_size": 64, "train.steps": STEPS}
OFF = {"placement.cpu_offload": True}


def config(mode: str = "fsdp", devices: str = "sim:2", **extra) -> RunConfig:
    return RunConfig().with_overrides({**MLP, "mode": mode, "devices": devices, **extra})


@functools.cache
def _run(cfg: RunConfig) -> tuple:
    return tuple(run_events(cfg))


def run(cfg: RunConfig) -> list:
    events = list(_run(cfg))
    assert ended(events).status == "ok", ended(events).message
    return events


def samples(events: list) -> list[MemorySample]:
    return [e for e in events if isinstance(e, MemorySample)]


def peak(events: list, device: int = 0) -> MemorySample:
    return max((e for e in samples(events) if e.device == device), key=lambda e: e.peak_bytes)


def shard_bytes(world: int = 2) -> tuple[int, int, int]:
    """By hand, from plain torch: (padded shard bytes of one rank, parameter tensors, the
    largest shard).  FSDP2 cuts every parameter along dim 0 into `world` chunks, each padded
    to the first's ceil(rows / world) rows."""
    params = list(build_model(config().model, 0).parameters())
    shards = [math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) * p.element_size() for p in params]
    return sum(shards), len(params), max(shards)


# ---- it trains as fsdp does ------------------------------------------------------------------------


def test_offload_trains_like_fsdp_and_single():
    off = losses(run(config(**OFF)))
    assert len(off) == STEPS
    for want, rel in ((losses(run(config())), 1e-6), (losses(run(config("single", "sim:1"))), 1e-4)):
        for step, (x, y) in enumerate(zip(off, want), start=1):
            assert math.isclose(x, y, rel_tol=rel), f"step {step}: {x} vs {y}"


def test_a_mesh_with_shards_offloads_as_fsdp_does():
    events = run(config("mesh", **{"mesh.shard": 2}, **OFF))
    for x, y in zip(losses(events), losses(run(config(**OFF))), strict=True):
        assert math.isclose(x, y, rel_tol=1e-6)
    assert all(e.bytes["params"] == e.bytes["optimizer"] == 0 and e.host for e in samples(events))


# ---- memory: off the device, on the host ------------------------------------------------------------


def test_shards_grads_and_optimizer_state_leave_the_device_for_the_host():
    params, tensors, largest = shard_bytes()
    optimizer = adam_state_bytes(params, tensors)  # two moments per element, a step counter per tensor
    # From step 2: Adam makes its step counters with torch.tensor in step 1, which no dispatched
    # op allocates, so the ledger (on the device too, without offload) counts them from step 2.
    found = [e for e in samples(run(config(**OFF))) if e.step > 1]
    assert found
    for e in found:
        # FSDP keeps nothing of them on the device: what it gathers is a working copy (temporaries).
        assert e.bytes["params"] == e.bytes["grads"] == e.bytes["optimizer"] == 0, e.bytes
        assert e.bytes["temporaries"] > 0
        # At the host's highest (the optimizer step): every shard, its gradient, Adam's state ...
        assert (e.host["params"], e.host["grads"], e.host["optimizer"]) == (params, params, optimizer), e.host
        # ... and the step's scratch, one parameter at a time (FSDP's DTensors step without foreach).
        assert 0 < e.host["temporaries"] <= 3 * largest
        assert e.host["activations"] == e.host["other"] == 0
    # Without offload the same shards are the device's: the ledger counts the same bytes.
    first = [e for e in samples(run(config())) if e.step > 1][0].bytes
    assert (first["params"], first["optimizer"]) == (params, optimizer)


def test_the_device_peak_drops_by_the_offloaded_bytes():
    params, tensors, _ = shard_bytes()
    static = params + adam_state_bytes(params, tensors)  # shards and optimizer state: always there
    without, with_ = peak(run(config())), peak(run(config(**OFF)))
    dropped = without.peak_bytes - with_.peak_bytes
    # The gradients the device held at its peak went too: between none and all of them.
    assert static <= dropped <= static + params, (without.bytes, with_.bytes)
    held = without.bytes["params"] + without.bytes["grads"] + without.bytes["optimizer"]
    assert dropped == pytest.approx(held, rel=0.05)


# ---- the prediction ------------------------------------------------------------------------------------


def test_the_trace_predicts_the_offloaded_device_within_5_percent():
    cfg = config(**OFF)
    est = estimate(cfg, method="both")
    events = run(cfg)
    for row in compare(est, events):
        assert row["measured"] and abs(row["trace_error_pct"]) <= 5.0, row
    traced = est.by_method["trace"][0]
    assert traced.host == [e for e in samples(events) if e.device == 0][-1].host  # a steady step's
    assert all(d.bytes[c] == 0 for d in est.by_method["formula"] for c in ("params", "grads", "optimizer"))
    assert "offloaded to host" in est.table()


# ---- the modelled clock ---------------------------------------------------------------------------


def test_the_modelled_clock_copies_over_pcie_and_steps_on_the_host():
    def modelled(**extra) -> dict:
        cfg = config(**{"sim.gpu": "H100 SXM", **extra})
        return estimate(cfg, method="trace").devices[0].modelled

    on, off = modelled(), modelled(**OFF)
    params, _, _ = shard_bytes()
    # Each layer is gathered twice (forward, and again in backward: ZeRO-3), each shard copied
    # to the device first; each gradient shard copied back once.
    assert off["comm_bytes"] - on["comm_bytes"] == 3 * params
    # The optimizer is the host's: GPU compute time drops, the host's appears.
    assert on["host_s"] == 0 < off["host_s"]
    assert off["busy"] * off["step_s"] < on["busy"] * on["step_s"]

    h100 = gpu_models()["H100 SXM"]
    log = OpLog(h100, lambda: (0, "communication"), offload=True)
    log._pcie("host-to-device", 0, torch.empty(1000), 4000)
    assert log.ops[-1].seconds == pytest.approx(4000 / (64e9) + h100.launch_us * 1e-6)
    assert {m.pcie_gbs for m in gpu_models().values()} <= {32.0, 64.0}


# ---- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{"mode": "ddp"}, {"mode": "mesh", "mesh.dp": 2},
                                   {"mode": "single", "devices": "sim:1"}])
def test_offload_outside_fsdp_says_what_to_use(extra, capsys):
    cfg = config(**{**OFF, **extra})
    assert problems(cfg) == ["placement.cpu_offload moves FSDP's shards to the host; use fsdp or a mesh "
                             "with mesh.shard above 1"]
    args = [arg for k, v in {**MLP, **OFF, "devices": "sim:2", **extra}.items() for arg in ("--set", f"{k}={v}")]
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "use fsdp or a mesh with mesh.shard above 1" in err


def test_offload_in_fsdp_and_a_sharded_mesh_is_accepted():
    assert problems(config(**OFF)) == []
    assert problems(config("mesh", **{"mesh.shard": 2}, **OFF)) == []


def test_the_offload_preset_fits_only_with_offload():
    cfg = presets.load("transformer-fsdp-offload")
    assert estimate(cfg, method="trace").fits
    assert not estimate(cfg.with_overrides({"placement.cpu_offload": False}), method="trace").fits
