"""The levers: gradient accumulation, activation checkpointing, bf16, the ZeRO stage.

Each must train like the run without it (the same loss, up to float error; bf16 within
its stated tolerance) and show in the memory categories what it trades.  Tiny models,
few steps, sim:2; runs are cached per configuration (2 CPU cores: every run counts).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from paralab.core.config import RunConfig
from paralab.core.estimate import compare, estimate
from paralab.core.events import MemorySample, PhaseSpan
from paralab.core.models import build_model
from paralab.core.parallel.levers import checkpoint_blocks
from paralab.core.validation import problems

from tests.helpers import adam_state_bytes, ended, losses, run_events

pytestmark = pytest.mark.usefixtures("no_leftover_ranks")

STEPS = 6
MLP = {"model.kind": "mlp", "model.width": 32, "model.depth": 3, "model.in_features": 16,
       "train.batch_size": 64, "train.steps": STEPS}
BF16_TOLERANCE = 0.02
"""bf16 keeps 8 bits of mantissa: each matmul's inputs are rounded by up to 2**-9 (0.2%) and
its outputs again; over 20 Adam steps the loss drifts from fp32's by 0.3-0.9% on the
tests' mlp and GPT (measured in single, ddp, fsdp and tensor-parallel).  2% leaves room for
other seeds and sizes while still failing a run that diverged; that bf16 was used at all
is checked apart (the losses differ from fp32's)."""


def config(mode: str = "single", devices: str = "sim:1", **extra) -> RunConfig:
    return RunConfig().with_overrides({**MLP, "mode": mode, "devices": devices,
                                       **{k.replace("__", "."): v for k, v in extra.items()}})


@functools.cache
def _run(cfg: RunConfig) -> tuple:
    return tuple(run_events(cfg))


def run(mode: str = "single", devices: str = "sim:1", **extra) -> list:
    events = list(_run(config(mode, devices, **extra)))
    assert ended(events).status == "ok", ended(events).message
    return events


def peak_breakdown(events: list, device: int = 0) -> dict[str, int]:
    """The breakdown at the highest peak any sampled step of `device` reached."""
    samples = [e for e in events if isinstance(e, MemorySample) and e.device == device]
    return max(samples, key=lambda e: e.peak_bytes).bytes


def assert_same_losses(got: list, want: list, rel: float) -> None:
    a, b = losses(got), losses(want)
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert math.isclose(x, y, rel_tol=rel), f"step {step}: {x} vs {y}"


# ---- gradient accumulation -----------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "devices"), [("single", "sim:1"), ("ddp", "sim:2"), ("fsdp", "sim:2")])
def test_accumulation_trains_like_the_whole_batch(mode, devices):
    """k micro-steps of batch/k, one optimizer step: the loss per optimizer step is single's
    without accumulation (up to float error), and only one micro-batch's activations live."""
    big = {"train__batch_size": 512}  # activations well above the state, so the peak is theirs
    events = run(mode, devices, train__grad_accumulation=4, **big)
    assert_same_losses(events, run(**big), rel=1e-5)
    whole = peak_breakdown(run(mode, devices, **big))["activations"]
    assert peak_breakdown(events)["activations"] <= whole / 3


@pytest.mark.parametrize("mode", ["tensor-parallel", "model-parallel", "data-parallel"])
def test_accumulation_in_the_other_modes_trains_like_the_whole_batch(mode):
    assert_same_losses(run(mode, "sim:2", train__grad_accumulation=2), run(), rel=1e-5)


def test_accumulation_runs_every_micro_step_forward_and_backward():
    spans = [e for e in run(train__grad_accumulation=4) if isinstance(e, PhaseSpan) and e.clock == "host"]
    step = spans[0].step
    phases = [s.phase for s in spans if s.step == step]
    assert phases.count("forward") == phases.count("backward") == 4
    assert phases.count("optimizer") == 1


# ---- activation checkpointing --------------------------------------------------------------------


def saved_bytes(how: str, width: int = 32, depth: int = 3, batch: int = 64, in_features: int = 16) -> int:
    """Bytes autograd (or the checkpoint) keeps for backward after one forward of the mlp,
    each storage once, parameters aside."""
    cfg = config(model__width=width, model__depth=depth, model__in_features=in_features).model
    model = build_model(cfg, 0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def note(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    checkpoint_blocks(model, how, _Told(note))
    with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
        out = model(torch.randn(batch, in_features))
    assert out.requires_grad
    return sum(kept.values())


class _Told:
    """What checkpoint_blocks asks of a ledger, telling `note` what is kept."""

    recording_allocations = True

    def __init__(self, note) -> None:
        self.mark_saved = note

    def where(self) -> tuple[int, str]:
        return 0, "forward"


def test_checkpointing_blocks_keeps_only_each_blocks_input():
    # By hand, per sample, in float32: the first layer keeps the input and its ReLU's output
    # (block 1's input); without checkpointing each block keeps its ReLU output (2w) and its
    # output (w, which the next layer keeps); with it, each block's input only, and the last
    # Linear keeps the last block's output.
    w, depth, b, d_in = 32, 3, 64, 16
    assert saved_bytes("none") == b * 4 * (d_in + w + 3 * depth * w)
    assert saved_bytes("blocks") == b * 4 * (d_in + w + (depth - 1) * w + w)
    # Selective keeps the first matmul's output of each block (2w) beside its input.
    assert saved_bytes("selective") == b * 4 * (d_in + w + depth * 2 * w + (depth - 1) * w + w)


@pytest.mark.parametrize("how", ["blocks", "selective"])
def test_checkpointing_changes_no_number(how):
    assert_same_losses(run(train__activation_checkpointing=how), run(), rel=1e-6)


def test_checkpointing_shrinks_activations_and_recomputes_in_backward():
    plain, ckpt = run(), run(train__activation_checkpointing="blocks")
    assert peak_breakdown(ckpt)["activations"] < 0.6 * peak_breakdown(plain)["activations"]

    def modelled(events, phase):
        spans = [e for e in events if isinstance(e, PhaseSpan) and e.clock != "host"]
        step = spans[-1].step
        return sum(e.end_s - e.start_s for e in spans if e.step == step and e.phase == phase)

    # The recompute is a second forward of the blocks inside backward, on the modelled GPU's
    # clock its own phase, while backward itself stays.  It is shorter than the blocks'
    # forward: torch's non-reentrant checkpoint stops recomputing once it has what backward
    # needs (fc1 and its ReLU; fc2 and the residual add save nothing it lacks).
    assert modelled(plain, "recompute") == 0
    assert 0.15 * modelled(ckpt, "forward") < modelled(ckpt, "recompute") < modelled(ckpt, "forward")
    assert modelled(ckpt, "backward") == pytest.approx(modelled(plain, "backward"), rel=0.25)
    assert modelled(ckpt, "forward") == pytest.approx(modelled(plain, "forward"), rel=0.25)
    host = [e for e in ckpt if isinstance(e, PhaseSpan) and e.clock == "host" and e.phase == "recompute"]
    assert len({e.step for e in host}) >= 1 and all(e.end_s > e.start_s for e in host)


@pytest.mark.parametrize("mode", ["fsdp", "tensor-parallel", "pipeline"])
def test_checkpointing_in_the_multi_process_modes_trains_like_single(mode):
    """Inside FSDP (gathered again for the recompute), after tensor parallel's split (its
    all-reduces run again) and in a pipeline stage."""
    assert_same_losses(run(mode, "sim:2", train__activation_checkpointing="blocks"), run(), rel=1e-5)


# ---- bf16 ------------------------------------------------------------------------------------------


def test_bf16_in_a_pipeline_sends_what_autocast_makes():
    """The stages agree on shapes and dtypes before the run: in bf16 an MLP's stage sends bf16."""
    assert_same_losses(run("pipeline", "sim:2", train__precision="bf16"), run(), rel=BF16_TOLERANCE)


@pytest.mark.parametrize(("mode", "devices"), [("single", "sim:1"), ("fsdp", "sim:2")])
def test_bf16_trains_like_fp32_within_its_tolerance_and_halves_activations(mode, devices):
    events = run(mode, devices, train__precision="bf16")
    assert_same_losses(events, run(), rel=BF16_TOLERANCE)
    assert losses(events) != losses(run())  # it did compute in bf16
    fp32 = peak_breakdown(run(mode, devices))
    bf16 = peak_breakdown(events)
    # Saved activations in bf16 are half; the input and the loss's float32 output stay whole.
    assert 0.45 <= bf16["activations"] / fp32["activations"] <= 0.6
    # Master weights, their gradients and the optimizer's state stay float32.
    assert bf16["params"] == fp32["params"] and bf16["optimizer"] == fp32["optimizer"]


# ---- ZeRO ------------------------------------------------------------------------------------------


def test_zero1_shards_only_the_optimizer_state():
    events = run("ddp", "sim:2", placement__zero=1)
    assert_same_losses(events, run(), rel=1e-5)
    ref = [e for e in run() if isinstance(e, MemorySample)][-1].bytes
    last = {e.device: e.bytes for e in events if isinstance(e, MemorySample)}
    assert all(last[d]["params"] == ref["params"] for d in (0, 1))
    # Each rank keeps the state of its share of the parameters (whole tensors, so about half).
    opt = [last[d]["optimizer"] for d in (0, 1)]
    assert sum(opt) == ref["optimizer"]
    tensors = len(list(build_model(config().model, 0).parameters()))
    assert all(0.3 * ref["optimizer"] < o < 0.7 * ref["optimizer"] for o in opt), opt
    assert ref["optimizer"] == adam_state_bytes(ref["params"], tensors)


def test_zero_2_and_3_are_fsdps_reshard_choice():
    assert config(placement__zero=2).placement.reshards_after_forward() is False
    assert config(placement__zero=3, placement__reshard_after_forward=False).placement.reshards_after_forward()
    assert config().placement.reshards_after_forward() is True  # 0: the mode's own, as before


# ---- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "words"), [
    ({"mode": "ddp", "devices": "sim:2", "train.batch_size": 12, "train.grad_accumulation": 4},
     "does not divide each device's 6 samples"),
    ({"mode": "pipeline", "devices": "sim:2", "train.grad_accumulation": 2}, "raise train.micro_batches"),
    ({"mode": "data-parallel", "devices": "sim:2", "train.activation_checkpointing": "blocks"}, "use ddp"),
    ({"model.kind": "linear", "train.activation_checkpointing": "blocks"}, "has none"),
    ({"mode": "fsdp", "devices": "sim:2", "placement.zero": 1}, "optimizer state of ddp"),
    ({"mode": "ddp", "devices": "sim:2", "placement.zero": 3}, "fsdp's"),
    ({"train.precision": "fp16"}, "not one of: fp32, bf16"),
    ({"train.activation_checkpointing": "all"}, "not one of: none, blocks, selective"),
])
def test_each_lever_says_what_is_wrong(extra, words):
    found = problems(RunConfig().with_overrides({"devices": "sim:1", **extra}))
    assert any(words in p for p in found), found


# ---- the estimate ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "devices", "lever"), [
    ("single", "sim:1", {"train.grad_accumulation": 4}),
    ("single", "sim:1", {"train.activation_checkpointing": "blocks"}),
    ("single", "sim:1", {"train.precision": "bf16"}),
    ("ddp", "sim:2", {"placement.zero": 1}),
    ("fsdp", "sim:2", {"train.precision": "bf16"}),
], ids=lambda v: v if isinstance(v, str) else next(iter(v.values()), ""))
def test_the_trace_predicts_each_lever_within_5_percent(mode, devices, lever):
    cfg = config(mode, devices).with_overrides(lever)
    rows = compare(estimate(cfg, method="trace"), run(mode, devices, **{k.replace(".", "__"): v
                                                                        for k, v in lever.items()}))
    for row in rows:
        assert row["measured"] and abs(row["trace_error_pct"]) <= 5.0, row


def test_bf16_runs_on_the_modelled_gpus_bf16_peak():
    """The trace's modelled step (the clock a simulated run keeps): matmuls in bf16 run at the
    GPU's bf16 peak, far above its fp32 one, so a matmul-bound step takes a fraction of the time."""
    big = {"model.width": 1024, "model.depth": 2, "train.batch_size": 2048}

    def step_s(precision: str) -> float:
        cfg = config().with_overrides({**big, "train.precision": precision})
        return estimate(cfg, method="trace").devices[0].modelled["step_s"]

    assert step_s("bf16") < 0.5 * step_s("fp32")


@pytest.mark.parametrize("lever", [{"train.activation_checkpointing": "blocks"},
                                   {"train.activation_checkpointing": "selective"},
                                   {"train.precision": "bf16"}, {"train.grad_accumulation": 4}],
                         ids=lambda v: next(iter(v.values())))
def test_the_formula_follows_each_lever_within_10_percent_of_the_trace(lever):
    """The checkpointing preset's GPT (no run: the trace is the reference, on fake tensors)."""
    cfg = RunConfig().with_overrides({"model.kind": "transformer", "model.width": 128, "model.depth": 4,
                                      "model.heads": 4, "model.seq_len": 64, "model.vocab": 512,
                                      "train.batch_size": 32, "devices": "sim:1", **lever})
    both = estimate(cfg)
    f, t = both.by_method["formula"][0], both.by_method["trace"][0]
    assert f.peak_bytes == pytest.approx(t.peak_bytes, rel=0.10), (f.bytes, t.bytes)
