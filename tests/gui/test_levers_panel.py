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


def test_cpu_offload_is_a_lever_of_the_modes_that_shard(window):
    panel = window.panel
    panel.set_config(presets.load("transformer-fsdp"))
    assert panel.offload.isEnabled() and not panel.offload.isChecked()
    panel.offload.setChecked(True)
    assert panel.config().placement.cpu_offload and panel.problems() == []

    panel.mode.setCurrentText("ddp")  # still ticked: left enabled so it can be unticked
    assert panel.offload.isEnabled()
    assert any("“CPU offload” moves FSDP's shards to the host" in p for p in panel.problems()), panel.problems()
    panel.offload.setChecked(False)
    assert not panel.offload.isEnabled() and panel.problems() == []
