import json

from paralab.core.events import (
    EventWriter,
    MemorySample,
    PhaseSpan,
    RunEnded,
    RunStarted,
    StepDone,
    UtilizationSample,
    from_json,
    read_events,
    to_json,
)

EVENTS = [
    RunStarted("ddp", [{"index": 0, "label": "sim0"}], {"mode": "ddp"}, 2, 10, 1.0),
    StepDone(1, 0.5, 1.25, 100.0, 0.01),
    MemorySample(1, 0, {"params": 1, "grads": 2, "optimizer": 3, "activations": 4, "temporaries": 6, "other": 5}, 21, 100),
    UtilizationSample(0, 42.0, 1.0, "spans"),
    PhaseSpan(1, "forward", 0.1, 0.2, 3),
    RunEnded("oom", "sim1 ran out of memory", 1, 2.0, 3, "forward"),
]


def test_round_trip():
    for e in EVENTS:
        line = to_json(e)
        assert json.loads(line)["event"] == e.kind
        assert from_json(line) == e


def test_contract_fields():
    step = json.loads(to_json(EVENTS[1]))
    assert {"step", "loss", "time_s", "samples_per_s"} <= set(step)
    mem = json.loads(to_json(EVENTS[2]))
    assert set(mem["bytes"]) == {"params", "grads", "optimizer", "activations", "temporaries", "other"}
    assert {"step", "device", "peak_bytes", "capacity_bytes"} <= set(mem)
    span = json.loads(to_json(EVENTS[4]))
    assert {"device", "phase", "start_s", "end_s"} <= set(span)
    end = json.loads(to_json(EVENTS[5]))
    assert {"status", "message", "device"} <= set(end)


def test_nan_loss_is_null():
    assert json.loads(to_json(StepDone(1, float("nan"), 0.0, 0.0)))["loss"] is None


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "e.jsonl"
    w = EventWriter(path)
    w.write(EVENTS)
    w.close()
    with open(path, "a") as f:
        f.write('{"event": "step", "st')  # the writer died mid-line
    assert list(read_events(path)) == EVENTS
