"""The live views: ring buffers, the dashboard's curves, gauges, timeline, PNG export."""

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"

import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from paralab.core.events import (  # noqa: E402
    CATEGORIES,
    MemorySample,
    PhaseSpan,
    RunEnded,
    RunStarted,
    StepDone,
    UtilizationSample,
)
from paralab.gui.buffers import MIB, Compacting, Ring, RunData  # noqa: E402

GiB = 2**30


def start(n=2, mode="ddp", micro_batches=4, capacity=GiB):
    devices = [{"index": i, "label": f"sim{i}", "kind": "sim", "capacity_bytes": capacity,
                "description": ""} for i in range(n)]
    return RunStarted(mode, devices, {"train": {"micro_batches": micro_batches}}, n)


def memory(step, device, t, **bytes_):
    b = {c: bytes_.get(c, 0) for c in CATEGORIES}
    return MemorySample(step, device, b, sum(b.values()), GiB, t)


# ---- buffers -------------------------------------------------------------------------------------


def test_ring_wraps_keeps_order_and_size():
    ring = Ring(5, 2)
    size = ring._buf.nbytes
    ring.extend(np.column_stack([np.arange(3), np.arange(3) * 10]))
    assert ring.column(0).tolist() == [0, 1, 2]
    for i in range(3, 12):
        ring.extend((i, i * 10))
    assert len(ring) == 5 and ring.count == 12
    assert ring.column(0).tolist() == [7, 8, 9, 10, 11]
    assert ring.column(1).tolist() == [70, 80, 90, 100, 110]
    assert ring.column(0).flags["C_CONTIGUOUS"]  # a view handed to setData without a copy
    ring.extend(np.column_stack([np.arange(100, 113), np.zeros(13)]))  # more than fits at once
    assert ring.column(0).tolist() == [108, 109, 110, 111, 112]
    assert ring._buf.nbytes == size


def test_compacting_halves_resolution_instead_of_growing():
    table = Compacting(4, 1)
    table.extend(np.arange(1, 5, dtype=float)[:, None])
    assert table.column(0).tolist() == [1, 2, 3, 4] and table.stride == 1
    for v in range(5, 9):
        table.extend((float(v),))
    # Full at 4 rows: pairs merged into their means, then every 2 steps make one row.
    assert table.column(0).tolist() == [1.5, 3.5, 5.5, 7.5]
    assert table.stride == 2 and table.count == 8
    big = Compacting(1000, 2)
    size = big._buf.nbytes
    steps = np.arange(1, 100_001, dtype=float)
    big.extend(np.column_stack([steps, 2 * steps]))
    assert len(big) <= 1000 and big._buf.nbytes == size
    x, y = big.column(0), big.column(1)
    assert x[0] < 100 and x[-1] > 99_000  # the whole run, start to end
    assert np.allclose(y, 2 * x)  # each row is a mean of whole steps, columns stay paired
    assert np.all(np.diff(x) > 0)


def test_rundata_memory_is_bounded_and_stacked():
    data = RunData(step_capacity=64, memory_capacity=16, util_capacity=16, span_capacity=32)
    data.reset(start(2))
    sizes = [d.memory._buf.nbytes + d.utilization._buf.nbytes + d.spans._buf.nbytes for d in data.devices]
    steps_size = data.steps._buf.nbytes
    for i in range(1, 501):
        data.add([StepDone(i, 1.0 / i, i * 0.01, 100.0, 0.01),
                  memory(i, 0, i * 0.01, params=MIB, grads=2 * MIB, activations=i * MIB),
                  UtilizationSample(1, 50.0, i * 0.01, "spans"),
                  PhaseSpan(0, "forward", i, i + 0.5, i)])
    assert len(data.devices[0].memory) == 16 and len(data.steps) <= 64
    assert [d.memory._buf.nbytes + d.utilization._buf.nbytes + d.spans._buf.nbytes
            for d in data.devices] == sizes
    assert data.steps._buf.nbytes == steps_size
    mem = data.devices[0].memory
    assert mem.column(0)[-1] == pytest.approx(5.0)
    # Running sums in MiB: params, +grads, +optimizer, +activations, +other.
    assert mem.columns(1, 6)[:, -1].tolist() == [1, 3, 3, 503, 503]
    assert data.devices[0].peak_bytes == 503 * MIB


def test_rundata_versions_and_a_new_start_in_a_batch():
    data = RunData()
    data.reset(start(2))
    v = (data.version, data.steps_version, data.memory_version)
    data.add([StepDone(1, 0.5, 0.1, 10.0)])
    assert data.version > v[0] and data.steps_version > v[1] and data.memory_version == v[2]
    data.add([])
    assert data.version == v[0] + 1
    data.add([RunEnded("ok", "done"), start(3), StepDone(1, 0.9, 0.1, 10.0)])
    assert len(data.devices) == 3 and data.end is None
    assert data.steps.column(2).tolist() == [0.9]
    data.add([memory(1, 7, 0.1, params=1)])  # a device the start did not name
    assert data.ignored == 1


# ---- dashboard -----------------------------------------------------------------------------------


@pytest.fixture
def dashboard(qtbot):
    from paralab.gui.dashboard import Dashboard

    dash = Dashboard()
    dash.telemetry_interval_s = 0.0  # every refresh draws everything (the app throttles telemetry)
    qtbot.addWidget(dash)
    dash.resize(1200, 900)
    dash.show()
    return dash


def feed(data, n_steps=50, n=2):
    events = [start(n)]
    for i in range(1, n_steps + 1):
        t = i * 0.1
        events.append(StepDone(i, 2.0 / i, t, 640.0 + i, 0.01))
        for d in range(n):
            events.append(memory(i, d, t, params=4 * MIB, grads=4 * MIB, optimizer=8 * MIB,
                                 activations=(i % 5 + d) * MIB, other=MIB // 2))
            events.append(UtilizationSample(d, 40.0 + d, t, "spans"))
    data.add(events)


def test_dashboard_curves_hold_the_fed_data(dashboard):
    data = RunData()
    dashboard.bind(data)
    feed(data)
    assert dashboard.refresh()
    assert not dashboard.refresh()  # nothing new: nothing redrawn
    x, y = dashboard.loss_curve.getData()
    assert x.tolist() == list(range(1, 51)) and y == pytest.approx([2.0 / i for i in range(1, 51)])
    x, y = dashboard.rate_curve.getData()
    # The curve is the smoothed rate (one step's figure swings); the raw one stays in the data.
    assert x == pytest.approx([i * 0.1 for i in range(1, 51)]) and 641.0 < y[-1] < 690.0
    assert data.steps.column(3)[-1] == 690.0
    assert data.average_rate == pytest.approx(50 / sum(1 / (640.0 + i) for i in range(1, 51)))
    for d in range(2):
        x, y = dashboard.util_curves[d].getData()
        assert len(x) == 50 and set(y.tolist()) == {40.0 + d}
        area = dashboard.mem_plots[d].area
        assert area.x == pytest.approx([i * 0.1 for i in range(1, 51)])
        tops = area.tops[:, -1] * MIB
        act = 16 * MIB + (50 % 5 + d) * MIB  # the feed has no temporaries: a zero band
        assert tops.tolist() == [4 * MIB, 8 * MIB, 16 * MIB, act, act, act + 0.5 * MIB]
        assert dashboard.mem_plots[d].capacity.value() == pytest.approx(GiB / MIB)
    assert "step 50" in dashboard.status.text()
    assert dashboard.devices.gauges[1].used == 16 * MIB + MIB // 2 + MIB


def test_dashboard_prediction_lines_and_markers(dashboard):
    data = RunData()
    dashboard.bind(data)
    feed(data)
    dashboard.set_prediction({0: {"peak_bytes": 40 * MIB, "bytes": {"params": 4 * MIB}}})
    dashboard.refresh()
    assert dashboard.mem_plots[0].predicted.isVisible()
    assert dashboard.mem_plots[0].predicted.value() == pytest.approx(40.0)
    assert not dashboard.mem_plots[1].predicted.isVisible()
    assert dashboard.devices.gauges[0].predicted == 40 * MIB
    assert dashboard.devices.gauges[1].predicted is None


def test_dashboard_reuses_its_items_across_runs(dashboard):
    data = RunData()
    dashboard.bind(data)
    feed(data, n=3)
    dashboard.refresh()
    scene = dashboard.plots.scene()
    items = len(scene.items())
    for n in (2, 3, 1, 3):
        feed(data, n=n)
        dashboard.refresh()
        assert sum(mp.plot.isVisible() for mp in dashboard.mem_plots) == n
    from paralab.gui.dashboard import PREMADE_SLOTS

    slots = max(3, PREMADE_SLOTS)
    assert len(dashboard.mem_plots) == slots and len(dashboard.util_curves) == slots
    assert len(scene.items()) == items
    renamed = start(3)
    for i, d in enumerate(renamed.devices):
        d["label"] = f"cuda:{i}"
    data.add([renamed])
    dashboard.refresh()
    assert [mp.plot.titleLabel.text for mp in dashboard.mem_plots[:3]] == ["cuda:0", "cuda:1", "cuda:2"]


def test_stacked_memory_keeps_peaks_when_downsampled(dashboard):
    from paralab.gui.memory_plot import StackedArea
    from pyqtgraph import functions as fn

    data = RunData(memory_capacity=100_000)
    dashboard.bind(data)
    data.reset(start(1))
    dashboard.refresh()
    n = 100_000
    tops = np.tile(np.array([1.0, 2.0, 3.0, 4.0, 4.5, 5.0])[:, None], n)
    tops[3:, 54_321] = (40.0, 40.5, 41.0)  # one activation spike among 100 000 samples
    data.devices[0].memory.extend(np.column_stack([np.arange(n) * 0.25, tops.T]))
    data._bump(memory=True)
    dashboard.refresh()
    area: StackedArea = dashboard.mem_plots[0].area
    bands = [fn.ndarray_from_qpolygonf(p) for p in area._build()]
    width = dashboard.mem_plots[0].plot.getViewBox().width()
    assert len(bands) == 6 and len(bands[3]) <= 2 * width + 4  # about one point per pixel column
    assert bands[3][:, 1].max() == 40.0 and bands[5][:, 1].max() == 41.0
    assert bands[0][-3, 0] == (n - 1) * 0.25  # reaches the newest sample


def test_log_scale_and_diverged_loss(dashboard):
    data = RunData()
    dashboard.bind(data)
    data.add([start(1), StepDone(1, 1.0, 0.1, 10.0), StepDone(2, 0.0, 0.2, 10.0),
              StepDone(3, float("nan"), 0.3, 10.0)])
    dashboard.set_log_loss(True)
    assert not data.loss_finite
    x, y = dashboard.loss_curve.getData()
    assert len(x) == 3 and dashboard.loss_curve.opts["connect"] == "finite"
    dashboard.set_log_loss(False)
    assert not dashboard.log_loss.isChecked()


def test_clear_empties_the_views(dashboard):
    data = RunData()
    dashboard.bind(data)
    feed(data)
    dashboard.refresh()
    dashboard.clear()
    assert dashboard.loss_curve.getData()[0] is None
    assert len(dashboard.mem_plots[0].area.x) == 0
    data.add([StepDone(51, 0.1, 5.1, 10.0)])
    dashboard.refresh()
    assert len(dashboard.loss_curve.getData()[0]) == 51


def test_export_png_writes_an_image(dashboard, tmp_path):
    from PySide6.QtGui import QImage

    data = RunData()
    dashboard.bind(data)
    feed(data)
    path = dashboard.export_png(tmp_path / "run.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = QImage(str(path))
    assert img.width() == dashboard.width() and img.height() == dashboard.height()
    with pytest.raises(OSError):
        dashboard.export_png(tmp_path / "no-such-folder" / "run.png")


# ---- device view ---------------------------------------------------------------------------------


def test_device_view_names_the_overflowing_category(qtbot):
    from paralab.gui.device_view import DeviceView

    view = DeviceView()
    qtbot.addWidget(view)
    data = RunData()
    data.reset(start(2, capacity=64 * MIB))
    data.add([memory(1, 1, 0.1, params=8 * MIB, activations=20 * MIB)])
    view.refresh(data)
    assert [g.oom for g in view.gauges] == [None, None]
    data.add([RunEnded("oom", "sim1 ran out of memory in forward: activations pushed it to 70.0 MiB "
                              "of its 64.0 MiB capacity", 1, 2.0, 3, "forward")])
    assert view.refresh(data)
    assert view.gauges[0].oom is None
    assert view.gauges[1].oom == "out of memory: activations"
    assert "activations" in view.gauges[1].toolTip()
    view.grab()  # paints the red state without error


def test_device_view_marks_every_device_past_its_capacity(qtbot):
    from paralab.gui.device_view import DeviceView

    view = DeviceView()
    qtbot.addWidget(view)
    data = RunData()
    data.reset(start(3, capacity=64 * MIB))
    def sample(device, **bytes_):
        b = {c: bytes_.get(c, 0) for c in CATEGORIES}
        return MemorySample(1, device, b, sum(b.values()), 64 * MIB, 0.1)

    data.add([sample(0, params=40 * MIB, optimizer=40 * MIB),  # past 64 MiB as well
              sample(1, params=40 * MIB, optimizer=40 * MIB),
              sample(2, params=10 * MIB),
              RunEnded("oom", "sim1 ran out of memory in optimizer: optimizer pushed it to 80.0 MiB "
                              "of its 64.0 MiB capacity", 1, 2.0, 1, "optimizer")])
    view.refresh(data)
    assert [g.oom for g in view.gauges] == ["over capacity too", "out of memory: optimizer", None]


def test_device_view_oom_without_a_category_in_the_message(qtbot):
    from paralab.gui.device_view import DeviceView

    view = DeviceView()
    qtbot.addWidget(view)
    data = RunData()
    data.reset(start(2))
    data.add([memory(1, 0, 0.1, params=8 * MIB, optimizer=16 * MIB, activations=4 * MIB),
              memory(2, 0, 0.2, params=8 * MIB, optimizer=16 * MIB, activations=4 * MIB, grads=30 * MIB),
              RunEnded("oom", "cuda:0 ran out of memory in backward: CUDA out of memory", 0, 1.0, 2)])
    view.refresh(data)
    assert view.gauges[0].oom == "out of memory: grads"  # the category that grew
    data.add([start(2)])
    view.refresh(data)
    assert [g.oom for g in view.gauges] == [None, None]


def test_device_view_shows_a_prediction_before_any_run(qtbot):
    from paralab.gui.device_view import DeviceView

    view = DeviceView()
    qtbot.addWidget(view)
    view.refresh(RunData())
    view.set_prediction({0: {"peak_bytes": 10 * MIB, "bytes": {}},
                         1: {"peak_bytes": 90 * MIB, "bytes": {}, "label": "sim1", "capacity_bytes": 64 * MIB}})
    assert [g.isVisibleTo(view) for g in view.gauges] == [True, True]
    assert view.gauges[1].label == "sim1" and view.gauges[1].predicted > view.gauges[1].capacity
    data = RunData()
    data.reset(start(1))
    view.refresh(data)  # the run's devices replace the predicted ones
    assert [g.isVisibleTo(view) for g in view.gauges] == [True, False]
    assert view.gauges[0].label == "sim0" and view.gauges[0].predicted == 10 * MIB


# ---- timeline ------------------------------------------------------------------------------------


def gpipe_spans(step, t0, p, m, unit=0.001):
    """GPipe on p stages, m micro-batches, every forward and backward one unit long:
    stage s runs forward k at t = s + k and backward k at t = (m + p - 1) + (p - 1 - s) + k."""
    out = []
    for s in range(p):
        for k in range(m):
            f = t0 + (s + k) * unit
            b = t0 + (m + p - 1 + p - 1 - s + k) * unit
            out += [PhaseSpan(s, "forward", f, f + unit, step), PhaseSpan(s, "backward", b, b + unit, step)]
    return out


def test_timeline_idle_share_matches_the_gpipe_bubble(qtbot):
    from paralab.core.spans import covered, ideal_bubble
    from paralab.gui.timeline import Timeline

    timeline = Timeline(n_steps=1)
    qtbot.addWidget(timeline)
    data = RunData()
    data.add([start(3, mode="pipeline", micro_batches=4)])
    data.add(gpipe_spans(7, 10.0, p=3, m=4))
    assert timeline.refresh(data)
    assert ideal_bubble(3, 4) == pytest.approx(2 / 6)
    assert timeline.window.steps == [7]
    assert timeline.window.idle == pytest.approx([2 / 6] * 3)
    assert "33%" in timeline.info.text() and "(3−1)/(4+3−1)" in timeline.info.text()
    x0, width, row = timeline.window.bars["forward"]
    assert len(x0) == 12 and width == pytest.approx([1.0] * 12)  # ms
    assert covered(zip(np.array([0.0, 1.0, 5.0]), np.array([2.0, 3.0, 6.0]))) == 4.0


def test_timeline_counts_gaps_and_idle_spans_and_skips_unsampled_devices(qtbot):
    from paralab.gui.timeline import Timeline

    timeline = Timeline(n_steps=2)
    qtbot.addWidget(timeline)
    data = RunData()
    data.add([start(3, mode="ddp")])
    data.add([
        # Step 4 on devices 0 and 1: 10 ms long.  Device 0 computes 6 ms and waits 4
        # (an explicit idle span); device 1 computes 2 + 3 ms with a 5 ms unrecorded gap.
        PhaseSpan(0, "forward", 1.000, 1.004, 4), PhaseSpan(0, "backward", 1.004, 1.006, 4),
        PhaseSpan(0, "idle", 1.006, 1.010, 4),
        PhaseSpan(1, "forward", 1.000, 1.002, 4), PhaseSpan(1, "communication", 1.007, 1.010, 4),
        # Step 5 on device 1 only: all busy.
        PhaseSpan(1, "forward", 2.000, 2.010, 5),
        # An older step drops out of the two shown.
        PhaseSpan(2, "forward", 0.0, 0.5, 3),
    ])
    timeline.refresh(data)
    assert timeline.window.steps == [4, 5]
    idle = timeline.window.idle
    assert idle[0] == pytest.approx(0.4)
    assert idle[1] == pytest.approx(5 / 20)  # 5 ms gap over steps 4 and 5 (10 ms each)
    assert idle[2] is None
    assert "sim2 –" in timeline.info.text() and "bubble" not in timeline.info.text()
    assert timeline.window.offsets_ms[1] > timeline.window.lengths_ms[0]  # side by side


# ---- environment ---------------------------------------------------------------------------------


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="None is immortal from Python 3.12 on")
def test_qt_binding_keeps_none_alive(qtbot):
    """PySide6 6.12.0 drops a reference to None on every void call; on Python 3.11 the
    app then aborts with 'none_dealloc' after a few thousand calls (pyproject excludes it)."""
    from PySide6.QtWidgets import QWidget

    w = QWidget()
    qtbot.addWidget(w)
    before = sys.getrefcount(None)
    for _ in range(1000):
        w.update()
    assert sys.getrefcount(None) > before - 500


def test_telemetry_views_redraw_at_most_ten_times_a_second(qtbot):
    """The loss follows every refresh; memory, gauges and timeline wait 100 ms between redraws."""
    from paralab.gui.dashboard import Dashboard

    dash = Dashboard()
    qtbot.addWidget(dash)
    data = RunData()
    dash.bind(data)
    feed(data, n_steps=5)
    dash.refresh(force=True)
    data.add([StepDone(6, 0.1, 0.6, 600.0, 0.01), memory(6, 0, 0.6, params=99 * MIB)])
    dash.refresh()
    assert dash.loss_curve.getData()[0][-1] == 6
    assert dash.devices.gauges[0].used != 99 * MIB  # not yet
    # Then one telemetry view per tick, each at most ten times a second.
    qtbot.waitUntil(lambda: dash.refresh() is not None and dash.devices.gauges[0].used == 99 * MIB, timeout=2000)


def test_memory_hint_comes_back_between_runs(dashboard):
    """No devices: the memory area says what will appear there; a run replaces it, and the
    next Start (no devices yet) brings it back without clashing with the plots' cells."""
    data = RunData()
    dashboard.bind(data)
    dashboard.refresh()
    assert dashboard.mem_pages.currentWidget() is dashboard.mem_hint
    feed(data, n_steps=3)
    dashboard.refresh()
    assert dashboard.mem_pages.currentWidget() is dashboard.mem_scroll and dashboard.mem_plots[0].plot.isVisible()
    for _ in range(2):
        data.reset(None)
        dashboard.clear()
        dashboard.refresh()
        assert dashboard.mem_pages.currentWidget() is dashboard.mem_hint
        feed(data, n_steps=3)
        dashboard.refresh()
        assert dashboard.mem_pages.currentWidget() is dashboard.mem_scroll


def test_memory_plots_fill_their_view_after_a_run_with_more_devices(dashboard, qtbot):
    """32 devices, then 2: the plots' grid once stayed at the 32-device size, a corner of the view."""
    data = RunData()
    dashboard.bind(data)
    for n in (2, 32, 2):
        data.reset(None)
        dashboard.clear()
        dashboard.refresh()
        feed(data, n_steps=3, n=n)
        dashboard.refresh()
        qtbot.wait(20)
        view, grid = dashboard.mem_view, dashboard.mem_layout
        assert grid.size().width() == view.width() and grid.size().height() == view.height()
        assert dashboard.mem_plots[0].plot.size().width() > view.width() / 5


def test_the_timeline_says_its_clock_and_the_modelled_figures(qtbot):
    from paralab.gui.timeline import Timeline

    timeline = Timeline(n_steps=1)
    qtbot.addWidget(timeline)
    data = RunData()
    s = start(2)
    s.clock = "modelled: 2 × H100 SXM over NVLink 4"
    data.add([s])
    extra = {"step_s": 0.002, "flops": 1e12, "mfu": 0.25, "comm_s": 1e-4, "comm_bytes": 2 * MIB,
             "busbw_gbs": 300.0, "overlap": 0.75}
    data.add([UtilizationSample(d, 90.0, 1.0, "modelled", extra) for d in (0, 1)]
             + [UtilizationSample(0, 40.0, 1.0, "spans", {})]  # the host's share: not this clock's
             + [PhaseSpan(d, "forward", 0.0, 0.002, 3, "modelled") for d in (0, 1)]
             + [PhaseSpan(d, "forward", 0.0, 0.5, 3, "host") for d in (0, 1)])
    timeline.refresh(data)
    text = timeline.info.text()
    assert text.startswith("Modelled: 2 × H100 SXM over NVLink 4"), text
    assert "sim0 MFU 25.0%, comm 2.0 MiB at 300 GB/s bus, 75% hidden" in text
    assert [d.util_percent for d in data.devices] == [90.0, 90.0]
    assert timeline.window.lengths_ms == pytest.approx([2.0])  # the modelled spans, not the host's
    assert timeline.host_time.isVisibleTo(timeline) and not timeline.host_time.isChecked()

    timeline.host_time.setChecked(True)  # the switch: the host's measured time
    assert timeline.window.lengths_ms == pytest.approx([500.0])
    assert timeline.info.text().startswith("Host time (measured); the run's clock is modelled: 2 × H100")
    assert [d.util_percent for d in data.devices] == [40.0, None] and data.devices[0].util_source == "spans"
    data.add([PhaseSpan(0, "backward", 0.5, 0.7, 3, "host"), PhaseSpan(0, "backward", 0.002, 0.003, 3, "modelled")])
    timeline.refresh(data)
    assert timeline.window.lengths_ms == pytest.approx([700.0])
    timeline.host_time.setChecked(False)  # and back, with what arrived meanwhile
    assert timeline.window.lengths_ms == pytest.approx([3.0])
    assert [d.util_percent for d in data.devices] == [90.0, 90.0]

    host = RunData()
    host.add([start(1)])
    host.add([PhaseSpan(0, "forward", 0.0, 0.5, 3)])
    timeline.refresh(host, force=True)
    assert timeline.info.text().startswith("Host time (measured)")
    assert not timeline.host_time.isVisibleTo(timeline)


def test_a_transformers_rate_is_said_in_tokens_too():
    from paralab.gui.dashboard import rate_text

    data = RunData()
    data.reset(RunStarted("single", start(1).devices, {"model": {"kind": "transformer", "seq_len": 64}}, 1))
    data.add([StepDone(i, 1.0, 0.1 * i, 100.0) for i in range(1, 4)])
    assert data.tokens_per_sample == 64
    assert "6,400 tokens/s" in rate_text(data) and "100 samples/s" in rate_text(data)
    mlp = RunData()
    mlp.reset(start(1))
    assert mlp.tokens_per_sample == 0
