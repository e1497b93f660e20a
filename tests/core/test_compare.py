"""`paralab compare`: per-device peaks equal the events files', differences in words, bad input."""

import csv
import json

import pytest
from paralab.core import compare
from paralab.core.cli import main
from paralab.core.config import RunConfig

from tests.helpers import ended, run_events

SMALL = {"devices": "sim:2", "model__width": 32, "model__depth": 2, "train__steps": 4, "train__batch_size": 8}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One small model recorded under ddp, fsdp and pipeline."""
    folder = tmp_path_factory.mktemp("runs")
    paths = []
    for mode in ("ddp", "fsdp", "pipeline"):
        path = folder / f"{mode}.jsonl"
        assert ended(run_events(metrics=path, mode=mode, **SMALL)).status == "ok"
        paths.append(path)
    return paths


def _peaks_in(path) -> dict[int, tuple[int, dict]]:
    """Straight from the JSON: each device's highest peak_bytes and the categories of the
    memory sample with the highest total."""
    best: dict[int, dict] = {}
    highest: dict[int, int] = {}
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e["event"] != "memory":
            continue
        d = e["device"]
        highest[d] = max(highest.get(d, 0), e["peak_bytes"])
        if d not in best or sum(e["bytes"].values()) > sum(best[d]["bytes"].values()):
            best[d] = e
    return {d: (highest[d], best[d]["bytes"]) for d in best}


def test_csv_peaks_equal_the_events_files(recorded, tmp_path, capsys):
    out = tmp_path / "peaks.csv"
    assert main(["compare", *map(str, recorded), "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "B: mode fsdp instead of ddp" in text and "C: mode pipeline instead of ddp" in text
    rows = list(csv.DictReader(out.open()))
    assert [(r["run"], r["mode"], r["device"]) for r in rows] == [
        (run, mode, dev) for run, mode in (("A", "ddp"), ("B", "fsdp"), ("C", "pipeline")) for dev in ("0", "1")]
    for path, run in zip(recorded, "ABC"):
        for device, (peak, by_category) in _peaks_in(path).items():
            row = next(r for r in rows if r["run"] == run and int(r["device"]) == device)
            assert int(row["peak_bytes"]) == peak
            assert {c: int(row[c]) for c in by_category} == by_category
            # On simulated devices the peak is exactly the categories' sum at that moment.
            assert sum(by_category.values()) == peak
    # The modes match single's loss; FSDP holds about half DDP's parameters per device.
    a, b = (compare.summarize(compare.read_file(p), n) for p, n in zip(recorded[:2], "AB"))
    assert a.final_loss == pytest.approx(b.final_loss, rel=1e-4)
    assert b.peaks[0].bytes["params"] < 0.6 * a.peaks[0].bytes["params"]
    assert a.mean_step_s > 0 and a.samples_per_s == pytest.approx(8 / a.mean_step_s)
    # One sampled step's timeline each, from its first span: every device; the pipeline waits.
    c = compare.summarize(compare.read_file(recorded[2]), "C")
    for run in (a, b, c):
        assert run.timeline_step > 0 and {d for d, *_ in run.timeline} == {0, 1}
        assert min(t[2] for t in run.timeline) == 0.0
    assert any(phase == "idle" for _, phase, *_ in c.timeline)


def test_differences_in_words():
    base = RunConfig().with_overrides({"mode": "ddp", "devices": "sim:2"})
    other = base.with_overrides({"mode": "fsdp", "devices": "sim:4", "train.lr": 0.1, "name": "renamed"})
    assert compare.differences(base.to_dict(), other.to_dict()) == [
        "mode fsdp instead of ddp", "devices sim:4 instead of sim:2", "train.lr 0.1 instead of 0.01"]
    assert compare.differences(base.to_dict(), base.to_dict()) == []


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"),
    ("not-events", "is not a paralab events file"),
    ("folder", "is not a file"),
    ("one", "compare takes 2 to 4 events files, not 1"),
    ("five", "compare takes 2 to 4 events files, not 5"),
])
def test_bad_input_is_one_sentence_and_exit_2(recorded, tmp_path, capsys, case, words):
    good = str(recorded[0])
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    files = {"missing": [good, str(tmp_path / "nope.jsonl")], "not-events": [good, str(other)],
             "folder": [good, str(tmp_path)], "one": [good], "five": [good] * 5}[case]
    assert main(["compare", *files]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_png_needs_the_app_renderer(recorded, tmp_path, capsys):
    assert main(["compare", *map(str, recorded[:2]), "--png", str(tmp_path / "x.png")]) == 2
    assert "paralab compare" in capsys.readouterr().err
