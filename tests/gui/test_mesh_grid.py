"""The mesh drawn as a grid of devices: where each rank sits, and the groups an axis lights."""

from paralab.core.config import RunConfig
from paralab.core.plan import Plan
from paralab.gui.mesh_grid import cell, columns, groups, preview_plan, tints


def test_stages_read_left_to_right_and_replicas_down():
    dp_pp = Plan(dp=2, pp=2)  # two pipelines of two stages: ranks 0,1 are stage 0
    assert columns(dp_pp) == 2 and [cell(dp_pp, r) for r in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    fsdp_tp = Plan(shard=2, tp=2)
    assert [cell(fsdp_tp, r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    hsdp = Plan(dp=2, shard=2)
    assert columns(hsdp) == 2 and cell(hsdp, 3) == (1, 1)
    three = Plan(pp=2, shard=2, tp=2)
    assert columns(three) == 4 and len({cell(three, r) for r in range(8)}) == 8


def test_an_axis_lights_the_devices_that_work_together_along_it():
    plan = Plan(shard=2, tp=2)
    assert groups(plan, "tp") == [[0, 1], [2, 3]]  # tp is innermost: neighbours
    assert groups(plan, "shard") == [[0, 2], [1, 3]]
    lit = tints(plan, "shard")
    assert lit[0] == lit[2] != lit[1] == lit[3]
    assert tints(plan, "pp") == {}  # one stage: nothing to light


def test_the_form_previews_its_mesh_before_a_run(qtbot):
    from paralab.gui.device_view import DeviceView

    cfg = RunConfig().with_overrides({"mode": "mesh", "devices": "sim:4", "mesh.dp": 2, "mesh.pp": 2})
    assert preview_plan(cfg) == Plan(dp=2, pp=2)
    assert preview_plan(cfg.with_overrides({"devices": "sim:8"})) is None  # degrees that do not fit
    view = DeviceView()
    qtbot.addWidget(view)
    view.set_mesh(preview_plan(cfg))
    view.set_prediction({r: {"peak_bytes": 10, "label": f"sim{r}", "capacity_bytes": 100} for r in range(4)})
    grid = view._grid
    assert [grid.getItemPosition(grid.indexOf(view.gauges[r]))[:2] for r in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    view.axis_picker.combo.setCurrentIndex(view.axis_picker.combo.findData("dp"))
    assert view.gauges[0].tint == view.gauges[1].tint != view.gauges[2].tint
    assert "replicas" in view.axis_picker.caption.text()
