"""Lessons: every step of every shipped lesson is a valid config that runs and ends as the
step says; a broken lesson fails with a sentence naming the lesson and the step; and the
claims the lessons make about memory hold in a real run."""

from dataclasses import replace

import pytest
from paralab.core import lessons, validation
from paralab.core.config import ConfigError
from paralab.core.events import MemorySample

from tests.helpers import ended, losses, run_events

STEPS = 3


def _distinct_steps() -> dict:
    """Each distinct config once (several steps share one: a lesson going back to a setting),
    with train.steps cut to a few, mapped to what the steps expect of it."""
    out: dict = {}
    for name in lessons.names():
        for i, step in enumerate(lessons.load(name).steps, 1):
            cfg = replace(step.config, name="").with_overrides({"train.steps": STEPS})
            out.setdefault(cfg, []).append((f"{name} step {i}", step.expect))
    return out


DISTINCT = _distinct_steps()
_events: dict = {}


def events_of(cfg):
    """A run's events, run once per config for the whole module."""
    if cfg not in _events:
        _events[cfg] = run_events(cfg)
    return _events[cfg]


def step_events(name: str, number: int) -> list:
    step = lessons.load(name).steps[number - 1]
    events = events_of(replace(step.config, name="").with_overrides({"train.steps": STEPS}))
    assert ended(events).status == step.expect, (name, number, ended(events))
    return events


def peaks(events: list) -> dict[int, MemorySample]:
    """Each device's sample at its highest peak."""
    out: dict[int, MemorySample] = {}
    for e in events:
        if isinstance(e, MemorySample) and (e.device not in out or e.peak_bytes >= out[e.device].peak_bytes):
            out[e.device] = e
    return out


def test_at_least_six_lessons_each_with_valid_steps():
    names = lessons.names()
    assert len(names) >= 6, names
    for name in names:
        lesson = lessons.load(name)
        assert lesson.title and lesson.summary and lesson.steps
        for step in lesson.steps:
            assert validation.problems(step.config) == []
            assert step.text and step.question and step.answer
            assert step.hidden <= set(lessons.CONTROLS)


def test_the_seeds_and_the_out_of_memory_preset_have_their_lessons():
    firsts = {lessons.load(n).steps[0].config.mode for n in lessons.names()}
    assert {"data-parallel", "model-parallel"} <= firsts
    assert any(s.expect == "oom" for n in lessons.names() for s in lessons.load(n).steps)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", list(DISTINCT), ids=[v[0][0] for v in DISTINCT.values()])
def test_every_step_runs_and_ends_as_the_lesson_says(cfg, no_leftover_ranks):
    expected = {expect for _, expect in DISTINCT[cfg]}
    assert len(expected) == 1, DISTINCT[cfg]  # two steps with one config cannot disagree
    end = ended(events_of(cfg))
    assert end.status == expected.pop(), (DISTINCT[cfg], end)
    if end.status == "ok":
        assert len(losses(events_of(cfg))) == STEPS


@pytest.mark.slow
def test_data_parallel_first_device_holds_more_and_ddp_balances(no_leftover_ranks):
    dp = peaks(step_events("data-parallel-first-device", 1))
    assert dp[0].peak_bytes > 4 * dp[1].peak_bytes
    assert dp[1].bytes["optimizer"] == 0 < dp[0].bytes["optimizer"]
    ddp = peaks(step_events("data-parallel-first-device", 4))
    # Each rank samples its own steps: equal up to a few bytes of whatever was alive then.
    assert ddp[0].peak_bytes == pytest.approx(ddp[1].peak_bytes, rel=0.01)
    assert ddp[0].peak_bytes < dp[0].peak_bytes


@pytest.mark.slow
def test_fsdp_halves_params_and_optimizer_state_but_not_activations(no_leftover_ranks):
    ddp = peaks(step_events("ddp-against-fsdp", 1))[0].bytes
    fsdp = peaks(step_events("ddp-against-fsdp", 2))[0].bytes
    for category in ("params", "optimizer"):
        assert fsdp[category] == pytest.approx(ddp[category] / 2, rel=0.02)
    assert fsdp["activations"] == pytest.approx(ddp["activations"], rel=0.01)  # a scalar apart


@pytest.mark.slow
def test_activations_follow_the_tokens_per_step(no_leftover_ranks):
    act = [peaks(step_events("activations-batch-size", k))[0].bytes["activations"] for k in (1, 2, 4)]
    assert act[1] == pytest.approx(2 * act[0], rel=0.02)  # batch 8 -> 16
    assert act[2] == pytest.approx(act[1], rel=0.02)       # batch 8 at 128 tokens = batch 16 at 64


# ---- broken lessons fail loudly ---------------------------------------------------------------


def _lesson(*steps: dict) -> dict:
    return {"title": "Broken", "steps": list(steps)}


FIRST = {"preset": "mlp-ddp", "text": "start"}


@pytest.mark.parametrize("steps, words", [
    ([{**FIRST, "set": {"train.batchsize": 3}}], ["step 1", "unknown setting 'train.batchsize'"]),
    ([FIRST, {"set": {"train.batch_size": 3}, "text": "odd"}], ["step 2", "batch size 3 does not split over 2"]),
    ([{"text": "no start"}], ["step 1", "must name a preset"]),
    ([{**FIRST, "preset": "nope"}], ["step 1", "there is no preset 'nope'"]),
    ([FIRST, {"look": "plots", "text": "x"}], ["step 2", "look 'plots' is not one of"]),
    ([{**FIRST, "show": ["train.learning_rate"]}], ["step 1", "'train.learning_rate' is not a control"]),
    ([{**FIRST, "question": "why?"}], ["step 1", "a question needs its answer"]),
    ([{**FIRST, "device": 2}], ["step 1", "device 2 is not a device of sim:2"]),
    ([{**FIRST, "expect": "crash"}], ["step 1", "expect 'crash'"]),
    ([{**FIRST, "colour": "red"}], ["step 1", "unknown key 'colour'"]),
    ([{**FIRST, "text": ""}], ["step 1", "text must be some text"]),
])
def test_a_broken_lesson_names_the_lesson_the_step_and_the_problem(steps, words):
    with pytest.raises(ConfigError) as err:
        lessons.parse(_lesson(*steps), "broken")
    message = str(err.value)
    assert message.startswith("lesson 'broken', ")
    for w in words:
        assert w in message, message


def test_steps_build_on_the_step_before():
    lesson = lessons.parse(_lesson(FIRST, {"set": {"train": {"batch_size": 4}}, "text": "b"},
                                   {"set": {"devices": "sim:4"}, "hide": ["seed"], "text": "c"}), "chain")
    a, b, c = (s.config for s in lesson.steps)
    assert (a.train.batch_size, b.train.batch_size, c.train.batch_size) == (128, 4, 4)
    assert c.devices == "sim:4" and b.devices == "sim:2"
    assert lesson.steps[2].hidden == {"seed"} and lesson.steps[0].hidden == set()
    assert a.name == "Broken" and a.description == ""  # the lesson's words, not the preset's


def test_unknown_lesson_lists_the_lessons():
    with pytest.raises(ConfigError, match="there is no lesson 'nope'; lessons: data-parallel-first-device"):
        lessons.load("nope")
