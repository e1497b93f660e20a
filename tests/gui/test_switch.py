"""Switching the layout of a paused run in the app: the curves go on, the devices are
the new layout's, and the switch is marked where it happened."""

from __future__ import annotations

from paralab.core.config import RunConfig

START_S = 120  # rank processes: forkserver start-up, torch import, gloo rendezvous
DDP = RunConfig().with_overrides({"mode": "ddp", "devices": "sim:2", "model.kind": "mlp", "model.width": 16,
                                  "model.depth": 1, "train.batch_size": 8, "train.steps": 1_000_000,
                                  "train.optimizer": "sgd", "sim.gpu": "host"})


def test_pause_switch_to_fsdp_on_four_devices_and_go_on(window, qtbot, no_leftover_ranks):
    w, data = window, window.data
    w.panel.set_config(DDP)
    assert w.start_run()
    qtbot.waitUntil(lambda: data.last_step is not None and data.last_step.step >= 3, timeout=START_S * 1000)
    w.pause_run()
    assert w.switch_action.isEnabled() and w.panel.form.isEnabled()  # paused: the form takes a new layout
    w.panel.set_config(DDP.with_overrides({"model.width": 32}))
    assert not w.switch_run() and "keeps the model" in w.banner.text()
    w.panel.set_config(DDP.with_overrides({"mode": "fsdp", "devices": "sim:4"}))
    assert w.switch_run()
    qtbot.waitUntil(lambda: len(data.devices) == 4 and data.last_step.step > 3 and data.start.first_step > 1,
                    timeout=START_S * 1000)
    first = data.start.first_step
    qtbot.waitUntil(lambda: data.last_step.step >= first + 2, timeout=60_000)
    steps = data.steps.column(0)
    assert list(steps[:first + 2]) == list(range(1, first + 3))  # one curve, no gap, no restart
    assert any(kind == "switch" and step == first - 1 for step, _, kind, _ in data.marks)
    times = data.steps.column(1)
    assert all(b >= a for a, b in zip(times, times[1:]))  # the new run's clock goes on from the old
    assert data.start.mode == "fsdp" and [d.label for d in data.devices] == [f"sim{i}" for i in range(4)]
    w.stop_run()
    qtbot.waitUntil(lambda: not w.controller.running, timeout=60_000)
