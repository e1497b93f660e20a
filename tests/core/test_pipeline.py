"""pipeline: GPipe and 1F1B over torch.distributed.pipelining train like single, each
device holds only its stage, and the timeline shows every micro-batch and the bubble."""

from __future__ import annotations

import pytest
from paralab.core import validation
from paralab.core.config import ConfigError, RunConfig
from paralab.core.events import PhaseSpan
from paralab.core.models import build_model, num_layers, split_layers
from paralab.core.run import Run
from paralab.core.spans import bubble, ideal_bubble

from tests.helpers import adam_state_bytes, ended, losses, memory_by_device, run_events

MODELS = {
    "mlp": dict(model__kind="mlp", model__width=32, model__depth=2, train__batch_size=8, train__micro_batches=4),
    "transformer": dict(model__kind="transformer", model__width=32, model__depth=2, model__heads=2,
                        model__seq_len=16, model__vocab=64, train__batch_size=8, train__micro_batches=2),
}
_runs: dict[tuple, list] = {}


def _events(model: str, mode: str = "pipeline", schedule: str = "gpipe", devices: str = "sim:2") -> list:
    """Each run once per session: several tests read the same run."""
    key = (model, mode, schedule, devices)
    if key not in _runs:
        _runs[key] = run_events(mode=mode, devices=devices, train__schedule=schedule, train__steps=20,
                                **MODELS[model])
    return _runs[key]


def _spans(events: list, device: int) -> dict[int, list[PhaseSpan]]:
    """A device's spans by step, in time order."""
    out: dict[int, list[PhaseSpan]] = {}
    for e in events:
        if isinstance(e, PhaseSpan) and e.device == device and e.clock == "host":
            out.setdefault(e.step, []).append(e)
    return {step: sorted(spans, key=lambda s: s.start_s) for step, spans in out.items()}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_losses_match_single_step_by_step(model, schedule, no_leftover_ranks):
    reference = _events(model, mode="single", devices="sim:1")
    events = _events(model, schedule=schedule)
    assert ended(events).status == "ok", ended(events).message
    want, got = losses(reference), losses(events)
    assert len(got) == len(want) == 20
    for step, (a, b) in enumerate(zip(want, got, strict=True), 1):
        assert b == pytest.approx(a, rel=1e-4), f"step {step}: single {a}, pipeline {b}"
    assert got[-1] < got[0]  # and it trains


def test_one_device_is_a_one_stage_pipeline(no_leftover_ranks):
    events = _events("mlp", devices="sim:1")
    assert ended(events).status == "ok", ended(events).message
    assert losses(events) == pytest.approx(losses(_events("mlp", mode="single", devices="sim:1")), rel=1e-4)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_each_device_holds_only_its_stage(schedule, no_leftover_ranks):
    cfg = RunConfig().with_overrides({k.replace("__", "."): v for k, v in MODELS["mlp"].items()})
    model = build_model(cfg.model, cfg.seed)
    memory = memory_by_device(_events("mlp", schedule=schedule))
    stages = split_layers(num_layers(cfg.model), 2)
    assert sorted(memory) == [0, 1]
    for device, layers in enumerate(stages):
        expected = sum(p.numel() * p.element_size() for j in layers for p in model[j].parameters())
        assert memory[device].bytes["params"] == expected
        tensors = sum(1 for j in layers for _ in model[j].parameters())
        assert memory[device].bytes["optimizer"] == adam_state_bytes(expected, tensors)  # its own params
    whole = memory_by_device(_events("mlp", mode="single", devices="sim:1"))[0].bytes["params"]
    assert memory[0].bytes["params"] + memory[1].bytes["params"] == whole


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_spans_show_every_micro_batch_and_the_bubble(schedule, no_leftover_ranks):
    events = _events("mlp", schedule=schedule)
    m = MODELS["mlp"]["train__micro_batches"]
    for device in (0, 1):
        by_step = _spans(events, device)
        assert 1 in by_step and 2 in by_step  # the first steps are always sampled
        for step, spans in by_step.items():
            phases = [s.phase for s in spans]
            assert phases.count("forward") == m and phases.count("backward") == m, (step, phases)
            assert phases.count("optimizer") == 1 and phases[-1] == "optimizer"
            assert "idle" in phases  # the bubble
            for a, b in zip(spans, spans[1:]):
                assert a.end_s <= b.start_s + 1e-9, f"device {device} step {step}: {a} overlaps {b}"
            forwards = [s for s in spans if s.phase == "forward"]
            backwards = [s for s in spans if s.phase == "backward"]
            if schedule == "gpipe":
                assert forwards[-1].end_s <= backwards[0].start_s  # fill, then drain
            elif device == 0:
                # 1F1B with m > p: the first stage starts a backward before its last forward.
                assert backwards[0].start_s < forwards[-1].start_s
        assert 0 < bubble([s for ss in by_step.values() for s in ss])[device] < 1


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_gpipe_keeps_more_micro_batches_alive_than_1f1b(model, no_leftover_ranks):
    # A batch large enough that activations, not the optimizer's step, make the peak: the
    # sample's breakdown is the one at the device's peak.
    settings = {**MODELS[model], "train__batch_size": 256 if model == "mlp" else 64}

    def stage0(schedule):
        events = run_events(mode="pipeline", devices="sim:2", train__schedule=schedule, train__steps=3, **settings)
        sample = memory_by_device(events)[0]
        assert sample.phase == "backward", (sample.phase, sample.op)
        return sample

    gpipe, one_f_one_b = stage0("gpipe"), stage0("1f1b")
    assert gpipe.bytes["activations"] > 0
    if MODELS[model]["train__micro_batches"] > 2:
        # m > p: GPipe holds all m micro-batches' activations on stage 0, 1F1B about p.
        assert gpipe.bytes["activations"] > one_f_one_b.bytes["activations"]
        assert gpipe.peak_bytes > one_f_one_b.peak_bytes
    else:
        # m == p: 1F1B's warm-up is every micro-batch, the same order as GPipe.
        assert gpipe.bytes["activations"] == one_f_one_b.bytes["activations"]


def test_the_bubble_is_the_idle_share_of_the_forward_backward_window():
    spans = [PhaseSpan(0, "forward", 0.0, 1.0, 1), PhaseSpan(0, "idle", 1.0, 2.0, 1),
             PhaseSpan(0, "backward", 2.0, 4.0, 1), PhaseSpan(0, "optimizer", 4.0, 9.0, 1),
             PhaseSpan(1, "idle", 0.0, 4.0, 1), PhaseSpan(0, "forward", 10.0, 14.0, 2)]
    assert bubble([s for s in spans if s.step == 1])[0] == pytest.approx(0.25)
    assert bubble(spans)[0] == pytest.approx(1 / 8)
    assert bubble(spans)[1] == 1.0  # idle all of step 1, the only step it has spans in
    assert 2 not in bubble(spans)
    assert ideal_bubble(2, 4) == pytest.approx(0.2)
    assert ideal_bubble(4, 4) == pytest.approx(3 / 7)


def _pipeline(**overrides) -> RunConfig:
    base = {"mode": "pipeline", "devices": "sim:2", **{k.replace("__", "."): v for k, v in MODELS["mlp"].items()}}
    return RunConfig().with_overrides({**base, **overrides})


@pytest.mark.parametrize(("overrides", "words"), [
    ({"devices": "sim:4", "model.depth": 1}, "more stages than layers"),
    ({"train.batch_size": 10}, "does not split into 4 micro-batches"),
    ({"train.schedule": "1f1b", "train.micro_batches": 1}, "at least as many micro-batches as devices"),
])
def test_bad_layouts_are_refused_with_a_sentence(overrides, words, no_leftover_ranks):
    assert validation.problems(_pipeline()) == []
    problems = validation.problems(_pipeline(**overrides))
    assert len(problems) == 1 and words in problems[0], problems
    with pytest.raises(ConfigError, match=words):
        Run(_pipeline(**overrides))


def test_a_stage_that_runs_out_of_memory_is_an_out_of_memory():
    """torch's stage re-raises a stage's error as "[Stage 1] failed to run forward"; the run
    still ends `oom`, naming the device, the phase and the operation."""
    from paralab.core import presets

    cfg = presets.load("transformer-pipeline").with_overrides(
        {"train.schedule": "gpipe", "sim.memory": "24MiB", "train.steps": 3, "train.micro_batches": 4})
    end = ended(run_events(cfg))
    assert end.status == "oom" and end.device == 1, end
    assert end.message.startswith("sim1 ran out of memory in forward") and "failed to run" not in end.message
