"""Session files: the config (seed included) and a recorded run survive a save and a load;
anything else is a sentence."""

import json
import math

import pytest
from paralab.core.config import RunConfig
from paralab.core.events import RunEnded, RunStarted, StepDone
from paralab.core.session import FORMAT, SessionError, load, save

CFG = RunConfig().with_overrides({"mode": "ddp", "devices": "sim:2", "seed": 7, "train.lr": 0.003})
EVENTS = [RunStarted("ddp", [{"index": 0, "label": "sim0"}], CFG.to_dict()),
          StepDone(1, 0.5, 0.01, 100.0, 0.003, None, 0.02), StepDone(2, float("nan"), 0.02, 100.0),
          RunEnded("ok", "finished 2 steps", None, 0.03, 2)]


def test_config_seed_and_events_round_trip(tmp_path):
    path = tmp_path / "s.json"
    save(path, CFG, EVENTS)
    opened = load(path)
    assert opened.config == CFG and opened.seed == 7
    assert opened.events[0] == EVENTS[0] and opened.events[1] == EVENTS[1] and opened.events[3] == EVENTS[3]
    assert opened.events[2].loss is None or math.isnan(opened.events[2].loss)  # JSON has no NaN
    save(path, CFG)
    assert load(path).events is None and load(path).lesson is None


def test_the_lesson_step_round_trips(tmp_path):
    path = tmp_path / "s.json"
    save(path, CFG, lesson=("pipeline-bubble", 2))
    assert load(path).lesson == ("pipeline-bubble", 2)
    doc = json.loads(path.read_text())
    doc["lesson"] = {"name": "pipeline-bubble", "step": -1}
    path.write_text(json.dumps(doc))
    with pytest.raises(SessionError, match="its lesson entry is damaged"):
        load(path)


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    ("not json", "is not a paralab session"),
    ('{"format": "something-else"}', "is not a paralab session"),
    ('{"event":"start","mode":"single"}\n{"event":"end"}\n', "is an events file, not a session: play it"),
    (json.dumps({"format": FORMAT, "version": 99, "config": {}}), "saved by a newer paralab"),
    (json.dumps({"format": FORMAT, "version": 1, "config": {"bogus": 1}}), "unknown setting 'bogus'"),
    (json.dumps({"format": FORMAT, "version": 1, "config": {}, "events": [{"event": "step"}]}), "cannot be read"),
    (json.dumps({"format": FORMAT, "version": 1, "config": {}, "events": []}), "does not begin with a 'start'"),
])
def test_bad_files_are_a_sentence(tmp_path, content, words):
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SessionError, match=words.replace("(", r"\(")):
        load(path)


def test_hostile_files_are_a_sentence_for_open_and_compare(tmp_path, capsys):
    """The files that config loading is tried with (binary, /dev/zero, 100 000 nested brackets,
    a folder…): `paralab open` and `paralab compare` answer each with one sentence."""
    from paralab.core.cli import main

    from tests.core.test_hostile import _files

    (tmp_path / "f").mkdir()
    good = tmp_path / "good.jsonl"
    good.write_text('{"event":"start","mode":"single","devices":[],"config":{}}\n')
    files = _files(str(tmp_path / "f"))
    (tmp_path / "f" / "deep.json").write_text("[" * 100_000)
    files["deep-json"] = str(tmp_path / "f" / "deep.json")
    for name, path in files.items():
        with pytest.raises(SessionError):
            load(path)
        assert main(["compare", str(good), path]) == 2, name
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
