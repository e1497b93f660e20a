"""The panel's Levers group: each lever is a field, a preset's levers show in it, and a
lever that does not fit the mode says so in the form's words."""

from __future__ import annotations

from paralab.core import presets


def test_levers_show_a_preset_and_set_the_config(window):
    panel = window.panel
    panel.set_config(presets.load("transformer-checkpointing"))
    assert panel.checkpointing.currentText() == "blocks"
    assert panel.config().train.activation_checkpointing == "blocks"

    panel.checkpointing.setCurrentText("selective")
    panel.precision.setCurrentText("bf16")
    panel._spins["train.grad_accumulation"].setValue(4)
    cfg = panel.config()
    assert (cfg.train.activation_checkpointing, cfg.train.precision, cfg.train.grad_accumulation) == \
        ("selective", "bf16", 4)
    assert not panel._spins["placement.zero"].isVisible()  # single has no ZeRO stage

    panel.mode.setCurrentText("ddp")
    panel.sim_count.setValue(2)
    assert panel._spins["placement.zero"].isVisible()
    panel._spins["placement.zero"].setValue(1)
    assert panel.config().placement.zero == 1 and panel.problems() == []

    panel._spins["train.grad_accumulation"].setValue(3)
    assert any("“Gradient accumulation” 3 does not divide" in p for p in panel.problems()), panel.problems()
