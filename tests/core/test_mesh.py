"""Composed layouts on a device mesh (mode=mesh): the plan as a value, each composition
training exactly as `single` does, memory against hand counts, and the estimate against
the measured peak."""

from __future__ import annotations

import pytest
from paralab.core import validation
from paralab.core.config import RunConfig
from paralab.core.estimate import compare, estimate
from paralab.core.plan import Plan

from tests.helpers import (
    adam_state_bytes,
    ended,
    losses,
    memory_by_device,
    run_events,
    steady_peak_errors,
)

pytestmark = pytest.mark.usefixtures("no_leftover_ranks")

MLP = {"model.kind": "mlp", "model.width": 64, "model.depth": 4, "model.in_features": 32, "model.out_features": 8,
       "train.batch_size": 16, "train.micro_batches": 2, "train.optimizer": "adam", "sim.gpu": "host"}
GPT = {"model.kind": "transformer", "model.width": 32, "model.depth": 2, "model.heads": 4, "model.seq_len": 16,
       "model.vocab": 64, "train.batch_size": 8, "train.micro_batches": 2, "sim.gpu": "host"}


def cfg_of(base: dict, **degrees: int) -> RunConfig:
    n = 1
    for v in degrees.values():
        n *= v
    mesh = {f"mesh.{a}": v for a, v in degrees.items()}
    return RunConfig().with_overrides({**base, "mode": "mesh", "devices": f"sim:{n}", **mesh})


def test_the_plan_lays_ranks_out_as_init_device_mesh_does():
    plan = Plan(pp=2, dp=1, shard=2, tp=2)
    assert plan.world == 8 and plan.shape == (2, 1, 2, 2) and plan.describe() == "pp2 × shard2 × tp2"
    assert plan.coordinate(5) == {"pp": 1, "dp": 0, "shard": 0, "tp": 1}  # 5 = 1·4 + 0·2 + 1
    assert [plan.batch_index(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]  # a tp group shares its batch
    assert plan.loss_ranks() == {4, 5, 6, 7}  # the last stage
    assert Plan.of(RunConfig(mode="fsdp"), 4) == Plan(shard=4)  # a mode is its one-axis mesh
    assert Plan.of(RunConfig(mode="pipeline"), 3).loss_ranks() == {2}
    assert Plan.of(RunConfig(mode="data-parallel"), 2).world == 1  # one process drives both


@pytest.mark.parametrize("settings,sentence", [
    ({"mesh.shard": 2, "mesh.tp": 2, "devices": "sim:2"},
     "mesh.shard 2 × mesh.tp 2 = 4 ranks, but the run has 2 devices"),
    ({"mode": "ddp", "mesh.tp": 2, "devices": "sim:4"}, "mesh.tp=2 composes axes only with mode=mesh"),
    ({"mesh.tp": 4, "devices": "sim:4", "model.width": 65},
     "tensor parallel splits each MLP block's 130 hidden units over 4 devices"),
    ({"mesh.dp": 2, "mesh.pp": 2, "devices": "sim:4", "train.batch_size": 12, "train.micro_batches": 4},
     "batch size 12 does not split into 4 micro-batches per pipeline (6 samples each)"),
    ({"mesh.shard": 4, "devices": "sim:4", "train.batch_size": 6},
     "batch size 6 does not split over the 4 replicas and shards (mesh.dp × mesh.shard)"),
    ({"mesh.pp": 4, "devices": "sim:4", "model.kind": "split-nn", "data.kind": "auto"},
     "model split-nn has 3 layers: too few for 4 pipeline stages (mesh.pp)"),
])
def test_a_layout_that_cannot_run_gets_a_sentence(settings, sentence):
    cfg = RunConfig().with_overrides({**MLP, "mode": "mesh", **settings})
    assert any(sentence in p for p in validation.problems(cfg)), validation.problems(cfg)


COMPOSITIONS = [dict(dp=2, tp=2), dict(shard=2, tp=2), dict(dp=2, shard=2), dict(dp=2, pp=2), dict(pp=2, tp=2)]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_every_composition_trains_as_single_does_and_the_estimate_predicts_its_peak(model):
    """20 steps of each composition on sim:4: the loss equals single's within 1e-4
    relative (fp32), and the estimate (the trace) is within 5% of each device's peak."""
    base = {"mlp": MLP, "transformer": GPT}[model]
    reference = losses(run_events(RunConfig().with_overrides({**base, "mode": "single", "devices": "sim:1",
                                                              "train.steps": 20})))
    for degrees in COMPOSITIONS:
        cfg = cfg_of({**base, "train.steps": 20}, **degrees)
        events = run_events(cfg)
        assert ended(events).status == "ok", (degrees, ended(events).message)
        got = losses(events)
        assert len(got) == 20
        for a, b in zip(got, reference):
            assert abs(a - b) <= 1e-4 * abs(b), (degrees, got, reference)
        for row in compare(estimate(cfg, "trace"), events):
            assert abs(row["trace_error_pct"]) < 5, (degrees, row)


@pytest.mark.parametrize("degrees", [dict(shard=2, tp=2), dict(pp=2, tp=2)], ids=["fsdp2xtp2", "pp2xtp2"])
def test_the_trace_is_each_tp_compositions_measured_peak(degrees):
    """Three steps at a batch where activations make the peak: the trace within 0.5% of
    each device's measured peak (the same local ops on both sides: test_estimate's
    SAME_PROGRAM).  A run that counted each all-reduce's AsyncCollectiveTensor wrappers, or
    a trace that let a stage's sends go before their works do, was 1.7-2.2% off here."""
    cfg = cfg_of({**MLP, "train.batch_size": 64, "train.steps": 3}, **degrees)
    predicted = estimate(cfg, "trace")
    events = run_events(cfg)
    assert ended(events).status == "ok", ended(events).message
    errors = steady_peak_errors(predicted, events)
    assert sorted(errors) == list(range(4)) and all(abs(e) <= 0.5 for e in errors.values()), (degrees, errors)


@pytest.mark.slow
def test_three_axes_on_eight_devices_train_the_transformer_as_single_does():
    reference = losses(run_events(RunConfig().with_overrides({**GPT, "mode": "single", "devices": "sim:1",
                                                              "train.steps": 6})))
    events = run_events(cfg_of({**GPT, "train.steps": 6}, pp=2, shard=2, tp=2))
    assert ended(events).status == "ok", ended(events).message
    assert losses(events) == pytest.approx(reference, rel=1e-4)


@pytest.mark.slow
def test_fsdp_times_tp_holds_a_quarter_of_each_block_and_half_of_each_end():
    """Hand count for shard 2 × tp 2 on an MLP (width 64, 4 blocks, 32 in, 8 out): a block's
    fc1 (64→128) and fc2 weight (128→64) are cut by tp and then by FSDP, 1/4 each; fc2's
    bias stays whole under tp, so FSDP halves it; the two end layers are replicated over
    tp and halved by FSDP.  Gradients the same; Adam two moments per element plus one step
    counter per tensor."""
    w, depth = 64, 4
    block = (w * 2 * w + 2 * w) / 4 + (2 * w * w) / 4 + w / 2
    ends = (32 * w + w + w * 8 + 8) / 2
    params = int(4 * (depth * block + ends))  # bytes
    events = run_events(cfg_of({**MLP, "train.steps": 3}, shard=2, tp=2))
    assert ended(events).status == "ok", ended(events).message
    tensors = 2 + depth * 4 + 2
    for device, sample in memory_by_device(events).items():
        assert sample.bytes["params"] == params, device
        assert sample.bytes["grads"] == params, device
        assert sample.bytes["optimizer"] == adam_state_bytes(params, tensors), device


@pytest.mark.slow
def test_hsdp_shards_within_a_replica_and_dp_pp_holds_a_stage():
    """HSDP 2 × 2: every parameter halved by its shard group, whole across replicas, so
    each device holds half the model; DP × PP: each device holds its stage's layers whole
    (the MLP's 6 layers split 3 | 3), as many bytes on both replicas of a stage."""
    w, depth = 64, 4
    layers = [32 * w + w] + [w * 2 * w + 2 * w + 2 * w * w + w] * depth + [w * 8 + 8]  # elements
    total = 4 * sum(layers)
    for sample in memory_by_device(run_events(cfg_of({**MLP, "train.steps": 3}, dp=2, shard=2))).values():
        assert sample.bytes["params"] == sample.bytes["grads"] == total // 2
    stage = {0: 4 * sum(layers[:3]), 1: 4 * sum(layers[3:])}
    for device, sample in memory_by_device(run_events(cfg_of({**MLP, "train.steps": 3}, dp=2, pp=2))).items():
        held = stage[Plan(dp=2, pp=2).coordinate(device)["pp"]]
        # A stage's peak comes in forward, before this step's gradients exist (zero_grad runs first).
        assert sample.bytes["params"] == held and sample.bytes["grads"] in (0, held)


@pytest.mark.slow
@pytest.mark.parametrize("lever,tolerance", [({"train.activation_checkpointing": "blocks"}, 1e-4),
                                             ({"train.grad_accumulation": 2}, 1e-4),
                                             ({"placement.zero": 2}, 1e-4),
                                             ({"train.precision": "bf16"}, 0.02)])  # test_levers: bf16's drift
def test_the_levers_work_on_a_mesh(lever, tolerance):
    """FSDP × TP with each lever: the loss as single's (fp32 ones exactly, bf16 within the
    2% test_levers justifies), and the trace within 5% of each device's peak."""
    reference = losses(run_events(RunConfig().with_overrides({**MLP, "mode": "single", "devices": "sim:1",
                                                              "train.steps": 6})))
    cfg = cfg_of({**MLP, "train.steps": 6, **lever}, shard=2, tp=2)
    events = run_events(cfg)
    assert ended(events).status == "ok", ended(events).message
    assert losses(events) == pytest.approx(reference, rel=tolerance)
    for row in compare(estimate(cfg, "trace"), events):
        assert abs(row["trace_error_pct"]) < 5, row
