"""Switching a run to another layout: the weights and optimizer state carry over
(torch.distributed.checkpoint reshards them), the loss goes on as if nothing happened,
and the memory is the new layout's from the first step after."""

from __future__ import annotations

import json
import threading

import pytest
from paralab.core.config import ConfigError, RunConfig
from paralab.core.events import MemorySample, RunStarted, StepDone
from paralab.core.run import Run

pytestmark = pytest.mark.usefixtures("no_leftover_ranks")

BASE = RunConfig().with_overrides({"model.kind": "mlp", "model.width": 64, "model.depth": 2, "train.batch_size": 16,
                                   "sim.gpu": "host", "train.optimizer": "adam"})


def go(cfg: RunConfig, **kwargs) -> list:
    events = list(Run(cfg, **kwargs).events())
    assert events[-1].status in ("ok", "stopped"), events[-1].message
    return events


def steps(events: list) -> dict[int, float]:
    return {e.step: e.loss for e in events if isinstance(e, StepDone)}


def params_held(events: list) -> dict[int, int]:
    return {e.device: e.bytes["params"] for e in events if isinstance(e, MemorySample)}


@pytest.mark.slow
def test_ddp_to_fsdp_and_two_devices_to_four_go_on_as_one_run(tmp_path):
    """Saved after step 20 of DDP on sim:2, continued as FSDP on sim:2 and as DDP on
    sim:4: every later loss equals an uninterrupted DDP run's within 1e-4 relative, and
    the parameters held per device are the new layout's."""
    uninterrupted = steps(go(BASE.with_overrides({"mode": "ddp", "devices": "sim:2", "train.steps": 26})))
    saved = str(tmp_path / "state")
    go(BASE.with_overrides({"mode": "ddp", "devices": "sim:2", "train.steps": 20}), save_at_end=saved)
    ddp_params = params_held(go(BASE.with_overrides({"mode": "ddp", "devices": "sim:2", "train.steps": 2})))[0]
    for layout, held in (({"mode": "fsdp", "devices": "sim:2"}, ddp_params // 2),
                         ({"mode": "ddp", "devices": "sim:4"}, ddp_params)):
        events = go(BASE.with_overrides({**layout, "train.steps": 26}), resume=saved)
        assert next(e for e in events if isinstance(e, RunStarted)).first_step == 21
        got = steps(events)
        assert sorted(got) == list(range(21, 27)), layout
        for step, loss in got.items():
            assert loss == pytest.approx(uninterrupted[step], rel=1e-4), (layout, step)
        assert set(params_held(events).values()) == {held}, layout


@pytest.mark.slow
def test_a_running_run_switches_where_it_is_paused(tmp_path):
    """Pause, switch: the ranks save where they stopped and say which step that was; the
    run of the new layout goes on from the next step with the same losses."""
    cfg = BASE.with_overrides({"mode": "ddp", "devices": "sim:2", "train.steps": 10_000})
    run = Run(cfg)
    seen: list = []

    def consume() -> None:
        for e in run.events():
            seen.append(e)
            if isinstance(e, StepDone) and e.step == 5:
                run.pause()
                run.switch()

    thread = threading.Thread(target=consume)
    thread.start()
    thread.join(120)
    assert not thread.is_alive() and run.saved_step is not None and run.saved_step >= 5
    assert "to switch layout" in seen[-1].message
    k = run.saved_step
    after = steps(go(BASE.with_overrides({"mode": "fsdp", "devices": "sim:2", "train.steps": k + 3}),
                     resume=run.checkpoint))
    reference = steps(go(cfg.with_overrides({"train.steps": k + 3})))
    assert sorted(after) == [k + 1, k + 2, k + 3]
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], rel=1e-4)


def test_what_cannot_go_on_is_refused_with_a_sentence(tmp_path):
    with pytest.raises(ConfigError, match="holds no saved paralab state"):
        Run(BASE.with_overrides({"mode": "ddp", "devices": "sim:2", "train.steps": 30}), resume=str(tmp_path))
    note = {"step": 20, "mode": "ddp", "devices": "sim:2", "model": BASE.to_dict()["model"]}
    (tmp_path / "paralab.json").write_text(json.dumps(note))
    with pytest.raises(ConfigError, match="mode pipeline holds its model in pieces"):
        Run(BASE.with_overrides({"mode": "pipeline", "devices": "sim:2", "train.steps": 30}), resume=str(tmp_path))
    with pytest.raises(ConfigError, match="must be above step 20"):
        Run(BASE.with_overrides({"mode": "ddp", "devices": "sim:2", "train.steps": 20}), resume=str(tmp_path))
    with pytest.raises(ConfigError, match="of another model"):
        Run(BASE.with_overrides({"mode": "ddp", "devices": "sim:2", "model.width": 32}), resume=str(tmp_path))
